"""DoRA vs LoRA training cost, ours against peft: per layer and for a whole DreamBooth-shaped step.
See docs/ARCHITECTURE.md, Measuring speed.

Run from the repository root, with the project's venv:

    python benchmarks/dora_layer.py --quick              # smoke test: tiny grid, tiny UNet, 1 thread (seconds)
    python benchmarks/dora_layer.py --checkpointing      # CPU: default layer grid + SD1.5-width step at 256 px
    python benchmarks/dora_layer.py --device cuda --dtype bf16 --full --checkpointing --resolution 512
    python benchmarks/dora_layer.py --skip-layers --skip-step --breakdown --threads 1   # DoRA's cost per layer shape

--full (80 layer shapes, up to 4096 tokens × 1280 at rank 128) is meant for a GPU; on a CPU it takes long.
On a CPU shared with other work, --threads 1 keeps the ratios steady (no thread oversubscription).
CPU memory measurement makes the profiler print "USDT ..." / "CPUAllocator ..." lines on stderr: harmless.

Four variants share the same frozen weights and bit-identical adapters (A, B set to small random values, as
after some training; m = ‖W0‖): ours DoRA (oD), ours LoRA (oL), peft DoRA (pD), peft LoRA (pL).
  * layer step: y = layer(x) with x.requires_grad (as inside a UNet), y.backward(random dy), then every
    adapter param p -= 1e-4·grad in place and grads dropped. The in-place update matters: our DoRA caches ‖V‖
    until A or B change, and real training changes them every step.
  * whole step: text encoder -> UNet -> MSE vs a random target -> backward -> AdamW.step -> zero_grad, on a
    random-init SD1.5-width UNet (320/640/1280/1280) and a CLIP-L-shaped text encoder, adapted at --rank
    (alpha = rank) on UNet to_q/to_k/to_v/to_out.0 and text q/k/v/out_proj.

Reading the tables: variants run round-robin, the order rotated every round, so machine noise hits all alike.
"ms" is the median time per step (CPU: process CPU time, robust to other work on the machine), for
reference only. A ratio X/Y is the median over rounds of
time(X)/time(Y) within one round: read those. Memory is the peak increase over the memory held before one
step (activations, temporaries, grads), by one method for all variants: CUDA max_memory_allocated after
reset_peak_memory_stats; CPU the running sum of all allocations/frees seen by torch.profiler(profile_memory).
loss0 is the first step's loss: it must agree between oD and pD, and between oL and pL.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import math
import os
import platform
import shlex
import statistics
import sys
import time
import zlib
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from dreambooth_dora.adapters.inject import add_adapter  # noqa: E402
from dreambooth_dora.adapters.layers import AdaptedLinear  # noqa: E402

VARIANTS = (("oD", "ours", "dora"), ("oL", "ours", "lora"), ("pD", "peft", "dora"), ("pL", "peft", "lora"))
REF = "oL"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# -- shared helpers ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are the SAME tensors as the original: all variants use the
    same frozen base weights, held once in memory."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def randomize_adapters(model: nn.Module, rank: int) -> None:
    """A, B <- small random values seeded by module path, so ours and peft get bit-identical adapters."""
    from peft.tuners.lora import LoraLayer

    for path, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            A, B = m.adapters["default"].lora_A, m.adapters["default"].lora_B
        elif isinstance(m, LoraLayer) and "default" in m.lora_A:
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        else:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
        A.copy_(torch.randn(A.shape, generator=g) / math.sqrt(A.shape[1]))
        B.copy_(torch.randn(B.shape, generator=g) * (1e-2 / math.sqrt(rank)))


def adapt(model: nn.Module, impl: str, kind: str, rank: int, targets: list[str]) -> tuple[nn.Module, list]:
    """A shared-weight copy of ``model`` with one adapter; returns (model, trainable fp32 params)."""
    model = shared_copy(model)
    if impl == "ours":
        add_adapter(model, kind=kind, rank=rank, alpha=rank, targets=targets)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=rank, use_dora=kind == "dora", target_modules=targets)
        inject_adapter_in_model(cfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.data = p.data.float()  # peft puts adapters in the base dtype; train them in fp32 like ours
    randomize_adapters(model, rank)
    return model, [p for p in model.parameters() if p.requires_grad]


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory increase (MiB) during fn() over the memory held before it."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, live)
    return peak / 2**20


def clock(device: torch.device):
    """CUDA: wall time (after synchronizing). CPU: this process's CPU time, which work of other processes on a
    shared machine barely disturbs (with torch on one thread it is the compute itself)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def bench(steps: dict, device: torch.device, warmup: int, rounds: int, target_ms: float = 0.0) -> dict:
    """Round-robin timing: {name: [ms per step, one per round]}. With target_ms > 0 each measurement repeats
    the step enough times (the same count for all variants) to last about target_ms."""
    now = clock(device)
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    inner = 1
    if target_ms > 0:
        sync(device)
        t0 = now()
        steps[REF]()
        sync(device)
        inner = max(1, min(1000, math.ceil(target_ms / max((now() - t0) * 1e3, 1e-3))))
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = now()
            for _ in range(inner):
                steps[n]()
            sync(device)
            times[n].append((now() - t0) * 1e3 / inner)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


