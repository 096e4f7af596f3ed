"""Builtin base models that need no download.

``tiny.py`` builds the random, seeded ``builtin:tiny-sd15`` / ``builtin:tiny-sdxl`` pipelines used by
tests; ``tokenizer/`` holds the CLIP vocabulary they share (regenerate with ``make_vocab.py``).
``builtin:toy`` is a trained model stored as a diffusers folder in ``sample_data/`` (see ``TOY_BASE_DIR``);
``dreambooth_dora.models`` loads it like any local folder.
"""

from pathlib import Path

# sample_data/ sits at the repository root, two levels above this package folder.
TOY_BASE_DIR = Path(__file__).resolve().parents[2] / "sample_data" / "toy_base"
TOY_BUILD_COMMAND = "python -m dreambooth_dora.builtin.toy_pretrain --out sample_data/toy_base"
