"""DreamBooth quality on the toy world: DoRA vs LoRA vs full fine-tuning of the same projections (issue 5).

    python benchmarks/toy_quality.py                       # 3 seeds × {dora, lora, full} × the lr grid
    python benchmarks/toy_quality.py --seeds 0 --steps 100 --samples 16     # a quick look
    python benchmarks/toy_quality.py --kinds dora --axes out in     # DoRA's two norm axes (use_in's choice)

Every run trains training_configs/toy_subject.yaml on builtin:toy (same data, steps, rank, prior preservation),
changing only kind, learning rate and seed, and keeps intermediate adapters for the ΔM/ΔD analysis. Each
trained adapter is then measured with the exact toy evaluator (builtin/toy_eval.py):
  subject fidelity  — identifier prompts "a sks heart on a {bg} background" showing the subject (%);
  prompt fidelity   — the same images with the asked background (%);
  drift             — class prompts "a heart on a {bg} background" that show the subject anyway (%; lower is
                      better), and that still draw an ordinary heart (%; compare with the base model's row).
The table gives mean ± std over seeds per (kind, lr); the ΔM/ΔD plots and per-run slopes (pooled over steps, and
within steps: across layers at the same step) come from dreambooth_dora.analysis over the best lr of each kind,
for all adapted layers and for the UNet query projections the paper plots (does DoRA show the paper's negative
slope, LoRA a positive one?). Outputs go to --out (default outputs/toy_quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_dora.adapters.inject import remove_adapter  # noqa: E402
from dreambooth_dora.adapters.io import load_adapter  # noqa: E402
from dreambooth_dora.adapters.readers import destinations_for  # noqa: E402
from dreambooth_dora.runs import RunFolder  # noqa: E402
from dreambooth_dora.sd.pipelines import load_pipeline  # noqa: E402
from dreambooth_dora.tools.analysis import analyze_runs  # noqa: E402
from dreambooth_dora.toy.eval import evaluate_subject  # noqa: E402
from dreambooth_dora.training.config import load_config  # noqa: E402
from dreambooth_dora.training.loop import train  # noqa: E402

LR_GRID = {"dora": (5e-4, 1e-3), "lora": (5e-4, 1e-3), "full": (5e-5, 1e-4)}
METRICS = {
    "subject %": "identifier: subject %",
    "asked bg %": "identifier: asked background %",
    "drift %": "class prompt: subject appears % (drift)",
    "class bg %": "class prompt: asked background %",
    "class: ordinary heart %": "class prompt: ordinary heart %",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=list(LR_GRID))
    p.add_argument("--axes", nargs="+", choices=["out", "in"], default=["out"], help="DoRA norm axes to train")
    p.add_argument("--steps", type=int, help="override max_train_steps")
    p.add_argument("--samples", type=int, default=48, help="identifier and class prompts per run")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_quality")
    args = p.parse_args()
    base_cfg = load_config(ROOT / "training_configs" / "toy_subject.yaml")
    class_dir = args.out / "class_images"  # shared by every run: generated once
    pipe = load_pipeline(base_cfg.base_model)
    base_rates, _ = evaluate_subject(pipe, args.samples, seed=10_000)  # the same prompts without any adapter
    results: dict[tuple[str, float], list[dict]] = {}
    runs: dict[tuple[str, float], list[Path]] = {}
    t0 = time.perf_counter()
    variants = [(k, a) for k in args.kinds for a in (args.axes if k == "dora" else ["out"])]
    for kind, axis in variants:
        label = kind if axis == "out" else f"{kind}-in"
        for lr in LR_GRID[kind]:
            for seed in args.seeds:
                out = args.out / f"{label}_lr{lr:g}_seed{seed}"
                over = {
                    "kind": kind,
                    "axis": axis,
                    "use_in": list(destinations_for(axis)),
                    "learning_rate": lr,
                    "seed": seed,
                    "output_dir": out,
                    "class_data_dir": class_dir,
                    "validation_prompt": None,
                }
                if args.steps:
                    over["max_train_steps"] = args.steps
                    over["save_intermediate_every"] = max(1, args.steps // 4)
                if not RunFolder(out).adapter_files():
                    train(base_cfg.model_copy(update=over))
                load_adapter(pipe, RunFolder(out).adapter_files()[0], name="run")
                rates, _ = evaluate_subject(pipe, args.samples, seed=10_000)
                remove_adapter(pipe, "run")
                results.setdefault((label, lr), []).append(rates)
                runs.setdefault((label, lr), []).append(out)
                print(
                    f"{label} lr {lr:g} seed {seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()),
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    print(
        f"\n{len(args.seeds)} seeds, {args.samples} identifier + {args.samples} class prompts per run, "
        f"{base_cfg.max_train_steps if not args.steps else args.steps} steps, rank {base_cfg.rank}\n"
    )
    print("| kind | lr | " + " | ".join(METRICS) + " |\n|---|---:|" + "---:|" * len(METRICS))
    best: dict[str, tuple[float, float]] = {}
    for (kind, lr), rs in results.items():
        cells = []
        for key in METRICS.values():
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        print(f"| {kind} | {lr:g} | " + " | ".join(cells) + " |")
        fidelity = statistics.mean(r[METRICS["subject %"]] for r in rs)
        if kind not in best or fidelity > best[kind][1]:
            best[kind] = (lr, fidelity)
    print("| base model, no adapter | – | " + " | ".join(f"{base_rates[k]:.1f}" for k in METRICS.values()) + " |")
    chosen = [run for kind, (lr, _) in best.items() for run in runs[(kind, lr)]]
    slopes = {}
    # The DoRA paper plots ΔM against ΔD for the query projections; "all" pools every adapted layer.
    for label, layers in (("all adapted layers", None), ("UNet queries (to_q)", "to_q")):
        analysis = analyze_runs(chosen, args.out / f"analysis_{layers or 'all'}", layers=layers)
        slopes[label] = {"pooled": analysis.slopes, "within steps": analysis.within_slopes}
        print(f"\nΔM/ΔD slope, {label} (best lr per kind; plot {analysis.png_path}):")
        print("| kind | lr | pooled, per seed | within steps, per seed | negative within steps |")
        print("|---|---:|---|---|---:|")
        for kind, (lr, _) in best.items():
            names = {path.name for path in runs[(kind, lr)]}  # kind here is the label (dora-in: input axis)
            pooled = [run.slope for run in analysis.runs if Path(run.name).name in names]
            within = [run.within_slope for run in analysis.runs if Path(run.name).name in names]
            cells = [", ".join(f"{v:+.3g}" for v in vals) for vals in (pooled, within)]
            print(f"| {kind} | {lr:g} | {cells[0]} | {cells[1]} | {sum(v < 0 for v in within)}/{len(within)} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    (args.out / "results.json").write_text(
        json.dumps(
            {f"{k}_{lr:g}": rs for (k, lr), rs in results.items()} | {"base": base_rates, "slopes": slopes}, indent=1
        )
    )


if __name__ == "__main__":
    main()
