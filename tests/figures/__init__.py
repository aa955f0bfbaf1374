"""Tests of saelib.figures (plotting and saved figures)."""
