"""The GPU suite is known to work before anyone pays for a device: its dry run (tiny shapes, CPU) passes."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_the_gpu_suite_dry_run_prints_its_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.rindex("| measurement |") :].splitlines()
    labels = [line.split(" | ")[0] for line in table[2:]]
    for ckpt in ("off", "on"):
        assert f"| train step SD1.5-quick 64 px fp32, checkpointing {ckpt}" in labels
        assert f"| train step SDXL-quick 64 px fp32, checkpointing {ckpt}" in labels
    for base in ("float", "nf4", "int8"):
        assert any(label.startswith("| QDoRA step") and f"{base} base" in label for label in labels), labels
    assert {"| inference: base", "| inference: toggled", "| inference: merged"} <= set(labels)
    assert labels[-1] == "| quickstart (toy preset + toy eval)"
    assert all(line.count("|") == 6 for line in table)
