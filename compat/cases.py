"""The files of the compatibility matrix, the weights each must produce, and where other tools keep those weights.

For one tiny architecture (SD1.x or SDXL layout, text encoders of 3 layers because ComfyUI's SDXL encoders need
layer −2) this writes, with the project's own code: the base as a diffusers folder and as a single-file checkpoint
(``export_merged`` without adapters), and every adapter file kind the project writes — native output-axis DoRA,
kohya input-axis DoRA, kohya output-axis DoRA, plain LoRA native and kohya, SVD LoRA (native and kohya), an
output-axis DoRA converted for ComfyUI/A1111/Forge (``convert --to comfyui``), and the merged checkpoint of the
DoRA. Every case carries the merged weight W' of each adapted layer, computed here by the DoRA formula from the
file's own tensors (independently of ``adapters.layers``), which the readers' patched weights are compared with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dreambooth_dora.adapters.inject import add_adapter, components
from dreambooth_dora.adapters.io import read_adapter_file, save_adapter
from dreambooth_dora.adapters.names import ldm_unet_path, public_path
from dreambooth_dora.adapters.readers import HEADER_KEY, FileForm, written_form
from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl
from dreambooth_dora.sd.ldm import pipeline_to_ldm
from dreambooth_dora.sd.pipelines import load_pipeline
from dreambooth_dora.tools.convert import convert_adapter
from dreambooth_dora.tools.export import export_merged, export_svd_lora
from tests.helpers import perturb

ARCHS = ("sd15", "sdxl")
TEXT_LAYERS = 3
RANK, ALPHA = 4, 6.0  # alpha ≠ rank: a reader that loses alpha shows it
Key = tuple[str, str]  # (component, diffusers module path)


@dataclass
class Case:
    """One file of the matrix. ``truth``: W' per adapted layer (fp32); ``source_truth``: W' of the DoRA the file
    was derived from (SVD, conversion, merge), to state the route's own error."""

    name: str
    arch: str
    path: Path
    form: FileForm
    truth: dict[Key, torch.Tensor]
    base_dir: Path
    checkpoint: Path
    source_truth: dict[Key, torch.Tensor] | None = None
    labels: list[str] = field(default_factory=list)  # the file's own dreambooth_dora.exact_in header


