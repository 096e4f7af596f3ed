"""Export adapters for tools that cannot load them: a merged full model, or DoRA turned into a plain LoRA.

``export_merged`` bakes adapters (at their strengths) into a base model and writes it as a diffusers folder
and/or one ``.safetensors`` checkpoint in the original Stable Diffusion (ldm) layout that single-file loaders
read (diffusers ``from_single_file``, A1111, ComfyUI; layout in ``ldm_keys``).

``export_svd_lora`` approximates every adapted layer's update Δ = W' − W0 by its best rank-r factorization
(truncated SVD, Eckart–Young): Δ ≈ B'A' with B' = U_r·√S_r (out, r), A' = √S_r·V_rᵀ (r, in), alpha = r (scaling 1),
and writes it as a plain LoRA file, for tools that read LoRA but not DoRA. The relative error per layer is
‖Δ − B'A'‖_F / ‖Δ‖_F = √(Σ_{i>r} S_i²) / √(Σ S_i²).

CLI::

    python -m dreambooth_dora.export merged --base BASE --adapter FILE[:WEIGHT] ... [--out DIR]
        [--single-file FILE.safetensors] [--dtype fp16|bf16|fp32] [--base-config DIR]
    python -m dreambooth_dora.export svd --base BASE --adapter FILE --rank R --out FILE.safetensors
        [--format native|kohya] [--base-config DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from dreambooth_dora import threads
from dreambooth_dora.adapters.inject import AdapterError, adapter_layers, bake_adapters, check_scale
from dreambooth_dora.adapters.io import (
    OUR_KEY,
    atomic_save_file,
    check_adapter_file,
    load_adapter,
    parse_adapter_spec,
    save_adapter,
)
from dreambooth_dora.adapters.readers import HEADER_KEY as READERS_KEY
from dreambooth_dora.adapters.readers import exact_readers, written_form
from dreambooth_dora.sd.ldm import LdmLayoutError, pipeline_to_ldm
from dreambooth_dora.sd.pipelines import DTYPES, ModelLoadError, describe_architecture, load_pipeline, save_pipeline

# Keys of our adapter header that save_adapter writes itself; the rest (trigger phrase, base id, training
# summary) is carried from the DoRA file into the LoRA made from it.
_REGENERATED_METADATA = ("format_version", "kind", "rank", "alpha", "axis", "arch")


class ExportError(ValueError):
    """A user-facing problem with export arguments; the message says what and how to fix it."""


@dataclass(frozen=True)
class ExportReport:
    """What ``export_merged`` wrote. ``layers_baked``: adapted layers folded into the weights."""

    base: str
    arch: str  # "sd15" | "sd2" | "sdxl"
    adapters: tuple[tuple[Path, float], ...]
    layers_baked: int
    dtype: torch.dtype
    out_dir: Path | None
    single_file: Path | None


@dataclass(frozen=True)
class SvdReport:
    """What ``export_svd_lora`` wrote. ``layer_errors``: {"<component>.<module path>": ‖Δ − B'A'‖_F / ‖Δ‖_F}
    (0 for a layer whose Δ is 0); ``overall_error``: √(Σ‖Δ − B'A'‖² / Σ‖Δ‖²) over all layers."""

    out: Path
    rank: int
    layer_errors: dict[str, float]
    overall_error: float

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` layers with the largest relative error, largest first."""
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:n]


# -- argument checks (all before the base model is loaded, so a mistake costs nothing) ---------------------------


def _check_new_file(path: Path, flag: str) -> None:
    if path.suffix != ".safetensors":
        raise ExportError(f"{flag} {str(path)!r} must end in .safetensors (the only format written)")
    if path.exists():
        raise ExportError(f"{flag} {str(path)!r} already exists; choose a new file name or delete it first")


# -- merged full model ------------------------------------------------------------------------------------------


