"""DreamBooth quality on the toy world: DoRA vs LoRA vs full fine-tuning of the same projections (issue 5).

    python benchmarks/toy_quality.py                       # 3 seeds × {dora, lora, full} × the lr grid
    python benchmarks/toy_quality.py --seeds 0 --steps 100 --samples 16     # a quick look
    python benchmarks/toy_quality.py --kinds dora --axes out in     # DoRA's two norm axes (use_in's choice)
    python benchmarks/toy_quality.py --kinds dora lora --lrs 5e-4 --quantize none nf4   # QDoRA / QLoRA
    python benchmarks/toy_quality.py --kinds dora --lrs 5e-4 --set --set text_encoder_lr=5e-5 \
        --set train_text_encoder=false                      # the preset against two variants of its defaults

Every run trains training_configs/toy_subject.yaml on builtin:toy (same data, steps, rank, prior preservation),
changing only kind, learning rate and seed — and, when asked, the base's quantization (--quantize: QDoRA is
dora+nf4, QLoRA lora+nf4) and config overrides (--set KEY=VALUE…: each --set one variant, a bare --set the preset
as is) — and keeps intermediate adapters for the ΔM/ΔD analysis. Run folders are named by variant, lr and seed;
one that already holds an adapter is measured, not retrained (--steps is not in the name: use another --out). Each
trained adapter is then measured with the exact toy evaluator (builtin/toy_eval.py):
  subject fidelity  — identifier prompts "a sks heart on a {bg} background" showing the subject (%);
  prompt fidelity   — the same images with the asked background (%);
  drift             — class prompts "a heart on a {bg} background" that show the subject anyway (%; lower is
                      better), and that still draw an ordinary heart (%; compare with the base model's row);
  forgetting        — base-world accuracy (all three right) without minus with the adapter, same prompts and
                      seeds (points; 0: nothing lost, larger: worse).
The table gives mean ± std over seeds per (variant, lr); the ΔM/ΔD plots and per-run slopes (pooled over steps, and
within steps: across layers at the same step) come from dreambooth_dora.analysis over the best lr of each variant,
for all adapted layers and for the UNet query projections the paper plots (does DoRA show the paper's negative
slope, LoRA a positive one?). Outputs go to --out (default outputs/toy_quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_dora import threads  # noqa: E402

# Before torch loads: idle OpenMP threads sleep, and the thread count follows the cores others leave free (a busy
# machine otherwise slows CPU training many times over); --threads N or OMP_NUM_THREADS decide instead.
threads.configure(threads.requested(sys.argv))

from dreambooth_dora.adapters.inject import remove_adapter  # noqa: E402
from dreambooth_dora.adapters.io import load_adapter  # noqa: E402
from dreambooth_dora.adapters.readers import destinations_for  # noqa: E402
from dreambooth_dora.runs import RunFolder  # noqa: E402
from dreambooth_dora.sd.pipelines import load_pipeline  # noqa: E402
from dreambooth_dora.tools.analysis import analyze_runs  # noqa: E402
from dreambooth_dora.toy.eval import evaluate_forgetting, evaluate_subject  # noqa: E402
from dreambooth_dora.training.config import ConfigError, TrainConfig, load_config, parse_overrides  # noqa: E402
from dreambooth_dora.training.loop import train  # noqa: E402

LR_GRID = {"dora": (5e-4, 1e-3), "lora": (5e-4, 1e-3), "full": (5e-5, 1e-4)}
METRICS = {
    "subject %": "identifier: subject %",
    "asked bg %": "identifier: asked background %",
    "drift %": "class prompt: subject appears % (drift)",
    "class bg %": "class prompt: asked background %",
    "class: ordinary heart %": "class prompt: ordinary heart %",
    "forgetting": "forgetting",
}
EVAL_SEED = 10_000  # the same prompts and seeds for every run and for the base model
CONFIG = ROOT / "training_configs" / "toy_subject.yaml"
# Keys the script sets per run: --set may not change them (use --kinds, --axes, --lrs, --seeds, --quantize).
OWN_KEYS = {"kind", "axis", "use_in", "learning_rate", "seed", "quantize_base", "output_dir", "class_data_dir"}


@dataclass(frozen=True)
class Variant:
    """What a table row trains, apart from the learning rate and seed."""

    kind: str
    axis: str
    quantize: str
    sets: tuple[str, ...]  # KEY=VALUE config overrides

    @property
    def name(self) -> str:  # dora, dora-in, dora+nf4 (QDoRA), lora+nf4 (QLoRA)
        quantized = "" if self.quantize == "none" else f"+{self.quantize}"
        return self.kind + ("-in" if self.axis == "in" else "") + quantized

    @property
    def label(self) -> str:
        return " ".join((self.name, *self.sets))

    def folder(self, out: Path, lr: float, seed: int) -> Path:
        sets = "".join(f"_{pair.replace('/', '-')}" for pair in self.sets)
        return out / f"{self.name}{sets}_lr{lr:g}_seed{seed}"

    def overrides(self, lr: float, seed: int, out: Path, class_dir: Path, steps: int | None) -> dict:
        over = {
            "kind": self.kind,
            "axis": self.axis,
            "use_in": list(destinations_for(self.axis)),
            "learning_rate": lr,
            "seed": seed,
            "quantize_base": self.quantize,
            "output_dir": out,
            "class_data_dir": class_dir,
            "validation_prompt": None,
        }
        if steps:
            over["max_train_steps"] = steps
            over["save_intermediate_every"] = max(1, steps // 4)
        return over


def check_sets(sets: list[list[str]]) -> list[tuple[str, ...]]:
    """Each --set's KEY=VALUE pairs, checked against the config before anything is trained."""
    for pairs in sets:
        if clash := OWN_KEYS & set(parse_overrides(pairs)):
            sys.exit(f"--set {' '.join(pairs)}: {', '.join(sorted(clash))} is set per run by this script")
        try:
            load_config(CONFIG, overrides=pairs)
        except ConfigError as e:  # an unknown key or a bad value
            sys.exit(f"--set {' '.join(pairs)}: {e}")
    return [tuple(pairs) for pairs in sets]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=list(LR_GRID))
    p.add_argument("--axes", nargs="+", choices=["out", "in"], default=["out"], help="DoRA norm axes to train")
    p.add_argument("--steps", type=int, help="override max_train_steps")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates for every kind (default: each kind's grid)")
    quant = TrainConfig.model_fields["quantize_base"].annotation.__args__
    p.add_argument("--quantize", nargs="+", choices=quant, default=["none"], help="quantize_base of each run")
    p.add_argument(
        "--set",
        dest="sets",
        nargs="*",
        action="append",
        metavar="KEY=VALUE",
        help="config overrides for every run; each --set is one variant (a bare --set: the preset as is)",
    )
    p.add_argument("--samples", type=int, default=48, help="identifier, class and forgetting prompts per run")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_quality")
    threads.add_argument(p)
    args = p.parse_args()
    sets = check_sets(args.sets or [[]])
    base_cfg = load_config(CONFIG)
    class_dir = args.out / "class_images"  # shared by every run: generated once
    pipe = load_pipeline(base_cfg.base_model)
    base_rates, _ = evaluate_subject(pipe, args.samples, seed=EVAL_SEED)  # the same prompts without any adapter
    results: dict[tuple[str, float], list[dict]] = {}
    runs: dict[tuple[str, float], list[Path]] = {}
    t0 = time.perf_counter()
    variants = [
        Variant(k, a, q, s)
        for k in args.kinds
        for a in (args.axes if k == "dora" else ["out"])
        for q in args.quantize
        for s in sets
    ]
    for v in variants:
        for lr in args.lrs or LR_GRID[v.kind]:
            for seed in args.seeds:
                out = v.folder(args.out, lr, seed)
                if not RunFolder(out).adapter_files():
                    over = v.overrides(lr, seed, out, class_dir, args.steps)
                    train(load_config(CONFIG, overrides=list(v.sets), **over))
                load_adapter(pipe, RunFolder(out).adapter_files()[0], name="run")
                rates, _ = evaluate_subject(pipe, args.samples, seed=EVAL_SEED)
                rates |= evaluate_forgetting(pipe, args.samples, seed=EVAL_SEED)[0]
                remove_adapter(pipe, "run")
                results.setdefault((v.label, lr), []).append(rates)
                runs.setdefault((v.label, lr), []).append(out)
                print(
                    f"{v.label} lr {lr:g} seed {seed}: " + ", ".join(f"{k} {x:.0f}" for k, x in rates.items()),
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

    print(
        f"\n{len(args.seeds)} seeds, {args.samples} identifier + {args.samples} class + {args.samples} base-world "
        f"prompts per run, {args.steps or base_cfg.max_train_steps} steps unless a --set says otherwise, "
        f"rank {base_cfg.rank}\n"
    )
    print("| variant | lr | " + " | ".join(METRICS) + " |\n|---|---:|" + "---:|" * len(METRICS))
    best: dict[str, tuple[float, float]] = {}  # variant label → (best lr by subject fidelity, that fidelity)
    for (label, lr), rs in results.items():
        cells = []
        for key in METRICS.values():
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        print(f"| {label} | {lr:g} | " + " | ".join(cells) + " |")
        fidelity = statistics.mean(r[METRICS["subject %"]] for r in rs)
        if label not in best or fidelity > best[label][1]:
            best[label] = (lr, fidelity)
    base_cells = (f"{base_rates[k]:.1f}" if k in base_rates else "–" for k in METRICS.values())
    print("| base model, no adapter | – | " + " | ".join(base_cells) + " |")
    chosen = [run for label, (lr, _) in best.items() for run in runs[(label, lr)]]
    slopes = {}
    # The DoRA paper plots ΔM against ΔD for the query projections; "all" pools every adapted layer.
    for scope, layers in (("all adapted layers", None), ("UNet queries (to_q)", "to_q")):
        analysis = analyze_runs(chosen, args.out / f"analysis_{layers or 'all'}", layers=layers)
        slopes[scope] = {"pooled": analysis.slopes, "within steps": analysis.within_slopes}
        print(f"\nΔM/ΔD slope, {scope} (best lr per variant; plot {analysis.png_path}):")
        print("| variant | lr | pooled, per seed | within steps, per seed | negative within steps |")
        print("|---|---:|---|---|---:|")
        for label, (lr, _) in best.items():
            names = {path.name for path in runs[(label, lr)]}
            pooled = [run.slope for run in analysis.runs if Path(run.name).name in names]
            within = [run.within_slope for run in analysis.runs if Path(run.name).name in names]
            cells = [", ".join(f"{v:+.3g}" for v in vals) for vals in (pooled, within)]
            print(f"| {label} | {lr:g} | {cells[0]} | {cells[1]} | {sum(v < 0 for v in within)}/{len(within)} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    (args.out / "results.json").write_text(
        json.dumps(
            {f"{k}_{lr:g}": rs for (k, lr), rs in results.items()} | {"base": base_rates, "slopes": slopes}, indent=1
        )
    )


if __name__ == "__main__":
    main()
