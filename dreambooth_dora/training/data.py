"""DreamBooth image intake and dataset: instance (+ class) images → fixed-size training tensors.

Intake: ``scan_images`` decodes every image of a folder once, up front, so a corrupt file is reported
before training starts (not at step 300) and unusable files are skipped with a listed reason.
``load_image`` gives an upright 8-bit RGB image from any file Pillow reads (EXIF orientation applied;
alpha composited on white; 16-bit and float greyscale scaled to 8 bits), refusing decompression bombs.

Captions: ``photo.txt`` beside ``photo.png`` (same stem) replaces the instance prompt for that image,
verbatim: it is not checked for the identifier token, so a caption without it trains the subject
under the caption's own words. An empty caption file falls back to the instance prompt.

Items are a pure function of ``(seed, epoch, index)``: random crops and flips draw from an RNG seeded
with exactly those numbers, never from global RNG state, so a resumed run sees the same pixels.
Pixel tensors are (3, H, W) float32 in [-1, 1], channels RGB, (W, H) = the item's bucket.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: above any camera photo users train on, far below a bomb
Rng = random.Random | np.random.Generator
_FIX = "Remove the file from the folder, or re-export it as PNG or JPEG."
_FIX_META = "Re-save the image without its metadata (any image editor's export does)."
_FIX_LARGE = "Downscale it (training uses at most ~1024 px per side), or raise max_pixels."


class DataError(ValueError):
    """Training images or data settings are unusable; the message says what, the value and the fix."""


class ImageFileError(DataError):
    """One image file is unusable; ``reason`` is the short human form ("corrupt or truncated JPEG")."""

    def __init__(self, path: Path, reason: str, fix: str = _FIX) -> None:
        super().__init__(f"{path}: {reason}. {fix}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class IntakeReport:
    """Result of ``scan_images``: usable images (sorted by name) with their upright (W, H) sizes,
    and the skipped image files with the reason each was refused."""

    folder: Path
    images: list[Path]
    sizes: list[tuple[int, int]]
    skipped: list[tuple[Path, str]]

    def describe_skipped(self) -> str:
        """One line per skipped file: ``  name: reason``."""
        return "\n".join(f"  {path.name}: {reason}" for path, reason in self.skipped)


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image; raise ``ImageFileError`` if unusable.

    max_pixels: refuse images with more pixels (decompression bombs). Pillow's own hard limit
    (2 × ``PIL.Image.MAX_IMAGE_PIXELS``) still applies above it and is reported the same way.
    draft_size: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling: much faster) as long as
    both sides stay >= draft_size; pass the largest side the result will be resized to.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow's warning threshold is replaced by max_pixels below; its hard error stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageFileError(path, f"too large (Pillow refuses it as a decompression bomb: {e})", _FIX_LARGE) from e
    except UnidentifiedImageError as e:
        empty = path.stat().st_size == 0
        raise ImageFileError(path, "empty file (0 bytes)" if empty else "not an image (unrecognized content)") from e
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise ImageFileError(
            path, f"cannot be read ({e.strerror or e})", "Check that the file exists and is readable."
        ) from e
    except OSError as e:  # Pillow's decoders fail this way on a header cut short
        raise ImageFileError(path, f"corrupt or truncated image ({e})") from e
    except ValueError as e:  # e.g. a PNG text chunk that decompresses past Pillow's safety limit
        raise ImageFileError(path, f"unsafe or corrupt image metadata ({e})", _FIX_META) from e
    with img:
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise ImageFileError(path, f"too large ({pixels:,} px > limit {max_pixels:,} px)", _FIX_LARGE)
        kind = img.format or path.suffix.lstrip(".").upper()
        if draft_size is not None:
            img.draft(None, (draft_size, draft_size))
        try:
            img.load()  # decode everything now: truncated or corrupt data fails here, not later
            upright = ImageOps.exif_transpose(img)
        except MemoryError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib/struct errors
            raise ImageFileError(path, f"corrupt or truncated {kind} ({e})") from e
    return _to_rgb(upright, path)


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Transparency is composited on white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # Pillow's own convert() clips these to 0..255 instead of scaling them.
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        peak = float(values.max(initial=0.0))
        if img.mode.startswith("I;16"):
            full = 65535.0
        elif img.mode == "F" and peak <= 1.0:
            full = 1.0  # float images are conventionally in [0, 1]
        else:
            full = next((top for top in (255.0, 65535.0) if peak <= top), peak)
        grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        if img.has_transparency_data:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")
    except ValueError as e:
        raise ImageFileError(path, f"unsupported colour mode {img.mode} ({e})") from e


def scan_images(folder: str | Path, *, min_images: int = 1, max_pixels: int = MAX_IMAGE_PIXELS) -> IntakeReport:
    """Decode every image file directly in ``folder`` (no subfolders) once to validate it.

    Image files are recognized by extension (``IMAGE_EXTENSIONS``, any case); other files (captions,
    ``.DS_Store``) and hidden files (macOS ``._name.jpg`` resource forks) are ignored, not skipped.
    Raises ``DataError`` when the folder is missing or fewer than ``min_images`` images are usable.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"image folder {str(folder)!r} {what}. Point it at a folder of .png/.jpg images.")
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    images, sizes, skipped = [], [], []
    for path in candidates:
        try:
            img = load_image(path, max_pixels=max_pixels)
        except ImageFileError as e:
            skipped.append((path, e.reason))
            continue
        images.append(path)
        sizes.append(img.size)
    report = IntakeReport(folder=folder, images=images, sizes=sizes, skipped=skipped)
    if len(images) < min_images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        found = f"\nUnusable files:\n{report.describe_skipped()}" if skipped else f" (recognized extensions: {exts})"
        raise DataError(
            f"image folder {str(folder)!r} has {len(images)} usable image(s); at least {min_images} needed."
            f"{found}\nAdd readable images (PNG or JPEG work everywhere) to the folder."
        )
    if skipped:
        log.warning("skipped %d unusable file(s) in %s:\n%s", len(skipped), folder, report.describe_skipped())
    return report


