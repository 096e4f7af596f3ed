"""Generation with adapters merged or toggled, and ``python -m dreambooth_dora.generate``.

``Studio`` keeps one base pipeline loaded. Adapters are loaded once per file and switched by strength, on/off and
mode without ever reloading the base: "merged" folds the enabled adapters into the weights (the base model's
speed), "toggled" runs them as live layers (switching is free). Base weights are restored bit for bit whenever
the merged set changes, in any dtype.
See docs/ARCHITECTURE.md (Entry points, The DoRA math).
"""

from __future__ import annotations

import argparse
import difflib
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreambooth_dora import threads
from dreambooth_dora.adapters.inject import (
    AdapterError,
    check_scale,
    list_adapters,
    merge_adapters,
    remove_adapter,
    set_adapter_enabled,
    set_adapter_scale,
    unmerge_adapters,
)
from dreambooth_dora.adapters.io import AdapterFileError, load_adapter, parse_adapter_spec
from dreambooth_dora.runs import atomic_path
from dreambooth_dora.sd.images import save_png
from dreambooth_dora.sd.pipelines import ModelLoadError, load_pipeline
from dreambooth_dora.sd.quantize import METHODS, QuantizationError

MODES = ("merged", "toggled")


class GenerationError(ValueError):
    """Bad generation input; the message names the value and the fix."""


def _schedulers() -> dict[str, tuple[type, dict]]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    dpm = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, dpm),
        "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**dpm, "use_karras_sigmas": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        # DDIM's own default clips predicted latents to [-1, 1], which only suits pixel-space models; a base whose
        # saved scheduler is not DDIM (builtin:toy's DPM-Solver) would inherit that default and draw nothing.
        "ddim": (DDIMScheduler, {"clip_sample": False}),
        "unipc": (UniPCMultistepScheduler, {}),
    }


