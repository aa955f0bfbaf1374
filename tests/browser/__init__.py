"""The notebooks' widgets in a real browser (run by make test-browser only)."""
