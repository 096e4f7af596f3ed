"""The CPU threading policy of the command-line entry points, set before torch starts its thread pool.

OpenMP threads that busy-wait stall whenever another process shares the cores: a CPU training measured 70×
slower on a loaded machine with the defaults. So every ``python -m dreambooth_dora.…`` command (and ``python
app.py``) starts with, unless the user already chose:

- ``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=10000``: an idle thread spins a few microseconds, then sleeps.
  Spinning for milliseconds (the default) stalls a shared machine; never spinning (PASSIVE alone) makes every
  small operation wait for a sleeping thread to wake — on the toy model 2 such threads ran at half the speed of 1;
- ``OMP_NUM_THREADS`` = the cores that are free right now (all usable cores minus the ones other processes keep
  busy, measured over a short interval, at least 1); ``--threads N`` on any command sets it explicitly.

A variable already in the environment is left alone, so ``OMP_NUM_THREADS=4 python -m dreambooth_dora.train …``
or ``OMP_WAIT_POLICY=ACTIVE`` still mean what they say. Importing the package from your own script changes
nothing: ``configure`` runs only for the package's own commands (see ``dreambooth_dora/__init__.py``).

Imports nothing from the package and nothing heavy, so every layer may use it.
"""

from __future__ import annotations

import os
import time

THREADS_FLAG = "--threads"
AUTO = "DREAMBOOTH_DORA_AUTO_THREADS"  # set when the thread count was chosen here (so it may follow the load)
_PROBE_S = 0.25  # how long the load of other processes is sampled at start
SPIN = "GOMP_SPINCOUNT"  # libgomp (torch's OpenMP on Linux): how long an idle thread spins before it sleeps
SPIN_COUNT = 10_000  # ~10 µs; benchmarks/contention.py measures it against PASSIVE alone and 1 thread


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadProbe:
    """Measures, between two calls, how many cores *other* processes kept busy (the machine's busy time minus
    this process's own CPU time). Non-blocking after the first call."""

    def __init__(self) -> None:
        self._last = (_cpu_times(), _own_cpu_s(), time.monotonic())

    def others_busy(self) -> float:
        now = (_cpu_times(), _own_cpu_s(), time.monotonic())
        (cpu0, own0, t0), (cpu1, own1, t1) = self._last, now
        self._last = now
        if cpu0 is None or cpu1 is None or cpu1[1] <= cpu0[1] or t1 <= t0:
            return 0.0
        cores = os.cpu_count() or 1
        machine = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]) * cores  # busy cores, this process included
        return max(0.0, machine - (own1 - own0) / (t1 - t0))

    def free_cores(self) -> int:
        """The usable cores not kept busy by other processes since the last call, at least 1."""
        return max(1, min(usable_cores(), round(usable_cores() - self.others_busy())))


def free_cores(interval: float = _PROBE_S) -> int:
    """The usable cores not kept busy by other processes over the next ``interval`` seconds, at least 1."""
    probe = LoadProbe()
    time.sleep(interval)
    return probe.free_cores()


class Balancer:
    """Follows the machine's load during a long CPU job: every ``every_s`` seconds, sets torch's thread count to
    the cores other processes leave free. Does nothing unless the count was chosen by ``configure`` (a user's
    ``--threads`` or ``OMP_NUM_THREADS`` is kept), or on CUDA."""

    def __init__(self, every_s: float = 10.0, environ: dict | None = None) -> None:
        env = os.environ if environ is None else environ
        self.active = env.get(AUTO) == "1"
        self.every_s = every_s
        self._probe = LoadProbe() if self.active else None
        self._next = time.monotonic() + every_s

    def tick(self) -> int | None:
        """Call often (e.g. once per step); returns the new thread count when it changed it."""
        if not self.active or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every_s
        import torch

        wanted = self._probe.free_cores()
        if wanted == torch.get_num_threads():
            return None
        torch.set_num_threads(wanted)
        return wanted


def requested(argv: list[str]) -> int | None:
    """The N of ``--threads N`` / ``--threads=N`` in a command line (None when absent or not a number ≥ 1)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == THREADS_FLAG and i + 1 < len(argv) else None
        if arg.startswith(THREADS_FLAG + "="):
            value = arg.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() and int(value) >= 1 else None
    return None


def configure(threads: int | None = None, environ: dict | None = None) -> dict[str, str]:
    """Set the policy in ``environ`` (default ``os.environ``) before torch is imported; returns what was set."""
    env = os.environ if environ is None else environ
    decided = {}
    if "OMP_WAIT_POLICY" not in env:
        decided["OMP_WAIT_POLICY"] = "PASSIVE"
        if SPIN not in env:  # libgomp: with PASSIVE alone, no spinning at all
            decided[SPIN] = str(SPIN_COUNT)
    if threads is not None:
        decided["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in env:
        decided["OMP_NUM_THREADS"] = str(free_cores())
        decided[AUTO] = "1"
    env.update(decided)
    return decided


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(value)
    return int(value)


def add_argument(parser) -> None:
    """The ``--threads`` option every command takes (applied before torch starts, by ``configure``)."""
    parser.add_argument(
        THREADS_FLAG,
        type=_positive,
        metavar="N",
        help="CPU threads (default: the cores free at start; OMP_NUM_THREADS also works)",
    )


def apply(threads: int | None) -> None:
    """For a ``main()`` called from Python, where the environment was read long ago: set torch's thread count."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def main() -> int:
    """``python -m dreambooth_dora.threads``: print the policy a command started now would run with."""
    import torch

    own = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", SPIN, "OMP_NUM_THREADS") if k in os.environ}
    how = "chosen from the free cores" if os.environ.get(AUTO) == "1" else "as set"
    print(f"{' '.join(f'{k}={v}' for k, v in own.items())} ({how}); torch uses {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
