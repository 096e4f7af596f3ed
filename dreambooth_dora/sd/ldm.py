"""diffusers → original Stable Diffusion (ldm) checkpoint layout, for single-file exports.

The inverse of what ``diffusers/loaders/single_file_utils.py`` reads (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), i.e. the
layout single-file loaders (diffusers ``from_single_file``, A1111, ComfyUI) expect:

    model.diffusion_model.*                          UNet      input_blocks / middle_block / output_blocks
    first_stage_model.*                              VAE       attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1)
    cond_stage_model.transformer.text_model.*        SD1.x     OpenAI CLIP: same names as transformers
    cond_stage_model.model.*                         SD2.x     OpenCLIP (below)
    conditioner.embedders.0.transformer.text_model.* SDXL      first encoder, OpenAI CLIP
    conditioner.embedders.1.model.*                  SDXL      second encoder, OpenCLIP (below)

OpenCLIP differs from transformers' CLIP: ``resblocks.N`` for ``encoder.layers.N``; q/k/v fused into one
``attn.in_proj_weight`` (3·hidden, hidden) in q, k, v order; ``ln_1/ln_2``, ``mlp.c_fc/c_proj``,
``positional_embedding`` (no ``.weight``), ``ln_final``; ``text_projection`` stored as (hidden, proj), the
transpose of the nn.Linear weight, because OpenCLIP computes ``x @ text_projection``.

UNet indices, with L = layers_per_block (ldm numbers every sub-layer of a level consecutively):

    down_blocks.i.{resnets,attentions}.j   →  input_blocks.{1 + i·(L+1) + j}.{0,1}     (input_blocks.0 is conv_in)
    down_blocks.i.downsamplers.0.conv      →  input_blocks.{(i+1)·(L+1)}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1  →  middle_block.0 / 1 / 2
    up_blocks.i.{resnets,attentions}.j     →  output_blocks.{i·(L+1) + j}.{0,1}
    up_blocks.i.upsamplers.0.conv          →  output_blocks.{i·(L+1) + L}.{2 with attention, else 1}.conv

Every tensor of every component must find a name, or ``LdmLayoutError`` lists the ones that did not: a
partially written checkpoint would load with silently random layers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd15": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
}

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL size/crop + pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down|up)_blocks\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_VAE_BLOCK = re.compile(
    r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)$"
)
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class LdmLayoutError(ValueError):
    """The model has tensors the original Stable Diffusion layout has no name for."""


def _rename(rest: str, table: dict[str, str]) -> str:
    """Rename the leading sub-module of ``rest`` ("norm1.weight" → "in_layers.0.weight") via ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_key(key: str, lpb: int, up_has_attention: list[bool]) -> str | None:
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if m := _BLOCK.match(key):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = (1 if side == "down" else 0) + i * (lpb + 1) + j
        rest = _rename(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := _SAMPLER.match(key):
        i, rest = int(m[2]), m[3]
        if m[1] == "down":
            return f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{rest}"
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attention[i] else 1}.conv.{rest}"
    if m := _MID.match(key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.{1 + j}.{rest}"
        return f"middle_block.{2 * j}.{_rename(rest, _UNET_RESNET)}"
    return None


def unet_to_ldm(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict under ldm names (without the ``model.diffusion_model.`` prefix)."""
    lpb = unet.config.layers_per_block
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise LdmLayoutError(f"layers_per_block={list(lpb)} varies per block; the ldm layout needs one value")
        lpb = lpb[0]
    up_has_attention = [hasattr(block, "attentions") for block in unet.up_blocks]
    return _convert(unet.state_dict(), "UNet", lambda k: _unet_key(k, int(lpb), up_has_attention))


def _vae_key(key: str, n_up: int) -> str | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    side, _, rest = key.partition(".")
    for plain in ("conv_in.", "conv_out."):
        if rest.startswith(plain):
            return key
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if m := _VAE_BLOCK.match(key):
        i, part, leaf = int(m[2]), m[3], m[5]
        level = i if m[1] == "encoder.down" else n_up - 1 - i  # ldm numbers decoder levels from the bottom
        where = m[1].replace("_blocks", "")
        if m[4] is not None:
            return f"{where}.{level}.block.{m[4]}.{_rename(leaf, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{where}.{level}.{'downsample' if part.startswith('down') else 'upsample'}.{leaf}"
    if m := _VAE_MID.match(key):
        if m[2] == "resnets":
            return f"{side}.mid.block_{int(m[3]) + 1}.{_rename(m[4], {'conv_shortcut': 'nin_shortcut'})}"
        return f"{side}.mid.attn_{int(m[3]) + 1}.{_rename(m[4], _VAE_ATTENTION)}"
    return None


def vae_to_ldm(vae: nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's state dict under ldm names; attention projections reshaped (C, C) → (C, C, 1, 1) convs."""
    n_up = len(vae.config.up_block_types)
    out = _convert(vae.state_dict(), "VAE", lambda k: _vae_key(k, n_up))
    for key, t in out.items():
        if ".attn_" in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and t.ndim == 2:
            out[key] = t[:, :, None, None]
    return out


def clip_to_ldm(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI-CLIP layout: transformers' own names under ``text_model.`` (transformers 5 dropped that level
    from CLIPTextModel; every checkpoint in the wild keeps it)."""
    state = encoder.state_dict()
    if "text_projection.weight" in state:
        raise LdmLayoutError("this CLIP text encoder has a text_projection, which the OpenAI-CLIP slot cannot hold")
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def open_clip_to_ldm(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2.x encoder, SDXL's second encoder): fused q/k/v, transposed text_projection."""
    state = {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
        for k, v in encoder.state_dict().items()
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, t in state.items():
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.t()  # (proj, hidden) Linear weight → (hidden, proj) matrix
        elif (m := _CLIP_LAYER.match(key)) and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2].removeprefix("self_attn.")[0]] = t
        elif (m := _CLIP_LAYER.match(key)) and m[2] in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = t
        else:
            unmapped.append(key)
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"text_model.encoder.layers.{layer}.self_attn.*_proj.{leaf} (incomplete q/k/v)")
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    _refuse_unmapped("OpenCLIP text encoder", unmapped)
    return out


