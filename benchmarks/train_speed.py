"""Steps/s and peak memory of one DreamBooth training step: ours DoRA/LoRA vs peft DoRA/LoRA.

Run from the repository root, with the project's venv:

    python benchmarks/train_speed.py --quick        # smoke test: down-scaled SD1.5 shapes, 1 thread (< 2 min)
    python benchmarks/train_speed.py                # CPU: SD1.5-shaped random model at 128 px (16×16 latents), fp32
    python benchmarks/train_speed.py --device cuda --dtype bf16 --resolution 512           # SD1.5 at 512 px
    python benchmarks/train_speed.py --device cuda --dtype bf16 --sdxl --resolution 1024   # SDXL at 1024 px

On a CPU shared with other work, --threads 1 keeps the ratios steady (no thread oversubscription).
CPU memory measurement makes the profiler print "USDT ..." / "CPUAllocator ..." lines on stderr: harmless.

What is measured: the step of dreambooth_dora/train.py (UNet and text encoder(s) trained, no prior
preservation, --batch images), built from the project's own functions in objective.py:
    latents (cached, or encode_images(vae, pixels) every step) -> encode_prompts (text encoder forward)
    -> diffusion_loss (noise, add_noise, UNet forward, MSE) -> backward -> clip_grad_norm_(1.0)
    -> AdamW.step -> zero_grad -> loss.item()
on random-init models with the real shapes (SD1.5: UNet 320/640/1280/1280, CLIP-L text encoder, SD VAE;
SDXL: UNet 320/640/1280 with 1/2/10 transformer layers, CLIP-L + OpenCLIP-bigG text encoders, SD VAE).
--quick shrinks the UNet, text encoder and VAE so that the whole run takes about a minute on one core.
Adapters: rank --rank, alpha = rank, on UNet to_q/to_k/to_v/to_out.0 and text q/k/v/out_proj. As in train.py,
--dtype bf16 keeps the base weights in bf16, the adapters and the VAE in fp32, and runs under autocast.

Each model family is built once; the four variants (oD ours DoRA, oL ours LoRA, pD peft DoRA, pL peft LoRA)
are shared-weight copies with bit-identical adapters (benchmarks/dora_layer.py's helpers). For each gradient
checkpointing setting (UNet and text encoder, as train.py enables it), the 8 (variant × latents) steps run
round-robin, order rotated each round: --warmup rounds, then --steps measured rounds.

Reading the tables: "time ×oL" is the median over rounds of time(variant)/time(oL) in the same round and
setting: read that, not the absolute s/step (for reference only). Peak memory is the increase over the
memory held before one step (activations, temporaries, grads; AdamW state already exists), by one method for
all: CUDA max_memory_allocated after reset_peak_memory_stats; CPU the running sum of the allocations/frees
torch.profiler(profile_memory) records. loss0 (first step, identical weights and batch) must agree between
oD and pD, and between oL and pL. The run stops if any adapter parameter gets no gradient.
See docs/ARCHITECTURE.md (Training, Measuring speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dora_layer.py, which also adds the repo root
from dora_layer import (  # noqa: E402
    REF,
    TEXT_TARGETS,
    UNET_TARGETS,
    VARIANTS,
    adapt,
    autocast,
    bench,
    peak_mib,
    print_header,
    ratio,
    save_tables,
    table,
)

from dreambooth_dora.sd.fixtures import NOISE_SCHEDULE, load_tokenizer  # noqa: E402
from dreambooth_dora.training.objective import (  # noqa: E402
    diffusion_loss,
    encode_images,
    encode_prompts,
    training_scheduler,
    with_time_ids,
)

PROMPT = "a photo of sks dog"


def text_encoder(cls, tok, hidden: int, layers: int, heads: int, act: str):
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return cls(cfg)


def build(args, device, dtype) -> SimpleNamespace:
    """The frozen base: UNet, text encoder(s), VAE, tokenizers, noise scheduler, one batch of pixels."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    q = args.quick
    tok, tok2 = load_tokenizer(), load_tokenizer(pad_token="!")
    torch.manual_seed(0)
    with torch.device(device):  # initialize in place: an SDXL UNet takes minutes to init on a CPU
        if args.sdxl:
            h1, h2 = (64, 64) if q else (768, 1280)
            te = text_encoder(CLIPTextModel, tok, h1, 2 if q else 12, 4 if q else 12, "quick_gelu")
            te2 = text_encoder(CLIPTextModelWithProjection, tok2, h2, 2 if q else 32, 4 if q else 20, "gelu")
            time_dim = 8 if q else 256
            unet = UNet2DConditionModel(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64, 128) if q else (320, 640, 1280),
                layers_per_block=2, transformer_layers_per_block=(1, 1, 2) if q else (1, 2, 10),
                attention_head_dim=(2, 4, 8) if q else (5, 10, 20), use_linear_projection=True,
                cross_attention_dim=h1 + h2, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + h2,
            )  # fmt: skip
        else:
            te, te2 = text_encoder(CLIPTextModel, tok, *((128, 2, 4) if q else (768, 12, 12)), "quick_gelu"), None
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64, 128, 128) if q else (320, 640, 1280, 1280),
                layers_per_block=1 if q else 2, cross_attention_dim=128 if q else 768, attention_head_dim=8,
            )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32) if q else (128, 256, 512, 512), layers_per_block=1 if q else 2,
            norm_num_groups=8 if q else 32, latent_channels=4, scaling_factor=0.13025 if args.sdxl else 0.18215,
        )  # fmt: skip
    for m in (unet, te, te2):
        if m is not None:
            m.requires_grad_(False).train()
            if dtype != torch.float32:
                m.to(dtype)
    vae.requires_grad_(False).eval()  # fp32, as train.py keeps it
    pixels = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    pixels = (pixels * 2 - 1).to(device)
    scheduler = training_scheduler(SimpleNamespace(scheduler=DDPMScheduler(**NOISE_SCHEDULE)), None)
    latents = encode_images(vae, pixels).to(dtype)  # what train.py's latent cache holds
    return SimpleNamespace(unet=unet, te=te, te2=te2, vae=vae, tok=tok, tok2=tok2, scheduler=scheduler,
                           pixels=pixels, latents=latents)  # fmt: skip


