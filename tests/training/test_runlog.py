"""The run log closes every sink it opened, whichever way its block is left; off the main process it writes nothing."""

import logging
import sys

import pytest
from tqdm.std import tqdm

from dreambooth_dora.runs import RunFolder
from dreambooth_dora.training import runlog
from dreambooth_dora.training.runlog import Callbacks, RunLog
from tests.helpers import open_files_under


def _our_handlers(run):
    handlers = logging.getLogger("dreambooth_dora").handlers
    return [h for h in handlers if getattr(h, "baseFilename", None) == str(run.log)]


def test_every_sink_is_closed_when_the_block_raises(tmp_path, tensorboard):
    run, steps = RunFolder(tmp_path), []
    bars_before = set(tqdm._instances)
    with pytest.raises(RuntimeError, match="the step failed"):
        with RunLog(run, Callbacks(on_step=steps.append), total=3, enabled=True) as log:
            log.start(0)
            log.step(1, 0.5, 1e-3)
            logging.getLogger("dreambooth_dora.train").info("one step done")
            assert _our_handlers(run) and len(open_files_under(tmp_path)) == 3  # train.log, log.csv, events
            raise RuntimeError("the step failed")
    assert open_files_under(tmp_path) == [] and _our_handlers(run) == []
    assert set(tqdm._instances) - bars_before == set()
    assert [w.closed for w in tensorboard] == [True] and tensorboard[0].folder == run.tensorboard
    assert tensorboard[0].scalars == [("loss", 0.5, 1), ("lr", 1e-3, 1)]
    assert [(s.step, s.total, s.loss) for s in steps] == [(1, 3, 0.5)]
    lines = run.csv.read_text().splitlines()
    assert lines[0] == "step,loss,lr,steps_per_s,elapsed_s" and lines[1].startswith("1,0.500000,0.001,")
    assert "one step done" in run.log.read_text()


def test_a_resumed_run_appends_to_log_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "_tensorboard", lambda folder: None)
    run = RunFolder(tmp_path)
    for first in (1, 3):
        with RunLog(run, Callbacks(), total=4, enabled=True) as log:
            log.start(first - 1)
            log.step(first, 1.0, 1e-4)
            log.step(first + 1, 1.0, 1e-4)
    steps = [line.split(",")[0] for line in run.csv.read_text().splitlines()]
    assert steps == ["step", "1", "2", "3", "4"]  # one header, every step once


def test_other_processes_write_and_report_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "_tensorboard", lambda folder: pytest.fail("only the main process opens TensorBoard"))
    seen = []
    cb = Callbacks(
        on_step=seen.append,
        on_samples=lambda *a: seen.append(a),
        on_checkpoint=lambda *a: seen.append(a),
    )
    with RunLog(RunFolder(tmp_path), cb, total=2, enabled=False) as log:
        log.start(0)
        log.step(1, 0.5, 1e-3)
        log.samples(1, [tmp_path / "x.png"])
        log.checkpoint(1, tmp_path / "ckpt")
    assert seen == [] and list(tmp_path.iterdir()) == []


def test_log_lines_go_above_the_live_bar_and_the_console_is_restored_after(tmp_path, monkeypatch, capsys):
    """A line logged while the bar is live (e.g. "checkpoint …") clears the bar, takes a line of its own and the bar
    is redrawn below it, instead of being glued to the end of the bar."""
    monkeypatch.setattr(runlog, "_tensorboard", lambda folder: None)
    console = logging.StreamHandler(sys.stderr)  # what `python -m dreambooth_dora.train` sets up (basicConfig)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.root.addHandler(console)
    try:
        with RunLog(RunFolder(tmp_path), Callbacks(), total=3, enabled=True) as log:
            log.start(0)
            log.step(1, 0.5, 1e-3)
            log.checkpoint(1, tmp_path / "checkpoints" / "step-000001")
            log.step(2, 0.5, 1e-3)
        assert console.stream is sys.stderr  # the handler writes to the console itself again
    finally:
        logging.root.removeHandler(console)
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n")]  # what each terminal line shows in the end
    assert f"INFO checkpoint {tmp_path / 'checkpoints' / 'step-000001'}" in lines
    before, _, after = err.partition("INFO checkpoint")
    assert "training:" in before and before.endswith("\r")  # the bar was there, and was cleared first
    assert "1/3" in after.split("\n")[1]  # then drawn again on the next line, where it goes on
