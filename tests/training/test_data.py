"""Image intake and the DreamBooth dataset: modes, EXIF, bad files, crops, captions, determinism, buckets."""

import random
import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_dora.training.data import (
    DataError,
    DreamBoothDataset,
    ImageFileError,
    assign_bucket,
    collate,
    load_image,
    make_buckets,
    resize_and_crop,
    scan_images,
)


def _solid(path: Path, size=(48, 32), colour=(200, 30, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def _gradient(size=(96, 48)) -> Image.Image:
    """Left-to-right ramp: every horizontal crop position gives different pixels."""
    ramp = np.linspace(0, 255, size[0], dtype=np.float32).round().astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(ramp, (size[1], 1))[..., None], 3, axis=2))


def _png16_rgb(path: Path, rgb16: tuple[int, int, int], size=(4, 3)) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + np.tile(np.array(rgb16, dtype=">u2"), size[0]).tobytes()
    header = struct.pack(">IIBBBBB", size[0], size[1], 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size[1])) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# -- load_image ---------------------------------------------------------------------------------------------------


def test_exif_orientation_6_comes_out_upright(tmp_path):
    # Stored 40x20 with a red LEFT edge; orientation 6 = "rotate 90° clockwise to display", which
    # brings the stored left edge to the top: on screen the image is 20x40 with a red top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :, 2] = 255
    stored[:, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    img = np.asarray(load_image(path)).astype(int)
    assert img.shape == (40, 20, 3)
    assert img[:6, :, 0].mean() > 200 and img[:6, :, 2].mean() < 60  # top band red
    assert img[-20:, :, 2].mean() > 200 and img[-20:, :, 0].mean() < 60  # the rest blue


def test_every_mode_loads_as_rgb_with_sensible_values(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red → the white background
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black → mid grey
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [0, 0, 255]
    assert abs(got[0, 2] - 127).max() <= 1

    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    pal.putdata([0, 1, 1, 0])
    pal.save(tmp_path / "pal.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "pal.png")).tolist() == [
        [[255, 255, 255], [0, 200, 0], [0, 200, 0], [255, 255, 255]]
    ]

    Image.new("L", (3, 3), 100).save(tmp_path / "grey.png")
    assert np.unique(np.asarray(load_image(tmp_path / "grey.png"))).tolist() == [100]

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # full magenta + yellow = red
    assert np.asarray(load_image(tmp_path / "cmyk.tif"))[0, 0].tolist() == [255, 0, 0]

    Image.fromarray(np.full((3, 3), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really the 16-bit path
    assert np.unique(np.asarray(load_image(tmp_path / "grey16.png"))).tolist() == [128]

    Image.fromarray(np.full((3, 3), 0.5, np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert np.unique(np.asarray(load_image(tmp_path / "float.tif"))).tolist() == [128]

    _png16_rgb(tmp_path / "rgb16.png", (65535, 32896, 0))
    assert np.asarray(load_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [255, 128, 0]

    for name in ("rgba.png", "pal.png", "grey.png", "cmyk.tif", "grey16.png", "float.tif", "rgb16.png"):
        assert load_image(tmp_path / name).mode == "RGB", name


def test_decompression_bombs_are_refused_with_a_clear_message(tmp_path, monkeypatch):
    path = _solid(tmp_path / "big.png", size=(20, 20))
    with pytest.raises(ImageFileError, match=r"too large \(400 px > limit 100 px\).*Downscale"):
        load_image(path, max_pixels=100)
    # Pillow's own hard limit (2 × MAX_IMAGE_PIXELS) becomes the same kind of error, not a crash.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ImageFileError, match="decompression bomb") as err:
        load_image(path)
    assert err.value.reason.startswith("too large")


def test_jpeg_draft_decodes_smaller_but_never_below_the_requested_size(tmp_path):
    path = tmp_path / "photo.jpg"
    _gradient((1024, 768)).save(path, quality=95)
    draft = load_image(path, draft_size=100)
    assert draft.size == (256, 192)  # DCT scaling by 4: the largest that keeps both sides >= 100
    full = resize_and_crop(load_image(path), 64, 64)
    ds = DreamBoothDataset(tmp_path, "sks", 64)  # items decode with draft_size = the bucket's long side
    from_ds = (ds[0]["pixel_values"].permute(1, 2, 0) + 1) * 127.5
    assert (from_ds - torch.from_numpy(np.asarray(full, dtype=np.float32))).abs().mean() < 2.0


# -- scan_images --------------------------------------------------------------------------------------------------


def _bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.png").write_text("this is text, not a PNG")
    (folder / "empty.jpg").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = BytesIO()
    noise.save(buf, format="JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_scan_keeps_good_images_and_lists_bad_ones_with_reasons(tmp_path):
    _solid(tmp_path / "b.jpg")
    _solid(tmp_path / "A.PNG")
    _bad_files(tmp_path)
    (tmp_path / "b.txt").write_text("caption")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "._b.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: hidden, ignored

    report = scan_images(tmp_path)
    assert [p.name for p in report.images] == ["A.PNG", "b.jpg"]
    assert report.sizes == [(48, 32), (48, 32)]
    reasons = {p.name: why for p, why in report.skipped}
    assert set(reasons) == {"notes.png", "empty.jpg", "cut.jpg"}  # captions and hidden files are not "skipped"
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["cut.jpg"].startswith("corrupt or truncated JPEG")


def test_scan_fails_clearly_when_nothing_is_usable(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"0 usable image\(s\).*recognized extensions: .bmp"):
        scan_images(tmp_path / "empty")
    _bad_files(tmp_path / "bad")
    with pytest.raises(DataError) as err:
        scan_images(tmp_path / "bad")
    message = str(err.value)
    for line in ("cut.jpg: corrupt or truncated JPEG", "empty.jpg: empty file", "notes.png: not an image"):
        assert line in message
    assert "Add readable images" in message
    # A size limit shows up as a per-file reason as well.
    _solid(tmp_path / "large" / "x.png", size=(20, 20))
    assert scan_images(tmp_path / "large", max_pixels=100, min_images=0).skipped[0][1].startswith("too large")


# -- resize_and_crop and buckets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 100), (10, 30), (64, 64)])
def test_resize_and_crop_covers_the_target_without_bars(size):
    out = resize_and_crop(Image.new("RGB", size, (10, 200, 30)), 64, 40)
    pixels = np.asarray(out).astype(int)
    assert out.size == (64, 40)
    assert np.abs(pixels - [10, 200, 30]).max() <= 1  # borders included: nothing was padded


def test_center_and_random_crops():
    img = _gradient()
    center = np.asarray(resize_and_crop(img, 32, 32))
    assert abs(int(center[0, 16, 0]) - 128) <= 3  # the middle of the ramp
    crops = [np.asarray(resize_and_crop(img, 32, 32, center=False, rng=random.Random(s))) for s in range(6)]
    assert any(not np.array_equal(c, center) for c in crops)
    assert len({c.tobytes() for c in crops}) > 1
    same = resize_and_crop(img, 32, 32, center=False, rng=np.random.default_rng(3))
    assert np.array_equal(
        np.asarray(same), np.asarray(resize_and_crop(img, 32, 32, center=False, rng=np.random.default_rng(3)))
    )
    with pytest.raises(TypeError, match="rng"):
        resize_and_crop(img, 32, 32, center=False)


def test_buckets_are_multiples_of_the_step_with_area_near_resolution_squared():
    for resolution, step in ((512, 64), (1024, 64), (128, 32)):
        buckets = make_buckets(resolution, step=step)
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % step == 0 and h % step == 0 and max(w / h, h / w) <= 2.0
            assert abs(w * h - resolution**2) <= w * step / 2  # h is the nearest multiple of step
    assert assign_bucket(4000, 2000, make_buckets(512)) == (704, 384)
    assert assign_bucket(1000, 1000, make_buckets(512)) == (512, 512)
    with pytest.raises(DataError, match="multiple of 8"):
        make_buckets(512, step=60)


# -- DreamBoothDataset --------------------------------------------------------------------------------------------


def _instance_dir(root: Path, sizes=((80, 64), (64, 80))) -> Path:
    folder = root / "inst"
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        _gradient(size).save(folder / f"img{i}.png")
    return folder


def test_items_shapes_prompts_captions_and_repeats(tmp_path):
    inst = _instance_dir(tmp_path)
    (inst / "img1.txt").write_text("  a photo of sks dog\non a beach \n")
    ds = DreamBoothDataset(inst, "a photo of sks dog", 64, repeats=3)
    assert len(ds) == 6 and not ds.augmented
    assert ds.prompts == frozenset({"a photo of sks dog", "a photo of sks dog on a beach"})
    item = ds[3]
    assert item["index"] == 1 and item["prompt"] == "a photo of sks dog on a beach"
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() < -0.9 and 0.9 < item["pixel_values"].max() <= 1.0
    assert item["original_size"] == (80, 64) and item["crop_top_left"] == (8, 0)  # (h, w) and (top, left)
    assert ds[0]["prompt"] == "a photo of sks dog" and "class_pixel_values" not in ds[0]
    with pytest.raises(IndexError):
        ds[6]
    (inst / "img0.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not UTF-8"):
        DreamBoothDataset(inst, "a photo of sks dog", 64)


def test_class_images_pair_by_index_modulo_their_count(tmp_path):
    inst = _instance_dir(tmp_path)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for k, colour in enumerate(colours):
        _solid(tmp_path / "cls" / f"c{k}.png", colour=colour)
    ds = DreamBoothDataset(inst, "sks dog", 64, class_dir=tmp_path / "cls", class_prompt="a dog", repeats=2)
    assert len(ds) == 4 and ds.prompts == {"sks dog", "a dog"}
    for i in range(4):
        item = ds[i]
        assert item["class_index"] == i % 3 and item["class_prompt"] == "a dog"
        rgb = ((item["class_pixel_values"][:, 10, 10] + 1) * 127.5).round().tolist()
        assert rgb == list(colours[i % 3])
    assert (
        len(
            DreamBoothDataset(
                inst, "x", 64, class_dir=tmp_path / "cls", class_prompt="a dog", num_class_images=2
            ).class_images
        )
        == 2
    )
    with pytest.raises(DataError, match="num_class_images=4 but"):
        DreamBoothDataset(inst, "x", 64, class_dir=tmp_path / "cls", class_prompt="a dog", num_class_images=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 100}, "positive multiple of 8"),
        ({"resolution": 0}, "positive multiple of 8"),
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"class_dir": "somewhere"}, "needs both"),
        ({"class_dir": "somewhere", "class_prompt": " "}, "needs both"),
        ({"instance_prompt": "  "}, "instance_prompt is empty"),
    ],
)
def test_constructor_rejects_bad_settings(tmp_path, kwargs, match):
    args = {"instance_dir": _instance_dir(tmp_path), "instance_prompt": "sks dog", "resolution": 64} | kwargs
    with pytest.raises(DataError, match=match):
        DreamBoothDataset(**args)


def test_items_are_a_function_of_seed_epoch_index_only(tmp_path):
    inst = _instance_dir(tmp_path, sizes=((120, 64),) * 4)
    make = lambda seed=0: DreamBoothDataset(inst, "sks", 64, center_crop=False, random_flip=True, seed=seed)  # noqa: E731
    ds = make()
    assert ds.augmented
    first = [ds[i]["pixel_values"] for i in range(4)]
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # global RNG state must not matter
    again = make()
    assert all(torch.equal(a, again[i]["pixel_values"]) for i, a in enumerate(first))
    changed = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        changed += [not torch.equal(first[i], ds[i]["pixel_values"]) for i in range(4)]
        assert torch.equal(ds[2]["pixel_values"], ds[2]["pixel_values"])
    assert any(changed)
    other_seed = make(seed=1)
    assert any(not torch.equal(first[i], other_seed[i]["pixel_values"]) for i in range(4))


def test_batch_order_is_deterministic_per_seed_and_epoch(tmp_path):
    ds = DreamBoothDataset(_instance_dir(tmp_path), "sks", 64, repeats=5)  # 10 items
    e0 = ds.batch_sampler(3, 0)
    assert (
        e0
        == ds.batch_sampler(3, 0)
        == DreamBoothDataset(_instance_dir(tmp_path), "sks", 64, repeats=5).batch_sampler(3, 0)
    )
    assert sorted(i for b in e0 for i in b) == list(range(10)) and [len(b) for b in e0].count(3) == 3
    assert e0 != ds.batch_sampler(3, 1)
    assert ds.batch_sampler(3, 0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(len(b) == 3 for b in ds.batch_sampler(3, 2, drop_last=True))
    batch = collate([ds[i] for i in e0[0]])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["bucket"] == (64, 64)
    assert batch["index"] == [i % 2 for i in e0[0]] and len(batch["prompt"]) == 3


def test_bucketing_keeps_one_bucket_per_batch(tmp_path):
    sizes = [(200, 100), (100, 200), (150, 150), (300, 100), (210, 100), (100, 190)]
    inst = _instance_dir(tmp_path, sizes=sizes)
    _solid(tmp_path / "cls" / "c0.png", size=(64, 64))
    ds = DreamBoothDataset(
        inst, "sks", 128, bucketing=True, bucket_step=32, class_dir=tmp_path / "cls", class_prompt="a dog"
    )
    assert len(set(ds.image_buckets)) == 3  # landscape, portrait, square
    for w, h in ds.image_buckets:
        assert w % 32 == 0 and h % 32 == 0 and abs(w * h - 128**2) <= w * 16
    for batch_indices in ds.batch_sampler(2, 0):
        batch = collate([ds[i] for i in batch_indices])
        w, h = batch["bucket"]
        assert batch["pixel_values"].shape[1:] == batch["class_pixel_values"].shape[1:] == (3, h, w)
    with pytest.raises(ValueError, match="one bucket"):
        collate([ds[0], ds[1]])


def test_jpeg_cut_inside_its_header_is_called_truncated(tmp_path):
    import io

    from PIL import Image

    from dreambooth_dora.training.data import ImageFileError, load_image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:120])
    with pytest.raises(ImageFileError, match="corrupt or truncated"):
        load_image(path)


def _png_with_huge_text_chunk(path: Path, mb: int = 200) -> Path:
    """A valid small PNG carrying a zTXt chunk that decompresses to ``mb`` MB (a few hundred KB on disk)."""
    buf = BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    data = b"Comment\x00\x00" + zlib.compress(b"\x00" * (mb * 2**20), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + data) & 0xFFFFFFFF)
    path.write_bytes(png[:33] + chunk + png[33:])  # after the 8-byte signature and the IHDR chunk
    return path


def test_an_image_with_a_metadata_bomb_is_skipped_and_listed_not_fatal(tmp_path):
    _solid(tmp_path / "good.png")
    _png_with_huge_text_chunk(tmp_path / "bomb.png")
    report = scan_images(tmp_path)
    assert [p.name for p in report.images] == ["good.png"]
    ((path, reason),) = report.skipped
    assert path.name == "bomb.png" and reason.startswith("unsafe or corrupt image metadata")


def test_photos_on_the_toy_base_are_warned_about():
    from dreambooth_dora.training.data import base_fit_warning

    warning = base_fit_warning("builtin:toy", [(64, 64), (4032, 3024)])
    assert warning.startswith("1 of 2 image(s) are photos (e.g. 4032×3024), but builtin:toy")
    assert "Load a Stable Diffusion model instead" in warning
    assert base_fit_warning("builtin:toy", [(64, 64)] * 5) is None  # the toy subject's own images
    assert base_fit_warning("builtin:tiny-sd15", [(4032, 3024)]) is None  # other bases take any size