def n_params(*models) -> str:
    return f"{sum(p.numel() for m in models if m is not None for p in m.parameters()) / 1e6:.1f} M"


def make_variants(base: SimpleNamespace, args) -> dict:
    """{name: (pipe-like namespace for encode_prompts, unet, optimizer, trainable params, watched params)}."""
    out = {}
    for name, impl, kind in VARIANTS:
        unet, p_unet = adapt(base.unet, impl, kind, args.rank, UNET_TARGETS)
        te, p_te = adapt(base.te, impl, kind, args.rank, TEXT_TARGETS)
        te2, p_te2 = adapt(base.te2, impl, kind, args.rank, TEXT_TARGETS) if base.te2 is not None else (None, [])
        pipe = SimpleNamespace(text_encoder=te, tokenizer=base.tok)
        watched = p_unet + p_te + p_te2  # adapter tensors that must get a gradient every step
        if te2 is not None:
            pipe.text_encoder_2, pipe.tokenizer_2 = te2, base.tok2
            # SDXL conditions on the penultimate hidden states: text_encoder's last layer gets no gradient
            # (train.py adapts it anyway; AdamW skips it). text_encoder_2's feeds the pooled embedding.
            last = f"encoder.layers.{te.config.num_hidden_layers - 1}."  # transformers 4 adds "text_model."
            watched = p_unet + [p for n, p in te.named_parameters() if p.requires_grad and last not in n]
            watched += p_te2
        # train.py: two groups (UNet, text encoders), AdamW(betas 0.9/0.999, weight decay 1e-2, eps 1e-8)
        groups = [{"params": p_unet, "lr": 1e-4}, {"params": p_te + p_te2, "lr": 1e-4}]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        out[name] = (pipe, unet, opt, p_unet + p_te + p_te2, watched)
    return out


