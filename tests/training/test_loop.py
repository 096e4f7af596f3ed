"""The headless trainer end to end on the tiny builtin models (docs/ARCHITECTURE.md: Training, Reliability)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_dora.training.loop import Callbacks, TrainingError, main, train
from tests.helpers import ROOT, open_files_under

SUBJECT = ROOT / "sample_data" / "smoke_subject"


def _cfg(tmp_path, **over):
    cfg = dict(
        base_model="builtin:tiny-sd15",
        instance_data_dir=str(SUBJECT),
        instance_prompt="a photo of sks heart",
        output_dir=str(tmp_path / "run"),
        resolution=64,
        train_batch_size=2,
        max_train_steps=4,
        learning_rate=1e-3,
        rank=4,
        seed=0,
        checkpointing_steps=2,
        use_in=["diffusers"],  # these runs are read back by stock diffusers: output-axis DoRA, native file
    )
    cfg.update(over)
    return cfg


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("base", ["builtin:tiny-sd15", "builtin:tiny-sdxl"])
def test_smoke_run_writes_everything_and_stock_diffusers_loads_it(base, tmp_path):
    seen = {"steps": [], "samples": [], "ckpts": []}
    cb = Callbacks(
        on_step=lambda info: seen["steps"].append((info.step, info.total, info.loss)),
        on_samples=lambda step, paths: seen["samples"].append((step, paths)),
        on_checkpoint=lambda step, path: seen["ckpts"].append(step),
    )
    result = train(
        _cfg(
            tmp_path,
            base_model=base,
            train_text_encoder=True,
            validation_prompt="a photo of sks heart",
            validation_steps=4,
            save_intermediate_every=4,
            validation_inference_steps=2,
            num_validation_images=1,
        ),
        cb,
    )
    out = tmp_path / "run"
    assert result.status == "finished" and result.steps == 4
    for name in ("adapter.safetensors", "train_config.yaml", "log.csv", "train.log"):
        assert (out / name).is_file(), name
    # use_in [diffusers]: no output-axis kohya file, which ComfyUI / A1111 / Forge would apply wrongly
    assert not (out / "adapter_kohya.safetensors").exists()
    assert [s[0] for s in seen["steps"]] == [1, 2, 3, 4] and seen["steps"][0][1] == 4
    assert seen["ckpts"] == [2, 4] and (out / "checkpoints" / "step-000004" / "state.json").is_file()
    assert seen["samples"][0][0] == 4 and seen["samples"][0][1][0].is_file()
    with Image.open(seen["samples"][0][1][0]) as sample:  # the sample says how it was made, as generate's do
        assert sample.text["parameters"].startswith("a photo of sks heart\nNegative prompt: \nSteps: 2")
        assert f"Seed: 0, Size: 64x64, Model: {base}" in sample.text["parameters"]
    assert len((out / "log.csv").read_text().splitlines()) == 5

    # The written adapter passes the interop check: stock diffusers gives our outputs.
    from dreambooth_dora.adapters.io import load_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline

    ours, stock = load_pipeline(base), load_pipeline(base)
    load_adapter(ours, out / "adapter.safetensors")
    stock.load_lora_weights(str(out / "adapter.safetensors"))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    with torch.no_grad():
        a = ours("a photo of sks heart", generator=torch.Generator().manual_seed(0), **kw).images
        b = stock("a photo of sks heart", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(a - b).max() <= 1e-4

    # Every adapter tensor trained (none sits where no gradient reaches, e.g. SDXL's unused last text layer).
    first = load_file(str(out / "intermediate" / "step-000000.safetensors"))
    final = load_file(str(out / "adapter.safetensors"))
    assert first.keys() == final.keys() and all(not torch.equal(first[k], final[k]) for k in final)
    assert any(k.startswith("text_encoder.") for k in final)


def test_prior_preservation_with_several_class_prompts(tmp_path, monkeypatch):
    from dreambooth_dora.training.data import DreamBoothDataset
    from dreambooth_dora.training.setup import foreign_class_images

    seen: list[str] = []
    collate = DreamBoothDataset.collate

    def spy(items):
        batch = collate(items)
        seen.extend(batch.get("class_prompt", []))
        return batch

    monkeypatch.setattr(DreamBoothDataset, "collate", staticmethod(spy))
    prompts = ["a photo of a heart", "a photo of a red heart"]
    # No text-encoder training: the prompts are encoded once up front, so every class caption must be among them.
    result = train(_cfg(tmp_path, with_prior_preservation=True, class_prompt=prompts, num_class_images=4))
    assert result.status == "finished"
    folder = tmp_path / "run" / "class_images"
    assert [p.read_text().strip() for p in sorted(folder.glob("class_*.txt"))] == prompts * 2
    assert set(seen) == set(prompts)  # the trainer paired instance images with class images of both prompts

    # A folder filled for another prompt is named, not silently reused as if it showed the prompts now set.
    ds = DreamBoothDataset(SUBJECT, "sks", 64, class_dir=folder, class_prompt=["a photo of a heart", "a circle"])
    note = foreign_class_images(ds, ["a photo of a heart", "a circle"])
    assert note.startswith(f"2 of the 4 class images in {folder} were made for other prompts")
    assert "'a photo of a red heart' ×2" in note and "point class_data_dir to a new folder" in note
    assert foreign_class_images(ds, prompts) is None


def test_overfitting_one_image_lowers_the_loss_and_moves_every_tensor(tmp_path):
    """One repeated image: a fixed-noise evaluation loss must fall clearly; A, B and m all change."""
    from dreambooth_dora.sd.pipelines import load_pipeline
    from dreambooth_dora.training.objective import diffusion_loss, encode_images, encode_prompts, training_scheduler

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(SUBJECT / "heart_1.png", one / "heart.png")
    pipe = load_pipeline("builtin:tiny-sd15")
    img = torch.from_numpy(np.array(Image.open(one / "heart.png").convert("RGB").resize((64, 64)))).float()
    pixels = (img.permute(2, 0, 1)[None] / 127.5 - 1).repeat(8, 1, 1, 1)
    sched = training_scheduler(pipe, None)

    def eval_loss(p):
        with torch.no_grad():
            cond = encode_prompts(p, ["a photo of sks heart"] * 8, "cpu")
            lat = encode_images(p.vae, pixels)
            return diffusion_loss(p.unet, sched, lat, cond, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss(pipe)
    result = train(
        _cfg(
            tmp_path,
            instance_data_dir=str(one),
            train_batch_size=1,
            max_train_steps=60,
            learning_rate=5e-3,
            rank=8,
            train_text_encoder=True,
            checkpointing_steps=60,
            save_intermediate_every=60,
        )
    )
    trained = load_pipeline("builtin:tiny-sd15")
    from dreambooth_dora.adapters.io import load_adapter

    load_adapter(trained, result.output_dir / "adapter.safetensors")
    after = eval_loss(trained)
    assert after < 0.8 * before, (before, after)
    first = load_file(str(result.output_dir / "intermediate" / "step-000000.safetensors"))
    last = load_file(str(result.output_dir / "intermediate" / "step-000060.safetensors"))
    final = load_file(str(result.output_dir / "adapter.safetensors"))
    assert first.keys() == last.keys() == final.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        keys = [k for k in first if f".{part}." in k]
        assert keys and all(not torch.equal(first[k], last[k]) for k in keys), part
    assert all(first[k].abs().max() == 0 for k in first if ".lora_B." in k)  # B = 0 at init


def _run_cli(tmp_path, *extra, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "dreambooth_dora.train",
        "--config",
        str(ROOT / "training_configs/tiny_smoke.yaml"),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "validation_prompt=null",
        *extra,
    ]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_kill_is_exact(tmp_path):
    """10 steps straight == 5 steps, process killed (SIGKILL), resumed to 10: identical adapter tensors."""
    common = dict(
        max_train_steps=10, checkpointing_steps=5, train_text_encoder=True, dropout=0.1, train_batch_size=3
    )  # 3 does not divide 4 images: epochs straddle steps
    straight = train(_cfg(tmp_path / "a", **common))
    script = (
        "import os, signal, sys\n"
        "from dreambooth_dora.train import Callbacks, train\n"
        "cfg = eval(sys.argv[1])\n"
        "def kill(step, path):\n"
        "    if step == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(cfg, Callbacks(on_checkpoint=kill))\n"
    )
    cfg_b = _cfg(tmp_path / "b", **common)
    proc = subprocess.run(
        [sys.executable, "-c", script, repr(cfg_b)], cwd=ROOT, env=_env(), capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out_b = Path(cfg_b["output_dir"])
    assert not (out_b / "adapter.safetensors").exists()
    resumed = train({**cfg_b, "resume_from_checkpoint": "latest"})
    assert resumed.steps == 10
    a = load_file(str(straight.output_dir / "adapter.safetensors"))
    b = load_file(str(out_b / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_a_checkpoint_to_resume_from(tmp_path):
    proc = _run_cli(tmp_path, "max_train_steps=100000", "checkpointing_steps=100000", wait=False)
    log = tmp_path / "run" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-2000:]
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and "resume with --resume latest" in output
    stopped_at = int(ckpts[0].name.split("-")[1])
    done = _run_cli(tmp_path, f"max_train_steps={stopped_at + 2}", "--resume", "latest")
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_should_stop_callback_stops_with_checkpoint(tmp_path):
    result = train(_cfg(tmp_path, max_train_steps=50, checkpointing_steps=50), Callbacks(should_stop=lambda: True))
    assert result.status == "stopped" and result.steps == 1
    assert result.last_checkpoint.name == "step-000001"
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"loss became nan at step \d+.*Last good checkpoint: .*step-"):
        train(_cfg(tmp_path, learning_rate=1e30, max_train_steps=20, checkpointing_steps=1, max_grad_norm=1e30))
    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "adapter.safetensors")).values())


def test_nan_stop_leaves_no_file_open_and_closes_the_progress_bar(tmp_path, tensorboard):
    """A NaN stop closes log.csv, train.log, the TensorBoard events file and the progress bar, even while the
    exception (and with it the trainer's frames, as a notebook's last traceback does) is still alive."""
    from tqdm.std import tqdm

    bars_before = set(tqdm._instances)
    with pytest.raises(TrainingError, match="loss became nan") as stopped:
        train(_cfg(tmp_path, learning_rate=1e30, max_train_steps=20, checkpointing_steps=1, max_grad_norm=1e30))
    run = tmp_path / "run"
    assert (run / "log.csv").is_file() and (run / "train.log").is_file()
    assert [w.folder for w in tensorboard] == [run / "tensorboard"] and tensorboard[0].scalars  # it was written to
    assert open_files_under(run) == []
    assert [b.desc for b in set(tqdm._instances) - bars_before] == []
    assert stopped.value is not None  # the traceback was alive during the checks above


def test_two_processes_write_one_adapter(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        "-m",
        "dreambooth_dora.train",
        "--config",
        str(ROOT / "training_configs/tiny_smoke.yaml"),
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "max_train_steps=4",
        "validation_prompt=null",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter.safetensors"]  # use_in [diffusers]
    assert len((out / "log.csv").read_text().splitlines()) == 5  # one writer: 4 steps + header


def test_mixed_folder_trains_on_good_images_and_lists_the_rest(tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    base = Image.open(SUBJECT / "heart_0.png").convert("RGB")
    base.convert("RGBA").save(data / "rgba.png")
    base.convert("P").save(data / "palette.png")
    base.convert("L").save(data / "grey.png")
    base.convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(data / "sixteen.png")
    (data / "notes.png").write_text("not an image")
    (data / "broken.jpg").write_bytes((SUBJECT / "heart_0.png").read_bytes()[:200])
    result = train(_cfg(tmp_path, instance_data_dir=str(data), max_train_steps=2))
    assert result.status == "finished"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "5 images used, 2 skipped" in log and "notes.png" in log and "broken.jpg" in log


BAD = {
    "empty folder": ({"instance_data_dir": "EMPTY"}, "has 0 usable image"),
    "only corrupt files": ({"instance_data_dir": "CORRUPT"}, "bad.png"),
    "unknown key": ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
    "wrong type": ({"rank": "many"}, "rank: Input should be a valid integer"),
    "lr <= 0": ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
    "resolution": ({"resolution": 100}, "resolution: must be a multiple of 8"),
    "prior without class prompt": ({"with_prior_preservation": True}, "class_prompt: prior preservation needs"),
    "unwritable output_dir": ({"output_dir": "FILE/sub"}, "output_dir: cannot write to"),
    "base not found offline": ({"base_model": "someone/not-cached-model"}, "builtin:"),
    "rank above the layers' width": ({"rank": 1000}, r"rank: rank 1000 is above the width .* Use rank <= 32"),
    "seed out of range": ({"seed": 2**70}, "seed: Input should be less than 4294967296"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_explained_and_writes_nothing(case, tmp_path, capsys):
    over, needle = BAD[case]
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "CORRUPT").mkdir()
    (tmp_path / "CORRUPT" / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "FILE").write_text("a file, not a folder")
    over = {
        k: str(tmp_path / v) if isinstance(v, str) and v.split("/")[0] in ("EMPTY", "CORRUPT", "FILE") else v
        for k, v in over.items()
    }
    cfg = _cfg(tmp_path, **over)
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(needle, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing written


def test_an_unavailable_optimizer_is_explained_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # adamw8bit needs a CUDA GPU
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, optimizer="adamw8bit")))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'adamw8bit' needs the bitsandbytes package and a CUDA GPU" in err and "use optimizer: adamw" in err
    assert not (tmp_path / "run").exists()


def test_full_fine_tuning_baseline_trains_the_target_weights(tmp_path):
    """kind=full (the comparison baseline): ΔW of each target trains; it saves as a full-rank LoRA."""
    from dreambooth_dora.adapters.inject import adapter_layers
    from dreambooth_dora.adapters.io import load_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline

    result = train(_cfg(tmp_path, kind="full", max_train_steps=3, rank=2))
    pipe = load_pipeline("builtin:tiny-sd15")
    load_adapter(pipe, result.output_dir / "adapter.safetensors")
    layers = adapter_layers(pipe, "default")
    assert layers and all(a.kind == "lora" and a.rank == layer.in_features for layer, a in layers.values())
    assert all(a.lora_B.abs().max() > 0 for _, a in layers.values())
    assert all(torch.equal(a.lora_A, torch.eye(layer.in_features)) for layer, a in layers.values())


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_completes(tmp_path):
    first = _run_cli(tmp_path, "max_train_steps=100000", "checkpointing_steps=100000", wait=False)
    log = tmp_path / "run" / "log.csv"
    deadline = time.time() + 180
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)  # the first run holds the folder and is stepping
    second = _run_cli(tmp_path, "max_train_steps=60", "rank=8")
    assert second.returncode == 2
    assert f"in use by a training run (PID {first.pid})" in second.stderr
    first.send_signal(signal.SIGINT)  # the first run stops cleanly, with a checkpoint
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, output[-2000:]
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, none of the refused one's
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert int(ckpt.name.removeprefix("step-")) == steps[-1]
    tensors = load_file(str(ckpt / "adapter.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")} == {4}  # the first run's rank


def test_leftovers_of_an_interrupted_save_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-x1y2").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-x1y2" / "adapter.safetensors").write_bytes(b"partial")
    (run / ".tmp-adapter.safetensors.abc").write_bytes(b"partial")
    train(_cfg(tmp_path))
    assert not [p for p in run.rglob(".tmp-*")]


def test_a_full_disk_is_explained_with_the_space_needed(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from dreambooth_dora.training import checkpoint

    calls = {"n": 0}
    real = checkpoint.save_file

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (2 files) fits, the second does not
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    with pytest.raises(TrainingError) as err:
        train(_cfg(tmp_path, checkpoints_total_limit=1))
    text = str(err.value)
    assert text.startswith("the disk is full: writing checkpoint 4 needs about")
    assert "the disk must hold 2 checkpoints at once" in text
    assert f"Last complete checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-000002'}" in text
    assert not [p for p in (tmp_path / "run").rglob(".tmp-*")]


def test_help_config_lists_every_key(capsys):
    from dreambooth_dora.training.config import FIELDS

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {key}: " in out for key in FIELDS)
    assert "rank: int (default 16; >= 1, <= 1024)" in out
