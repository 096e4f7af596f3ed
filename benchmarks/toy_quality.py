"""DreamBooth quality on the toy world: DoRA vs LoRA vs full fine-tuning of the same projections, and the study
behind docs/quality.md (issue 15: where does DoRA beat LoRA, at what rank and learning rate?).

    python benchmarks/toy_quality.py                       # 3 seeds × {dora, lora, full} × the lr grid, rank 8
    python benchmarks/toy_quality.py --seeds 0 --steps 100 --samples 16     # a quick look
    python benchmarks/toy_quality.py --kinds dora --axes out in     # DoRA's two norm axes (use_in's choice)
    python benchmarks/toy_quality.py --kinds dora lora --lrs 5e-4 --quantize none nf4   # QDoRA / QLoRA
    python benchmarks/toy_quality.py --kinds dora --lrs 5e-4 --set --set text_encoder_lr=5e-5 \
        --set train_text_encoder=false                      # the preset against two variants of its defaults
    # the rank study (docs/quality.md); one process per kind, one thread each, shares 2 cores best:
    python benchmarks/toy_quality.py --study ranks --kinds dora --threads 1 &
    python benchmarks/toy_quality.py --study ranks --kinds lora --threads 1; wait
    python benchmarks/toy_quality.py --study ranks --plots docs/quality     # tables, CIs and plots (no training)

Every run trains training_configs/toy_subject.yaml on builtin:toy (same data, steps, rank, prior preservation with
the one class prompt "a heart", set here so that an edited preset never changes what a cached run means; several
class prompts are a --set class_prompt=[…] variant), changing only kind, learning rate and seed — and, when asked,
the rank (--ranks; alpha = rank, so the update's scale is the same at every rank), the subject (--subject star: the
harder one, a purple star with a yellow stripe, a colour pair pretraining never put on a star), the number of
training images (--images 3), the base's quantization (--quantize: QDoRA is dora+nf4, QLoRA lora+nf4) and config
overrides (--set KEY=VALUE…: each --set one variant, a bare --set the preset as is) — and keeps intermediate
adapters for the ΔM/ΔD analysis. Run folders are named by variant, lr and seed; one that already holds an adapter is
measured, not retrained (--steps is not in the name: use another --out), and its scores are kept in the folder
(toy_scores.json), so a later call that only reports costs seconds. --select-lr-on SEED trains every lr of the grid
on that seed only, and the other seeds at each variant's best lr there (by subject fidelity). --study ranks is the
whole study: ranks 1 2 4 16 (the preset's 8 is --ranks 8 --lrs 5e-4), the heart with 5 and with 3 images and the
star, DoRA's grid a little lower than LoRA's, lr chosen on seed 0 of the 5-image heart and used for the other two
cases at the same rank; fidelity against steps is measured for the 5-image heart only.

Each trained adapter is then measured with the exact toy evaluator (dreambooth_dora/toy/eval.py):
  subject fidelity  — identifier prompts "a sks heart on a {bg} background" showing the subject (%);
  prompt fidelity   — the same images with the asked background (%);
  drift             — class prompts "a heart on a {bg} background" that show the subject anyway (%; lower is
                      better), and that still draw an ordinary heart (%; compare with the base model's row);
  forgetting        — base-world accuracy (all three right) without minus with the adapter, same prompts and
                      seeds (points; 0: nothing lost, larger: worse).
The table gives mean ± std over seeds per (variant, lr); the ΔM/ΔD plots and per-run slopes (pooled over steps, and
within steps: across layers at the same step) come from dreambooth_dora.analysis over the best lr of each variant,
for all adapted layers and for the UNet query projections the paper plots (does DoRA show the paper's negative
slope, LoRA a positive one?). With --plots DIR: subject fidelity against rank and against steps (the intermediate
adapters at each quarter of the run), mean and seed spread, and the DoRA − LoRA differences with 95 % confidence
intervals (Welch). Outputs go to --out (default outputs/toy_quality).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stats import mean_sd, welch_ci  # noqa: E402
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
from dreambooth_dora.toy import world as tw  # noqa: E402
from dreambooth_dora.toy.eval import evaluate_forgetting, evaluate_subject  # noqa: E402
from dreambooth_dora.training.config import ConfigError, TrainConfig, load_config, parse_overrides  # noqa: E402
from dreambooth_dora.training.loop import train  # noqa: E402

LR_GRID = {"dora": (5e-4, 1e-3), "lora": (5e-4, 1e-3), "full": (5e-5, 1e-4)}
# The rank study: DoRA's grid a step lower than LoRA's (its authors advise a slightly lower rate); both hold 5e-4
# (the preset's) and 1e-3, so a method whose best rate is shared is compared at the same rate.
STUDY_LR_GRID = {"dora": (2.5e-4, 5e-4, 1e-3), "lora": (5e-4, 1e-3, 2e-3)}
STUDY_RANKS = (1, 2, 4, 16)  # and the preset's 8 at its lr: --ranks 8 --lrs 5e-4
STUDY_CASES = (("heart", None), ("heart", 3), ("star", None))  # (subject, images): the preset's 5, 3 of them, star
METRICS = {
    "subject %": "identifier: subject %",
    "asked bg %": "identifier: asked background %",
    "drift %": "class prompt: subject appears % (drift)",
    "class bg %": "class prompt: asked background %",
    "class: ordinary object %": "class prompt: ordinary object %",
    "forgetting": "forgetting",
}
# One class prompt for every run, whatever the preset names (runs are cached by folder name, so a changed preset
# must not change what a folder means); several class prompts are a --set variant.
STUDY_CLASS_PROMPT = "a {}"
EVAL_SEED = 10_000  # the same prompts and seeds for every run and for the base model
CONFIG = ROOT / "training_configs" / "toy_subject.yaml"
# Keys the script sets per run: --set may not change them (use --kinds, --axes, --lrs, --seeds, --quantize, …).
OWN_KEYS = {
    "kind", "axis", "use_in", "learning_rate", "seed", "quantize_base", "output_dir", "class_data_dir", "rank",
    "alpha", "instance_data_dir", "instance_prompt",
}  # fmt: skip
PRESET_RANK = load_config(CONFIG).rank


@dataclass(frozen=True)
class Variant:
    """What a table row trains, apart from the learning rate and seed."""

    kind: str
    axis: str
    quantize: str
    sets: tuple[str, ...]  # KEY=VALUE config overrides
    rank: int = PRESET_RANK
    subject: str = "heart"
    images: int | None = None  # the first N subject views (None: the preset's folder, all 5)

    @property
    def name(self) -> str:  # dora, dora-in, dora+nf4 (QDoRA), lora+nf4 (QLoRA), star_dora_r4_img3
        quantized = "" if self.quantize == "none" else f"+{self.quantize}"
        name = self.kind + ("-in" if self.axis == "in" else "") + quantized
        name += "" if self.rank == PRESET_RANK else f"_r{self.rank}"
        name += "" if self.images is None else f"_img{self.images}"
        return name if self.subject == "heart" else f"{self.subject}_{name}"

    @property
    def label(self) -> str:
        return " ".join((self.name, *self.sets))

    @property
    def scene(self) -> tw.Scene:
        return tw.SUBJECTS[self.subject]

    def folder(self, out: Path, lr: float, seed: int) -> Path:
        sets = "".join(f"_{pair.replace('/', '-')}" for pair in self.sets)
        if len(sets) > 60:  # a list of class prompts: the folder name stays well under the file system's limit
            sets = "_sets-" + hashlib.sha1(sets.encode()).hexdigest()[:8]
        return out / f"{self.name}{sets}_lr{lr:g}_seed{seed}"

    def overrides(self, lr: float, seed: int, out: Path, root: Path, steps: int | None) -> dict:
        over = {
            "kind": self.kind,
            "axis": self.axis,
            "use_in": list(destinations_for(self.axis)),
            "learning_rate": lr,
            "seed": seed,
            "quantize_base": self.quantize,
            "output_dir": out,
            "class_data_dir": class_dir(root, self.subject, self.sets),
            "validation_prompt": None,
            "rank": self.rank,
            "alpha": self.rank,
        }
        if self.subject != "heart" or self.images is not None:
            over["instance_data_dir"] = subject_images(root, self.subject, self.images)
            over["instance_prompt"] = f"a {tw.SUBJECT_TOKEN} {self.scene.shape}"
        if "class_prompt" not in parse_overrides(list(self.sets)):
            over["class_prompt"] = STUDY_CLASS_PROMPT.format(self.scene.shape)
        if steps:
            over["max_train_steps"] = steps
            over["save_intermediate_every"] = max(1, steps // 4)
        return over


def class_dir(root: Path, subject: str, sets: tuple[str, ...] = ()) -> Path:
    """Class images, shared by every run of a subject's class with the same class prompt(s) (generated once)."""
    name = "class_images" if subject == "heart" else f"class_images_{subject}"
    if prompts := parse_overrides(list(sets)).get("class_prompt"):
        name += "_" + hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:8]
    return root / name


