"""How the trainer fares when another CPU-heavy process shares the machine, with nothing set by hand.

    python benchmarks/contention.py                      # toy-preset steps/s: quiet vs one competing process
    python benchmarks/contention.py --quickstart         # the README's first command, quiet vs with a competitor
    python benchmarks/contention.py --repo ../old-checkout   # the same measurement for another checkout
    python benchmarks/contention.py --env OMP_NUM_THREADS=1  # the trainer with a variable set by hand

The trainer runs as a user runs it — ``python -m dreambooth_dora.train`` with every OMP_* variable (and
GOMP_SPINCOUNT) removed from the environment, so whatever thread policy the checkout applies by itself is measured.
The competitor is what a second training or the app's generator is: one CPU-bound torch process with 2 threads and
the default OpenMP settings (matrix products in a loop), started before the trainer and stopped after it.
Rounds alternate quiet and contended runs, so slow drifts of the machine's background load hit both.

Steps/s is read from the run's log.csv between step --skip and the last step (the loop's own time, without model
loading); --quickstart measures the whole command's wall time instead (class images included).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS_ONLY = ["with_prior_preservation=false", "lr_warmup_steps=0"]  # the loop alone: no class images
COMPETITOR = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(768, 768)\nwhile True:\n    a = (a @ a).clamp_(-1, 1)\n"
)


def _clean_env(repo: Path, extra: dict[str, str]) -> dict[str, str]:
    drop = ("DREAMBOOTH_DORA_AUTO_THREADS", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k not in drop}
    return {**env, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _train(repo: Path, out: Path, sets: list[str], extra_env: dict[str, str]) -> float:
    """Run the toy preset; returns the wall time in seconds."""
    cmd = [sys.executable, "-m", "dreambooth_dora.train", "--config", "training_configs/toy_subject.yaml"]
    cmd += ["--set", f"output_dir={out}", *sets]
    t0 = time.perf_counter()
    env = _clean_env(repo, extra_env)
    done = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        sys.exit(f"the trainer failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - t0


def _steps_per_s(out: Path, skip: int) -> float:
    with (out / "log.csv").open() as f:
        rows = [(int(r["step"]), float(r["elapsed_s"])) for r in csv.DictReader(f)]
    (s0, t0), (s1, t1) = next(r for r in rows if r[0] == skip), rows[-1]
    return (s1 - s0) / (t1 - t0)


class Competitor:
    """One 2-thread CPU-bound torch process with the default OpenMP settings, for the length of a ``with``."""

    def __enter__(self) -> Competitor:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
        time.sleep(2.0)  # let it reach its loop (importing torch takes a second or two)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(repo: Path, rounds: int, steps: int, skip: int, quickstart: bool, env: dict) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"quiet": [], "contended": []}
    for r in range(rounds):
        for label in ("quiet", "contended") if r % 2 == 0 else ("contended", "quiet"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                sets = [] if quickstart else STEPS_ONLY + [f"max_train_steps={steps}"]
                sets += ["validation_prompt=null", "save_intermediate_every=null", f"checkpointing_steps={10**6}"]
                if label == "contended":
                    with Competitor():
                        wall = _train(repo, out, sets, env)
                else:
                    wall = _train(repo, out, sets, env)
                value = wall if quickstart else _steps_per_s(out, skip)
                results[label].append(value)
                print(f"round {r + 1} {label:<9} {value:8.3f} {'s' if quickstart else 'steps/s'}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose trainer is measured (default: this one)")
    p.add_argument("--rounds", type=int, default=2, help="quiet/contended pairs")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (steps/s mode)")
    p.add_argument("--skip", type=int, default=5, help="steps not counted at the start of a run")
    p.add_argument("--quickstart", action="store_true", help="time the README's whole first command instead")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="set for the trainer (default: nothing)")
    a = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in a.env)
    results = measure(a.repo.resolve(), a.rounds, a.steps, a.skip, a.quickstart, env)
    quiet, busy = statistics.median(results["quiet"]), statistics.median(results["contended"])
    unit = "wall s (whole command)" if a.quickstart else "steps/s"
    ratio = busy / quiet if not a.quickstart else quiet / busy
    label = f"{a.repo.resolve().name} {' '.join(a.env)}".strip()
    print(f"\n| checkout, environment | {unit}: quiet | with one competitor | contended / quiet speed |")
    print("|---|---:|---:|---:|")
    print(f"| {label} | {quiet:.3f} | {busy:.3f} | {ratio:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
