"""Magnitude and direction of adapter updates (DoRA paper §2.2, Fig. 2) + ``python -m dreambooth_dora.analysis``.

For one adapted linear layer, W0: (out, in) the base weight and W' = W0 + ``Adapter.merged_delta(W0)`` the
adapted weight at strength 1, both fp32, with i running over the ``out`` rows (one row = one output unit):

    ΔM = mean_i | ‖W'_i‖ − ‖W0_i‖ |
    ΔD = mean_i (1 − cos(W'_i, W0_i))

Rows are used whatever the adapter's axis: the paper's W ∈ R^{d×k} maps inputs to outputs as xW, so its
per-column norms are our per-row (per-output-unit) norms. For DoRA with axis="out", ‖W'_i‖ = m_i, so ΔM is
the mean change of the learned magnitude and ΔD the change of direction of V = W0 + s·B·A; an axis="in"
adapter is measured by the same rows, so runs of either axis are compared on one scale. 1 − cos is
computed as ½‖W'_i/‖W'_i‖ − W0_i/‖W0_i‖‖²: the same number without the fp32 cancellation of 1 − cos at the
tiny angles of early steps, and exactly 0 when W' = W0 (a row that is zero on one side only, whose direction
is undefined, contributes ½).

``analyze_runs`` measures every intermediate adapter a training run saved (``save_intermediate_every: N``
writes ``output_dir/intermediate/step-NNNNNN.safetensors``), writes the numbers as a CSV and plots ΔM against
ΔD, one panel per run, with the least-squares slope: the paper finds it negative for DoRA (large direction
changes come with small magnitude changes and vice versa, as in full fine-tuning) and positive for LoRA
(both change together).

Two slopes per run: the pooled one fits every (layer, step) point at once, so it also carries training progress
(both ΔM and ΔD grow with steps, which pushes it positive for every method); the within-step one first removes
each step's mean ΔD and ΔM, so it compares layers with each other at the same point of training — the trade-off
the paper describes.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dreambooth_dora import threads
from dreambooth_dora.adapters.inject import AdapterError, adapter_layers, remove_adapter
from dreambooth_dora.adapters.io import load_adapter
from dreambooth_dora.adapters.layers import KINDS
from dreambooth_dora.runs import RunFolder
from dreambooth_dora.sd.pipelines import ModelLoadError, load_pipeline

_NAME = "analysis"  # the name intermediate adapters are loaded under
_KIND_LABELS = {"dora": "DoRA", "lora": "LoRA", "full": "full fine-tuning"}


class AnalysisError(ValueError):
    """A run folder or argument that cannot be analysed; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class LayerStats:
    layer: str  # "<component>.<module path>" (just the module path for a bare nn.Module)
    delta_m: float
    delta_d: float


@dataclass
class RunAnalysis:
    """One run: its stats per saved step (steps ascending) and the fitted slope of ΔM over ΔD (steps > 0)."""

    name: str
    kind: str
    steps: dict[int, list[LayerStats]]
    slope: float  # nan when fewer than two distinct ΔD values are available to fit
    intercept: float
    within_slope: float = float("nan")  # the same fit after removing each step's mean ΔD and ΔM

    def mean_at(self, step: int) -> tuple[float, float]:
        """(ΔM, ΔD) at ``step``, averaged over the layers."""
        stats = self.steps[step]
        return float(np.mean([s.delta_m for s in stats])), float(np.mean([s.delta_d for s in stats]))


@dataclass
class AnalysisResult:
    runs: list[RunAnalysis]
    csv_path: Path
    png_path: Path

    @property
    def slopes(self) -> dict[str, float]:
        return {run.name: run.slope for run in self.runs}

    @property
    def within_slopes(self) -> dict[str, float]:
        return {run.name: run.within_slope for run in self.runs}


@torch.no_grad()
def decomposition_stats(pipe, adapter_name: str) -> list[LayerStats]:
    """ΔM and ΔD (module docstring) of every layer holding adapter ``adapter_name``, in fp32, at strength 1
    whatever the adapter's current scale. ``pipe`` is a pipeline or a bare nn.Module; merged or not."""
    out = []
    for path, (layer, adapter) in adapter_layers(pipe, adapter_name).items():
        w0 = layer.base_weight().detach().float()  # (out, in)
        w1 = w0 + adapter.merged_delta(layer.base_weight())
        delta_m = (w1.norm(dim=1) - w0.norm(dim=1)).abs().mean()
        delta_d = 0.5 * (F.normalize(w1, dim=1) - F.normalize(w0, dim=1)).square().sum(dim=1).mean()
        out.append(LayerStats(path, delta_m.item(), delta_d.item()))
    return out


