"""What the Analysis tab does, testable without a browser: which runs it offers, the ΔM/ΔD plot with its slopes,
and the toy-world scores (subject fidelity, drift, forgetting) of runs trained on ``builtin:toy``."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import yaml

from dreambooth_dora.runs import RunFolder
from dreambooth_dora.tools.analysis import AnalysisError

TOY_BASE = "builtin:toy"
TOY_SAMPLES = 32  # identifier, class and base-world prompts per run: ~1/3 of the quality benchmark's, seconds each
TOY_SEED = 10_000  # the quality benchmark's evaluation seed, so the numbers compare (at its sample count)
TOY_COLUMNS = {  # table header → toy evaluator key
    "subject %": "identifier: subject %",
    "asked background %": "identifier: asked background %",
    "drift %": "class prompt: subject appears % (drift)",
    "base world % before → after": None,  # two keys, see _toy_row
    "forgetting (points)": "forgetting",
}


def _config(run: Path) -> dict | None:
    try:
        cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def analysable_runs(data_dir: Path, busy: set[str]) -> list[tuple[str, str]]:
    """(label, job id) of finished or stopped runs that saved intermediate adapters."""
    out = []
    runs = data_dir / "runs"
    for run in sorted(runs.iterdir() if runs.is_dir() else [], reverse=True):
        if run.name in busy or not any((run / "intermediate").glob("step-*.safetensors")):
            continue
        if (cfg := _config(run)) is None:
            continue
        label = f"{run.name}: {cfg.get('kind', '?')}, {cfg.get('instance_prompt', '')}"
        out.append((label + (" (toy world)" if cfg.get("base_model") == TOY_BASE else ""), run.name))
    return out


def _chosen(data_dir: Path, job_ids: list[str], busy: set[str]) -> list[Path]:
    known = {job_id for _, job_id in analysable_runs(data_dir, busy)}
    chosen = [data_dir / "runs" / j for j in job_ids if j in known]
    if not chosen:
        raise AnalysisError("choose at least one run (runs appear here once they have saved intermediate adapters)")
    return chosen


def run_analysis(data_dir: Path, job_ids: list[str], busy: set[str]) -> tuple[Path, str]:
    """ΔM/ΔD plot of the chosen runs → (png, Markdown with the fitted slopes); AnalysisError on bad input."""
    from dreambooth_dora.tools.analysis import analyze_runs

    chosen = _chosen(data_dir, job_ids, busy)
    out = data_dir / "analysis" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    result = analyze_runs(chosen, out)
    lines = ["| run | kind | slope of ΔM over ΔD | within steps (across layers) |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.kind} | {r.slope:.4g} | {r.within_slope:.4g} |" for r in result.runs]
    lines.append(
        "\nThe DoRA paper finds the slope negative for DoRA and positive for LoRA (§2.2, Fig. 2). The pooled slope"
        " also carries training progress (both grow with steps); the within-step one compares layers at the same step."
    )
    return result.png_path, "\n".join(lines)


def _toy_row(name: str, rates: dict) -> str:
    cells = []
    for key in TOY_COLUMNS.values():
        if key is None:
            before, after = (rates[f"base world: all three % {w} adapter"] for w in ("without", "with"))
            cells.append(f"{before:.0f} → {after:.0f}")
        else:
            cells.append(f"{rates[key]:+.0f}" if key == "forgetting" else f"{rates[key]:.0f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def toy_scores(data_dir: Path, job_ids: list[str], busy: set[str], samples: int = TOY_SAMPLES) -> str:
    """Markdown: the toy evaluator's scores of each chosen run trained on builtin:toy (others are named, not
    measured: the evaluator knows only the toy world). AnalysisError when nothing can be measured."""
    from dreambooth_dora.adapters.inject import remove_adapter
    from dreambooth_dora.adapters.io import load_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline
    from dreambooth_dora.toy.eval import evaluate_forgetting, evaluate_subject

    chosen = _chosen(data_dir, job_ids, busy)
    toy = [run for run in chosen if (_config(run) or {}).get("base_model") == TOY_BASE]
    toy = [run for run in toy if RunFolder(run).adapter_files()]
    others = [run.name for run in chosen if run not in toy]
    if not toy:
        raise AnalysisError(
            f"{', '.join(others)}: not trained on {TOY_BASE} (or no final adapter); the toy evaluator measures only "
            f"the toy world — train on {TOY_BASE} (preset toy_subject) to get these scores"
        )
    pipe = load_pipeline(TOY_BASE)
    lines = ["| run | " + " | ".join(TOY_COLUMNS) + " |", "|---|" + "---:|" * len(TOY_COLUMNS)]
    for run in toy:
        load_adapter(pipe, RunFolder(run).adapter_files()[0], name="measured")
        rates, _ = evaluate_subject(pipe, samples, seed=TOY_SEED)
        rates |= evaluate_forgetting(pipe, samples, seed=TOY_SEED)[0]
        remove_adapter(pipe, "measured")
        lines.append(_toy_row(run.name, rates))
    lines.append(
        f'\n{samples} prompts of each kind, the same seeds for every run. **subject**: "a sks heart on a … background"'
        ' draws the toy subject (green heart, blue stripe); **drift**: "a heart on a … background" draws it too (lower'
        " is better); **forgetting**: the base world's accuracy (background, colour and shape all right on ordinary"
        " prompts) without the adapter minus with it — 0 means nothing was lost."
    )
    if others:
        lines.append(f"\nNot measured (not trained on {TOY_BASE}): {', '.join(others)}.")
    return "\n".join(lines)
