"""Compatibility with the official 4M (apple/ml-4m): checkpoint conversion and parity checks."""
