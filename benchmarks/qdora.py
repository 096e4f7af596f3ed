"""QDoRA / QLoRA: DoRA and LoRA training steps on a full-precision, NF4 and int8 base, ours against peft.

Run from the repository root, with the project's venv:

    python benchmarks/qdora.py --dry-run          # smoke test: down-scaled models, 1 measured round (CPU, ~1 min)
    python benchmarks/qdora.py                    # CPU: SD1.5-width UNet + CLIP-L text encoder at 256 px, fp32
    python benchmarks/qdora.py --device cuda --dtype bf16 --resolution 1024 --sdxl   # GPU: SDXL at 1024 px

What is measured: the training step of benchmarks/train_speed.py (text encoder(s) -> UNet -> MSE -> backward ->
clip_grad_norm_ -> AdamW.step -> zero_grad, latents cached), built by its own functions on the same random-init
models, for three frozen bases: "float" (the --dtype weights), "nf4" and "int8" (sd.quantize.quantize_module:
every linear layer of the UNet and text encoder(s) as bitsandbytes Linear4bit / Linear8bitLt). On each base the
four adapter variants of train_speed.py: oD ours DoRA, oL ours LoRA, pD peft DoRA, pL peft LoRA (peft's
bitsandbytes layers, peft.tuners.lora.bnb, on the quantized bases). Adapters: rank --rank, alpha = rank, on UNet
to_q/to_k/to_v/to_out.0 and text q/k/v/out_proj; bit-identical across variants (loss0 agrees oD/pD, oL/pL).

Timing: all 12 steps run round-robin in one process, the order rotated every round (dora_layer.bench); CPU
time is process CPU time. Read the ratios (medians of per-round ratios), not the absolute s/step.
Memory, one method for every variant:
  * frozen MiB: bytes of the frozen base tensors held (sd.quantize.base_bytes: packed weights + their scales,
    and every float parameter/buffer), counted, not sampled; "linears vs fp16": the quantized linear layers'
    bytes over the same layers in fp16 (the aim for NF4: about 1/4);
  * train MiB: adapter parameters + their gradients + AdamW's two moments (fp32);
  * step peak ΔMiB: the peak increase over the memory held before one step (activations, temporaries,
    dequantized weights, gradients), CUDA max_memory_allocated, CPU the running sum of the allocations and
    frees torch.profiler(profile_memory) records (dora_layer.peak_mib; bitsandbytes allocates through torch).
CPU memory measurement makes the profiler print "USDT ..." / "CPUAllocator ..." lines on stderr: harmless.
The run also prints the memory per adapted layer (quantized W0, ‖W0‖² cache, A, B, m, AdamW state) for
SD1.5 and SDXL attention shapes. See docs/ARCHITECTURE.md (Measuring speed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dora_layer.py / train_speed.py
from dora_layer import VARIANTS, bench, peak_mib, print_header, ratio, save_tables, shared_copy, table  # noqa: E402
from torch import nn  # noqa: E402
from train_speed import build, make_step, make_variants, n_params, set_checkpointing  # noqa: E402

from dreambooth_dora.adapters.inject import add_adapter  # noqa: E402
from dreambooth_dora.adapters.quantized import is_quantized_linear, magnitude_for_base  # noqa: E402
from dreambooth_dora.sd.quantize import base_bytes, blocksize_for, quantize_module  # noqa: E402

BASES = ("float", "nf4", "int8")
MIB = 2**20
# Attention projections (out, in) of the real models: self-attention q/k/v/out, cross-attention k/v.
LAYER_SHAPES = {
    "SD1.5": [(320, 320), (320, 768), (640, 640), (1280, 1280), (1280, 768)],
    "SDXL": [(640, 640), (640, 2048), (1280, 1280), (1280, 2048)],
}


def quantized_base(base: SimpleNamespace, method: str) -> SimpleNamespace:
    """A copy of ``base`` whose UNet and text encoder(s) share its non-linear weights and hold quantized linears;
    flagged as loaded in 4/8 bit so that peft picks its bitsandbytes layer classes."""
    out = SimpleNamespace(**vars(base))
    for key in ("unet", "te", "te2"):
        module = getattr(base, key)
        if module is None:
            continue
        module = shared_copy(module)
        quantize_module(module, method)
        setattr(module, "is_loaded_in_8bit" if method == "int8" else "is_loaded_in_4bit", True)
        setattr(out, key, module)
    return out


def int8_state_keeper(variant: tuple):
    """A function that (re)gives every int8 layer of ``variant`` its CB and SCB in its state; call it before each
    step. Shared-weight copies share one Int8Params, from which bitsandbytes moves CB and SCB into the state of
    whichever copy runs first; and peft 0.21.2's int8 DoRA forward swaps in a new Int8Params carrying CB but no
    SCB, so that bitsandbytes' next forward clears state.SCB and fails in MatMul8bitFp (CPU): restoring the state
    works around it. Costs a loop over the layers."""
    from bitsandbytes.nn import Linear8bitLt

    pipe, unet = variant[0], variant[1]
    pick = lambda a, b: a if a is not None else b  # noqa: E731
    kept = [
        (m, pick(m.weight.CB, m.state.CB), pick(m.weight.SCB, m.state.SCB))
        for module in (unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if module is not None
        for m in module.modules() if isinstance(m, Linear8bitLt)
    ]  # fmt: skip

    def restore() -> None:
        for m, cb, scb in kept:
            m.state.CB, m.state.SCB = cb, scb
            m.weight.CB, m.weight.SCB = None, scb  # weight.CB set would make the forward re-read both from it

    return restore


def base_memory(ns: SimpleNamespace, float_ns: SimpleNamespace) -> tuple[float, str]:
    """(frozen MiB, quantized linears' bytes / the same layers in fp16)."""
    modules = [m for m in (ns.unet, ns.te, ns.te2) if m is not None]
    held = base_bytes(modules)
    if not held["quantized"]:
        return sum(held.values()) / MIB, "-"
    paths = [(i, n) for i, m in enumerate(modules) for n, x in m.named_modules() if is_quantized_linear(x)]
    float_modules = [m for m in (float_ns.unet, float_ns.te, float_ns.te2) if m is not None]
    fp16 = sum(2 * float_modules[i].get_submodule(n).weight.numel() for i, n in paths)
    return sum(held.values()) / MIB, f"{held['quantized'] / fp16:.3f}"


def train_mib(params: list) -> float:
    """Adapter parameters + gradients + AdamW's exp_avg and exp_avg_sq, all fp32."""
    return 4 * sum(p.numel() * 4 for p in params) / MIB


def layer_story(rank: int) -> str:
    """Bytes per adapted layer (DoRA, axis out, rank ``rank``) for the real models' attention shapes."""
    rows = []
    for family, shapes in LAYER_SHAPES.items():
        for out_f, in_f in shapes:
            n = out_f * in_f
            bs = blocksize_for(in_f)
            # 4-bit codes + an 8-bit scale per block + an fp32 scale per 256 blocks + the two code tables (16, 256)
            nf4 = n // 2 + n // bs + 4 * -(-(n // bs) // 256) + 4 * (16 + 256)
            int8 = n + 4 * out_f
            adapter = 4 * (rank * in_f + out_f * rank + out_f)
            rows.append([
                family, f"{out_f}×{in_f}", f"{2 * n / 1024:.0f}", f"{nf4 / 1024:.0f}", f"{int8 / 1024:.0f}",
                f"{4 * out_f / 1024:.1f}", f"{4 * rank * in_f / 1024:.0f}", f"{4 * out_f * rank / 1024:.0f}",
                f"{4 * out_f / 1024:.1f}", f"{3 * adapter / 1024:.0f}",
                f"{(nf4 + 4 * out_f + 4 * adapter) / (2 * n):.3f}",
            ])  # fmt: skip
    headers = ["model", "W0 (out×in)", "fp16 KiB", "NF4 KiB", "int8 KiB", "‖W0‖² KiB", "A KiB", "B KiB", "m KiB",
               "grads+AdamW KiB", "QDoRA total / fp16 W0"]  # fmt: skip
    return table(headers, rows)


def run(args, device, dtype) -> None:
    base = build(args, device, dtype)
    bases = {"float": base, **{m: quantized_base(base, m) for m in BASES[1:]}}
    variants, memory, keepers = {}, {}, {}
    for bname, ns in bases.items():
        memory[bname] = base_memory(ns, base)
        for name, v in make_variants(ns, args).items():
            variants[f"{bname} {name}"] = v
            keepers[f"{bname} {name}"] = int8_state_keeper(v)
    set_checkpointing(variants, args.checkpointing)
    losses, checked = {}, set()

    def make(key):
        inner = make_step(bases[key.split()[0]], variants, key, True, device, dtype, args, losses, checked)
        restore = keepers[key]

        def step() -> None:
            restore()
            inner()

        return step

    steps = {key: make(key) for key in variants}
    times = bench(steps, device, warmup=args.warmup, rounds=args.steps)
    mem = {k: peak_mib(f, device) for k, f in steps.items()}
    print(
        f"{'down-scaled (--dry-run) ' if args.quick else ''}{'SDXL' if args.sdxl else 'SD1.5'}-shaped random model: "
        f"UNet {n_params(base.unet)}, text encoder(s) {n_params(base.te, base.te2)}; {args.resolution} px, batch "
        f"{args.batch}, rank {args.rank}, gradient checkpointing {'on' if args.checkpointing else 'off'}; "
        f"{args.warmup} warmup + {args.steps} measured rounds of all {len(steps)} steps.\n"
    )
    rows = []
    for bname in bases:
        ref = f"{bname} oL"
        for name, _, _ in VARIANTS:
            k = f"{bname} {name}"
            rows.append([
                bname, name, f"{statistics.median(times[k]) / 1e3:.4g}", f"{ratio(times, k, ref):.3f}",
                f"{ratio(times, k, 'float ' + name):.3f}", f"{memory[bname][0]:.0f}", memory[bname][1],
                f"{train_mib(variants[k][3]):.1f}", f"{mem[k]:.0f}", f"{losses[k]:.6f}",
            ])  # fmt: skip
    headers = ["base", "variant", "s/step", "time ×oL (same base)", "time ×float base", "frozen MiB",
               "linears vs fp16", "train MiB", "step peak ΔMiB", "loss0"]  # fmt: skip
    print("## Training step per base and variant\n")
    print(table(headers, rows))
    summary = [
        [b, f"{ratio(times, f'{b} oD', f'{b} oL'):.3f}", f"{ratio(times, f'{b} pD', f'{b} pL'):.3f}",
         f"{ratio(times, f'{b} oD', f'{b} pD'):.3f}", f"{mem[f'{b} oD'] / max(mem[f'{b} oL'], 1e-9):.3f}",
         f"{mem[f'{b} oD'] / max(mem[f'{b} pD'], 1e-9):.3f}"]
        for b in bases
    ]  # fmt: skip
    print("\n## Summary: DoRA over LoRA, ours over peft, on each base (aims: oD/oL ≤ 1.10, oD/pD < 1)\n")
    print(table(["base", "time oD/oL", "time pD/pL", "time oD/pD", "peak oD/oL", "peak oD/pD"], summary))
    print(f"\n## Memory per adapted layer: DoRA rank {args.rank}, axis out, fp32 adapters and AdamW state\n")
    print(layer_story(args.rank))


def transfer_rows(method: str, shape: tuple[int, int], axis: str, rank: int = 16) -> list:
    """One layer W (SD-like init, std 0.02) quantized; a DoRA adapter as after training on the quantized base
    (‖sBA‖ = 2 % of ‖W0‖, m moved ±3 % off ‖W0 + sBA‖). Its learned update Δ = W'_q − Wq loaded onto the
    full-precision W: as is, and with magnitude_for_base. Errors relative to the update's own effect ‖Δx‖."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f + in_f)
    full = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    with torch.no_grad():
        full[0].weight.copy_(torch.randn(shape, generator=g) * 0.02)
    quant = shared_copy(full)
    quantize_module(quant, method)
    add_adapter(quant, rank=rank, axis=axis, targets=["0"])
    layer, a = quant[0], quant[0].adapters["default"]
    wf, wq = full[0].weight.detach(), layer.frozen
    with torch.no_grad():
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
        a.lora_B.mul_(0.02 * wf.norm() / (a.scaling * a.lora_B @ a.lora_A).norm())
        a.magnitude.copy_(a.weight_norm(wq) * (1 + 0.03 * torch.randn(a.magnitude.shape, generator=g)))
        x = torch.randn(256, in_f, generator=g)
        delta_q = a.merged_delta(wq)  # what training on the quantized base learned
        target = wf + delta_q  # the full-precision base with that update
        effect = (x @ delta_q.t()).norm()
        naive = wf + a.merged_delta(wf)
        m = a.magnitude.clone()
        a.magnitude.copy_(magnitude_for_base(a, wq, wf))
        corrected = wf + a.merged_delta(wf)
        a.magnitude.copy_(m)
        trained = wq.float() + delta_q  # the model training validated (quantized base + adapter)
    err = lambda w, ref: f"{((x @ (w - ref).t()).norm() / effect).item():.4f}"  # noqa: E731
    return [method, f"{out_f}×{in_f}", axis, err(naive, target), err(corrected, target), err(naive, trained),
            err(corrected, trained), err(wf, wq.float())]  # fmt: skip


def run_transfer() -> None:
    rows = [
        transfer_rows(method, shape, axis)
        for method in BASES[1:]
        for shape in ((640, 640), (1280, 2048))
        for axis in ("out", "in")
    ]
    print("## A DoRA adapter trained on a quantized base, loaded onto the full-precision base\n")
    print(
        "Errors are ‖(W − W_ref) x‖ / ‖Δ x‖, relative to the effect of the learned update Δ = W'_q − Wq on random x. "
        "target = Wf + Δ (the full base with the learned update); trained = Wq + Δ (what training validated). "
        "as is: the file's m on Wf; corrected: m' = magnitude_for_base (row scales m/‖W0 + ΔW‖ kept).\n"
    )
    headers = ["base", "W (out×in)", "axis", "as is vs target", "corrected vs target", "as is vs trained",
               "corrected vs trained", "Wf vs Wq (for scale)"]  # fmt: skip
    print(table(headers, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--dry-run", action="store_true", help="down-scaled models, 1 thread, 0 warmup + 1 round: checks the code path")
    add("--sdxl", action="store_true", help="SDXL-shaped model (two text encoders, text_time conditioning)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: base bf16 (quantized compute dtype bf16)")
    add("--resolution", type=int, default=256, help="image size in px (latents px/8)")
    add("--rank", type=int, default=32, help="adapter rank (alpha = rank)")
    add("--batch", type=int, default=1)
    add("--warmup", type=int, help="warmup rounds (default 1; 0 with --dry-run)")
    add("--steps", type=int, help="measured rounds (default 3; 1 with --dry-run)")
    add("--checkpointing", action="store_true", help="UNet and text encoder gradient checkpointing on")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 with --dry-run)")
    add("--transfer", action="store_true", help="only: adapter trained on a quantized base, loaded on the full one")
    add("--json", metavar="FILE", help="also write the tables as JSON (benchmarks/gpu_summary.py reads it)")
    args = ap.parse_args()
    args.quick = args.dry_run  # train_speed.build's down-scaled models
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.resolution % (32 if args.sdxl else 64):
        ap.error(f"--resolution {args.resolution}: use a multiple of {32 if args.sdxl else 64}")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 1)
    args.steps = args.steps or (1 if args.dry_run else 3)
    print_header("QDoRA / QLoRA training step: float, NF4 and int8 bases, ours vs peft", args, device)
    if args.transfer:
        run_transfer()
    else:
        run(args, device, dtype)
    shape = f"{'SDXL' if args.sdxl else 'SD1.5'}{'-quick' if args.quick else ''}"
    save_tables(args.json, kind="qdora", shape=shape, resolution=args.resolution, dtype=args.dtype)


if __name__ == "__main__":
    main()
