"""Stable Diffusion bases: loading and exporting pipelines (pipelines), the original single-file layout (ldm), the
tiny random test models and their tokenizer (fixtures, vocab)."""
