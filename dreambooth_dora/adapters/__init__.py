"""Adapters: the DoRA/LoRA layer math (layers), injection and switching (inject), adapter files (io) and the key
spellings of every file format (names). Imports nothing above it but runs."""