def set_checkpointing(variants: dict, on: bool) -> None:
    """As train.py: UNet enable_gradient_checkpointing() and, when the text encoders train, theirs too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_checkpointing_* deprecated alias
        for pipe, unet, *_ in variants.values():
            unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()
            for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                if te is not None:
                    te.gradient_checkpointing_enable() if on else te.gradient_checkpointing_disable()


def make_step(base, variants: dict, name: str, cached: bool, device, dtype, args, losses: dict, checked: set):
    pipe, unet, opt, params, watched = variants[name]
    res = args.resolution
    sizes = {"original_sizes": [(res, res)] * args.batch, "crop_top_lefts": [(0, 0)] * args.batch,
             "target_size": (res, res)}  # fmt: skip

    def step() -> None:
        latents = base.latents if cached else encode_images(base.vae, base.pixels).to(dtype)
        with autocast(device, dtype):
            cond = with_time_ids(encode_prompts(pipe, [PROMPT] * args.batch, device), **sizes)
            g = torch.Generator().manual_seed(0)  # same noise and timesteps for every variant and step
            loss = diffusion_loss(unet, base.scheduler, latents, cond, generator=g)
            loss.backward()
        if name not in checked:  # once per checkpointing setting: every adapter tensor must get a gradient
            missing = sum(p.grad is None for p in watched)
            if missing:
                raise RuntimeError(f"{name}: {missing} of {len(watched)} adapter tensors got no gradient")
            checked.add(name)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # train.py: accelerator.clip_grad_norm_(..., max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault(name, loss.detach().float().item())  # train.py reads the loss every step too

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--quick", action="store_true", help="down-scaled UNet/text encoder/VAE, 1 thread, few rounds (< 2 min)")
    add("--sdxl", action="store_true", help="SDXL-shaped model (two text encoders, text_time conditioning)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: base bf16, adapters + VAE fp32, autocast")
    add("--resolution", type=int, help="image size in px, latents px/8 (default 128 CPU; 512 CUDA, 1024 SDXL)")
    add("--rank", type=int, default=32, help="adapter rank (alpha = rank)")
    add("--batch", type=int, default=1, help="train_batch_size")
    add("--warmup", type=int, help="warmup rounds (default 2; 1 with --quick)")
    add("--steps", type=int, help="measured rounds (default 5)")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 with --quick)")
    add("--json", metavar="FILE", help="also write the tables as JSON (benchmarks/gpu_summary.py reads it)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    args.resolution = args.resolution or (128 if device.type == "cpu" else 1024 if args.sdxl else 512)
    multiple = 32 if args.sdxl else 64  # the latents pass 2 (SDXL) or 3 (SD1.5) UNet downsamplers
    if args.resolution % multiple:
        ap.error(f"--resolution {args.resolution}: use a multiple of {multiple} (e.g. 128, 512, 1024)")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or 5
    print_header("DreamBooth training step: DoRA vs LoRA, ours vs peft", args, device)
    base = build(args, device, dtype)
    variants = make_variants(base, args)
    shape = ("down-scaled (--quick) " if args.quick else "") + ("SDXL" if args.sdxl else "SD1.5") + "-shaped"
    lat = args.resolution // 8
    print(
        f"{shape} random model: UNet {n_params(base.unet)}, text encoder(s) {n_params(base.te, base.te2)}, "
        f"VAE {n_params(base.vae)}; {args.resolution} px ({lat}×{lat} latents), batch {args.batch}, "
        f"rank {args.rank} (alpha {args.rank}); trainable: "
        + ", ".join(f"{n} {sum(p.numel() for p in v[3]):,}" for n, v in variants.items())
        + f".\n\n{args.warmup} warmup + {args.steps} measured rounds. oD = ours DoRA, oL = ours LoRA, "
        "pD = peft DoRA, pL = peft LoRA.\n"
    )
    losses: dict = {}
    rows, summary = [], []
    for ckpt in (False, True):
        set_checkpointing(variants, ckpt)
        checked: set = set()
        steps = {
            (n, cached): make_step(base, variants, n, cached, device, dtype, args, losses, checked)
            for cached in (True, False)
            for n, _, _ in VARIANTS
        }
        times = bench(steps, device, warmup=args.warmup, rounds=args.steps)
        mem = {k: peak_mib(f, device) for k, f in steps.items()}
        for cached in (True, False):
            ref = (REF, cached)
            for n, _, _ in VARIANTS:
                k = (n, cached)
                s = statistics.median(times[k]) / 1e3
                rows.append([
                    n, "on" if ckpt else "off", "cached" if cached else "VAE encode", f"{s:.4g}", f"{1 / s:.3g}",
                    f"{ratio(times, k, ref):.3f}", f"{mem[k]:.4g}", f"{mem[k] / max(mem[ref], 1e-9):.3f}",
                    f"{losses[n]:.6f}",
                ])  # fmt: skip
            od, pd = ("oD", cached), ("pD", cached)
            summary.append([
                "on" if ckpt else "off", "cached" if cached else "VAE encode", f"{ratio(times, od, ref):.3f}",
                f"{ratio(times, pd, ('pL', cached)):.3f}", f"{ratio(times, od, pd):.3f}",
                f"{mem[od] / max(mem[ref], 1e-9):.3f}", f"{mem[od] / max(mem[pd], 1e-9):.3f}",
            ])  # fmt: skip
        print(f"  gradient checkpointing {'on' if ckpt else 'off'}: done", file=sys.stderr, flush=True)
    headers = ["variant", "grad ckpt", "latents", "s/step", "steps/s", "time ×oL", "peak ΔMiB", "mem ×oL", "loss0"]
    print("## Steps/s and peak memory per variant (ratios vs oL in the same setting)\n")
    print(table(headers, rows))
    print("\n## Summary: DoRA overhead and ours vs peft (time = median of per-round ratios)\n")
    print(table(["grad ckpt", "latents", "time oD/oL", "time pD/pL", "time oD/pD", "mem oD/oL", "mem oD/pD"], summary))
    shape = ("SDXL" if args.sdxl else "SD1.5") + ("-quick" if args.quick else "")
    save_tables(args.json, kind="train_speed", shape=shape, resolution=args.resolution, dtype=args.dtype)


if __name__ == "__main__":
    main()
