"""``python -m dreambooth_dora.generate``: images from a base and adapters. An entry point only: the code lives in
``dreambooth_dora.tools.generate``; this module keeps the command (and the names scripts import from it)."""

import sys

from dreambooth_dora.tools.generate import AdapterChoice, GenerationError, Settings, Studio, main, save_images  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
