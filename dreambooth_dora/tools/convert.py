"""Convert LoRA/DoRA files into the form a destination applies exactly (docs/ARCHITECTURE.md: Adapter files).

Reads every layout ``adapters.io.read_adapter_file`` reads (native, diffusers, peft, kohya/LyCORIS of either
axis, 1-D or 2-D ``dora_scale``, ai-toolkit, OneTrainer) and writes the form ``adapters.readers`` says the
destination reads right:

  --to diffusers            native keys; DoRA on the output axis
  --to comfyui|a1111|forge  kohya keys; DoRA on the input axis (their output-axis branch computes other weights)
  --to kohya                kohya keys, the axis kept (input axis: the tools above; output axis: LyCORIS)

A plain LoRA, or a DoRA already on the destination's axis, is rewritten exactly (only key spellings, the
magnitude's shape and the header change; no base model needed when the keys are dotted). A DoRA on the other
axis cannot be rewritten exactly: its merged weight W' = W0 + (W' − W0) is re-fitted per layer by a DoRA of the
destination's axis (``fit_dora``: alternating least squares, magnitude closed-form per column/row, direction by a
truncated SVD; never worse than the plain SVD LoRA of the same rank, which is its first iterate). That needs the
base weights W0, and the error is printed per layer and overall, relative to the update ‖W' − W0‖.

CLI::

    python -m dreambooth_dora.convert IN.safetensors OUT.safetensors --to diffusers|comfyui|a1111|forge|kohya
        [--base MODEL] [--rank R] [--base-config DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

from dreambooth_dora.adapters.inject import AdapterError, components
from dreambooth_dora.adapters.io import (
    AdapterFile,
    LayerTensors,
    check_adapter_file,
    read_adapter_file,
    write_adapter,
)
from dreambooth_dora.adapters.layers import Adapter
from dreambooth_dora.adapters.readers import (
    DESTINATIONS,
    LABELS,
    exact_readers,
    readers_text,
    written_form,
)
from dreambooth_dora.sd.pipelines import ModelLoadError, load_pipeline
from dreambooth_dora.tools.export import _Parser  # one `error: …` line and exit status 2 for usage mistakes

TARGETS = (*DESTINATIONS, "kohya")
_LAYOUT = {"diffusers": "native", "comfyui": "kohya", "a1111": "kohya", "forge": "kohya", "kohya": "kohya"}
_AXIS = {"diffusers": "out", "comfyui": "in", "a1111": "in", "forge": "in"}  # DoRA axis each destination reads
# Our header keys write_adapter regenerates; the rest (trigger phrase, base id, training summary) is carried over.
_REGENERATED = ("format_version", "kind", "rank", "alpha", "axis", "arch")


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert_adapter`` wrote. ``layer_errors``: {"<component>.<path>": ‖W'' − W'‖_F / ‖W' − W0‖_F} of
    re-fitted layers (empty for an exact conversion); ``overall_error``: the same pooled over all layers."""

    out: Path
    layout: str
    kind: str
    axis: str | None
    readers: tuple[str, ...]
    refit: bool
    layer_errors: dict[str, float]
    overall_error: float
    notes: tuple[str, ...]

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:n]


# -- the fit ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_dora(
    w0: torch.Tensor, target: torch.Tensor, rank: int, axis: str, iters: int = 30, tol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A DoRA (A (r, in), B (out, r), m, alpha = r) on ``axis`` whose merged weight approximates ``target`` (W').

    For axis "in": W'' = V·diag(g) with V = W0 + BA and one free scale g_j per column. For fixed g the best V is
    W0 + the rank-r SVD of (W'·diag(1/g) − W0) weighted by g (exact: substitute A' = A·diag(g)); for fixed V the best
    g_j is ⟨V_j, W'_j⟩/‖V_j‖². Starting from g = 1 (the first iterate is the SVD LoRA of W' − W0 with the best
    magnitude), each step lowers ‖W'' − W'‖. axis "out" is the same on the transposes. m = g·‖V‖ per column (row).
    Returns A, B, m and ‖W'' − W'‖_F.
    """
    w0, target = w0.float(), target.float()
    if axis == "out":
        a_t, b_t, m, err = fit_dora(w0.t(), target.t(), rank, "in", iters, tol)
        return b_t.t().contiguous(), a_t.t().contiguous(), m, err
    g = torch.ones(w0.shape[1])
    best = None
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(target - w0 * g, full_matrices=False)  # rank-r part of (W' − W0·diag(g))
        k = min(rank, s.numel())
        b = torch.zeros(w0.shape[0], rank)
        a = torch.zeros(rank, w0.shape[1])
        b[:, :k] = u[:, :k] * s[:k].sqrt()
        a[:k] = s[:k, None].sqrt() * vh[:k] / g  # A = A'·diag(1/g)
        v = w0 + b @ a
        g = ((v * target).sum(0) / v.square().sum(0).clamp_min(1e-30)).clamp_min(1e-12)
        err = float((v * g - target).norm())
        if best is not None and best[3] - err <= tol * max(best[3], 1e-30):
            best = (a, b, g * v.norm(dim=0), err) if err < best[3] else best
            break
        best = (a, b, g * v.norm(dim=0), err)
    return best


def _merged_delta(w0: torch.Tensor, lt: LayerTensors) -> torch.Tensor:
    """W' − W0 of one parsed layer, by the layer math of ``adapters.layers`` (fp32)."""
    adapter = Adapter(w0, kind=lt.kind, rank=int(lt.A.shape[0]), alpha=lt.alpha, axis=lt.axis)
    with torch.no_grad():
        adapter.lora_A.copy_(lt.A.float())
        adapter.lora_B.copy_(lt.B.float())
        if lt.m is not None:
            adapter.magnitude.copy_(lt.m.float())
    return adapter.merged_delta(w0)