@dataclass(frozen=True)
class _Run:
    dir: Path
    kind: str
    base_model: str
    base_config: str | None
    files: list[tuple[int, Path]]  # (step, adapter file), steps ascending


def _read_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: not a folder; pass training output folders (the trainer's output_dir)")
    run = RunFolder(run_dir)
    cfg_path = run.config
    if not cfg_path.is_file():
        raise AnalysisError(f"{run_dir}: no {cfg_path.name}; pass a folder written by dreambooth_dora.train")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as err:
        raise AnalysisError(f"{cfg_path}: not valid YAML: {err}") from None
    if not isinstance(cfg, dict) or not cfg.get("base_model") or cfg.get("kind") not in KINDS:
        raise AnalysisError(f"{cfg_path}: needs base_model and kind ({' or '.join(KINDS)}); is it a training config?")
    files = run.intermediate_adapters()
    if not files:
        raise AnalysisError(
            f"{run_dir}: no intermediate adapters (intermediate/step-NNNNNN.safetensors). Train with "
            "`save_intermediate_every: N` (e.g. --set save_intermediate_every=50) to save them every N steps."
        )
    return _Run(run_dir, cfg["kind"], str(cfg["base_model"]), cfg.get("base_config"), files)


def _selected(layer: str, pattern: str | None) -> bool:
    """No pattern: every layer. A glob (``*?[``) matches the whole path; anything else is a substring."""
    if pattern is None:
        return True
    return fnmatch.fnmatchcase(layer, pattern) if any(c in pattern for c in "*?[") else pattern in layer


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _points(run_steps: dict[int, list[LayerStats]], centred: bool) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for step, stats in run_steps.items():
        if step == 0 or not stats:
            continue
        x = np.array([s.delta_d for s in stats], dtype=np.float64)
        y = np.array([s.delta_m for s in stats], dtype=np.float64)
        xs.append(x - x.mean() if centred else x)
        ys.append(y - y.mean() if centred else y)
    return (np.concatenate(xs), np.concatenate(ys)) if xs else (np.zeros(0), np.zeros(0))


def _fit(run_steps: dict[int, list[LayerStats]]) -> tuple[float, float]:
    """Least-squares line ΔM = slope·ΔD + intercept over all layers of all steps > 0."""
    return _line(*_points(run_steps, centred=False))


def within_step_slope(run_steps: dict[int, list[LayerStats]]) -> float:
    """Slope of ΔM on ΔD across layers at the same step: each step's points centred, then one pooled fit."""
    return _line(*_points(run_steps, centred=True))[0]


def analyze_runs(run_dirs: list[Path], out_dir: Path, *, layers: str | None = None) -> AnalysisResult:
    """Measure every intermediate adapter of each run, write ``out_dir/decomposition.csv`` (run, kind, step,
    layer, delta_m, delta_d) and ``out_dir/decomposition.png``; nothing is written when anything fails.

    ``layers`` keeps only matching layer paths (glob on the full path, or substring: "attn1.to_q"). Each
    distinct base is loaded once; adapters are attached one at a time and removed, so the base stays exact.
    """
    run_dirs, out_dir = [Path(d) for d in run_dirs], Path(out_dir)
    if not run_dirs:
        raise AnalysisError("no run folders given; pass one or more training output folders")
    if out_dir.exists() and not out_dir.is_dir():
        raise AnalysisError(f"--out {out_dir}: exists and is not a folder; choose a folder")
    runs = [_read_run(d) for d in run_dirs]  # every folder is checked before any model is loaded
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    steps: list[dict[int, list[LayerStats]]] = [{} for _ in runs]
    bases = dict.fromkeys((r.base_model, r.base_config) for r in runs)
    for base in bases:
        mine = [i for i, r in enumerate(runs) if (r.base_model, r.base_config) == base]
        try:
            pipe = load_pipeline(base[0], config=base[1])
        except ModelLoadError as err:
            where = ", ".join(str(runs[i].dir) for i in mine)
            raise AnalysisError(f"{where}: base_model {base[0]!r} cannot be loaded: {err}") from None
        for i in mine:
            run = runs[i]
            for step, path in run.files:
                try:
                    load_adapter(pipe, path, name=_NAME)
                except AdapterError as err:
                    raise AnalysisError(f"{run.dir}: {err}") from None
                try:
                    stats = decomposition_stats(pipe, _NAME)
                finally:
                    remove_adapter(pipe, _NAME)
                kept = [s for s in stats if _selected(s.layer, layers)]
                if not kept:
                    some = ", ".join(s.layer for s in stats[:4])
                    raise AnalysisError(f"--layers {layers!r} matches no adapted layer of {run.dir}; e.g. {some}")
                steps[i][step] = kept
        del pipe  # free this base before the next one loads
    results = [
        RunAnalysis(n, r.kind, s, *_fit(s), within_step_slope(s)) for n, r, s in zip(names, runs, steps, strict=True)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    result = AnalysisResult(results, out_dir / "decomposition.csv", out_dir / "decomposition.png")
    _write_csv(results, result.csv_path)
    _plot(results, result.png_path, layers)
    return result


def _write_csv(runs: list[RunAnalysis], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "kind", "step", "layer", "delta_m", "delta_d"])
        for run in runs:
            for step, stats in run.steps.items():
                writer.writerows([run.name, run.kind, step, s.layer, s.delta_m, s.delta_d] for s in stats)


def _plot(runs: list[RunAnalysis], path: Path, layers: str | None) -> None:
    """ΔD (x) vs ΔM (y), one panel per run, points coloured by step, the fitted line; step 0 (the origin,
    where every layer starts) is left out like in the fit. Agg canvas: no display, no global pyplot state."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(runs) + 1.2, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    # One colour per saved step: bins centred on the steps (a lone step gets a bin of its own).
    later = sorted({step for run in runs for step in run.steps if step > 0}) or [1]
    edges = np.concatenate([[later[0] - 1], (np.array(later[1:]) + later[:-1]) / 2, [later[-1] + 1]])
    cmap = colormaps["viridis"].resampled(len(later))
    norm = BoundaryNorm(edges, cmap.N)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs, strict=True):
        pts = [(s.delta_d, s.delta_m, step) for step, stats in run.steps.items() if step > 0 for s in stats]
        x, y, c = np.array(pts, dtype=np.float64).reshape(-1, 3).T
        scatter = ax.scatter(x, y, c=c, cmap=cmap, norm=norm, s=14, alpha=0.8, edgecolors="none")
        fit = "slope n/a (needs two distinct ΔD values)"
        if np.isfinite(run.slope):
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, run.slope * xs + run.intercept, color="crimson", lw=1.5, label="least squares")
            ax.legend(loc="best", fontsize="small")
            fit = f"slope {run.slope:+.3g}, within steps {run.within_slope:+.3g}"
        label = _KIND_LABELS[run.kind]
        name = label if run.name.lower() == run.kind else f"{run.name} ({label})"
        ax.set_title(f"{name}\n{fit}", fontsize="medium")
        ax.set_xlabel("ΔD = mean(1 − cos(W′ᵢ, W0ᵢ))")
        ax.set_ylabel("ΔM = mean |‖W′ᵢ‖ − ‖W0ᵢ‖|")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True)
        ax.grid(alpha=0.3)
    fig.colorbar(scatter, ax=list(axes), label="training step", ticks=later[:: max(1, len(later) // 10)])
    fig.suptitle(f"Magnitude vs direction updates per layer ({'layers: ' + layers if layers else 'all layers'})")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """``python -m dreambooth_dora.analysis RUN_DIR [RUN_DIR ...] --out DIR [--layers PATTERN]``; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth_dora.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="training output folders")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the CSV and PNG")
    parser.add_argument("--layers", metavar="PATTERN", help='only matching layers: substring or glob ("attn1.to_q")')
    threads.add_argument(parser)
    args = parser.parse_args(argv)
    threads.apply(args.threads)
    try:
        result = analyze_runs(args.runs, args.out, layers=args.layers)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'run':<24} {'kind':<5} {'steps':>5} {'slope':>11} {'within':>11} {'ΔM last':>11} {'ΔD last':>11}")
    for run in result.runs:
        last = max(run.steps)
        dm, dd = run.mean_at(last)
        print(
            f"{run.name:<24} {run.kind:<5} {len(run.steps):>5} {run.slope:>11.4g} {run.within_slope:>11.4g} "
            f"{dm:>11.4g} {dd:>11.4g}"
        )
    print(f"wrote {result.csv_path}\nwrote {result.png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