def _convert(state: dict[str, torch.Tensor], what: str, name) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, t in state.items():
        new = name(key)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise LdmLayoutError(f"{what}: two tensors map to the ldm key {new!r}; this layout is not supported")
        else:
            out[new] = t
    _refuse_unmapped(what, unmapped)
    return out


def _refuse_unmapped(what: str, unmapped: list[str]) -> None:
    if unmapped:
        shown = ", ".join(unmapped[:6]) + (f" … ({len(unmapped)} in all)" if len(unmapped) > 6 else "")
        raise LdmLayoutError(
            f"{what} has tensors with no name in the original Stable Diffusion layout: {shown}. Export a "
            "diffusers folder (--out) instead; single files cover standard SD1.x, SD2.x and SDXL models."
        )


def pipeline_to_ldm(pipe, arch: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as one ldm-layout state dict; ``arch`` is ``"sd15"``, ``"sd2"`` or ``"sdxl"``
    (``models.describe_architecture``). Tensors are views of the model's own (not copies)."""
    if arch not in TEXT_PREFIXES:
        raise LdmLayoutError(f"architecture {arch!r} has no single-file layout here (expected sd15, sd2 or sdxl)")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae).items()})
    for component, (prefix, layout) in TEXT_PREFIXES[arch].items():
        encoder = getattr(pipe, component, None)
        if encoder is None:
            raise LdmLayoutError(
                f"{arch} pipeline without {component} (an SDXL refiner?): its single-file layout is not supported"
            )
        converted = clip_to_ldm(encoder) if layout == "clip" else open_clip_to_ldm(encoder)
        out.update({prefix + k: v for k, v in converted.items()})
    return out
