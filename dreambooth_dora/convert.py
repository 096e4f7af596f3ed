"""``python -m dreambooth_dora.convert``: LoRA/DoRA files into the form a destination applies exactly. An entry
point only: the code lives in ``dreambooth_dora.tools.convert``."""

import sys

from dreambooth_dora.tools.convert import ConvertError, convert_adapter, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
