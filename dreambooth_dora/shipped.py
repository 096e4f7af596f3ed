"""Where the data this project ships lives — presets, sample images, the toy base model — resolved in one place.

In a checkout these are the folders at the repository root (``training_configs/``, ``sample_data/``). An
installed package (``pip install .``) carries the same folders inside itself, under ``dreambooth_dora/_shipped/``
(pyproject.toml maps them there). The package's own files (the tiny models' tokenizer) sit beside their module.

Imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The folder that holds the package: what a worker process needs on its path to import it.
PACKAGE_PARENT = PACKAGE_DIR.parent


def _shipped(name: str) -> Path:
    """The installed copy of a shipped folder if there is one, else the checkout's (absent folders still get
    the checkout path, so that errors name the place a reader of the repository would look)."""
    installed = PACKAGE_DIR / "_shipped" / name
    return installed if installed.is_dir() else PACKAGE_PARENT / name


PRESETS_DIR = _shipped("training_configs")
SAMPLE_DATA_DIR = _shipped("sample_data")
TOY_BASE_DIR = SAMPLE_DATA_DIR / "toy_base"  # builtin:toy, a standard diffusers folder
TOY_SUBJECT_DIR = SAMPLE_DATA_DIR / "toy_subject"  # the toy subject's five images and captions
SMOKE_SUBJECT_DIR = SAMPLE_DATA_DIR / "smoke_subject"  # four images for the tiny smoke preset
TOY_BUILD_COMMAND = "python -m dreambooth_dora.toy.pretrain --out sample_data/toy_base"
