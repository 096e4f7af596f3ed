"""Readers that are Python libraries: this project, stock diffusers, peft and LyCORIS (``lycoris-lora``).

Each reader loads a case's file with that library's own loading code onto a fresh base and returns the weight
its patched layers compute, per adapted layer. Layers are probed through their forward (W = layer(I) − layer(0)),
so a reader is measured by what it computes, whether it merged the weights or patched the forward.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from compat.cases import Case, Key, ldm_locations, module_tree
from dreambooth_dora.adapters.inject import components, merge_adapters
from dreambooth_dora.adapters.io import load_adapter
from dreambooth_dora.sd.pipelines import load_pipeline


class NotApplicable(Exception):
    """The reader does not read files of this kind at all (e.g. peft and kohya keys)."""


@torch.no_grad()
def probe(module: nn.Module, in_features: int) -> torch.Tensor:
    """The (out, in) weight a linear-like module applies: module(I) − module(0), transposed."""
    eye = torch.eye(in_features)
    return (module(eye) - module(torch.zeros(1, in_features))).t().float()


def _probe_all(pipe, keys: list[Key]) -> dict[Key, torch.Tensor]:
    comps = components(pipe)
    return {(c, m): probe(comps[c].get_submodule(m), _in_features(comps[c].get_submodule(m))) for c, m in keys}


def _in_features(module: nn.Module) -> int:
    return getattr(module, "in_features", None) or module.base_layer.in_features


def _is_merged_file(case: Case) -> bool:
    return case.form.layout == "merged"


def read_ours(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
    """dreambooth_dora: load_adapter + merge_adapters (the merged weights), or the single file as a base."""
    if _is_merged_file(case):
        pipe = load_pipeline(str(case.path), config=str(case.base_dir))
    else:
        pipe = load_pipeline(str(case.base_dir))
        load_adapter(pipe, case.path)
        merge_adapters(pipe)
    comps = components(pipe)
    return {(c, m): comps[c].get_submodule(m).weight.detach().float().clone() for c, m in keys}


def read_diffusers(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
    """Stock diffusers: ``pipe.load_lora_weights(file)`` (it converts kohya files itself), or
    ``from_single_file`` for the merged checkpoint."""
    from diffusers import DiffusionPipeline

    if _is_merged_file(case):
        cls = type(DiffusionPipeline.from_pretrained(str(case.base_dir)))
        pipe = cls.from_single_file(str(case.path), config=str(case.base_dir))
    else:
        pipe = DiffusionPipeline.from_pretrained(str(case.base_dir))
        pipe.load_lora_weights(str(case.path))
    return _probe_all(pipe, keys)


def read_peft(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
    """peft on its own: a LoraConfig per component from the file's header (what diffusers passes it),
    ``inject_adapter_in_model`` + ``set_peft_model_state_dict``. Reads only peft/diffusers keys."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    with safe_open(str(case.path), "pt") as f:
        cfg = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    if _is_merged_file(case) or not cfg:
        raise NotApplicable("peft reads its own keys (lora_A/lora_B) with a LoraConfig")
    state = load_file(str(case.path))
    pipe = load_pipeline(str(case.base_dir))
    for comp, module in components(pipe).items():
        fields = {k.split(".", 1)[1]: v for k, v in cfg.items() if k.startswith(comp + ".")}
        if not fields:
            continue
        inject_adapter_in_model(LoraConfig(**fields), module)
        sub = {k[len(comp) + 1 :]: v for k, v in state.items() if k.startswith(comp + ".")}
        if not hasattr(module, "text_model"):  # transformers 5 dropped the text_model level the files keep
            sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        result = set_peft_model_state_dict(module, sub)
        if result.unexpected_keys:
            raise RuntimeError(f"peft did not place {len(result.unexpected_keys)} keys: {result.unexpected_keys[0]}")
    return _probe_all(pipe, keys)


class _TextModel(nn.Module):
    """Gives a transformers-5 CLIP text encoder back the ``text_model.`` level kohya names are built from."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = encoder


def read_lycoris(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
    """LyCORIS' kohya loader: ``create_network_from_weights`` + ``merge_to``. SD1.x on diffusers' UNet; SDXL files
    name the UNet in the original layout (as sd-scripts' SDXL UNet does), so that UNet is the checkpoint's own
    module tree."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    if case.form.layout != "kohya":
        raise NotApplicable("LyCORIS reads kohya keys (lora_unet_…)")
    # Narrowed as sd-scripts does for inference (readers.md): only attention blocks are scanned at creation.
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []
    pipe = load_pipeline(str(case.base_dir))
    comps = components(pipe)
    names = [n for n in ("text_encoder", "text_encoder_2") if n in comps]
    encoders = [comps[n] if hasattr(comps[n], "text_model") else _TextModel(comps[n]) for n in names]
    unet, params = comps["unet"], None
    if case.arch == "sdxl":
        state = load_file(str(case.checkpoint))
        tree, params = module_tree(state, "model.diffusion_model.")
        unet = tree
    te = encoders if len(encoders) > 1 else encoders[0]
    network, weights = create_network_from_weights(1.0, str(case.path), None, te, unet, for_inference=True)
    network.merge_to(te, unet, weights, torch.float32, "cpu")
    out = {}
    where = ldm_locations(case.base_dir, case.arch, keys) if params is not None else {}
    for c, m in keys:
        if c == "unet" and params is not None:
            out[(c, m)] = params[where[(c, m)][0]].detach().float().clone()
        else:
            out[(c, m)] = comps[c].get_submodule(m).weight.detach().float().clone()
    return out


LIBRARIES = {"dreambooth_dora": read_ours, "diffusers": read_diffusers, "peft": read_peft, "lycoris": read_lycoris}
