"""Tests of saelib.data (toy hierarchies and the text corpus)."""
