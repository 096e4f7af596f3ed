"""Generation: merged = toggled, exact base restore across switches, PNG metadata, schedulers, bad input."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_dora.adapters.io import AdapterFileError, save_adapter
from dreambooth_dora.tools import generate as gen
from dreambooth_dora.tools.generate import AdapterChoice, GenerationError, Settings, Studio, main
from tests.helpers import trained_like


def _adapter_file(path, build, seed, rank=4):
    pipe = trained_like(build(), rank=rank, alpha=rank * 1.5, seed=seed)
    return save_adapter(pipe, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl

    d = tmp_path_factory.mktemp("adapters")
    return {
        "one": _adapter_file(d / "one.safetensors", build_tiny_sd15, 1),
        "two": _adapter_file(d / "two.safetensors", build_tiny_sd15, 2),
        "xl": _adapter_file(d / "xl.safetensors", build_tiny_sdxl, 3),
    }


SETTINGS = Settings("a photo of sks heart", steps=3, guidance=5.0, width=64, height=64, seed=7)


def _weights(pipe):
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
        if "adapters" not in k
    }


def test_merged_and_toggled_give_the_same_image(files):
    studio = Studio("builtin:tiny-sd15")
    base = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use([AdapterChoice(files["one"], 0.8), AdapterChoice(files["two"], 0.5)], "toggled")
    toggled = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use(studio.choices, "merged")
    merged = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    assert np.abs(merged - toggled).max() <= 2
    assert np.abs(toggled - base).max() > 10  # the adapters change the picture


def test_a_quantized_base_generates_merged_and_toggled_alike_and_is_restored(files):
    """generate --quantize nf4: the base is held in 4 bits; adapters apply toggled (exact) or merged (a dense copy
    of each adapted layer), and switching them off restores the quantized base's own images."""
    studio = Studio("builtin:tiny-sd15", quantize="nf4")
    base = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use([AdapterChoice(files["one"], 0.8)], "toggled")
    toggled = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use(studio.choices, "merged")
    merged = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use([], "toggled")
    again = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    assert np.abs(merged - toggled).max() <= 2
    assert np.abs(toggled - base).max() > 10
    assert np.array_equal(again, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hundred_switches_leave_the_base_bitwise_identical(files, dtype):
    studio = Studio("builtin:tiny-sd15", dtype=dtype)
    before = _weights(studio.pipe)
    unet_id = id(studio.pipe.unet)
    rng = random.Random(0)
    for _ in range(100):
        choices = [
            AdapterChoice(files[k], rng.choice([0.0, 0.3, 1.0, -0.5, 1.7]), rng.random() < 0.8)
            for k in ("one", "two")
            if rng.random() < 0.8
        ]
        studio.use(choices, rng.choice(["merged", "toggled"]))
    studio.use([], "toggled")
    after = _weights(studio.pipe)
    assert id(studio.pipe.unet) == unet_id  # never reloaded
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_files_load_once_and_reload_when_changed(files, monkeypatch, tmp_path):
    calls = []
    real = gen.load_adapter
    monkeypatch.setattr(gen, "load_adapter", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    studio = Studio("builtin:tiny-sd15")
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(files["one"].read_bytes())
    for strength in (1.0, 0.5, 0.0, 1.0):
        studio.use([AdapterChoice(copy, strength)], "merged")
        studio.use([AdapterChoice(copy, strength)], "toggled")
    assert len(calls) == 1
    copy.write_bytes(files["two"].read_bytes())
    import os

    os.utime(copy, (1, 1))  # a new mtime, as a re-saved file would have
    studio.use([AdapterChoice(copy)], "toggled")
    assert len(calls) == 2 and len(gen.list_adapters(studio.pipe)) == 1


def test_png_metadata_and_grid(files, tmp_path):
    studio = Studio("builtin:tiny-sd15")
    studio.use([AdapterChoice(files["one"], 0.8)], "merged")
    images = studio.generate(
        Settings(
            "a photo of sks heart",
            negative_prompt="blurry",
            steps=2,
            width=64,
            height=64,
            seed=11,
            num_images=3,
            scheduler="euler_a",
        )
    )
    paths = gen.save_images(images, tmp_path / "out")
    assert [p.name for p in paths] == ["image_11.png", "image_12.png", "image_13.png", "image_grid_11-13.png"]
    info = Image.open(paths[1]).text
    params = json.loads(info["dreambooth_dora"])
    assert params["seed"] == 12 and params["scheduler"] == "euler_a" and params["negative_prompt"] == "blurry"
    assert params["adapters"] == [{"file": "one.safetensors", "strength": 0.8}] and params["mode"] == "merged"
    assert "Seed: 12, Size: 64x64" in info["parameters"] and "one.safetensors:0.8" in info["parameters"]
    assert Image.open(paths[-1]).size == (128, 128)
    again = studio.generate(
        Settings(
            "a photo of sks heart", negative_prompt="blurry", steps=2, width=64, height=64, seed=12, scheduler="euler_a"
        )
    )[0].image
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(paths[1]).convert("RGB")))


