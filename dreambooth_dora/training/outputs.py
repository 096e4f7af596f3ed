"""The files a run writes from its live state (main process only), each under its ``RunFolder`` name: validation
images, checkpoints, intermediate adapters (for the ΔM/ΔD analysis) and the final adapter files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreambooth_dora.adapters.io import save_adapter
from dreambooth_dora.runs import atomic_path
from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training.runlog import RunLog
from dreambooth_dora.training.setup import ADAPTER, Session

log = logging.getLogger("dreambooth_dora.train")


def wants_samples(s: Session, step: int) -> bool:
    cfg = s.cfg
    return s.main and bool(cfg.validation_prompt) and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps)


def validation_images(s: Session, step: int) -> list[Path]:
    """Sample images with the live (unmerged) adapter; main process only."""
    cfg = s.cfg
    s.unet.eval()
    paths = []
    with torch.no_grad(), s.accelerator.autocast():
        s.pipe.set_progress_bar_config(disable=True)
        for i in range(cfg.num_validation_images):
            image = s.pipe(
                cfg.validation_prompt,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=torch.Generator().manual_seed(cfg.seed + i),
            ).images[0]
            with atomic_path(s.run.sample(step, i)) as tmp:
                image.save(tmp, format="PNG")
            paths.append(s.run.sample(step, i))
    s.unet.train()
    return paths


def save_checkpoint(s: Session, step: int, runlog: RunLog) -> Path | None:
    """Checkpoint ``step`` (main process; the others return None), keeping the newest checkpoints_total_limit."""
    if not s.main:
        return None
    scaler = s.accelerator.scaler
    extra = {
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "config": s.cfg.model_dump(mode="json"),
    }
    path = ckpt.save_checkpoint(
        s.run.checkpoint(step), step, s.named, s.optimizer, s.lr_scheduler, extra, keep=s.cfg.checkpoints_total_limit
    )
    runlog.checkpoint(step, path)
    return path


def save_intermediate(s: Session, step: int) -> None:
    """The adapter at step 0, N, 2N… (N = save_intermediate_every), for the ΔM/ΔD analysis."""
    every = s.cfg.save_intermediate_every
    if s.main and every and step % every == 0:
        fmt = "native" if s.cfg.axis == "out" else "kohya"
        meta = {"base_model": s.cfg.base_model, "step": step}
        save_adapter(s.pipe, s.run.intermediate_adapter(step), ADAPTER, fmt, meta)


def save_adapters(s: Session, steps: int) -> list[Path]:
    """The final adapter files: native (axis "out" only; diffusers reads no other) and kohya, with the run's facts
    in their metadata."""
    cfg = s.cfg
    meta = {
        "base_model": cfg.base_model,
        "arch_name": s.arch.arch,
        "instance_prompt": cfg.instance_prompt,
        "class_prompt": cfg.class_prompt,
        "steps": steps,
        "resolution": cfg.resolution,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "train_text_encoder": cfg.train_text_encoder,
    }
    files = []
    if cfg.axis == "out":
        files.append(save_adapter(s.pipe, s.run.adapter, ADAPTER, "native", meta))
    files.append(save_adapter(s.pipe, s.run.kohya_adapter, ADAPTER, "kohya", meta))
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return files