TABLES: list[dict] = []  # every table printed, for --json


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; also recorded in TABLES so that ``save_tables`` can write what was printed as JSON."""
    TABLES.append({"headers": list(headers), "rows": [[str(c) for c in row] for row in rows]})
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def save_tables(path: str | None, **facts) -> None:
    """Write every table printed so far (and ``facts``) as JSON to ``path`` (for benchmarks/gpu_summary.py)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump({"command": sys.argv, **facts, "tables": TABLES}, f, indent=1)


def fake_update(params: list) -> None:
    """What an optimizer does to the adapter: change it in place, drop the grads."""
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-4)
            p.grad = None


def print_header(title: str, args, device: torch.device) -> None:
    """Set the thread count (--threads; 1 with --quick) and print the title, exact command and environment."""
    import diffusers
    import peft
    import transformers

    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"# {title}\n\n`python {shlex.join(sys.argv)}`\n")
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; device {args.device} ({dev}), dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}\n"
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


# -- 1. single layers ----------------------------------------------------------------------------------------------


def layer_grid(args) -> list[tuple[int, int, int]]:
    """(width, tokens, rank). Default: the shapes SD1.5 meets at 256/512 px, at rank 32, plus rank sweeps
    where DoRA's once-per-step norm weighs most (text, 77 tokens) and at a mid UNet shape."""
    if args.quick:
        return [(768, 77, 32), (320, 256, 4), (320, 256, 32)]
    if args.full:
        return [(w, t, r) for w in (768, 320, 640, 1280) for t in (77, 256, 1024, 4096) for r in (4, 16, 32, 64, 128)]
    shapes = [(768, 77), (320, 4096), (320, 1024), (640, 1024), (640, 256), (1280, 256), (1280, 64)]
    return [(w, t, 32) for w, t in shapes] + [(w, t, r) for w, t in ((768, 77), (640, 1024)) for r in (4, 16, 64, 128)]