def refit_layers(
    parsed: AdapterFile, comps: dict[str, nn.Module], axis: str, rank: int | None
) -> tuple[dict[tuple[str, str], LayerTensors], dict[str, float], float]:
    """Every DoRA layer of ``parsed`` re-fitted on ``axis`` (``fit_dora``) against the weights of ``comps``.
    Returns the new layers, per-layer errors relative to ‖W' − W0‖ and the pooled error."""
    layers, errors, err_sq, total_sq = {}, {}, 0.0, 0.0
    for (comp, mod), lt in parsed.layers.items():
        w0 = comps[comp].get_submodule(mod).weight.detach().float()
        delta = _merged_delta(w0, lt)
        r = rank or int(lt.A.shape[0])
        a, b, m, err = fit_dora(w0, w0 + delta, r, axis)
        layers[(comp, mod)] = LayerTensors(a, b, m, float(r), axis)
        norm = float(delta.norm())
        errors[f"{comp}.{mod}"] = err / norm if norm > 0 else 0.0
        err_sq, total_sq = err_sq + err * err, total_sq + norm * norm
    return layers, errors, math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0


# -- reading without a base: a skeleton of the layers the file names ---------------------------------------------


class _Skeleton(nn.Module):
    """Stands in for a model component when no base is given: the file's own layers, on the meta device."""


