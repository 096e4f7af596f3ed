"""The toy world: procedural scenes, the exact evaluator, and the pretraining of builtin:toy. Nothing outside
toy/ imports it."""