def export_merged(
    base: str,
    adapters: list[tuple[str | os.PathLike, float]],
    out_dir: str | os.PathLike | None = None,
    single_file: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    base_config: str | None = None,
) -> ExportReport:
    """Bake ``adapters`` [(file, strength λ)] into ``base`` — W = W0 + Σ λ_i (W'_i − W0), computed in fp32 —
    and write the result in ``dtype`` (fp16 by default: the size real checkpoints ship in) as a diffusers
    folder ``out_dir`` (new or empty) and/or one ldm-layout checkpoint ``single_file`` (SD1.x, SD2.x, SDXL).

    ``base_config``: a diffusers folder of the same architecture, needed offline when ``base`` is itself a
    single-file checkpoint. Everything is checked and converted before the first byte is written.
    """
    out = Path(out_dir) if out_dir is not None else None
    single = Path(single_file) if single_file is not None else None
    if out is None and single is None:
        raise ExportError(
            "nothing to write: give out_dir (--out, a diffusers folder) and/or single_file (--single-file)"
        )
    if out is not None and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        raise ExportError(f"output folder {str(out)!r} exists and is not empty; choose a new folder")
    if single is not None:
        _check_new_file(single, "single file")
    if dtype not in DTYPES.values():
        raise ExportError(f"dtype {dtype}: choose torch.float16, torch.bfloat16 or torch.float32")
    specs = [(Path(p), s) for p, s in adapters]
    for path, strength in specs:
        check_adapter_file(path)
        check_scale(strength, path.name)

    pipe = load_pipeline(base, config=base_config)  # fp32: the merge is computed at full precision
    for i, (path, strength) in enumerate(specs):
        load_adapter(pipe, path, name=f"adapter_{i}", scale=float(strength))
    arch = describe_architecture(pipe).arch
    baked = bake_adapters(pipe)
    if dtype != torch.float32:
        # diffusers warns on every cast that modules listed in _keep_in_fp32_modules (none in SD) stay fp32.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipe.to(dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    # Built (and checked: every tensor must have an ldm name) before anything is written.
    ldm = {k: v.detach().contiguous() for k, v in pipeline_to_ldm(pipe, arch).items()} if single else None
    if out is not None:
        save_pipeline(pipe, out)
    if single is not None:
        label = next(k for k, v in DTYPES.items() if v == dtype)
        header = {"adapters": [[str(p), s] for p, s in specs], "arch": arch, "base": base, "dtype": label}
        readers = exact_readers(written_form("merged", "model"))
        atomic_save_file(ldm, single, {OUR_KEY: json.dumps(header, sort_keys=True), READERS_KEY: json.dumps(readers)})
    return ExportReport(base, arch, tuple(specs), baked, dtype, out, single)


# -- DoRA → plain LoRA ------------------------------------------------------------------------------------------


@torch.no_grad()
def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ``delta`` (out, in): B' (out, rank), A' (rank, in), ‖Δ − B'A'‖_F, ‖Δ‖_F.

    Ranks beyond min(out, in) are zero-padded, so every layer of a file has the same rank (diffusers reads
    one ``r`` per component from the header).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a, float(s[k:].square().sum().sqrt()), float(s.square().sum().sqrt())