def test_scheduler_names_as_users_write_them():
    assert Settings("x", scheduler="DPM++ 2M Karras").scheduler == "dpmpp_2m_karras"
    assert Settings("x", scheduler="Euler a").scheduler == "euler_a"


@pytest.mark.parametrize("name", gen.SCHEDULER_NAMES)
def test_every_scheduler_generates(name):
    studio = Studio("builtin:tiny-sd15")
    out = studio.generate(Settings("a heart", steps=2, width=64, height=64, seed=0, scheduler=name))
    assert out[0].image.size == (64, 64) and out[0].params["scheduler"] == name


def test_progress_is_reported_per_step_without_changing_the_images():
    studio = Studio("builtin:tiny-sd15")
    settings = Settings("a heart", steps=3, width=64, height=64, seed=5, num_images=2)
    seen: list[tuple[int, int]] = []
    reported = studio.generate(settings, on_step=lambda done, total: seen.append((done, total)))
    quiet = studio.generate(settings)
    total = seen[-1][1]
    assert total >= 6 and seen == [(d, total) for d in range(1, total + 1)]
    for a, b in zip(reported, quiet, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_sdxl_merged_equals_toggled(files):
    studio = Studio("builtin:tiny-sdxl")
    studio.use([AdapterChoice(files["xl"])], "toggled")
    a = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    studio.use([AdapterChoice(files["xl"])], "merged")
    b = np.asarray(studio.generate(SETTINGS)[0].image, dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_cli_writes_images(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "--base",
            "builtin:tiny-sd15",
            "--adapter",
            f"{files['one']}:0.8",
            "--prompt",
            "a photo of sks heart",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "3",
            "--num-images",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_3.png", "image_4.png", "image_grid_3-4.png"]
    assert "wrote" in capsys.readouterr().out


BAD = {
    "unknown scheduler": (["--scheduler", "dpm+ 2m"], r"scheduler: unknown 'dpm\+_2m'.*Did you mean 'dpmpp_2m'"),
    "size": (["--width", "100"], r"width: 100 must be a multiple of 8"),
    "other architecture": (["--adapter", "XL"], r"trained for SDXL.*loaded base is"),
    "strength": (["--adapter", "ONE:12"], r"strength 12.0 for one.safetensors: use a number in \[-10, 10\]"),
    "missing file": (["--adapter", "nowhere.safetensors"], r"adapter file not found: 'nowhere.safetensors'"),
    "empty prompt": (["--prompt", " "], r"prompt: empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_explained_and_writes_nothing(case, files, tmp_path, capsys):
    extra, needle = BAD[case]
    extra = [str(files["xl"]) if x == "XL" else x.replace("ONE", str(files["one"])) for x in extra]
    args = [
        "--base",
        "builtin:tiny-sd15",
        "--prompt",
        "a heart",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    import re

    assert err.startswith("error: ") and re.search(needle, err, re.S), err
    assert not (tmp_path / "out").exists()


def test_bad_file_in_use_changes_nothing(files, tmp_path):
    studio = Studio("builtin:tiny-sd15")
    studio.use([AdapterChoice(files["one"])], "merged")
    merged = _weights(studio.pipe)
    with pytest.raises(AdapterFileError):
        studio.use([AdapterChoice(files["one"]), AdapterChoice(files["xl"])], "merged")
    assert all(torch.equal(v, _weights(studio.pipe)[k]) for k, v in merged.items())
    assert list(gen.list_adapters(studio.pipe)) == ["one"]
    with pytest.raises(GenerationError, match="mode: 'fast'"):
        studio.use([], "fast")