def _skeleton(path: Path) -> SimpleNamespace:
    """Components holding an nn.Linear (meta) at every dotted layer path of the file, sized from its A and B.

    Only dotted layouts (``unet.…``, ``text_encoder.…``) name their layers without the model; kohya names
    (``lora_unet_…``) need the model's module table to be read, so they need a base."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_", "base_model.", "diffusion_model.")) for k in shapes):
        raise ConvertError(
            f"{path.name} names its layers the kohya / peft / ComfyUI way, which only the model can resolve: add "
            "--base MODEL (the base it was trained on: builtin:…, a diffusers folder or a .safetensors checkpoint)"
        )
    dims: dict[str, list[int]] = {}
    for key, shape in shapes.items():
        for slot, (suffix, index) in enumerate(((".lora_A.weight", 1), (".lora_B.weight", 0))):  # [in, out]
            if key.endswith(suffix) and len(shape) == 2:
                dims.setdefault(key[: -len(suffix)], [0, 0])[slot] = shape[index]
    roots: dict[str, _Skeleton] = {}
    for stem, (in_f, out_f) in dims.items():
        comp, _, mod = stem.partition(".")
        mod = mod.removeprefix("base_model.model.")  # a PeftModel's state dict saved under a component
        if comp not in ("unet", "text_encoder", "text_encoder_2") or not mod or not in_f or not out_f:
            continue
        parent = roots.setdefault(comp, _Skeleton())
        *parents, leaf = mod.split(".")
        for name in parents:
            parent = parent._modules.setdefault(name, _Skeleton())
        parent._modules[leaf] = nn.Linear(in_f, out_f, bias=False, device="meta")
    if "unet" in roots:
        roots["unet"].config = SimpleNamespace(**_unet_config(dims))
    return SimpleNamespace(**roots)


def _unet_config(dims: dict[str, list[int]]) -> dict:
    """What the name mapping reads from a UNet config: blocks, attention layers per block, cross-attention dim."""
    downs = [s.split(".") for s in dims if s.startswith("unet.down_blocks.") and ".attentions." in s]
    blocks = max((int(p[2]) for p in downs), default=-1) + 1
    per_block = max((int(p[4]) for p in downs), default=0) + 1
    cross = next((d[0] for s, d in dims.items() if s.startswith("unet.") and s.endswith("attn2.to_k")), None)  # in
    return {
        "down_block_types": ["CrossAttnDownBlock2D"] * max(blocks, 1),
        "layers_per_block": per_block,
        "cross_attention_dim": cross,
        "addition_embed_type": None,
    }


# -- the conversion ----------------------------------------------------------------------------------------------


def _check_args(src: Path, dst: Path, to: str, rank) -> None:
    if to not in TARGETS:
        raise ConvertError(
            f"--to {to!r}: choose one of {', '.join(TARGETS)} (the program that will load the file; kohya: the "
            "kohya layout keeping the DoRA axis)"
        )
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConvertError(f"--rank {rank!r}: must be an integer >= 1 (the rank of a re-fitted adapter; typical 8-64)")
    if dst.suffix != ".safetensors":
        raise ConvertError(f"output {str(dst)!r} must end in .safetensors (the only format written)")
    if dst.exists():
        raise ConvertError(f"output {str(dst)!r} already exists; choose a new file name or delete it first")
    if dst.resolve() == src.resolve():
        raise ConvertError("the output would overwrite the input; choose a new file name")
    check_adapter_file(src)


def convert_adapter(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str,
    *,
    base: str | None = None,
    rank: int | None = None,
    base_config: str | None = None,
) -> ConvertReport:
    """Write ``src`` as ``out`` in the form destination ``to`` applies exactly (re-fitting the DoRA axis when it
    has to, which needs ``base``). Every check runs before anything is written; the file appears whole or not."""
    src, dst = Path(src), Path(out)
    _check_args(src, dst, to, rank)
    model = load_pipeline(base, config=base_config) if base is not None else _skeleton(src)
    parsed = read_adapter_file(src, model)
    comps = components(model)
    source_axis = next((lt.axis for lt in parsed.layers.values() if lt.m is not None), None)
    axis = _AXIS.get(to, source_axis) if parsed.kind == "dora" else None
    refit = parsed.kind == "dora" and axis != source_axis
    notes = [*parsed.notes, f"{src.name} is applied exactly by: {readers_text(exact_readers(parsed.form))}"]
    if refit and base is None:
        raise ConvertError(
            f"{src.name} is an axis='{source_axis}' DoRA and {LABELS.get(to, to)} applies only axis='{axis}' "
            "DoRA exactly: the conversion re-fits every layer against the base weights W0 — add --base MODEL "
            "(the base it was trained on)"
        )
    if refit:
        layers, errors, overall = refit_layers(parsed, comps, axis, rank)
    else:
        layers, errors, overall = dict(parsed.layers), {}, 0.0
        if rank is not None:
            notes.append(f"--rank {rank} ignored: this conversion is exact and keeps the file's own ranks")
    layout = _LAYOUT[to]
    kept = {k: v for k, v in parsed.metadata.items() if k not in _REGENERATED}
    first = next(iter(layers.values()))
    kept["converted"] = {"source": src.name, "to": to, "refit": refit, "relative_error": overall}
    ours = {"kind": parsed.metadata.get("kind", parsed.kind), "rank": int(first.A.shape[0]), "alpha": first.alpha}
    write_adapter(layers, comps, dst, layout, {**ours, **kept, "axis": axis or "out"})
    readers = exact_readers(written_form(layout, parsed.kind, axis))
    return ConvertReport(dst, layout, parsed.kind, axis, readers, refit, errors, overall, tuple(notes))


# -- CLI ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dreambooth_dora.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="IN", help="a LoRA/DoRA .safetensors file (any layout this project reads)")
    p.add_argument("out", metavar="OUT", help="a new .safetensors file")
    p.add_argument("--to", required=True, metavar="|".join(TARGETS), help="the program that will load OUT")
    p.add_argument("--base", help="the base model (needed to change a DoRA's axis and to read kohya names)")
    p.add_argument("--rank", type=int, help="rank of a re-fitted DoRA (default: the file's own)")
    p.add_argument("--base-config", help="diffusers folder of the same architecture, for single-file bases")
    return p


def _print_report(report: ConvertReport) -> None:
    kind = report.kind if report.axis is None else f"{report.kind}, axis={report.axis}"
    print(f"wrote {report.out} ({report.layout} layout, {kind}); applied exactly by: {readers_text(report.readers)}")
    for note in report.notes:
        print(f"note: {note}")
    if not report.refit:
        print("exact conversion: same merged weights as the input")
        return
    print("re-fitted on the other DoRA axis; worst layers (relative error ‖W'' − W'‖/‖W' − W0‖):")
    for where, err in report.worst(10):
        print(f"  {err:9.2e}  {where}")
    print(f"overall relative error: {report.overall_error:.3e} (0 = exact; a merged checkpoint is exact)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dreambooth_dora.convert``; returns the exit status (2 on any error)."""
    args = _parser().parse_args(argv)
    try:
        report = convert_adapter(
            args.src, args.out, args.to, base=args.base, rank=args.rank, base_config=args.base_config
        )
    except (ConvertError, AdapterError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0
