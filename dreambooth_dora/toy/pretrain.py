"""Train ``builtin:toy`` from scratch on the procedural toy world, on a CPU (docs/ARCHITECTURE.md: Base models).

    python -m dreambooth_dora.toy.pretrain --out sample_data/toy_base            # ~60 min on 2 cores
    python -m dreambooth_dora.toy.pretrain --out sample_data/toy_base --resume   # continue after a stop

Stages, each checkpointed under ``--work`` (default ``outputs/toy_pretrain``) so a stopped run continues:
  1. render ``--scenes`` captioned 64×64 scenes (seeded);
  2. the VAE (AutoencoderKL 32/64/64, 4× downsampling → 16×16×4 latents; MSE + 1e-6·KL) on 32×32 crops, then
     its decoder alone on whole scenes (the encoder frozen, so latents stay valid) — the VAE caps shape accuracy;
  3. latents = posterior means × scaling factor (1/std), computed once;
  4. text encoder (CLIP, 128 wide, 3 layers, 20 positions) and UNet (64/128/128, cross-attention 128) together,
     from the diffusion loss alone: AdamW 6e-4, warmup, cosine to 10 %, grad clip 1, batch 32; v-prediction on a
     noise schedule rescaled to zero terminal SNR (see NOISE_SCHEDULE), its error weighted like ε-prediction's
     (see V_LOSS_FLOOR);
  5. the pipeline in fp16 safetensors as a standard diffusers folder (StableDiffusionPipeline.from_pretrained).
The sizes and recipe follow measurements on a 2-core CPU (shared/notes/toy-world.md): fp32 UNet (bf16 was 3×
slower there), bf16 autocast for the VAE (7× faster), denormals flushed, fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_dora import threads
from dreambooth_dora.runs import atomic_path
from dreambooth_dora.sd.fixtures import load_tokenizer
from dreambooth_dora.toy import world as toy_world

TEXT_POSITIONS = 20  # the longest caption ("a small green and blue striped ring in the top left on a …") is 17

# The scenes are mostly background, so a latent's spatial mean says which background it is, and with SD's usual
# schedule (√ᾱ_T ≈ 0.068) that mean survives into pure-looking noise: a model trained so reads the background off
# the initial noise and ignores the prompt (measured: 13 % right, chance level). Rescaling the schedule to zero
# terminal SNR makes the last step truly signal-free, v-prediction keeps that step learnable, and "trailing"
# spacing makes sampling start there — so the background must come from the text.
NOISE_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}
# Plain v-prediction MSE is dominated by the noisiest steps, whose error is mostly irreducible (where the object
# sits cannot be known from the text): measured, that run kept the backgrounds (100 %) but drew blobs (shape
# 6 %). Weighting the v error by ᾱ_t makes it exactly the ε-prediction loss (ε̂ − ε = √ᾱ_t·(v̂ − v)), which
# learns the shapes; the floor keeps the last, signal-free steps — where the background is decided — learning.
V_LOSS_FLOOR = 0.05


def build_components(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=TEXT_POSITIONS,
            projection_dim=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,
    )
    return vae, text, unet


def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, list]:
    """n scenes (held-out compositions and the toy subject excluded) → uint8 images (n, 3, 64, 64), scenes."""
    images, scenes = toy_world.make_dataset(np.random.default_rng(seed), n)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(work: Path, name: str, state: dict) -> None:
    with atomic_path(work / name) as tmp:
        torch.save(state, tmp)  # our own work files, never user input


def _load(work: Path, name: str) -> dict | None:
    path = work / name
    return torch.load(path, weights_only=True) if path.exists() else None


class _Progress:
    """Log every 100 steps with the pace and time left; checkpoint every ``every`` steps."""

    def __init__(self, name: str, total: int, start: int, log, every: int = 250):
        self.name, self.total, self.start, self.log, self.every = name, total, start, log, every
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: float, extra: str = "") -> bool:
        """Report step; True when a checkpoint is due."""
        if step % 100 == 0:
            rate = (step - self.start) / (time.perf_counter() - self.t0)
            left = (self.total - step) / rate / 60 if rate else float("nan")
            self.log(
                f"{self.name} step {step}/{self.total} loss {loss:.5f} {extra}{rate:.2f} steps/s, {left:.1f} min left"
            )
        return step % self.every == 0


def train_vae(vae, images, work: Path, steps: int, decoder_steps: int, log) -> None:
    """AutoencoderKL on the scenes: MSE + 1e-6·KL for ``steps``, then the decoder alone on posterior means."""
    state = _load(work, "vae.pt")
    if state is not None:
        vae.load_state_dict(state["model"])
        if state.get("finished"):
            return
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, fused=True)
    if state is not None:
        opt.load_state_dict(state["opt"])
    step = state["step"] if state else 0
    total = steps + decoder_steps
    progress = _Progress("vae", total, step, log)
    vae.train()
    while step < total:
        g = torch.Generator().manual_seed(1_000_000 + step)  # per step: a resumed run draws the same batches
        decoder_only = step >= steps
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(not decoder_only)
        x = _to_unit(images[torch.randint(0, len(images), (32,), generator=g)])
        if not decoder_only:
            # The VAE is convolutional: 32×32 crops teach it at a quarter of the cost; the decoder then
            # finishes on whole scenes.
            top, left = torch.randint(0, 33, (2,), generator=g).tolist()
            x = x[:, :, top : top + 32, left : left + 32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.mean if decoder_only else post.sample(generator=g)).sample
        loss = F.mse_loss(rec.float(), x) + (0 if decoder_only else 1e-6 * post.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if progress.step(step, loss.item(), "decoder " if decoder_only else ""):
            _save(work, "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    _save(work, "vae.pt", {"model": vae.state_dict(), "step": step, "finished": True})


@torch.no_grad()
def encode_all(vae, images) -> torch.Tensor:
    vae.eval()
    out = []
    for i in range(0, len(images), 256):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(vae.encode(_to_unit(images[i : i + 256])).latent_dist.mean.float())
    return torch.cat(out)


def train_unet(text, unet, latents, scenes, tokenizer, work: Path, steps: int, log, lr: float = 6e-4) -> None:
    """Text encoder + UNet from the diffusion loss; captions are drawn afresh for every sample (optional words
    and the 10 % empty caption for classifier-free guidance vary)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**NOISE_SCHEDULE)
    weight = sched.alphas_cumprod.clamp(min=V_LOSS_FLOOR)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
    state = _load(work, "unet.pt")
    if state is not None:
        text.load_state_dict(state["text"])
        unet.load_state_dict(state["unet"])
        if state.get("finished"):
            return
        opt.load_state_dict(state["opt"])
    step = state["step"] if state else 0
    progress = _Progress("unet", steps, step, log)
    text.train()
    unet.train()
    while step < steps:
        g = torch.Generator().manual_seed(2_000_000 + step)
        caption_rng = np.random.default_rng(3_000_000 + step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(latents), (32,), generator=g)
        z = latents[idx]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        captions = [toy_world.caption(scenes[i], caption_rng) for i in idx.tolist()]
        ids = tokenizer(
            captions, padding="max_length", max_length=TEXT_POSITIONS, truncation=True, return_tensors="pt"
        ).input_ids
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        per_sample = (pred - sched.get_velocity(z, noise, t)).square().mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if progress.step(step, loss.item(), f"lr {opt.param_groups[0]['lr']:.2e} "):
            state = {"text": text.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(), "step": step}
            _save(work, "unet.pt", state)
    _save(work, "unet.pt", {"text": text.state_dict(), "unet": unet.state_dict(), "step": step, "finished": True})


