"""Class images for prior preservation: generate only what is missing, deterministically per index."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_dora.training.data import DataError, DreamBoothDataset
from dreambooth_dora.training.prior import ensure_class_images


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
    spin-waiting made these tests ~200x slower at random (measured: 0.3 s vs 72 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = {"batch_size": 2, "num_inference_steps": 2, "resolution": 64, "progress": False}


def _bytes(paths: list[Path]) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in paths}


def test_fills_the_folder_and_continues_exactly_like_a_fresh_run(tmp_path, tiny_sd15):
    tiny_sd15.unet.train()  # modes and the progress-bar setting must come back as they were
    tiny_sd15.set_progress_bar_config(leave=False)

    first = ensure_class_images(tiny_sd15, "a dog", tmp_path / "class", 3, **FAST)
    assert [p.name for p in first] == ["class_000000.png", "class_000001.png", "class_000002.png"]
    assert all(Image.open(p).size == (64, 64) for p in first)
    assert tiny_sd15.unet.training and not tiny_sd15.vae.training
    assert tiny_sd15._progress_bar_config == {"leave": False}

    before = _bytes(first)
    reported = []
    grown = ensure_class_images(
        tiny_sd15, "a dog", tmp_path / "class", 5, on_progress=lambda *a: reported.append(a), **FAST
    )
    assert reported == [(1, 2), (2, 2)]  # the two missing images, counted as they are written
    assert [p.name for p in grown] == [f"class_{k:06d}.png" for k in range(5)]
    assert {name: data for name, data in _bytes(grown).items() if name in before} == before  # untouched

    fresh = ensure_class_images(tiny_sd15, "a dog", tmp_path / "fresh", 5, **FAST)
    assert _bytes(fresh) == _bytes(grown)  # image k depends on (seed, k) only, not on the run that made it
    assert len(set(_bytes(fresh).values())) == 5  # and the images differ from each other

    # A file broken by hand is not counted; it is made again, identical to the original.
    (tmp_path / "class" / "class_000001.png").write_bytes(b"broken")
    again = ensure_class_images(tiny_sd15, "a dog", tmp_path / "class", 5, **FAST)
    assert _bytes(again) == _bytes(grown)
    assert not [p for p in (tmp_path / "class").iterdir() if p.name.startswith(".")]  # no temp files left

    ds = DreamBoothDataset(tmp_path / "class", "sks dog", 64, class_dir=tmp_path / "class", class_prompt="a dog")
    assert ds.class_images == grown  # the dataset uses the same images in the same order


def test_works_with_sdxl(tmp_path, tiny_sdxl):
    made = ensure_class_images(tiny_sdxl, "a dog", tmp_path / "class", 1, seed=7, **FAST)
    assert [p.name for p in made] == ["class_000000.png"] and Image.open(made[0]).size == (64, 64)


def test_existing_images_are_reused_without_generating(tmp_path):
    for name in ("mine_b.jpg", "mine_a.png", "class_000004.png"):
        Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / name)
    # The pipeline is never called when the folder already holds enough usable images.
    got = ensure_class_images(object(), "a dog", tmp_path, 2)
    assert [p.name for p in got] == ["class_000004.png", "mine_a.png"]
    assert len(ensure_class_images(object(), "a dog", tmp_path, 3)) == 3


def test_bad_arguments_and_unwritable_folders_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="class_prompt is empty"):
        ensure_class_images(object(), " ", tmp_path, 2)
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        ensure_class_images(object(), "a dog", tmp_path, 2, batch_size=0)
    with pytest.raises(DataError, match="num_class_images must be an integer >= 0"):
        ensure_class_images(object(), "a dog", tmp_path, -1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot create the class image folder.*folder you can write to"):
        ensure_class_images(object(), "a dog", tmp_path / "file" / "class", 2)


def test_several_class_prompts_take_turns_and_each_image_keeps_its_prompt(tmp_path, tiny_sd15):
    prompts = ["a dog", "a dog on grass", "a small dog"]
    fast = FAST | {"batch_size": 1}  # one image per batch: image k then depends on its own prompt and seed only
    made = ensure_class_images(tiny_sd15, prompts, tmp_path / "class", 4, **fast)
    captions = [p.with_suffix(".txt").read_text() for p in made]
    assert captions == ["a dog\n", "a dog on grass\n", "a small dog\n", "a dog\n"]  # image k: prompt k % 3
    # Image 1 is what the prompt "a dog on grass" alone makes for index 1: the prompt reached the pipeline.
    alone = ensure_class_images(tiny_sd15, "a dog on grass", tmp_path / "alone", 2, **fast)
    assert made[1].read_bytes() == alone[1].read_bytes() and made[0].read_bytes() != alone[0].read_bytes()
    assert (tmp_path / "alone" / "class_000000.txt").read_text() == "a dog on grass\n"  # one prompt: captions too

    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "me.png").write_bytes(made[0].read_bytes())  # an instance image without a caption
    ds = DreamBoothDataset(
        tmp_path / "inst", "sks dog", 64, class_dir=tmp_path / "class", class_prompt=prompts, repeats=4
    )
    assert [ds[i]["class_prompt"] for i in range(4)] == [c.strip() for c in captions]
    assert ds.prompts == {"sks dog", *prompts}


def test_class_images_without_captions_cannot_serve_several_prompts(tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    for folder in (inst, cls):
        folder.mkdir()
        Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "a.png")
    with pytest.raises(DataError, match=r"a.png' has no caption file \(a.txt\), and with 2 class prompts"):
        DreamBoothDataset(inst, "sks dog", 64, class_dir=cls, class_prompt=["a dog", "a cat"])
    # One prompt: an uncaptioned class image trains with it, a captioned one with its caption (kohya's habit).
    assert DreamBoothDataset(inst, "sks dog", 64, class_dir=cls, class_prompt="a dog")[0]["class_prompt"] == "a dog"
    (cls / "a.txt").write_text("a brown dog\n")
    assert DreamBoothDataset(inst, "sks dog", 64, class_dir=cls, class_prompt="a dog")[0]["class_prompt"] == (
        "a brown dog"
    )
    with pytest.raises(DataError, match="holds an empty prompt"):
        DreamBoothDataset(inst, "sks dog", 64, class_dir=cls, class_prompt=["a dog", "  "])
