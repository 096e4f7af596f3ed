"""How module paths are spelled in adapter files (docs/ARCHITECTURE.md: Adapter files).

Public paths: transformers 5 flattened CLIPTextModel (``encoder.layers.0…``), while every file in the wild,
ComfyUI, A1111 and transformers 4 spell the first text encoder ``text_model.encoder.layers.0…``. Files are
written with the public spelling (stock diffusers on transformers 5 maps it back) and read in either.

Kohya-style names (``lora_unet_…``, ``lora_te_…``), the keys kohya-ss, LyCORIS, ComfyUI, A1111 and Forge look up
(which of them apply a file's DoRA right is ``readers.exact_readers``' business):

Kohya flattens a module path by replacing dots with underscores. SD1.x/2.x files use diffusers' UNet paths;
SDXL files use the original (ldm) UNet layout that kohya's SDXL trainer writes:

    down_blocks.{i}.attentions.{j}.X  ->  input_blocks.{i·(L+1) + j + 1}.1.X
    mid_block.attentions.0.X          ->  middle_block.1.X
    up_blocks.{i}.attentions.{j}.X    ->  output_blocks.{i·(L+1) + j}.1.X       (L = layers_per_block)

Underscores are ambiguous ("transformer_blocks", "to_q"), so names are resolved by building the forward map
from the model and inverting it, never by guessing where the dots were.
"""

from __future__ import annotations

import re

from torch import nn

TEXT_PREFIX = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_TEXT_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")


def _layers_per_block(unet: nn.Module) -> list[int]:
    cfg = unet.config
    n = len(cfg.down_block_types)
    lpb = cfg.layers_per_block
    return list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n


def ldm_unet_path(path: str, unet: nn.Module) -> str | None:
    """The original-SD (ldm) path of a diffusers UNet attention module path, or None if it has none."""
    lpb = _layers_per_block(unet)
    if m := _DOWN.match(path):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        index = 1 + sum(n + 1 for n in lpb[:i]) + j  # +1: input_blocks.0 is conv_in; +1 per level: downsampler
        return f"input_blocks.{index}.1.{rest}"
    if m := _MID.match(path):
        return f"middle_block.1.{m[1]}"
    if m := _UP.match(path):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        up_lpb = list(reversed(lpb))
        index = sum(n + 1 for n in up_lpb[:i]) + j  # up blocks hold layers_per_block + 1 layers
        return f"output_blocks.{index}.1.{rest}"
    return None


def public_path(component: str, module: nn.Module, path: str) -> str:
    """The spelling of ``path`` that files use (adds ``text_model.`` for a flattened CLIP text encoder)."""
    if component != "unet" and not hasattr(module, "text_model"):
        return f"text_model.{path}"
    return path


def model_path(component: str, module: nn.Module, path: str) -> str:
    """Inverse of public_path, also accepting the model's own spelling."""
    if component != "unet" and not hasattr(module, "text_model") and path.startswith("text_model."):
        return path[len("text_model.") :]
    return path


def _flat(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_name(component: str, path: str, module: nn.Module, sdxl: bool) -> str:
    """The kohya key stem for ``component``'s module ``path`` (``module`` is that component, e.g. the UNet)."""
    if component == "unet":
        if sdxl:
            ldm = ldm_unet_path(path, module)
            if ldm is None:
                raise ValueError(
                    f"UNet module {path!r} has no name in kohya's SDXL layout (only attention blocks are mapped); "
                    "export it in the native format instead"
                )
            path = ldm
        return _flat("lora_unet", path)
    prefixes = SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX
    return _flat(prefixes[component], public_path(component, module, path))


# How other tools spell a text encoder in dotted files: OneTrainer's ComfyUI layout names it by architecture.
COMFY_TEXT_PREFIX = {
    "text_encoder": ("text_encoders.clip_l.transformer", "text_encoders.clip_h.transformer"),
    "text_encoder_2": ("text_encoders.clip_g.transformer",),
}


def name_table(components: dict[str, nn.Module], sdxl: bool) -> dict[str, tuple[str, str]]:
    """{key stem: (component, module path)} for every nn.Linear of the model, in every spelling adapter files use:

    kohya (flat): diffusers and ldm paths for the UNet (``lora_unet_…``); ``lora_te`` and ``lora_te1`` for the first
    text encoder (older SDXL exports used ``lora_te``); dotted: ``<component>.<path>`` (diffusers, peft, OneTrainer)
    with or without ``text_model.``, and OneTrainer's ComfyUI layout (``diffusion_model.<ldm path>``,
    ``text_encoders.clip_l.transformer.<path>``)."""
    table: dict[str, tuple[str, str]] = {}
    for comp, module in components.items():
        for path, m in module.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if comp == "unet":
                table[_flat("lora_unet", path)] = table[f"unet.{path}"] = (comp, path)
                if (ldm := ldm_unet_path(path, module)) is not None:
                    table[_flat("lora_unet", ldm)] = table[f"diffusion_model.{ldm}"] = (comp, path)
                continue
            for spelling in {path, public_path(comp, module, path)}:
                table[_flat(TEXT_PREFIX[comp], spelling)] = (comp, path)
                table[_flat(SDXL_TEXT_PREFIX[comp], spelling)] = (comp, path)
                table[f"{comp}.{spelling}"] = (comp, path)
                for prefix in COMFY_TEXT_PREFIX[comp]:
                    table[f"{prefix}.{spelling}"] = (comp, path)
    return table