def assemble(vae, text, unet, tokenizer):
    from diffusers import DPMSolverMultistepScheduler

    from dreambooth_dora.sd.fixtures import assemble_sd

    # steps_offset only matters for "leading" spacing; 1 is what diffusers expects to find in a saved config.
    sched = DPMSolverMultistepScheduler(**NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    return assemble_sd(vae, text, tokenizer, unet, sched)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreambooth_dora.toy.pretrain", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("outputs/toy_pretrain"))
    p.add_argument("--scenes", type=int, default=40_000)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--decoder-steps", type=int, default=250)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --work (otherwise it must be empty)")
    threads.add_argument(p)
    a = p.parse_args(argv)
    threads.apply(a.threads)
    if a.work.exists() and any(a.work.iterdir()) and not a.resume:
        print(
            f"error: {a.work} holds an earlier run; pass --resume to continue it or choose another --work",
            file=sys.stderr,
        )
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    logf = (a.work / "log.txt").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    tokenizer = load_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    vae, text, unet = build_components(tokenizer)
    t0 = time.perf_counter()
    images, scenes = render_dataset(a.scenes, a.seed)
    log(f"rendered {len(images)} scenes in {time.perf_counter() - t0:.0f} s")
    train_vae(vae, images, a.work, a.vae_steps, a.decoder_steps, log)
    latents = encode_all(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    log(f"latents {tuple(latents.shape)} scaling_factor {vae.config.scaling_factor:.4f}")
    train_unet(text, unet, latents, scenes, tokenizer, a.work, a.unet_steps, log)
    pipe = assemble(vae, text, unet, tokenizer).to(torch.float16)
    pipe.save_pretrained(a.out, safe_serialization=True)
    (a.out / "toy_world.json").write_text(
        json.dumps({"scenes": a.scenes, "seed": a.seed, "held_out": [list(x) for x in toy_world.HELD_OUT]})
    )
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