TOY_BASE = "builtin:toy"
TOY_MAX_SIDE = 256  # builtin:toy draws 64 px scenes; anything far larger is a photo, not a toy-world picture


def base_fit_warning(base_model: str, sizes: list[tuple[int, int]]) -> str | None:
    """A warning when the images clearly do not fit the base: photos on the offline toy model, which only knows
    flat coloured shapes at 64 px (training runs, but learns nothing useful)."""
    big = [s for s in sizes if max(s) > TOY_MAX_SIDE]
    if base_model != TOY_BASE or not big:
        return None
    w, h = big[0]
    return (
        f"{len(big)} of {len(sizes)} image(s) are photos (e.g. {w}×{h}), but {TOY_BASE} is a 17 MB model of coloured "
        "shapes at 64 px that this project trains offline for its demo and tests: it cannot learn a photographed "
        "subject. Load a Stable Diffusion model instead: base_model: a hub id such as "
        "stable-diffusion-v1-5/stable-diffusion-v1-5, a diffusers folder, or a .safetensors checkpoint"
    )


def _crop_plan(size: tuple[int, int], width: int, height: int, center: bool, rng: Rng | None):
    """Source box covering a (width, height) output with no bars, and its top-left (top, left)
    in the coordinates of the image scaled to cover the output (what SDXL's crop conditioning uses)."""
    src_w, src_h = size
    scale = max(width / src_w, height / src_h)  # the smaller side fits exactly, the other overhangs
    slack_x, slack_y = max(src_w * scale - width, 0.0), max(src_h * scale - height, 0.0)
    if center:
        left, top = slack_x / 2, slack_y / 2
    elif isinstance(rng, np.random.Generator):
        left, top = int(rng.integers(0, int(slack_x) + 1)), int(rng.integers(0, int(slack_y) + 1))
    elif isinstance(rng, random.Random):
        left, top = rng.randint(0, int(slack_x)), rng.randint(0, int(slack_y))
    else:
        raise TypeError(f"a random crop needs rng=random.Random or numpy Generator, got {rng!r}")
    # min(): float rounding must not push the box past the image edge.
    box = (left / scale, top / scale, min((left + width) / scale, src_w), min((top + height) / scale, src_h))
    return box, (round(top), round(left))


def resize_and_crop(
    img: Image.Image, width: int, height: int, *, center: bool = True, rng: Rng | None = None
) -> Image.Image:
    """Scale ``img`` to cover (width, height), then crop (centered, or at a position drawn from
    ``rng``): the output is exactly (width, height), never padded. Lanczos resampling."""
    box, _ = _crop_plan(img.size, width, height, center, rng)
    return img.resize((width, height), Image.Resampling.LANCZOS, box=box)


