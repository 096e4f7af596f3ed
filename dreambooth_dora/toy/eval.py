"""Measure toy models with the exact evaluator of the procedural world (issue: the offline default).

    python -m dreambooth_dora.toy.eval --base builtin:toy --samples 256 --grid outputs/toy_grid.png
    python -m dreambooth_dora.toy.eval --base builtin:toy --adapter outputs/toy_subject/adapter.safetensors

Base quality: prompts "a {colour} {shape} on a {background} background" for random scenes of the training
distribution → % correct background, object colour, shape, and all three; the same for colour×shape pairs held
out of pretraining (composition, not memorisation). With an adapter: identifier prompts "a sks heart on a {bg}
background" → % showing the subject, % with the asked background; class prompts "a heart on a {bg} background"
→ % showing the subject anyway (the drift check), % with the asked background, % drawing an ordinary heart (or star:
``--subject star``, the harder subject of the quality study).
Forgetting: what personalization cost the rest of the world — the base-world accuracy (all three right on
prompts of the training distribution) with the adapter, against the same prompts and seeds without it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dreambooth_dora import threads
from dreambooth_dora.adapters.inject import disable_adapters
from dreambooth_dora.toy import world as tw

STEPS, GUIDANCE, BATCH = 20, 5.0, 16


@dataclass
class Sample:
    prompt: str
    image: Image.Image
    checks: dict[str, bool]


def generate(pipe, prompts: list[str], seed: int, steps: int = STEPS, guidance: float = GUIDANCE) -> list:
    """Images for prompts (batched; image i uses seed + i)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), BATCH):
        chunk = prompts[i : i + BATCH]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        with torch.no_grad():
            images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def base_prompts(n: int, seed: int, held_out: bool) -> list[tuple[str, tw.Scene]]:
    """Scenes from the training distribution, or with held-out colour×shape pairs, as full prompts."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        if held_out:
            colour, shape = tw.HELD_OUT[len(out) % len(tw.HELD_OUT)]
            scene = tw.sample_scene(rng, exclude=(), colour=colour, shape=shape, colour2=None, pattern="plain")
        else:
            scene = tw.sample_scene(rng)
        out.append((tw.describe(scene, size=False, position=False), scene))
    return out


def _rates(samples: list[Sample], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: 100.0 * float(np.mean([s.checks[k] for s in samples])) for k in keys}


def evaluate_base(pipe, n: int = 256, seed: int = 0, held_out: bool = False) -> tuple[dict, list[Sample]]:
    pairs = base_prompts(n, seed, held_out)
    images = generate(pipe, [p for p, _ in pairs], seed)
    samples = []
    for (prompt, scene), img in zip(pairs, images, strict=True):
        pred = tw.evaluate(img)
        c = {
            "background": pred.background == scene.background,
            "colour": pred.colour == scene.colour,
            "shape": pred.shape == scene.shape,
        }
        c["all three"] = all(c.values())
        samples.append(Sample(prompt, img, c))
    return _rates(samples, ("background", "colour", "shape", "all three")), samples


def evaluate_subject(
    pipe, n: int = 64, seed: int = 0, subject: tw.Scene = tw.SUBJECT_SCENE
) -> tuple[dict, list[Sample]]:
    """Identifier prompts "a sks {shape} on a {bg} background" (subject + asked background) and class prompts
    "a {shape} on a {bg} background" (drift: no subject appears), on backgrounds not of the subject's colours."""
    backgrounds = [c for c in tw.COLOURS if c not in subject.colours]
    shape = subject.shape
    ident = [f"a {tw.SUBJECT_TOKEN} {shape} on a {backgrounds[i % len(backgrounds)]} background" for i in range(n)]
    klass = [f"a {shape} on a {backgrounds[i % len(backgrounds)]} background" for i in range(n)]
    samples = []
    for i, (prompt, img) in enumerate(zip(ident + klass, generate(pipe, ident + klass, seed), strict=True)):
        pred = tw.evaluate(img)
        asked = tw.parse_caption(prompt)
        c = {"background": pred.background == asked["background"], "subject": tw.is_subject(pred, subject)}
        if i >= n:  # class prompts: an ordinary object of the class is what the base model would draw
            c["ordinary object"] = pred.shape == shape and not c["subject"]
        samples.append(Sample(prompt, img, c))
    ident_s, class_s = samples[:n], samples[n:]
    rates = {
        "identifier: subject %": _rates(ident_s, ("subject",))["subject"],
        "identifier: asked background %": _rates(ident_s, ("background",))["background"],
        "class prompt: subject appears % (drift)": _rates(class_s, ("subject",))["subject"],
        "class prompt: asked background %": _rates(class_s, ("background",))["background"],
        "class prompt: ordinary object %": _rates(class_s, ("ordinary object",))["ordinary object"],
    }
    return rates, samples


FORGETTING_KEYS = ("base world: all three % without adapter", "base world: all three % with adapter", "forgetting")


def evaluate_forgetting(pipe, n: int = 64, seed: int = 0) -> tuple[dict, list[Sample]]:
    """Base-world accuracy ("all three") with the pipeline's enabled adapters and without them (same prompts,
    same seeds); ``forgetting`` = without − with, in points (0: nothing lost; larger: worse)."""
    with disable_adapters(pipe):
        before, _ = evaluate_base(pipe, n, seed)
    after, samples = evaluate_base(pipe, n, seed)
    rates = dict(zip(FORGETTING_KEYS, (before["all three"], after["all three"], 0.0), strict=True))
    rates["forgetting"] = before["all three"] - after["all three"]
    return rates, samples


def grid(samples: list[Sample], path: Path, cols: int = 8, scale: int = 2) -> Path:
    """A labelled contact sheet: each image with ✓/✗ for its checks."""
    w = 64 * scale
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * (w + 24)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % cols) * w, (i // cols) * (w + 24)
        sheet.paste(s.image.resize((w, w), Image.Resampling.NEAREST), (x, y))
        marks = "".join("+" if ok else "-" for ok in s.checks.values())
        draw.text((x + 2, y + w + 1), f"{' '.join(s.prompt.split()[1:3])[:18]} {marks}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    from dreambooth_dora.adapters.io import load_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline

    p = argparse.ArgumentParser(prog="python -m dreambooth_dora.toy.eval", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="builtin:toy")
    p.add_argument("--adapter", type=Path, help="evaluate a toy-subject adapter instead of the base")
    p.add_argument("--subject", choices=list(tw.SUBJECTS), default="heart", help="what the adapter was trained on")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--grid", type=Path, help="write a labelled sample sheet here")
    threads.add_argument(p)
    a = p.parse_args(argv)
    threads.apply(a.threads)
    pipe = load_pipeline(a.base)
    if a.adapter:
        load_adapter(pipe, a.adapter)
        rates, samples = evaluate_subject(pipe, a.samples, a.seed, tw.SUBJECTS[a.subject])
        rates |= evaluate_forgetting(pipe, a.samples, a.seed)[0]
        for k, v in rates.items():
            print(f"{k:42s} {v:5.1f}")
    else:
        rates, samples = evaluate_base(pipe, a.samples, a.seed)
        held, _ = evaluate_base(pipe, max(a.samples // 4, len(tw.HELD_OUT)), a.seed, held_out=True)
        print("| prompts | background | colour | shape | all three |\n|---|---:|---:|---:|---:|")
        for name, r in (("training distribution", rates), ("held-out colour×shape", held)):
            print(f"| {name} | {r['background']:.1f} | {r['colour']:.1f} | {r['shape']:.1f} | {r['all three']:.1f} |")
    if a.grid:
        print(f"wrote {grid(samples[:32], a.grid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
