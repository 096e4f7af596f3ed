"""One optimizer step: the diffusion loss of each micro-batch, backward with gradient accumulation, the NaN policy,
gradient clipping, optimizer and schedule step.

Everything random in a step (noise, timesteps, dropout) comes from a generator seeded by (seed, step, micro-batch,
rank), so a step computes the same whether the run got there straight or resumed from a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training.batches import Batches, MicroBatch, TextCache
from dreambooth_dora.training.objective import diffusion_loss, with_time_ids
from dreambooth_dora.training.setup import Session


class TrainingError(RuntimeError):
    """The run had to stop (NaN loss, …); the message says what happened and what was kept."""


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + micro * 131 + rank) % (2**63))


def _backward(s: Session, text: TextCache, mb: MicroBatch, g: torch.Generator, *, sync: bool) -> float:
    """Loss of one micro-batch, its gradient accumulated (gradients are all-reduced only when ``sync``)."""
    cfg, accelerator = s.cfg, s.accelerator
    no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(s.unet)
    with no_sync, accelerator.autocast():
        cond = with_time_ids(text(mb.prompts), **mb.sizes)
        loss = diffusion_loss(
            s.unet,
            s.noise_scheduler,
            mb.latents,
            cond,
            generator=g,
            noise_offset=cfg.noise_offset,
            snr_gamma=cfg.snr_gamma,
            num_prior=mb.num_prior,
            prior_loss_weight=cfg.prior_loss_weight,
        )
        accelerator.backward(loss / cfg.gradient_accumulation_steps)
    return loss.detach().float().item()


def nan_error(loss: float, step: int, checkpoints: Path) -> TrainingError:
    """The error a non-finite loss stops the run with: nothing of this step is saved; the last good checkpoint is
    named so the run can be resumed from it with other settings."""
    kept = ckpt.list_checkpoints(checkpoints)
    return TrainingError(
        f"loss became {loss} at step {step + 1}; the run stopped without saving this state. "
        f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower learning_rate, or use "
        "mixed_precision bf16 instead of fp16."
    )


def train_step(s: Session, batches: Batches, text: TextCache, step: int) -> float:
    """Optimizer step ``step`` (0-based) over its micro-batches; returns the mean loss. Raises TrainingError
    (before the optimizer moves) when the loss is not finite."""
    cfg, accumulation = s.cfg, s.cfg.gradient_accumulation_steps
    loss = 0.0
    for micro in range(accumulation):
        g = step_generator(cfg.seed, step, micro, s.rank)
        torch.manual_seed(g.initial_seed())  # dropout and anything else using the global RNG
        mb = batches(step, micro)
        loss += _backward(s, text, mb, g, sync=micro == accumulation - 1) / accumulation
    if not math.isfinite(loss):
        raise nan_error(loss, step, s.run.checkpoints)
    s.accelerator.clip_grad_norm_(s.trainable, cfg.max_grad_norm)
    s.optimizer.step()
    s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return loss
