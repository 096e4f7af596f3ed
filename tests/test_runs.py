"""The run folder's names, its lock and the atomic writes every file goes through."""

import os
import signal
import subprocess
import sys

import pytest

from dreambooth_dora.runs import TMP_PREFIX, RunFolder, RunFolderBusy, atomic_path, parse_step, step_name, write_text

HOLD = "import sys, time; from dreambooth_dora.runs import RunFolder\nwith RunFolder(sys.argv[1]).lock():\n"
HOLD += "    print('held', flush=True)\n    time.sleep(600)\n"


def test_step_names_round_trip():
    assert step_name(100) == "step-000100" and parse_step("step-000100") == 100
    assert parse_step("step-12x") is None and parse_step("latest") is None


def test_run_folder_names_every_file(tmp_path):
    run = RunFolder(tmp_path)
    assert run.checkpoint(5) == tmp_path / "checkpoints" / "step-000005"
    assert run.sample(100, 1) == tmp_path / "samples" / "step-000100_1.png"
    for step in (0, 50, 100):
        write_text(run.intermediate_adapter(step), "x")
    (run.intermediate / "notes.safetensors").write_text("not a step")
    assert [s for s, _ in run.intermediate_adapters()] == [0, 50, 100]


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_releases_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by a training run \(PID {holder.pid}\)"):
            with RunFolder(tmp_path).lock():
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with RunFolder(tmp_path).lock():  # the kernel released the dead process's lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "checkpoints" / "step-000010"
    final.mkdir(parents=True)
    (final / "stale.json").write_text("{}")
    with atomic_path(final, directory=True) as tmp:
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in final.iterdir()] == ["state.json"]


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    run = RunFolder(tmp_path)
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / f"{TMP_PREFIX}abc").mkdir()
    (tmp_path / f"{TMP_PREFIX}adapter.safetensors.x1").write_text("partial")
    (run.checkpoints / "step-000010").mkdir()
    removed = run.remove_stale_temps()
    assert len(removed) == 2 and [p.name for p in run.checkpoints.iterdir()] == ["step-000010"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
