"""``python -m dreambooth_dora.export``: merged checkpoints and SVD LoRAs. An entry point only: the code lives in
``dreambooth_dora.tools.export``; this module keeps the command (and the names scripts import from it)."""

import sys

from dreambooth_dora.tools.export import ExportError, export_merged, export_svd_lora, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
