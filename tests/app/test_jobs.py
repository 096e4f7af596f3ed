"""Background training jobs (dreambooth_dora.jobs): what the manager reports around stops and resumes. The whole
train → stop → resume path runs in the browser tests (test_app.py); these cover the edges they cannot time."""

import json
import os
import time

import pytest

from dreambooth_dora.app.jobs import JobManager, _view
from dreambooth_dora.training.config import validate
from tests.helpers import SMOKE_SUBJECT

SMOKE = SMOKE_SUBJECT


def _wait(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()) is not None and value is not False:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_view_keeps_the_latest_losses_of_repeated_steps(tmp_path):
    """A run killed after step 3 and resumed from its step-2 checkpoint repeats step 3: the curve keeps the new one."""
    events = [{"event": "step", "step": s, "total": 5, "loss": loss, "steps_per_s": 1.0, "eta_s": 1.0}
              for s, loss in ((1, 0.9), (2, 0.8), (3, 0.7))]  # fmt: skip
    events += [{"event": "end", "status": "stopped", "message": "x"}, {"event": "resumed"}]
    events += [{"event": "step", "step": 3, "total": 5, "loss": 0.5, "steps_per_s": 1.0, "eta_s": 1.0}]
    (tmp_path / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    view = _view("j", tmp_path, "running", 123, None)
    assert view.losses == [(1, 0.9), (2, 0.8), (3, 0.5)]
    assert (view.status, view.message) == ("running", "")  # the old run's end no longer applies


def test_stop_while_loading_is_reported_and_resume_starts_over(tmp_path):
    manager = JobManager(tmp_path / "data")
    config = validate({"base_model": "builtin:tiny-sd15", "instance_data_dir": SMOKE, "instance_prompt": "a sks heart",
                       "resolution": 64, "max_train_steps": 5000, "rank": 4})  # fmt: skip
    job_id, run_dir = manager.new_run_dir()
    manager.submit(job_id, config)
    pid = _wait(lambda: manager.view(job_id).pid)
    view = manager.stop(job_id, wait=True)  # still importing torch: no checkpoint, no trainer to report
    assert (view.status, view.message) == ("stopped", "stopped before the first checkpoint; resume starts from step 0")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    manager.resume(job_id)
    assert json.loads((run_dir / "job.json").read_text())["config"]["resume_from_checkpoint"] is None
    assert manager.resume(job_id).status in ("queued", "running")  # a second resume does not queue it twice
    assert manager._queue.count(job_id) <= 1
    _wait(lambda: manager.view(job_id).status == "running")
    manager.shutdown()
    assert manager.view(job_id).status == "stopped" and manager.active() is None
