"""The DreamBooth training objective for SD 1.x/2.x and SDXL: prompt encoding, noising, the (prior-preserving,
min-SNR-weighted) diffusion loss. Flat arguments; the training loop in train.py wires them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batch-first: hidden (B, 77, D); SDXL also pooled (B, P), time_ids (B, 6)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        extra = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": extra}

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        first = parts[0]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),
        )


def _tokens(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_prompts(pipe, prompts: Sequence[str], device) -> Conditioning:
    """Text conditioning as the pipelines compute it at inference:
    SD1.x/2.x: the text encoder's last hidden state;
    SDXL: both encoders' penultimate hidden states concatenated and text_encoder_2's pooled projection
    (time ids are per image: see ``with_time_ids``)."""
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is None:
        return Conditioning(pipe.text_encoder(_tokens(pipe.tokenizer, prompts, device))[0])
    out1 = pipe.text_encoder(_tokens(pipe.tokenizer, prompts, device), output_hidden_states=True)
    out2 = te2(_tokens(pipe.tokenizer_2, prompts, device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return Conditioning(hidden, out2.text_embeds)


def with_time_ids(cond: Conditioning, original_sizes, crop_top_lefts, target_size) -> Conditioning:
    """SDXL's size/crop conditioning per image: (original h, w, crop top, left, target h, w)."""
    if cond.pooled is None:
        return cond
    rows = [[*orig, *crop, *target_size] for orig, crop in zip(original_sizes, crop_top_lefts, strict=True)]
    ids = torch.tensor(rows, device=cond.hidden.device, dtype=cond.hidden.dtype)
    return Conditioning(cond.hidden, cond.pooled, ids)


def training_scheduler(pipe, prediction_type: str | None) -> DDPMScheduler:
    """A DDPM noise scheduler with the base model's schedule (and prediction type unless overridden)."""
    config = dict(pipe.scheduler.config)
    if prediction_type:
        config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, H, W) in [-1, 1] → latents (B, 4, H/8, W/8), scaled. The posterior mean, not a sample:
    deterministic (cacheable, exact resume) and, for small VAEs, free of sampling texture."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    *,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    num_prior: int = 0,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Noise-prediction loss on latents (B, 4, h, w). The last ``num_prior`` rows are class (prior) images,
    weighted by ``prior_loss_weight``. Randomness comes from ``generator`` only, for exact resume."""
    b = latents.shape[0]
    dev = latents.device
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(dev, latents.dtype)
    if noise_offset:
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, device="cpu")
        noise = noise + noise_offset * offset.to(dev, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device="cpu").to(dev)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, **cond.unet_kwargs()).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, t)
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        else:  # min(snr, γ)/snr, taken as 1 where a zero-terminal-SNR schedule reaches snr = 0
            weight = torch.where(snr > 0, torch.clamp(snr, max=snr_gamma) / snr.clamp(min=1e-12), 1.0)
        per_sample = per_sample * weight
    n = b - num_prior
    loss = per_sample[:n].mean()
    if num_prior:
        loss = loss + prior_loss_weight * per_sample[n:].mean()
    return loss
