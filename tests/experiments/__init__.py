"""Tests of saelib.experiments (absorption, hedging, claims, sparse MLPs and the other experiments)."""
