"""Known-harmless notices of the libraries we use, kept off a command's screen so a newcomer sees what matters.

Each entry names the library logger that emits it and the start of the message; nothing else is touched, and a
user's own logging configuration still sees every other record. Filters sit on the emitting loggers themselves,
so they must be installed before the library is imported (the commands do it first thing, see
dreambooth_dora/__init__.py and app.py).

Imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import logging

# (logger name, text the message contains, why it is harmless here)
KNOWN = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional faster CPU kernel; bitsandbytes falls back to its own",
    ),
    (
        "transformers.utils.import_utils",
        "requires torchvision (not installed); falling back to",
        "image processors of models we never load (CLIP, Siglip); the PIL fallback would serve anyway",
    ),
)


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Install the filters (idempotent)."""
    for name, text, _why in KNOWN:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
