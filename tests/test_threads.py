"""The CPU threading policy of the commands: passive OpenMP waiting and a thread count that fits the free cores,
unless the user chose; set before torch starts (docs/ARCHITECTURE.md, Entry points)."""

import os
import subprocess
import sys

import pytest

from dreambooth_dora import threads


def _command(*args: str, **env: str) -> str:
    """``python -m dreambooth_dora.threads ARGS`` with the OpenMP variables removed, then ``env`` added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k not in (threads.AUTO, threads.SPIN)}
    out = subprocess.run(
        [sys.executable, "-m", "dreambooth_dora.threads", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_a_command_sleeps_idle_threads_and_fits_the_free_cores():
    line = _command()
    assert line.startswith("OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 OMP_NUM_THREADS=")
    chosen = int(line.split("OMP_NUM_THREADS=")[1].split()[0])
    assert 1 <= chosen <= threads.usable_cores()
    assert "chosen from the free cores" in line and f"torch uses {chosen} threads" in line


def test_the_users_settings_win():
    assert _command(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == (
        "OMP_WAIT_POLICY=ACTIVE OMP_NUM_THREADS=1 (as set); torch uses 1 threads"
    )
    assert _command("--threads", "1").startswith("OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 OMP_NUM_THREADS=1 (as")
    assert _command("--threads=1", OMP_NUM_THREADS="2").startswith("OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 O")
    assert _command(GOMP_SPINCOUNT="0").startswith("OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0 ")


def test_importing_the_package_from_a_script_changes_nothing():
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    probe = "import os, dreambooth_dora; print(sorted(k for k in os.environ if k.startswith('OMP_')))"
    out = subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--threads", "3"], 3), (["x", "--threads=2"], 2), (["--threads"], None), (["--threads", "0"], None), ([], None)],
)
def test_requested_reads_the_flag(argv, expected):
    assert threads.requested(argv) == expected


def test_configure_writes_only_what_the_user_left_open():
    env = {"OMP_NUM_THREADS": "7"}
    assert threads.configure(environ=env) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
    assert env == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
    env = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}  # the user's policy, with libgomp's own spin count
    assert threads.configure(environ=env) == {} and "GOMP_SPINCOUNT" not in env
    env = {}
    decided = threads.configure(environ=env)
    assert decided[threads.AUTO] == "1" and 1 <= int(decided["OMP_NUM_THREADS"]) <= threads.usable_cores()


def test_the_balancer_follows_the_load_only_when_the_count_was_chosen_for_the_user(monkeypatch):
    import torch

    assert not threads.Balancer(environ={}).active
    balancer = threads.Balancer(every_s=0.0, environ={threads.AUTO: "1"})
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(balancer._probe, "free_cores", lambda: 1)
        torch.set_num_threads(2)
        assert balancer.tick() == 1 and torch.get_num_threads() == 1
        assert balancer.tick() is None  # nothing changed
    finally:
        torch.set_num_threads(before)


def test_a_bad_thread_count_is_refused_by_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "dreambooth_dora.generate", "--threads", "0", "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--threads" in out.stderr