SCHEDULER_NAMES = ("default", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "unipc")


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter file to use, at strength λ (W0 + λ·(W' − W0)); disabled ones stay loaded but off."""

    path: Path
    strength: float = 1.0
    enabled: bool = True

    @staticmethod
    def parse(spec: str) -> AdapterChoice:
        """``file.safetensors`` or ``file.safetensors:0.8``."""
        return AdapterChoice(*parse_adapter_spec(spec))


@dataclass
class Settings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    width: int | None = None  # default: the model's native size
    height: int | None = None
    seed: int | None = None  # None: a random seed (reported with the images)
    num_images: int = 1
    scheduler: str = "default"

    def __post_init__(self) -> None:
        # "DPM++ 2M Karras", "Euler a", "euler-a" → the canonical names
        self.scheduler = re.sub(r"[\s\-]+", "_", self.scheduler.strip().lower().replace("++", "pp"))


@dataclass
class GeneratedImage:
    image: Image.Image
    params: dict = field(default_factory=dict)


def check_settings(s: Settings) -> None:
    """Every problem at once, before any work."""
    problems = []
    if not isinstance(s.prompt, str) or not s.prompt.strip():
        problems.append("prompt: empty; describe the image, e.g. 'a photo of sks dog on the beach'")
    if not 1 <= s.steps <= 500:
        problems.append(f"steps: {s.steps} is outside 1-500 (20-30 is typical)")
    if not (math.isfinite(s.guidance) and 0 <= s.guidance <= 50):
        problems.append(f"guidance: {s.guidance} is outside 0-50 (5-8 is typical)")
    for name in ("width", "height"):
        v = getattr(s, name)
        if v is not None and (v < 8 or v > 4096 or v % 8):
            problems.append(f"{name}: {v} must be a multiple of 8 between 8 and 4096 (the VAE works in 8 px blocks)")
    if not 1 <= s.num_images <= 64:
        problems.append(f"num_images: {s.num_images} is outside 1-64")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        problems.append(f"seed: {s.seed} must be in [0, 2^63)")
    if s.scheduler not in SCHEDULER_NAMES:
        hint = difflib.get_close_matches(s.scheduler, SCHEDULER_NAMES, n=1, cutoff=0.4)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        problems.append(f"scheduler: unknown {s.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}.{extra}")
    if problems:
        raise GenerationError("cannot generate:\n  " + "\n  ".join(problems))


def _adapter_name(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:48] or "adapter"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


class Studio:
    """One loaded base model plus any number of adapters, switched without reloading (the UI's engine)."""

    def __init__(
        self, base: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, base_config=None, quantize="none"
    ):
        """``quantize`` (none|nf4|fp4|int8): hold the base's linear layers quantized (less memory; adapters then
        run toggled exactly, and "merged" keeps a dense copy of each adapted layer)."""
        self.base = base
        self.pipe = load_pipeline(base, torch_dtype=dtype, device=device, config=base_config, quantize=quantize)
        self.pipe.set_progress_bar_config(disable=True)
        self._default_scheduler = self.pipe.scheduler
        self._loaded: dict[Path, tuple[str, float]] = {}  # resolved path -> (adapter name, file mtime)
        self.mode = "toggled"
        self.choices: list[AdapterChoice] = []

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def use(self, choices: list[AdapterChoice], mode: str = "toggled") -> None:
        """Make exactly ``choices`` active, at their strengths, in ``mode``. Files load once; a file changed on
        disk is reloaded; adapters no longer listed are dropped. Validates everything before changing anything."""
        if mode not in MODES:
            raise GenerationError(f"mode: {mode!r}; choose 'merged' (base-model speed) or 'toggled' (live layers)")
        for c in choices:
            if not c.path.is_file():
                raise GenerationError(f"adapter file not found: {str(c.path)!r}")
            check_scale(c.strength, c.path.name)
        wanted = {c.path.resolve(): c for c in choices}
        was_merged = self.mode == "merged"
        unmerge_adapters(self.pipe)  # every change below starts from the exact base weights
        stale = {p: n for p, (n, mtime) in self._loaded.items() if p not in wanted or p.stat().st_mtime != mtime}
        fresh: dict[Path, tuple[str, float]] = {}
        try:  # load (and validate) new files before dropping anything, so a bad file changes nothing
            for path in wanted:
                if path in stale or path not in self._loaded:
                    name = _adapter_name(path, set(list_adapters(self.pipe)))
                    load_adapter(self.pipe, path, name=name)
                    fresh[path] = (name, path.stat().st_mtime)
        except BaseException:
            for name, _ in fresh.values():
                remove_adapter(self.pipe, name)
            if was_merged:
                merge_adapters(self.pipe)
            raise
        for path, name in stale.items():
            remove_adapter(self.pipe, name)
            del self._loaded[path]
        self._loaded.update(fresh)
        for path, c in wanted.items():
            name = self._loaded[path][0]
            set_adapter_scale(self.pipe, name, c.strength)
            set_adapter_enabled(self.pipe, name, c.enabled)
        if mode == "merged":
            merge_adapters(self.pipe)
        self.mode, self.choices = mode, list(choices)

    def _scheduler(self, name: str):
        if name == "default":
            return self._default_scheduler
        cls, extra = _schedulers()[name]
        return cls.from_config(self._default_scheduler.config, **extra)

    @torch.no_grad()
    def generate(self, settings: Settings, on_step: Callable[[int, int], None] | None = None) -> list[GeneratedImage]:
        """Images for ``settings``; image i uses seed + i and can be reproduced alone, bit for bit.
        ``on_step(done, total)`` is called after every denoising step of every image."""
        check_settings(settings)
        seed = settings.seed if settings.seed is not None else random.randrange(2**31)
        size = self.native_size
        width, height = settings.width or size, settings.height or size
        self.pipe.scheduler = self._scheduler(settings.scheduler)
        # One image per call: batching changes the arithmetic slightly, and a seed must give the same picture
        # whether it was drawn alone or as image 5 of 8.
        images = [
            self.pipe(
                settings.prompt,
                negative_prompt=settings.negative_prompt or None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                width=width,
                height=height,
                generator=torch.Generator().manual_seed(seed + i),
                callback_on_step_end=_step_reporter(on_step, i, settings) if on_step else None,
            ).images[0]
            for i in range(settings.num_images)
        ]
        adapters = [
            {"file": c.path.name, "strength": c.strength} for c in self.choices if c.enabled and c.strength != 0
        ]
        common = {
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "scheduler": settings.scheduler,
            "width": width,
            "height": height,
            "base": self.base,
            "adapters": adapters,
            "mode": self.mode if adapters else "base",
        }
        return [GeneratedImage(img, {**common, "seed": seed + i}) for i, img in enumerate(images)]


def _step_reporter(on_step: Callable[[int, int], None], image: int, settings: Settings):
    """A diffusers ``callback_on_step_end`` that reports overall progress over all images (a scheduler may run a
    step or two more than asked: PNDM repeats its first timestep)."""

    def report(pipe, step: int, timestep, tensors: dict) -> dict:
        per_image = max(pipe.num_timesteps, step + 1)
        on_step(image * per_image + step + 1, settings.num_images * per_image)
        return tensors

    return report


def save_images(images: list[GeneratedImage], out_dir: Path, prefix: str = "image") -> list[Path]:
    """PNGs carrying their parameters in text chunks (``PREFIX_SEED.png``), plus a grid when there are several
    (``PREFIX_grid_FIRSTSEED-LASTSEED.png``, so another generation into the same folder keeps its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in images:
        path = out_dir / f"{prefix}_{g.params['seed']}.png"
        save_png(g.image, path, g.params)
        paths.append(path)
    if len(images) > 1:
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        w, h = images[0].image.size
        grid = Image.new("RGB", (cols * w, rows * h), "white")
        for i, g in enumerate(images):
            grid.paste(g.image, ((i % cols) * w, (i // cols) * h))
        seeds = f"{images[0].params['seed']}-{images[-1].params['seed']}"
        paths.append(out_dir / f"{prefix}_grid_{seeds}.png")
        with atomic_path(paths[-1]) as tmp:
            grid.save(tmp, format="PNG")
    return paths


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreambooth_dora.generate", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="builtin:toy", help="builtin:*, hub id, diffusers folder or .safetensors")
    p.add_argument("--base-config", help="diffusers folder describing a single-file base (offline)")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeatable")
    p.add_argument("--mode", choices=MODES, default="merged")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", default="default", help=", ".join(SCHEDULER_NAMES))
    p.add_argument("--quantize", default="none", choices=METHODS, help="hold the base in 4/8 bits (bitsandbytes)")
    p.add_argument("--out", required=True, type=Path)
    threads.add_argument(p)
    a = p.parse_args(argv)
    threads.apply(a.threads)
    settings = Settings(
        a.prompt, a.negative_prompt, a.steps, a.guidance, a.width, a.height, a.seed, a.num_images, a.scheduler
    )
    try:
        check_settings(settings)
        choices = [AdapterChoice.parse(s) for s in a.adapter]
        print(f"loading {a.base}…", flush=True)
        studio = Studio(a.base, base_config=a.base_config, quantize=a.quantize)
        studio.use(choices, a.mode)
        with tqdm(total=settings.steps * settings.num_images, desc="sampling", unit="step") as bar:
            images = studio.generate(settings, on_step=lambda done, total: _advance(bar, done, total))
        paths = save_images(images, a.out)
    except (GenerationError, AdapterError, AdapterFileError, ModelLoadError, QuantizationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
