"""Generated images as PNG files that carry how they were made: the A1111-style ``parameters`` text that image
viewers and UIs read, and the same facts as JSON under ``dreambooth_dora``."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth_dora.runs import atomic_path


def png_info(params: dict) -> PngInfo:
    """Text chunks for ``params``: prompt, negative_prompt, steps, scheduler, guidance, seed, width, height, base,
    adapters [{file, strength}], mode (any further keys go into the JSON only)."""
    info = PngInfo()
    loras = ", ".join(f"{a['file']}:{a['strength']:g}" for a in params.get("adapters", [])) or "none"
    info.add_text(
        "parameters",
        f"{params['prompt']}\nNegative prompt: {params.get('negative_prompt') or ''}\n"
        f"Steps: {params['steps']}, Sampler: {params['scheduler']}, CFG scale: {params['guidance']:g}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, Model: {params['base']}, "
        f"Adapters: {loras}, Mode: {params['mode']}",
    )
    info.add_text("dreambooth_dora", json.dumps(params, sort_keys=True, default=str))
    return info


def save_png(image: Image.Image, path: Path, params: dict) -> Path:
    """Write ``image`` with its parameters, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(params))
    return path
