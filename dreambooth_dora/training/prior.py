"""Prior preservation: make sure the class-image folder holds enough images of the class prompt(s).

DreamBooth trains on instance images and, against language drift, on images the *base* model made for
the bare class prompt ("a photo of a dog"), or for several (a list: image k shows prompt k % n, so the
prior covers more of what the class looks like). Existing usable images in the folder are reused; only the
missing ones are generated, as ``class_NNNNNN.png`` with the prompt that made it in ``class_NNNNNN.txt``
(the caption the dataset trains it with). Image NNNNNN always comes from a generator seeded
with ``seed + NNNNNN``, in the batch of indices ``NNNNNN // batch_size`` (a different batch composition
changes the last bits of a batched computation, and so a few pixels), so an interrupted or smaller
earlier run is continued with exactly the images one full run with the same batch size makes. A batch
whose other indices already exist is still generated whole and the extra images discarded: at most
2 × (batch_size - 1) wasted images per call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from dreambooth_dora.runs import atomic_path, write_text
from dreambooth_dora.training.data import MAX_IMAGE_PIXELS, DataError, class_prompt_list, scan_images

CLASS_IMAGE_NAME = "class_{:06d}.png"


def ensure_class_images(
    pipe: DiffusionPipeline,
    class_prompt: str | list[str],
    class_dir: str | Path,
    num_class_images: int,
    *,
    batch_size: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    progress: bool = True,
    negative_prompt: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Fill ``class_dir`` up to ``num_class_images`` usable images and return exactly that many paths.

    The paths come sorted by name: the same images, in the same order, that
    ``DreamBoothDataset(class_dir=..., num_class_images=...)`` uses. Works with SD1.x/2.x and SDXL
    pipelines; ``resolution`` (square, pixels) defaults to the pipeline's native size. The pipeline's
    modules are switched to eval for the generation and back to their previous mode afterwards.
    ``on_progress(done, total)`` is called after each image written (the app's progress line).
    """
    if not class_prompt or (isinstance(class_prompt, str) and not class_prompt.strip()):
        raise DataError("class_prompt is empty. Name the subject's class, e.g. 'a photo of a dog'.")
    prompts = class_prompt_list(class_prompt)
    for name, value, least in (("num_class_images", num_class_images, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{name} must be an integer >= {least}; got {value!r}.")
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise DataError(f"resolution must be a positive multiple of 8 (e.g. 512); got {resolution!r}.")
    if seed < 0:
        raise DataError(f"seed must be >= 0; got {seed}.")
    folder = Path(class_dir).expanduser()
    existing = scan_images(folder, min_images=0, max_pixels=max_pixels).images if folder.is_dir() else []
    missing = num_class_images - len(existing)
    if missing <= 0:
        return existing[:num_class_images]
    _ensure_writable(folder)
    taken = {path.name for path in existing}
    # The smallest free indices: a folder filled by an earlier run continues where it stopped.
    indices: list[int] = []
    k = 0
    while len(indices) < missing:
        if CLASS_IMAGE_NAME.format(k) not in taken:
            indices.append(k)
        k += 1
    made = _generate(
        pipe, prompts, folder, indices, batch_size, seed, num_inference_steps, guidance_scale,
        resolution, progress, negative_prompt, on_progress,
    )  # fmt: skip
    return sorted(existing + made)


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the class image folder {str(folder)!r} ({e.strerror or e}). "
            "Set class_data_dir to a folder you can write to."
        ) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(
            f"the class image folder {str(folder)!r} is not writable. "
            "Fix its permissions or set class_data_dir to a folder you can write to."
        )


def _generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    folder: Path,
    indices: list[int],
    batch_size: int,
    seed: int,
    steps: int,
    guidance: float,
    resolution: int | None,
    progress: bool,
    negative_prompt: str | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Generate and save image k (prompt k % len(prompts), and that prompt as its caption) for every k in
    ``indices``, with batches aligned to batch_size."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    was_training = {name: m.training for name, m in modules.items()}
    bar_config = getattr(pipe, "_progress_bar_config", None)  # diffusers keeps it here; no public getter
    pipe.set_progress_bar_config(disable=True)
    for m in modules.values():
        m.eval()
    wanted, paths = set(indices), []
    try:
        with torch.no_grad(), tqdm(total=len(indices), desc="class images", unit="img", disable=not progress) as bar:
            for group in sorted({k // batch_size for k in indices}):
                batch = range(group * batch_size, (group + 1) * batch_size)
                # One CPU generator per image: the same noise on every device, whatever the batch.
                generators = [torch.Generator("cpu").manual_seed(seed + k) for k in batch]
                texts = [prompts[k % len(prompts)] for k in batch]
                images = pipe(
                    prompt=texts,
                    negative_prompt=None if negative_prompt is None else [negative_prompt] * batch_size,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generators,
                    output_type="pil",
                ).images
                for k, image, text in zip(batch, images, texts, strict=True):
                    if k in wanted:
                        path = folder / CLASS_IMAGE_NAME.format(k)
                        write_text(path.with_suffix(".txt"), text + "\n")  # first: an image never lacks it
                        paths.append(_save_png(image, path))
                        bar.update()
                        if on_progress is not None:
                            on_progress(len(paths), len(indices))
    finally:
        for name, m in modules.items():
            m.train(was_training[name])
        if bar_config is None:
            del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = bar_config
    return paths


def _save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as ``path`` atomically: a reader (or a killed run) never sees half a file."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
