"""Generation speed with a DoRA adapter merged or toggled, relative to the base model (issue targets:
merged / base = 1.00 ± 0.03, toggled / base ≤ 1.10).

    python benchmarks/inference.py --quick                      # builtin tiny SD1.x model, seconds
    python benchmarks/inference.py                              # SD1.5-shaped random model, 256 px, CPU
    python benchmarks/inference.py --device cuda --dtype fp16 --resolution 512 --steps 25

Two pipelines hold the same random weights: "base" has no adapter at all; the other carries a rank --rank DoRA
adapter on the UNet and text-encoder attention (non-zero B, magnitudes off the base norm), switched between
"toggled" (live layers) and "merged" (folded into the weights) outside the timed region. One measurement is a
whole text-to-image call (text encoder, --steps UNet steps with classifier-free guidance, VAE decode). Variants
run round-robin with the order rotated each round; ratios are medians over rounds of time(X)/time(base) within
a round, so machine noise hits all variants alike. Absolute seconds are printed for reference only. On the CPU
the time is the process's CPU time (with --threads 1, the compute itself), which other work on a shared
machine barely disturbs; on CUDA it is wall time after synchronizing.
See docs/ARCHITECTURE.md (Measuring speed).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.dora_layer import cpu_name, save_tables, sync, table  # noqa: E402
from dreambooth_dora.adapters.inject import adapter_layers, add_adapter, merge_adapters, unmerge_adapters  # noqa: E402


def sd15_shaped_pipeline(resolution: int, dtype: torch.dtype):
    """A random-init pipeline with SD1.5's widths (UNet 320/640/1280/1280, CLIP-L text encoder, SD VAE)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_dora.sd.fixtures import load_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=77,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=load_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="builtin:tiny-sd15 instead of SD1.5 widths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1: CPU time = compute)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON (benchmarks/gpu_summary.py reads it)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    hw = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"torch {torch.__version__} · {device} · {hw} · {args.threads} threads · {args.dtype}")
    clock = time.perf_counter
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        torch.set_num_threads(args.threads)
        clock = time.process_time

    if args.quick:
        from dreambooth_dora.sd.fixtures import build_tiny_sd15

        base = build_tiny_sd15()
        base = base if dtype == torch.float32 else base.to(dtype=dtype)
        args.resolution = 64
    else:
        base = sd15_shaped_pipeline(args.resolution, dtype)
    adapted = copy.deepcopy(base)
    base.to(device)
    adapted.to(device)
    add_adapter(adapted, rank=args.rank, alpha=args.rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in adapter_layers(adapted, "default").values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.01)
            a.magnitude.mul_(1 + 0.05 * torch.randn(a.magnitude.shape, generator=g))
    for pipe in (base, adapted):
        pipe.set_progress_bar_config(disable=True)

    def run(pipe):
        def call():
            with torch.no_grad():
                pipe(
                    "a photo of sks dog",
                    num_inference_steps=args.steps,
                    height=args.resolution,
                    width=args.resolution,
                    guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                )

        return call

    def prepare(name):
        if name == "merged":
            merge_adapters(adapted)
        elif name == "toggled":
            unmerge_adapters(adapted)

    names = ["base", "toggled", "merged"]
    calls = {"base": run(base), "toggled": run(adapted), "merged": run(adapted)}
    for n in names * args.warmup:
        prepare(n)
        calls[n]()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % 3 :] + names[: r % 3]:
            prepare(n)
            sync(device)
            t0 = clock()
            calls[n]()
            sync(device)
            times[n].append(clock() - t0)
    rows = []
    for n in names:
        ratio = statistics.median(t / b for t, b in zip(times[n], times["base"], strict=True))
        rows.append([n, f"{statistics.median(times[n]):.3f}", f"{ratio:.3f}"])
    model = "builtin:tiny-sd15" if args.quick else "SD1.5-shaped random init"
    print(
        f"\n{model}, {args.resolution} px, {args.steps} steps + CFG, DoRA rank {args.rank} on UNet + text encoder, "
        f"{args.rounds} rounds"
    )
    print(table(["variant", "s / image (median)", "time / base (median ratio)"], rows))
    save_tables(args.json, kind="inference", resolution=args.resolution, steps=args.steps, dtype=args.dtype)


if __name__ == "__main__":
    main()