def run_layers(args, device, dtype) -> None:
    rows = []
    for width, tokens, rank in layer_grid(args):
        torch.manual_seed(0)
        base = nn.Sequential(OrderedDict(proj=nn.Linear(width, width))).to(device, dtype).requires_grad_(False)
        x = torch.randn(args.batch, tokens, width, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.batch, tokens, width, device=device, dtype=dtype)
        steps = {}
        for name, impl, kind in VARIANTS:
            model, params = adapt(base, impl, kind, rank, ["proj"])

            def step(model=model, params=params, x=x, dy=dy):
                with autocast(device, dtype):
                    y = model(x)
                y.backward(dy.to(y.dtype))
                x.grad = None
                fake_update(params)

            steps[name] = step
        times = bench(steps, device, warmup=2, rounds=args.repeats, target_ms=args.target_ms)
        mem = {n: peak_mib(f, device) for n, f in steps.items()}
        ms = " / ".join(f"{statistics.median(times[n]):.3g}" for n, _, _ in VARIANTS)
        ratios = [f"{ratio(times, a, b):.2f}" for a, b in (("oD", "oL"), ("pD", "pL"), ("oD", "pD"), ("pL", "oL"))]
        mem_r = " / ".join(f"{mem[n] / max(mem[REF], 1e-9):.2f}" for n in ("oD", "pD", "pL"))
        rows.append([f"{args.batch}×{tokens}×{width}", rank, ms, *ratios, f"{mem[REF]:.1f}", mem_r])
        print(f"  layer {width} × {tokens} tokens, rank {rank}: done", file=sys.stderr, flush=True)
    print("\n## 1. One adapted linear layer (in = out = width): forward + backward + in-place update\n")
    print(
        table(
            [
                "x: batch×tokens×width",
                "rank",
                "ms oD / oL / pD / pL",
                "oD/oL",
                "pD/pL",
                "oD/pD",
                "pL/oL",
                "ΔMiB oL",
                "mem ×oL: oD / pD / pL",
            ],
            rows,
        )
    )


# -- 2. whole DreamBooth-shaped step -------------------------------------------------------------------------------