def subject_images(root: Path, subject: str, count: int | None) -> Path:
    """The subject's first ``count`` views with their captions (as the shipped heart folder has them)."""
    folder = root / "subjects" / f"{subject}_{count or 5}"
    if not folder.is_dir():
        tw.write_subject_images(folder, tw.SUBJECTS[subject], count or 5)
    return folder


@contextlib.contextmanager
def class_images_lock(folder: Path):
    """Held while a run may generate its class images into ``folder``, so parallel calls of this script make them
    once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def _intermediate_quarters(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of the intermediate adapters at each quarter of the run (the final adapter is the last)."""
    files = sorted((int(f.stem.split("-")[1]), f) for f in (run / "intermediate").glob("step-*.safetensors"))
    last = files[-1][0] if files else 0
    wanted = {round(last * q / 4) for q in (1, 2, 3)}
    return [(step, f) for step, f in files if step in wanted]


def scores(pipe, run: Path, scene: tw.Scene, samples: int, curve: bool) -> dict:
    """The toy evaluator's rates for a run's final adapter (and, with ``curve``, at each quarter of its steps, on
    half the prompts), cached in the run folder by sample count and seed."""
    cache_file = run / "toy_scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = f"{samples} samples, seed {EVAL_SEED}"
    entry = cache.get(key, {})
    if "final" not in entry:
        load_adapter(pipe, RunFolder(run).adapter_files()[0], name="run")
        rates, _ = evaluate_subject(pipe, samples, seed=EVAL_SEED, subject=scene)
        rates |= evaluate_forgetting(pipe, samples, seed=EVAL_SEED)[0]
        remove_adapter(pipe, "run")
        entry["final"] = rates
    if curve and "curve" not in entry:
        entry["curve"] = {}
        for step, path in _intermediate_quarters(run):
            load_adapter(pipe, path, name="run")
            entry["curve"][str(step)] = evaluate_subject(pipe, samples // 2, seed=EVAL_SEED, subject=scene)[0]
            remove_adapter(pipe, "run")
    cache[key] = entry
    cache_file.write_text(json.dumps(cache, indent=1))
    return entry


def cached_scores(run: Path, samples: int) -> dict | None:
    """A run's final rates from its score cache (written by ``scores``), or None."""
    cache_file = run / "toy_scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    return cache.get(f"{samples} samples, seed {EVAL_SEED}", {}).get("final")


def best_lr(variant: Variant, lrs: tuple[float, ...], seed: int, out: Path, found: dict, samples: int) -> float | None:
    """The lr with the best subject fidelity on ``seed`` (ties: less forgetting), from this call's runs or the
    cached scores of earlier ones; None until all are measured."""
    rated = [
        (found.get((variant.label, lr, seed)) or cached_scores(variant.folder(out, lr, seed), samples), lr)
        for lr in lrs
    ]
    if any(r is None for r, _ in rated):
        return None
    return max(rated, key=lambda x: (x[0][METRICS["subject %"]], -x[0]["forgetting"]))[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", help="dora lora full (default: all three; the study: dora lora)")
    p.add_argument("--axes", nargs="+", choices=["out", "in"], default=["out"], help="DoRA norm axes to train")
    p.add_argument("--steps", type=int, help="override max_train_steps")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates for every kind (default: each kind's grid)")
    quant = TrainConfig.model_fields["quantize_base"].annotation.__args__
    p.add_argument("--quantize", nargs="+", choices=quant, default=["none"], help="quantize_base of each run")
    p.add_argument("--ranks", type=int, nargs="+", help=f"adapter ranks (alpha = rank; default {PRESET_RANK})")
    p.add_argument("--subject", nargs="+", choices=list(tw.SUBJECTS), default=["heart"], help="subjects to train")
    p.add_argument("--images", type=int, nargs="+", help="train on the first N subject views (default: all 5)")
    p.add_argument("--select-lr-on", type=int, metavar="SEED", help="every lr on SEED, the best one on the others")
    p.add_argument("--study", choices=["ranks"], help="the rank study of docs/quality.md (see above)")
    p.add_argument("--cases", nargs="+", help="with --study: which of heart, heart-3, star (default: all)")
    p.add_argument("--curve", action="store_true", help="also measure subject fidelity at each quarter of the steps")
    p.add_argument("--report", action="store_true", help="train nothing: report the runs that exist")
    p.add_argument("--plots", type=Path, help="write the study's plots and tables (Markdown) here")
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
    if args.study == "ranks":
        args.kinds = args.kinds or ["dora", "lora"]
        args.ranks = args.ranks or list(STUDY_RANKS)
        args.select_lr_on = 0 if args.select_lr_on is None else args.select_lr_on
        args.curve = True
    args.kinds = args.kinds or list(LR_GRID)
    return args


def study_cases(args) -> list[tuple[str, int | None]]:
    if args.study != "ranks":
        return [(subject, images) for subject in args.subject for images in (args.images or [None])]
    names = {"heart": ("heart", None), "heart-3": ("heart", 3), "star": ("star", None)}
    return [names[c] for c in args.cases] if args.cases else list(STUDY_CASES)


def lr_grid(args, kind: str) -> tuple[float, ...]:
    if args.lrs:
        return tuple(args.lrs)
    return STUDY_LR_GRID[kind] if args.study == "ranks" else LR_GRID[kind]


def main() -> None:
    args = parse_args()
    sets = check_sets(args.sets or [[]])
    base_cfg = load_config(CONFIG)
    pipe = load_pipeline(base_cfg.base_model)
    results: dict[tuple[str, float], list[dict]] = {}  # (variant label, lr) → final rates per seed
    curves: dict[tuple[str, float], list[dict]] = {}  # … → {step: rates} per seed
    runs: dict[tuple[str, float], list[Path]] = {}
    found: dict[tuple[str, float, int], dict] = {}  # (label, lr, seed) → rates
    variants: list[Variant] = []
    t0 = time.perf_counter()
    cases = study_cases(args)
    for subject, images in cases:
        for v in (
            Variant(k, a, q, s, rank=r, subject=subject, images=images)
            for k in args.kinds
            for r in args.ranks or [PRESET_RANK]
            for a in (args.axes if k == "dora" else ["out"])
            for q in args.quantize
            for s in sets
        ):
            variants.append(v)
            # fidelity against steps is plotted for the main case only: the other cases skip its scoring
            curve = args.curve and (args.study != "ranks" or (subject, images) == STUDY_CASES[0])
            if args.study == "ranks" and (subject, images) != STUDY_CASES[0]:
                # the other cases train at each method's best lr for this rank in the main case (seed 0)
                main_v = Variant(v.kind, v.axis, v.quantize, v.sets, rank=v.rank)
                lrs = [best_lr(main_v, lr_grid(args, v.kind), args.select_lr_on, args.out, found, args.samples)]
                if lrs[0] is None:
                    print(f"{v.label}: skipped, its rank has no chosen lr yet: run --cases heart --ranks {v.rank}")
                    continue
                seeds = args.seeds
            else:
                lrs, seeds = list(lr_grid(args, v.kind)), args.seeds
            if args.select_lr_on is not None and len(lrs) > 1:
                order = [args.select_lr_on] + [s for s in seeds if s != args.select_lr_on]
            else:
                order = list(seeds)
            for seed in order:
                if len(lrs) > 1 and args.select_lr_on is not None and seed != args.select_lr_on:
                    chosen = best_lr(v, tuple(lrs), args.select_lr_on, args.out, found, args.samples)
                    todo = [chosen] if chosen is not None else []
                else:
                    todo = [lr for lr in lrs if lr is not None]
                for lr in todo:
                    out = v.folder(args.out, lr, seed)
                    if not RunFolder(out).adapter_files():
                        if args.report:
                            continue
                        with class_images_lock(class_dir(args.out, v.subject, v.sets)):  # and the subject's images
                            over = v.overrides(lr, seed, out, args.out, args.steps)
                            train(load_config(CONFIG, overrides=list(v.sets), **over))
                    # the curve (fidelity at each quarter) only at the lr the table reports: not while choosing it
                    rates = scores(pipe, out, v.scene, args.samples, curve and len(todo) == 1)["final"]
                    found[(v.label, lr, seed)] = rates
                    results.setdefault((v.label, lr), []).append(rates)
                    runs.setdefault((v.label, lr), []).append(out)
                    print(
                        f"{v.label} lr {lr:g} seed {seed}: " + ", ".join(f"{k} {x:.0f}" for k, x in rates.items()),
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
            if curve:
                chosen = lrs[0]
                if len(lrs) > 1:
                    chosen = best_lr(v, tuple(lrs), args.select_lr_on, args.out, found, args.samples)
                for out in runs.get((v.label, chosen), []):
                    curves.setdefault((v.label, chosen), []).append(
                        scores(pipe, out, v.scene, args.samples, True)["curve"]
                    )
    report(args, base_cfg, pipe, variants, results, curves, runs, t0)


def report(args, base_cfg, pipe, variants, results, curves, runs, t0) -> None:
    # the same prompts without any adapter, for each subject trained
    subjects = list(dict.fromkeys(v.subject for v in variants)) or ["heart"]
    base_rates = {s: evaluate_subject(pipe, args.samples, seed=EVAL_SEED, subject=tw.SUBJECTS[s])[0] for s in subjects}
    lines = [
        f"{len(args.seeds)} seeds, {args.samples} identifier + {args.samples} class + {args.samples} base-world "
        f"prompts per run, {args.steps or base_cfg.max_train_steps} steps unless a --set says otherwise"
        + (f", lr chosen on seed {args.select_lr_on}" if args.select_lr_on is not None else ""),
        "",
        "| variant | lr | seeds | " + " | ".join(METRICS) + " |",
        "|---|---:|---:|" + "---:|" * len(METRICS),
    ]
    best: dict[str, tuple[float, float]] = {}  # variant label → (best lr by subject fidelity, that fidelity)
    for (label, lr), rs in results.items():
        cells = ["{:.1f} ± {:.1f}".format(*mean_sd([r[key] for r in rs])) for key in METRICS.values()]
        lines.append(f"| {label} | {lr:g} | {len(rs)} | " + " | ".join(cells) + " |")
        fidelity = statistics.mean(r[METRICS["subject %"]] for r in rs)
        n_best = len(results.get((label, best[label][0]), [])) if label in best else 0
        if label not in best or (len(rs), fidelity) > (n_best, best[label][1]):  # most seeds, then fidelity
            best[label] = (lr, fidelity)
    for subject, rates in base_rates.items():
        base_cells = (f"{rates[k]:.1f}" if k in rates else "–" for k in METRICS.values())
        lines.append(f"| base model, no adapter ({subject} prompts) | – | – | " + " | ".join(base_cells) + " |")
    print("\n" + "\n".join(lines))
    tables = {"runs": lines}
    if args.study == "ranks":
        tables |= study_tables(args, variants, results, best)
        for name in ("best", "compare"):
            print("\n" + "\n".join(tables[name]))
    chosen = [run for label, (lr, _) in best.items() for run in runs[(label, lr)]]
    slopes, slope_lines = {}, []
    # The DoRA paper plots ΔM against ΔD for the query projections; "all" pools every adapted layer.
    for scope, layers in (("all adapted layers", None), ("UNet queries (to_q)", "to_q")):
        if not chosen:
            break
        analysis = analyze_runs(chosen, args.out / f"analysis_{layers or 'all'}", layers=layers)
        slopes[scope] = {"pooled": analysis.slopes, "within steps": analysis.within_slopes}
        slope_lines += [
            f"\nΔM/ΔD slope, {scope} (best lr per variant; plot {_shown_path(analysis.png_path)}):",
            "| variant | lr | pooled, per seed | within steps, per seed | negative within steps |",
            "|---|---:|---|---|---:|",
        ]
        for label, (lr, _) in best.items():
            names = {path.name for path in runs[(label, lr)]}
            pooled = [run.slope for run in analysis.runs if Path(run.name).name in names]
            within = [run.within_slope for run in analysis.runs if Path(run.name).name in names]
            cells = [", ".join(f"{v:+.3g}" for v in vals) for vals in (pooled, within)]
            slope_lines.append(
                f"| {label} | {lr:g} | {cells[0]} | {cells[1]} | {sum(v < 0 for v in within)}/{len(within)} |"
            )
    print("\n".join(slope_lines))
    tables["slopes"] = slope_lines
    if args.plots:
        write_plots(args.plots, variants, results, curves, best, tables)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    (args.out / "results.json").write_text(
        json.dumps(
            {f"{k}_{lr:g}": rs for (k, lr), rs in results.items()} | {"base": base_rates, "slopes": slopes}, indent=1
        )
    )


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (the tables are committed to docs/)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _case(v: Variant) -> str:
    return {"heart": "heart, 5 images", "star": "star (harder), 5 images"}[v.subject].replace(
        "5 images", f"{v.images or 5} images"
    )


def study_tables(args, variants, results, best) -> dict[str, list[str]]:
    """The best-lr row of each (case, kind, rank), and DoRA − LoRA with 95 % CIs per (case, rank)."""
    keys = ("subject %", "drift %", "forgetting")
    out = [
        "| case | kind | rank | best lr | seeds | " + " | ".join(keys) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by: dict[tuple[str, str, int], list[dict]] = {}
    for v in variants:
        if v.label not in best:
            continue
        lr = best[v.label][0]
        rs = results[(v.label, lr)]
        by[(_case(v), v.kind, v.rank)] = rs
        cells = ["{:.1f} ± {:.1f}".format(*mean_sd([r[METRICS[k]] for r in rs])) for k in keys]
        out.append(f"| {_case(v)} | {v.kind} | {v.rank} | {lr:g} | {len(rs)} | " + " | ".join(cells) + " |")
    cmp = [
        "| case | rank | " + " | ".join(f"DoRA − LoRA {k} (95 % CI)" for k in keys) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, kind, rank in by:
        if kind != "dora" or (case, "lora", rank) not in by:
            continue
        cells = []
        for k in keys:
            ci = welch_ci(
                [r[METRICS[k]] for r in by[(case, "dora", rank)]], [r[METRICS[k]] for r in by[(case, "lora", rank)]]
            )
            cells.append("–" if ci is None else f"{ci[0]:+.1f} [{ci[1]:+.1f}, {ci[2]:+.1f}]")
        cmp.append(f"| {case} | {rank} | " + " | ".join(cells) + " |")
    return {"best": out, "compare": cmp}


def write_plots(folder: Path, variants, results, curves, best, tables) -> None:
    """fidelity_vs_rank.png (subject fidelity and forgetting per case, mean ± std over seeds at each method's best
    lr), fidelity_vs_steps.png (per rank, the main case), and tables.md (every table above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    cases = list(dict.fromkeys(_case(v) for v in variants if v.label in best))
    colours = {"dora": "tab:blue", "lora": "tab:orange", "full": "tab:green"}
    panels = (("subject %", "subject fidelity %"), ("forgetting", "forgetting (points)"))
    fig, axes = plt.subplots(len(panels), len(cases), figsize=(4.5 * len(cases), 6.4), squeeze=False, sharex=True)
    for col, case in enumerate(cases):
        for row, (metric, title) in enumerate(panels):
            ax = axes[row][col]
            for kind in dict.fromkeys(v.kind for v in variants):
                pts = []
                for v in variants:
                    if _case(v) == case and v.kind == kind and v.label in best:
                        vals = [r[METRICS[metric]] for r in results[(v.label, best[v.label][0])]]
                        pts.append((v.rank, *mean_sd(vals)))
                if pts:
                    pts.sort()
                    x, m, sd = zip(*pts, strict=True)
                    ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=kind, color=colours.get(kind))
            ax.set_xscale("log", base=2)
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylabel(f"{title}, mean ± std over seeds", fontsize=8)
        axes[-1][col].set_xlabel("rank (each method at its best lr)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(folder / "fidelity_vs_rank.png", dpi=110)
    plt.close(fig)

    main_case = _case(Variant("dora", "out", "none", ()))
    ranks = sorted(
        {v.rank for v in variants if _case(v) == main_case and curves.get((v.label, best.get(v.label, (0,))[0]))}
    )
    fig, axes = plt.subplots(1, len(ranks), figsize=(3.4 * len(ranks), 3.2), squeeze=False, sharey=True)
    for ax, rank in zip(axes[0], ranks, strict=True):
        for v in variants:
            if _case(v) != main_case or v.rank != rank or v.label not in best:
                continue
            lr = best[v.label][0]
            per_seed = curves.get((v.label, lr), [])
            finals = [r[METRICS["subject %"]] for r in results[(v.label, lr)]]
            if not per_seed or len(per_seed) != len(finals):
                continue
            last = max(int(s) for s in per_seed[0]) * 4 // 3
            steps = sorted(int(s) for s in per_seed[0]) + [last]
            vals = [
                [c[str(s)][METRICS["subject %"]] for s in steps[:-1]] + [f]
                for c, f in zip(per_seed, finals, strict=True)
            ]
            m = [statistics.mean(col) for col in zip(*vals, strict=True)]
            sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*vals, strict=True)]
            c = colours.get(v.kind)
            ax.plot(steps, m, marker="o", color=c, label=f"{v.kind} lr {lr:g}")
            low = [max(0.0, a - b) for a, b in zip(m, sd, strict=True)]
            high = [min(100.0, a + b) for a, b in zip(m, sd, strict=True)]
            ax.fill_between(steps, low, high, color=c, alpha=0.15)
        ax.set_title(f"rank {rank}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("subject fidelity % (mean ± std)")
    fig.tight_layout()
    fig.savefig(folder / "fidelity_vs_steps.png", dpi=110)
    plt.close(fig)
    (folder / "tables.md").write_text("\n\n".join("\n".join(t) for t in tables.values()) + "\n")


if __name__ == "__main__":
    main()
