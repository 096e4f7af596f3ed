"""The parts of benchmarks/gpu_suite.sh that are easier in Python: the timed quickstart, and the one table.

python benchmarks/gpu_summary.py quickstart OUT_DIR [--dry-run]   # README's first command, timed, + toy eval
python benchmarks/gpu_summary.py table OUT_DIR                    # one table from OUT_DIR/*.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreambooth_dora.runs import RunFolder  # noqa: E402

VARIANTS = ("oD", "oL", "pD", "pL")
DRY_RUN_SETS = [
    "max_train_steps=2", "with_prior_preservation=false", "lr_warmup_steps=0", "validation_prompt=null",
    "save_intermediate_every=null",
]  # fmt: skip


def quickstart(out: Path, dry_run: bool) -> dict:
    """Train the toy preset as the README's first command does, then score the adapter with the toy evaluator."""
    run = out / "quickstart"
    cmd = [sys.executable, "-m", "dreambooth_dora.train", "--config", "training_configs/toy_subject.yaml"]
    cmd += ["--set", f"output_dir={run}", *(DRY_RUN_SETS if dry_run else [])]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    adapter = RunFolder(run).adapter_files()[0]
    evaluation = [sys.executable, "-m", "dreambooth_dora.toy.eval", "--adapter", str(adapter)]
    evaluation += ["--samples", "2" if dry_run else "48"]
    text = subprocess.run(evaluation, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rates = {m[1].strip(): float(m[2]) for m in re.finditer(r"^(.+?)\s+(-?\d+\.\d)$", text, re.M)}
    result = {"kind": "quickstart", "wall_s": round(wall, 1), "rates": rates}
    (out / "quickstart.json").write_text(json.dumps(result, indent=1))
    return result


def _train_rows(data: dict) -> list[list[str]]:
    """One row per gradient-checkpointing setting: each variant's s/step (×ours LoRA) and peak memory."""
    headers, rows = data["tables"][0]["headers"], data["tables"][0]["rows"]
    col = {h: i for i, h in enumerate(headers)}
    out = []
    for ckpt in ("off", "on"):
        cells = {r[col["variant"]]: r for r in rows if r[col["grad ckpt"]] == ckpt and r[col["latents"]] == "cached"}
        shown = [
            f"{cells[v][col['s/step']]} s ({cells[v][col['time ×oL']]}×), {cells[v][col['peak ΔMiB']]} MiB"
            for v in VARIANTS
        ]
        label = f"train step {data['shape']} {data['resolution']} px {data['dtype']}, checkpointing {ckpt}"
        out.append([label, *shown])
    return out


def _qdora_rows(data: dict) -> list[list[str]]:
    """One row per base (float, NF4, int8): each variant's s/step (×ours LoRA on that base) and step peak memory."""
    headers, rows = data["tables"][0]["headers"], data["tables"][0]["rows"]
    col = {h: i for i, h in enumerate(headers)}
    out = []
    for base in dict.fromkeys(r[col["base"]] for r in rows):
        cells = {r[col["variant"]]: r for r in rows if r[col["base"]] == base}
        shown = [
            f"{cells[v][col['s/step']]} s ({cells[v][col['time ×oL (same base)']]}×), "
            f"{cells[v][col['step peak ΔMiB']]} MiB"
            for v in VARIANTS
        ]
        frozen = cells[VARIANTS[0]][col["frozen MiB"]]
        label = f"QDoRA step {data['shape']} {data['resolution']} px {data['dtype']}, {base} base ({frozen} MiB frozen)"
        out.append([label, *shown])
    return out


def _generic_rows(data: dict) -> list[list[str]]:
    """Any other benchmark: its first table, row by row, the first column as the label."""
    table = data["tables"][0]
    rows = []
    for row in table["rows"]:
        cells = "; ".join(f"{h} {c}" for h, c in zip(table["headers"][1:], row[1:], strict=False))
        rows.append([f"{data['kind']}: {row[0]}", cells, "", "", ""])
    return rows


def table(out: Path) -> str:
    lines = ["| measurement | ours DoRA | ours LoRA | peft DoRA | peft LoRA |", "|---|---|---|---|---|"]
    for name in ("train_sd15", "train_sdxl", "qdora", "inference"):
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        shaped = {"train_speed": _train_rows, "qdora": _qdora_rows}.get(data.get("kind"), _generic_rows)
        rows = shaped(data)
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    quick = out / "quickstart.json"
    if quick.is_file():
        q = json.loads(quick.read_text())
        rates = ", ".join(f"{k} {v:g}" for k, v in q["rates"].items())
        lines.append(f"| quickstart (toy preset + toy eval) | {q['wall_s']} s wall; {rates} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["quickstart", "table"])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true", help="quickstart: 2 steps, no class images, 2 eval prompts")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "quickstart":
        print(json.dumps(quickstart(a.out, a.dry_run)))
    else:
        print(table(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
