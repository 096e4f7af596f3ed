"""Compatibility harness: adapter files of this project loaded by other programs' own code (see matrix.py)."""
