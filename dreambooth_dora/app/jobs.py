"""Background training jobs for the UI: one training at a time per server, each in its own process.

A job is a folder under ``<data_dir>/runs/<id>/`` holding ``job.json`` (the config and state), the trainer's
usual outputs, and ``progress.jsonl`` — one JSON object per event, written by the worker process:

    {"event": "step", "step": 12, "total": 400, "loss": 0.12, "lr": 1e-4, "steps_per_s": 1.9, "eta_s": 203}
    {"event": "samples", "step": 100, "paths": [...]}     {"event": "checkpoint", "step": 100, "path": "..."}
    {"event": "end", "status": "finished" | "stopped" | "failed", "message": "..."}

The worker (``python -m dreambooth_dora.app.jobs run RUN_DIR``) dies with the server (PR_SET_PDEATHSIG) and turns
SIGTERM into "checkpoint, then exit" through the trainer's own signal handling. The manager lives in the server
process, so a page reload or a second browser tab sees the same jobs; requests beyond the running one wait in a
FIFO queue and know their position.
See docs/ARCHITECTURE.md (The browser app).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_dora.shipped import PACKAGE_PARENT
from dreambooth_dora.training.config import TrainConfig

STOP_GRACE_S = 5.0


@dataclass
class JobView:
    """What the UI shows about one job."""

    id: str
    status: str  # queued | running | stopping | finished | stopped | failed
    run_dir: Path
    queue_position: int | None = None
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    steps_per_s: float = 0.0
    eta_s: float | None = None
    samples: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    message: str = ""
    pid: int | None = None
    phase: tuple[str, int, int] | None = None  # (name, done, total) of a long phase before the first step


def _read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return events


def _view(job_id: str, run_dir: Path, status: str, pid: int | None, position: int | None) -> JobView:
    view = JobView(job_id, status, run_dir, position, pid=pid)
    for e in _read_events(run_dir / "progress.jsonl"):
        kind = e.get("event")
        if kind == "step":
            view.step, view.total = e["step"], e["total"]
            # a run resumed after a kill repeats the steps after its last checkpoint: keep the latest ones
            while view.losses and view.losses[-1][0] >= e["step"]:
                view.losses.pop()
            view.losses.append((e["step"], e["loss"]))
            view.steps_per_s, view.eta_s = e["steps_per_s"], e["eta_s"]
        elif kind == "phase":
            view.phase = (e["name"], e["done"], e["total"])
        elif kind == "samples":
            view.samples = e["paths"]
        elif kind == "checkpoint":
            view.checkpoints.append(e["step"])
        elif kind == "end":
            view.status, view.message = e["status"], e.get("message", "")
        elif kind == "resumed":  # the previous run's end no longer describes the job
            view.status, view.message = status, ""
    return view


def _ended(run_dir: Path) -> bool:
    """Whether the latest run of this job folder wrote its "end" event."""
    kinds = [e.get("event") for e in _read_events(run_dir / "progress.jsonl")]
    kinds = kinds[len(kinds) - kinds[::-1].index("resumed") :] if "resumed" in kinds else kinds
    return "end" in kinds


def _stop_message(run_dir: Path) -> str:
    if any((run_dir / "checkpoints").glob("step-*")):
        return "stopped; resume continues from the last checkpoint"
    return "stopped before the first checkpoint; resume starts from step 0"


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the server process dies (Linux)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class JobManager:
    """Starts, queues, stops and reports training jobs; thread-safe, one per server."""

    def __init__(self, data_dir: Path) -> None:
        # Absolute: the worker runs with the repository as its working directory, not the server's.
        self.runs = (Path(data_dir) / "runs").resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._queue: list[str] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping: set[str] = set()
        # Workers are started from this one long-lived thread only: PR_SET_PDEATHSIG fires when the *thread*
        # that forked the child ends, so a worker started from a short-lived thread would be killed at once.
        self._wake = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="job-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            with self._lock:
                self._advance()

    def new_run_dir(self) -> tuple[str, Path]:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        run_dir = self.runs / job_id
        run_dir.mkdir()
        return job_id, run_dir

    def submit(self, job_id: str, config: TrainConfig) -> JobView:
        """Queue a validated config for the run folder of ``job_id``; starts it at once when nothing runs."""
        run_dir = self.runs / job_id
        config = config.model_copy(update={"output_dir": run_dir})
        (run_dir / "job.json").write_text(json.dumps({"config": config.model_dump(mode="json")}, indent=1))
        with self._lock:
            self._queue.append(job_id)
        self._wake.set()
        return self.view(job_id)

    def resume(self, job_id: str) -> JobView:
        """Queue a stopped job again; it continues from its last checkpoint. A queued or running job is left
        as it is (queueing it twice would train the same folder twice)."""
        run_dir = self.runs / job_id
        with self._lock:
            if job_id in self._queue or job_id in self._procs:
                return self.view(job_id)
        state = json.loads((run_dir / "job.json").read_text())
        # No checkpoint yet (stopped while loading): start over rather than fail on "latest".
        has_checkpoint = any((run_dir / "checkpoints").glob("step-*"))
        state["config"]["resume_from_checkpoint"] = "latest" if has_checkpoint else None
        (run_dir / "job.json").write_text(json.dumps(state, indent=1))
        with (run_dir / "progress.jsonl").open("a") as f:
            f.write(json.dumps({"event": "resumed"}) + "\n")
        with self._lock:
            self._queue.append(job_id)
        self._wake.set()
        return self.view(job_id)

    def _advance(self) -> None:
        """Start the head of the queue if no job is running (supervisor thread, under the lock)."""
        self._reap()
        if any(p.poll() is None for p in self._procs.values()) or not self._queue:
            return
        job_id = self._queue.pop(0)
        run_dir = self.runs / job_id
        log = (run_dir / "worker.log").open("ab")
        self._procs[job_id] = subprocess.Popen(
            [sys.executable, "-m", "dreambooth_dora.app.jobs", "run", str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            cwd=PACKAGE_PARENT,
        )

    def _reap(self) -> None:
        # A job being stopped stays listed (as "stopping") until _finish_stop has recorded how it ended.
        for job_id, p in list(self._procs.items()):
            if p.poll() is not None and job_id not in self._stopping:
                del self._procs[job_id]

    def view(self, job_id: str) -> JobView:
        with self._lock:
            self._reap()
            run_dir = self.runs / job_id
            if job_id in self._queue:
                return _view(job_id, run_dir, "queued", None, self._queue.index(job_id) + 1)
            proc = self._procs.get(job_id)
            if proc is not None:
                status = "stopping" if job_id in self._stopping else "running"
                v = _view(job_id, run_dir, status, proc.pid, None)
                if v.status in ("finished", "stopped", "failed"):  # worker is writing its last words
                    v.status = status
                return v
            v = _view(job_id, run_dir, "failed", None, None)
            if v.status in ("running", "queued", "stopping", "failed") and not v.message:
                v.message = "the training process ended without a report; see worker.log"
            return v

    def jobs(self) -> list[JobView]:
        """Every job, newest first (reloads and other tabs see the same list)."""
        ids = sorted((p.name for p in self.runs.iterdir() if (p / "job.json").exists()), reverse=True)
        with self._lock:
            return [self.view(i) for i in ids]

    def active(self) -> JobView | None:
        with self._lock:
            for job_id, p in self._procs.items():
                if p.poll() is None:
                    return self.view(job_id)
            return self.view(self._queue[0]) if self._queue else None

    def stop(self, job_id: str, wait: bool = False) -> JobView:
        """Queued: drop it. Running: SIGTERM (the worker checkpoints and exits), SIGKILL after a grace period."""
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                with (self.runs / job_id / "progress.jsonl").open("a") as f:
                    f.write(json.dumps({"event": "end", "status": "stopped", "message": "removed from queue"}) + "\n")
                return self.view(job_id)
            proc = self._procs.get(job_id)
            if proc is None or proc.poll() is not None:
                return self.view(job_id)
            if job_id in self._stopping:
                return self.view(job_id)
            self._stopping.add(job_id)
            os.killpg(proc.pid, signal.SIGTERM)
        if wait:
            self._finish_stop(job_id, proc)
        else:
            threading.Thread(target=self._finish_stop, args=(job_id, proc), daemon=True).start()
        return self.view(job_id)

    def _finish_stop(self, job_id: str, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        run_dir = self.runs / job_id
        with self._lock:
            # Killed before the trainer took over SIGTERM (still loading) or after the grace period: say so.
            if not _ended(run_dir):
                with (run_dir / "progress.jsonl").open("a") as f:
                    f.write(json.dumps({"event": "end", "status": "stopped", "message": _stop_message(run_dir)}) + "\n")
            self._procs.pop(job_id, None)
            self._stopping.discard(job_id)
        self._wake.set()

    def shutdown(self) -> None:
        """Stop every running job (the server is going away)."""
        with self._lock:
            self._queue.clear()
            procs = list(self._procs.items())
        for job_id, p in procs:
            if p.poll() is None:
                self.stop(job_id, wait=True)


def run_worker(run_dir: Path) -> int:
    """The worker process: train the job in ``run_dir``, reporting to progress.jsonl."""
    from dreambooth_dora.training.loop import Callbacks, train

    progress = (run_dir / "progress.jsonl").open("a")

    def emit(**event) -> None:
        progress.write(json.dumps(event) + "\n")
        progress.flush()

    cb = Callbacks(
        on_step=lambda s: emit(
            event="step",
            step=s.step,
            total=s.total,
            loss=s.loss,
            lr=s.lr,
            steps_per_s=s.steps_per_s,
            eta_s=s.eta_s if s.eta_s != float("inf") else None,
        ),
        on_samples=lambda step, paths: emit(event="samples", step=step, paths=[str(p) for p in paths]),
        on_checkpoint=lambda step, path: emit(event="checkpoint", step=step, path=str(path)),
        on_phase=lambda name, done, total: emit(event="phase", name=name, done=done, total=total),
    )
    config = json.loads((run_dir / "job.json").read_text())["config"]
    try:
        result = train(config, cb)
    except Exception as e:  # reported to the UI; the traceback stays in worker.log
        import traceback

        traceback.print_exc()
        emit(event="end", status="failed", message=str(e))
        return 1
    msg = f"stopped at step {result.steps}; resume continues from the checkpoint" if result.status == "stopped" else ""
    emit(event="end", status=result.status, message=msg)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(run_worker(Path(sys.argv[2])))
    print("usage: python -m dreambooth_dora.app.jobs run RUN_DIR", file=sys.stderr)
    sys.exit(2)
