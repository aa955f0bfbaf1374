"""Tests of saelib.core (the SAE, its training, losses, metrics and saves)."""