def make_buckets(resolution: int, *, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (w, h), sorted: multiples of ``step`` with w*h ≈ resolution² (each h is
    the multiple of step nearest resolution²/w) and max(w/h, h/w) <= max_ratio."""
    if step <= 0 or step % 8:
        raise DataError(f"bucket step must be a positive multiple of 8 (the VAE's scale factor); got {step}.")
    buckets = set()
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        h = round(resolution * resolution / w / step) * step
        if h > 0 and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
    if not buckets:
        raise DataError(f"no bucket of step {step} fits resolution {resolution}; use a smaller step or no bucketing.")
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to width/height; ties go to the first."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """(W, H) RGB image → (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _read_caption(image: Path) -> str | None:
    path = image.with_suffix(".txt")
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption {str(path)!r} is not UTF-8 text ({e}). Re-save it as UTF-8.") from e
    return " ".join(text.split()) or None  # newlines → spaces; empty → the instance prompt


def class_prompt_list(class_prompt: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """One class prompt or several (a list): class image k is made from prompt k % n. Blank prompts are refused."""
    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
    if class_prompt is not None and (not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts)):
        raise DataError(
            f"class_prompt {class_prompt!r} holds an empty prompt. Name the subject's class, e.g. 'a photo of a "
            "dog', or several as a list: ['a photo of a dog', 'a photo of a dog on a beach']."
        )
    return prompts


def class_image_prompts(images: list[Path], class_prompt: str | list[str] | tuple[str, ...]) -> list[str]:
    """The prompt each class image trains with: its caption file (``class_000000.txt``, which the generator writes
    beside every image it makes, or the user's own), else the one class prompt. With several class prompts an
    image without a caption is refused: which prompt it shows is unknown."""
    prompts = class_prompt_list(class_prompt)
    out = []
    for path in images:
        caption = _read_caption(path)
        if caption is None and len(prompts) > 1:
            raise DataError(
                f"class image {str(path)!r} has no caption file ({path.with_suffix('.txt').name}), and with "
                f"{len(prompts)} class prompts it is not known which one it shows. Point class_data_dir to a new "
                "folder (the class images are then made with their captions), add the caption files, or set a "
                "single class_prompt."
            )
        out.append(caption or prompts[0])
    return out


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (× repeats), each paired with class image ``index % num_class`` when prior
    preservation is on. ``len`` = instance images × repeats; dataset index i shows image i % n.

    Call ``set_epoch(e)`` before reading epoch e (items depend on it when ``augmented``).
    With bucketing each instance image keeps one bucket (nearest aspect ratio) and its class image
    is cropped to the same bucket, so instance and class tensors of a batch can be concatenated.
    """

    def __init__(
        self,
        instance_dir: str | Path,
        instance_prompt: str,
        resolution: int,
        *,
        class_dir: str | Path | None = None,
        class_prompt: str | list[str] | None = None,
        num_class_images: int | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        bucketing: bool = False,
        bucket_step: int = 64,
        seed: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
            raise DataError(f"resolution must be a positive multiple of 8 (e.g. 512, 1024); got {resolution!r}.")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise DataError(f"repeats must be an integer >= 1; got {repeats!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be an integer >= 0; got {seed!r}.")
        if not instance_prompt.strip():
            raise DataError(
                "instance_prompt is empty. Describe the subject with a rare token, e.g. 'a photo of sks dog'."
            )
        blank = class_prompt is not None and (
            not class_prompt or (isinstance(class_prompt, str) and not class_prompt.strip())
        )
        if (class_dir is None) != (class_prompt is None) or blank:
            raise DataError(
                f"class_dir={class_dir!r} and class_prompt={class_prompt!r}: prior preservation needs both "
                "(e.g. class_prompt='a photo of a dog'), or neither."
            )
        class_prompt_list(class_prompt)  # refuses blank prompts
        self.instance_prompt = instance_prompt
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.repeats, self.seed, self.max_pixels, self.epoch = repeats, seed, max_pixels, 0
        self.report = scan_images(instance_dir, max_pixels=max_pixels)
        self.captions = [_read_caption(path) or instance_prompt for path in self.report.images]
        self.buckets = make_buckets(resolution, step=bucket_step) if bucketing else [(resolution, resolution)]
        self.image_buckets = [assign_bucket(w, h, self.buckets) for w, h in self.report.sizes]
        self.class_images: list[Path] = []
        self.class_sizes: list[tuple[int, int]] = []
        self.class_captions: list[str] = []  # the prompt of each class image
        if class_dir is not None:
            class_report = scan_images(class_dir, max_pixels=max_pixels)
            count = len(class_report.images) if num_class_images is None else num_class_images
            if not 1 <= count <= len(class_report.images):
                raise DataError(
                    f"num_class_images={num_class_images} but {class_dir} has {len(class_report.images)} usable "
                    "class images. Generate them first (prior.ensure_class_images) or lower num_class_images."
                )
            self.class_images, self.class_sizes = class_report.images[:count], class_report.sizes[:count]
            self.class_captions = class_image_prompts(self.class_images, class_prompt)

    @property
    def augmented(self) -> bool:
        """True when items change between epochs (random crop or flip): latents cannot be cached."""
        return self.random_flip or not self.center_crop

    @property
    def prompts(self) -> frozenset[str]:
        """Every distinct prompt an item can carry (the instance and class images' captions or prompts)."""
        return frozenset(self.captions) | frozenset(self.class_captions)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops/flips ``__getitem__`` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.report.images) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` of the current epoch: ``pixel_values`` (3, H, W) in [-1, 1], ``prompt``,
        ``index`` (instance image index), ``bucket`` (W, H), ``original_size`` (h, w) and
        ``crop_top_left`` (top, left) for SDXL conditioning, and the ``class_*`` counterparts
        (``class_index`` = index % number of class images). With bucketing a class image takes the
        bucket of the instance image it is paired with, so cache class latents by (class_index, bucket)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image = index % len(self.report.images)
        bucket = self.image_buckets[image]
        # One private stream per (seed, epoch, index); the class image draws from its own substream.
        streams = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        item = {"index": image, "bucket": bucket, "prompt": self.captions[image]}
        item.update(self._pixels(self.report.images[image], self.report.sizes[image], bucket, streams[0], ""))
        if self.class_images:
            k = index % len(self.class_images)
            item.update(class_index=k, class_prompt=self.class_captions[k])
            item.update(self._pixels(self.class_images[k], self.class_sizes[k], bucket, streams[1], "class_"))
        return item

    def _pixels(
        self, path: Path, size: tuple[int, int], bucket: tuple[int, int], stream: np.random.SeedSequence, prefix: str
    ) -> dict[str, Any]:
        rng = np.random.default_rng(stream)
        img = load_image(path, max_pixels=self.max_pixels, draft_size=max(bucket))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # before the crop, so its coordinates match
        box, crop_top_left = _crop_plan(img.size, *bucket, self.center_crop, rng)
        return {
            f"{prefix}pixel_values": _to_tensor(img.resize(bucket, Image.Resampling.LANCZOS, box=box)),
            f"{prefix}original_size": (size[1], size[0]),
            f"{prefix}crop_top_left": crop_top_left,
        }

    def batch_sampler(
        self, batch_size: int, epoch: int, *, shuffle: bool = True, drop_last: bool = False
    ) -> list[list[int]]:
        """Dataset indices for each batch of ``epoch``; a pure function of (seed, epoch).

        Every batch holds one bucket. The batch count does not depend on the epoch.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch size must be an integer >= 1; got {batch_size!r}.")
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in range(len(self)):
            by_bucket.setdefault(self.image_buckets[index % len(self.report.images)], []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
            if drop_last and len(batches[-1]) < batch_size:
                batches.pop()
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch items of one bucket under the items' own keys: tensors stacked (``pixel_values`` and
        ``class_pixel_values`` become (B, 3, H, W)), ``bucket`` kept once as (W, H), everything else
        listed (``prompt``, ``index``, ``original_size``, ...). The trainer concatenates instance and class."""
        buckets = {item["bucket"] for item in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must hold one bucket, got {sorted(buckets)}; use batch_sampler()")
        batch: dict[str, Any] = {}
        for key, first in items[0].items():
            values = [item[key] for item in items]
            batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
        batch["bucket"] = buckets.pop()
        return batch


collate = DreamBoothDataset.collate
