"""Tests of saelib.lm (language models and activation harvesting)."""