def build_models(args, device, dtype):
    """Random-init text encoder + UNet, frozen, built once (SD1.5 widths; tiny with --quick), and one batch."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if args.quick:
        te_cfg = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
        unet_cfg = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, cross_attention_dim=128)
        latent = 16
    else:
        te_cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        unet_cfg = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768)
        latent = args.resolution // 8
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **te_cfg))
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, attention_head_dim=8, **unet_cfg)
    for m in (te, unet):
        m.to(device).requires_grad_(False).train()
        if dtype != torch.float32:
            m.to(dtype)
    g = torch.Generator().manual_seed(1)
    batch = dict(
        ids=torch.randint(0, 49408, (args.batch, 77), generator=g).to(device),
        latents=torch.randn(args.batch, 4, latent, latent, generator=g).to(device, dtype),
        t=torch.randint(0, 1000, (args.batch,), generator=g).to(device),
        target=torch.randn(args.batch, 4, latent, latent, generator=g).to(device),
    )
    return te, unet, batch, latent


def run_whole_step(args, device, dtype) -> None:
    te0, unet0, batch, latent = build_models(args, device, dtype)
    variants, losses = {}, {}
    for name, impl, kind in VARIANTS:
        te, p_te = adapt(te0, impl, kind, args.rank, TEXT_TARGETS)
        unet, p_unet = adapt(unet0, impl, kind, args.rank, UNET_TARGETS)
        opt = torch.optim.AdamW(p_te + p_unet, lr=1e-4)
        variants[name] = (te, unet, opt, sum(p.numel() for p in p_te + p_unet))

    def make_step(name):
        te, unet, opt, _ = variants[name]

        def step():
            with autocast(device, dtype):
                hidden = te(batch["ids"])[0]
                pred = unet(batch["latents"], batch["t"], hidden).sample
            loss = F.mse_loss(pred.float(), batch["target"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.setdefault(name, loss.item())  # the first step's loss: identical weights and batch

        return step

    steps = {n: make_step(n) for n in variants}
    rows, summary = [], []
    for ckpt in (False, True) if args.checkpointing else (False,):
        for _, unet, _, _ in variants.values():
            unet.enable_gradient_checkpointing() if ckpt else unet.disable_gradient_checkpointing()
        times = bench(steps, device, warmup=args.warmup, rounds=args.steps)
        mem = {n: peak_mib(f, device) for n, f in steps.items()}
        for n, _, _ in VARIANTS:
            ms, rel, mem_rel = statistics.median(times[n]), ratio(times, n, REF), mem[n] / max(mem[REF], 1e-9)
            rows.append(
                [
                    n,
                    "on" if ckpt else "off",
                    f"{ms:.4g}",
                    f"{rel:.3f}",
                    f"{mem[n]:.0f}",
                    f"{mem_rel:.3f}",
                    f"{losses[n]:.6f}",
                    f"{variants[n][3]:,}",
                ]
            )
        summary.append(
            f"checkpointing {'on' if ckpt else 'off'}: time {ratio(times, 'oD', 'pD'):.3f}, "
            f"memory {mem['oD'] / max(mem['pD'], 1e-9):.3f}"
        )
        print(f"  whole step, checkpointing {ckpt}: done", file=sys.stderr, flush=True)
    print(
        f"\n## 2. Whole step: {'tiny (--quick)' if args.quick else 'SD1.5-width'} UNet at {latent}×{latent} "
        f"latents + {'tiny' if args.quick else 'CLIP-L-shaped'} text encoder, rank {args.rank}, batch {args.batch}\n"
    )
    print(
        f"{args.warmup} warmup + {args.steps} measured rounds; step = TE fwd -> UNet fwd -> MSE -> backward "
        "-> AdamW.step -> zero_grad\n"
    )
    print(table(["variant", "UNet ckpt", "step ms", "time ×oL", "ΔMiB peak", "mem ×oL", "loss0", "trainable"], rows))
    print("\nours DoRA / peft DoRA: " + "; ".join(summary))


# -- 3. where DoRA's extra time goes, per adapted layer shape of the whole step ------------------------------------


def run_breakdown(args, device, dtype) -> None:
    """The adapted layers the whole step meets (shapes and token counts recorded by forward hooks during one
    forward of the step's models), each timed alone as ours DoRA vs ours LoRA: forward + backward + AdamW step
    (which invalidates the cached norm) + zero_grad. "norm ms" is the once-per-step
    factored ‖V‖ alone; its product W0·Aᵀ (out·in·r multiply-adds) is the part of DoRA's cost no fusion removes.
    The UNet forward runs twice with gradient checkpointing; this table counts it once."""
    from collections import Counter

    te0, unet0, batch, _ = build_models(args, device, dtype)
    seen: Counter = Counter()
    handles = []
    for part, model, targets in (("text", te0, TEXT_TARGETS), ("unet", unet0, UNET_TARGETS)):
        model, _ = adapt(model, "ours", "lora", args.rank, targets)
        for m in model.modules():
            if isinstance(m, AdaptedLinear):
                hook = lambda m, inp, out, part=part: seen.update(  # noqa: E731
                    [(part, m.in_features, m.out_features, inp[0].numel() // m.in_features, m.bias is not None)]
                )
                handles.append(m.register_forward_hook(hook))
        if part == "text":
            te = model
        else:
            with torch.no_grad(), autocast(device, dtype):
                model(batch["latents"], batch["t"], te(batch["ids"])[0])
    for h in handles:
        h.remove()
    rows, total = [], {"oL": 0.0, "extra": 0.0, "norm": 0.0}
    for (part, fin, fout, tokens, bias), count in sorted(seen.items()):
        torch.manual_seed(0)
        base = nn.Sequential(OrderedDict(proj=nn.Linear(fin, fout, bias=bias))).to(device, dtype).requires_grad_(False)
        x = torch.randn(tokens, fin, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, fout, device=device, dtype=dtype)
        steps, adapters = {}, {}
        for name, impl, kind in VARIANTS[:2]:  # oD, oL
            model, params = adapt(base, impl, kind, args.rank, ["proj"])
            adapters[name] = model.proj.adapters["default"]
            opt = torch.optim.AdamW(params, lr=1e-4)  # a real optimizer step: it invalidates what it should

            def step(model=model, opt=opt, x=x, dy=dy):
                with autocast(device, dtype):
                    y = model(x)
                y.backward(dy.to(y.dtype))
                x.grad = None
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[name] = step
        times = bench(steps, device, warmup=2, rounds=args.repeats, target_ms=args.target_ms)

        def norm(a=adapters["oD"], w=base.proj.weight):
            a._norm = None  # drop the cached ‖V‖, as an optimizer step does
            return a.weight_norm(w)

        norm_t = bench({REF: norm}, device, warmup=1, rounds=5, target_ms=10.0)
        ms, r, norm_ms = statistics.median(times[REF]), ratio(times, "oD", REF), statistics.median(norm_t[REF])
        extra = (r - 1) * ms * count
        total["oL"] += ms * count
        total["extra"] += extra
        total["norm"] += norm_ms * count
        rows.append([part, f"{fin}→{fout}", tokens, "yes" if bias else "no", count, f"{ms:.3g}", f"{r:.3f}",
                     f"{norm_ms:.3g}", f"{extra:.1f}"])  # fmt: skip
        print(f"  breakdown {part} {fin}→{fout} × {tokens} tokens: done", file=sys.stderr, flush=True)
    print(f"\n## 3. DoRA's extra time per adapted layer shape of the whole step (rank {args.rank})\n")
    print(table(["model", "in→out", "tokens", "bias", "layers", "ms oL", "oD/oL", "norm ms", "extra ms × layers"],
                rows))  # fmt: skip
    print(
        f"\nAll adapted layers, once each: oL {total['oL']:.1f} ms, DoRA extra {total['extra']:.1f} ms, of which the "
        f"factored norm {total['norm']:.1f} ms."
    )


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--quick", action="store_true", help="smoke test: 3 layer shapes, tiny UNet, 1 thread")
    add("--full", action="store_true", help="full layer grid: widths × tokens × ranks (80 shapes)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: base bf16, adapters fp32, autocast")
    add("--batch", type=int, default=1, help="batch size (2 for CFG-like layer inputs)")
    add("--repeats", type=int, help="measured rounds per layer shape (default 15; 5 with --quick)")
    add("--target-ms", type=float, help="min duration of one layer measurement (default 40 CPU, 5 CUDA)")
    add("--rank", type=int, default=32, help="whole-step adapter rank (alpha = rank)")
    add("--resolution", type=int, default=256, help="whole-step image size in px (latents = px / 8)")
    add("--warmup", type=int, help="whole-step warmup rounds (default 3)")
    add("--steps", type=int, help="whole-step measured rounds (default 4)")
    add("--checkpointing", action="store_true", help="also measure with UNet gradient checkpointing")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 with --quick)")
    add("--skip-layers", action="store_true")
    add("--skip-step", action="store_true")
    add("--breakdown", action="store_true", help="also: DoRA's extra time per adapted layer shape of the whole step")
    args = ap.parse_args()
    pick = lambda quick, default: quick if args.quick else default  # noqa: E731
    args.repeats = args.repeats or pick(5, 15)
    args.warmup = args.warmup if args.warmup is not None else pick(1, 3)
    args.steps = args.steps or pick(3, 4)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    args.target_ms = args.target_ms or (5.0 if device.type == "cuda" else pick(10.0, 40.0))
    print_header("DoRA benchmark", args, device)
    print(
        "oD = ours DoRA, oL = ours LoRA, pD = peft DoRA, pL = peft LoRA. Ratios are medians of per-round "
        "ratios; absolute ms are for reference only."
    )
    if not args.skip_layers:
        run_layers(args, device, dtype)
    if not args.skip_step:
        run_whole_step(args, device, dtype)
    if args.breakdown:
        run_breakdown(args, device, dtype)


if __name__ == "__main__":
    main()
