"""Tools that use trained adapters: generation, export (merged models, SVD LoRAs) and the magnitude/direction
analysis."""