def tiny_pipeline(arch: str):
    """The tiny fixture pipeline with 3-layer text encoders (same seed every call); SDXL's second encoder is 48
    wide, as the real encoders differ in width (768, 1280) — single-file loaders tell them apart by it — with a
    square text projection, as the real one (ComfyUI builds it square)."""
    pipe = build_tiny_sd15() if arch == "sd15" else build_tiny_sdxl()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, wide in (
            ("text_encoder", {}),
            ("text_encoder_2", {"hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}),
        ):
            te = getattr(pipe, name, None)
            if te is not None:
                fields = {**te.config.to_dict(), "num_hidden_layers": TEXT_LAYERS, **wide}
                setattr(pipe, name, type(te)(te.config.__class__(**fields)).eval())
        if arch == "sdxl":
            wider = {"cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 48}
            pipe.unet = type(pipe.unet).from_config({**pipe.unet.config, **wider}).eval()
    pipe.register_modules(
        **{n: getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2") if hasattr(pipe, n)}
    )
    return pipe


def reference_weights(path: Path, base_dir: Path) -> dict[Key, torch.Tensor]:
    """W' = W0 + ΔW (LoRA) or the DoRA of the file's axis, from the file's tensors (parsed by our reader)."""
    pipe = load_pipeline(str(base_dir))
    comps = components(pipe)
    out = {}
    for (comp, mod), lt in read_adapter_file(path, pipe).layers.items():
        w0 = comps[comp].get_submodule(mod).weight.detach().double()
        v = w0 + (lt.alpha / lt.A.shape[0]) * (lt.B.double() @ lt.A.double())
        if lt.m is not None:
            dim = 1 if lt.axis == "out" else 0
            v = v * (lt.m.double() / v.norm(dim=dim)).unsqueeze(dim)
        out[(comp, mod)] = v.float()
    return out


def _labels(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get(HEADER_KEY, "[]"))


def _adapter_file(base_dir: Path, path: Path, kind: str, axis: str, layout: str) -> Path:
    pipe = load_pipeline(str(base_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # lora_A's initialisation: the same files every run
        add_adapter(pipe, kind=kind, rank=RANK, alpha=ALPHA, axis=axis)
    perturb(pipe, seed=3)
    return save_adapter(pipe, path, format=layout)


def make_cases(arch: str, work: Path) -> list[Case]:
    """Write the base and every file kind for ``arch`` under ``work``; return the cases."""
    work.mkdir(parents=True, exist_ok=True)
    base_dir, ckpt = work / "base", work / "base.safetensors"
    if not base_dir.exists():
        tiny_pipeline(arch).save_pretrained(base_dir)
    if not ckpt.exists():
        export_merged(str(base_dir), [], single_file=ckpt, dtype=torch.float32)
    cases = []

    def add(name: str, path: Path, form: FileForm, truth=None, source=None) -> None:
        truth = truth if truth is not None else reference_weights(path, base_dir)
        cases.append(Case(name, arch, path, form, truth, base_dir, ckpt, source, _labels(path)))

    specs = [
        ("native out-axis DoRA", "dora", "out", "native"),
        ("kohya in-axis DoRA", "dora", "in", "kohya"),
        ("kohya out-axis DoRA", "dora", "out", "kohya"),
        ("native LoRA", "lora", "out", "native"),
        ("kohya LoRA", "lora", "out", "kohya"),
    ]
    for name, kind, axis, layout in specs:
        path = work / (name.replace(" ", "_") + ".safetensors")
        if not path.exists():
            _adapter_file(base_dir, path, kind, axis, layout)
        add(name, path, written_form(layout, kind, axis))
    dora = cases[0]
    for layout in ("native", "kohya"):
        path = work / f"svd_lora_{layout}.safetensors"
        if not path.exists():
            export_svd_lora(str(base_dir), dora.path, RANK, path, format=layout)
        add(f"SVD LoRA r{RANK} ({layout})", path, written_form(layout, "lora"), source=dora.truth)
    path = work / "converted_for_comfyui.safetensors"
    if not path.exists():
        convert_adapter(dora.path, path, "comfyui", base=str(base_dir))
    add("out-axis DoRA → convert --to comfyui", path, written_form("kohya", "dora", "in"), source=dora.truth)
    path = work / "merged.safetensors"
    if not path.exists():
        export_merged(str(base_dir), [(dora.path, 1.0)], single_file=path, dtype=torch.float32)
    add("merged checkpoint (of the DoRA)", path, written_form("merged", "model"), truth=dora.truth)
    return cases


# -- where the weights live in other tools' models -------------------------------------------------------------


def ldm_locations(base_dir: Path, arch: str, keys: list[Key]) -> dict[Key, tuple[str, int | None]]:
    """{layer: (single-file checkpoint key, q/k/v chunk or None)}: where our export put each layer's weight."""
    pipe = load_pipeline(str(base_dir))
    state = pipeline_to_ldm(pipe, arch)
    by_pointer = {t.data_ptr(): k for k, t in state.items()}
    out = {}
    for comp, mod in keys:
        w = getattr(pipe, comp).get_submodule(mod).weight
        if w.data_ptr() in by_pointer:
            out[(comp, mod)] = (by_pointer[w.data_ptr()], None)
        else:  # OpenCLIP (SDXL's second encoder) fuses q, k, v into one in_proj_weight
            assert comp == "text_encoder_2", f"{comp}.{mod} has no single-file key"
            layer, leaf = mod.split(".")[-3], mod.rsplit(".", 1)[-1]
            out[(comp, mod)] = (
                f"conditioner.embedders.1.model.transformer.resblocks.{layer}.attn.in_proj_weight",
                "qkv".index(leaf[0]),
            )
    return out


def comfy_locations(base_dir: Path, keys: list[Key]) -> dict[Key, str]:
    """{layer: state-dict key in ComfyUI's (and Forge's) models}: ldm UNet names, HF CLIP names."""
    pipe = load_pipeline(str(base_dir))
    comps = components(pipe)
    out = {}
    for comp, mod in keys:
        if comp == "unet":
            out[(comp, mod)] = f"diffusion_model.{ldm_unet_path(mod, comps['unet'])}.weight"
        else:
            clip = "clip_l" if comp == "text_encoder" else "clip_g"
            out[(comp, mod)] = f"{clip}.transformer.{public_path(comp, comps[comp], mod)}.weight"
    return out


def module_tree(state: dict[str, torch.Tensor], prefix: str) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """An nn.Module whose named_modules are the checkpoint's own paths under ``prefix``: nn.Linear for 2-D
    ``.weight`` tensors, nn.MultiheadAttention for OpenCLIP's ``in_proj_weight``; other tensors are left out.
    Returns the module and {checkpoint key: its parameter} (the weights a tool holding this checkpoint patches)."""
    root = nn.Module()
    params: dict[str, nn.Parameter] = {}
    for key in sorted(k for k in state if k.startswith(prefix)):
        path, _, leaf = key[len(prefix) :].rpartition(".")
        t = state[key]
        if leaf == "in_proj_weight":
            mha = nn.MultiheadAttention(t.shape[1], 1)
            _place(root, path, mha)
            with torch.no_grad():
                mha.in_proj_weight.copy_(t)
                mha.out_proj.weight.copy_(state[f"{prefix}{path}.out_proj.weight"])
            params[key] = mha.in_proj_weight
            params[f"{prefix}{path}.out_proj.weight"] = mha.out_proj.weight
        elif (
            leaf == "weight" and t.ndim == 2 and f"{prefix}{path.removesuffix('.out_proj')}.in_proj_weight" not in state
        ):
            linear = nn.Linear(t.shape[1], t.shape[0], bias=f"{prefix}{path}.bias" in state)
            with torch.no_grad():
                linear.weight.copy_(t)
                if linear.bias is not None:
                    linear.bias.copy_(state[f"{prefix}{path}.bias"])
            _place(root, path, linear)
            params[key] = linear.weight
    return root, params


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        root = root._modules[name]
    root.add_module(leaf, module)