def export_svd_lora(
    base: str,
    adapter: str | os.PathLike,
    rank: int,
    out: str | os.PathLike,
    *,
    format: str = "native",
    base_config: str | None = None,
) -> SvdReport:
    """Write a plain LoRA (``kind="lora"``, alpha = ``rank``) approximating DoRA/LoRA file ``adapter`` on
    ``base`` by a truncated SVD of each layer's fp32 update W' − W0 (``Adapter.merged_delta``, strength 1).

    The LoRA goes through ``save_adapter``, so ``format`` ("native" for diffusers, "kohya" for the kohya readers)
    and the header are the ones every adapter file gets; the source file's own metadata (trigger phrase,
    base model, training summary) is kept, plus an ``svd`` entry. Works for axis="in" DoRA too: the LoRA
    reproduces W' − W0, whichever parametrization produced it.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ExportError(f"rank={rank!r}: must be an integer >= 1 (the LoRA rank to keep; typical 8-64)")
    if format not in ("native", "kohya"):
        raise ExportError(f"format={format!r}: choose 'native' (diffusers/peft) or 'kohya' (ComfyUI/A1111/Forge)")
    src, dst = Path(adapter), Path(out)
    check_adapter_file(src)
    _check_new_file(dst, "output")

    pipe = load_pipeline(base, config=base_config)
    parsed = load_adapter(pipe, src, name="source")
    errors: dict[str, float] = {}
    err_sq = total_sq = 0.0
    for where, (layer, source) in adapter_layers(pipe, "source").items():
        b, a, err, norm = svd_factors(source.merged_delta(layer.weight), rank)
        lora = layer.add("svd", kind="lora", rank=rank, alpha=float(rank))
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        errors[where] = err / norm if norm > 0 else 0.0
        err_sq, total_sq = err_sq + err * err, total_sq + norm * norm
    overall = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    kept = {k: v for k, v in parsed.metadata.items() if k not in _REGENERATED_METADATA}
    kept["svd"] = {"source": src.name, "source_kind": parsed.kind, "rank": rank, "relative_error": overall}
    save_adapter(pipe, dst, name="svd", format=format, metadata=kept)
    return SvdReport(dst, rank, errors, overall)


# -- CLI ----------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same single ``error: …`` line and exit status 2 as every other error."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dreambooth_dora.export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merged = commands.add_parser("merged", help="bake adapters into the base; write a diffusers folder / single file")
    merged.add_argument("--base", required=True, help="builtin:*, a diffusers folder, a .safetensors file, a hub id")
    merged.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="repeatable; strength in [-10, 10], default 1; none: convert the base as it is",
    )
    merged.add_argument("--out", help="new or empty folder for a diffusers pipeline")
    merged.add_argument("--single-file", help="new .safetensors in the original SD layout (A1111, ComfyUI)")
    merged.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    merged.add_argument("--base-config", help="diffusers folder of the same architecture, for single-file bases")
    svd = commands.add_parser("svd", help="DoRA (or LoRA) file → plain LoRA of rank R by truncated SVD")
    svd.add_argument("--base", required=True)
    svd.add_argument("--adapter", required=True, metavar="FILE")
    svd.add_argument("--rank", required=True, type=int)
    svd.add_argument("--out", required=True, metavar="FILE.safetensors")
    svd.add_argument("--format", choices=["native", "kohya"], default="native")
    svd.add_argument("--base-config", help="diffusers folder of the same architecture, for single-file bases")
    for sub in (merged, svd):
        threads.add_argument(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dreambooth_dora.export``; returns the exit status (2 on any error)."""
    args = _parser().parse_args(argv)
    threads.apply(args.threads)
    try:
        if args.command == "merged":
            report = export_merged(
                args.base,
                [parse_adapter_spec(spec) for spec in args.adapter],
                args.out,
                args.single_file,
                dtype=DTYPES[args.dtype],
                base_config=args.base_config,
            )
            for where in (report.out_dir, report.single_file):
                if where is not None:
                    print(f"wrote {where} ({report.arch}, {args.dtype}, {report.layers_baked} layers baked)")
        else:
            report = export_svd_lora(
                args.base, args.adapter, args.rank, args.out, format=args.format, base_config=args.base_config
            )
            print(f"wrote {report.out} (plain LoRA, rank {report.rank}, {len(report.layer_errors)} layers)")
            print("worst layers (relative error ‖Δ − B'A'‖/‖Δ‖):")
            for where, err in report.worst(10):
                print(f"  {err:9.2e}  {where}")
            print(f"overall relative error: {report.overall_error:.3e}")
    except (ExportError, AdapterError, ModelLoadError, LdmLayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
