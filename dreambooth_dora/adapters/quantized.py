"""DoRA and LoRA on a quantized frozen base (QDoRA / QLoRA): adapters around bitsandbytes ``Linear4bit``
(NF4, FP4) and ``Linear8bitLt`` (int8) layers. Imports torch; bitsandbytes only when such a layer exists.

The adapters' math is the one of ``adapters.layers`` with W0 = dequant(Wq), the very matrix the layer's own
matmul multiplies by (dequantized in the layer's compute dtype). What the once-per-step factored norm needs
from W0 (docs/ARCHITECTURE.md, The DoRA math), and where it comes from:

    ‖W0‖² per row or column   cached by ``QuantizedWeight`` from one blockwise dequantization, the first time
                              it is asked (the packed weight is frozen; the cache is keyed on its storage)
    W0·Aᵀ (axis="out")        once per optimizer step: dequantize ``rows_per_block`` rows at a time,
    Bᵀ·W0 (axis="in")         multiply, accumulate; the full (out, in) float W0 is never held
    W0·x (the forward)        the quantized layer's own forward (bitsandbytes' matmul), as in QLoRA

So one DoRA step dequantizes each adapted weight once more than LoRA does (bitsandbytes' forward and
backward each dequantize it as well), holding at most ``min(BLOCK_ELEMENTS, half the layer)`` dequantized
values at a time.

Merged on a quantized base means a dense copy W' = W0 + Σ λ(W'_i − W0) in the compute dtype, kept beside the
untouched packed weight: generation at the speed of a float layer, exact up to that dtype's rounding; the
layer then holds a float weight until unmerged. Unmerging drops the copy, so the quantized state is restored
bit for bit. (Requantizing W' would keep the memory but measured on SD-like weights it loses 15-90 % of a
typical adapter's effect to 4-bit rounding; not offered.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_dora.adapters.layers import AdaptedLinear, Adapter

BLOCK_ELEMENTS = 1 << 20  # dequantized values held at once by the per-step norm (4 MiB in fp32)
_QUANT_PARAMS = ("Params4bit", "Int8Params")


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or int8 linear layer (checked by parameter type: bitsandbytes need not be imported)."""
    return isinstance(module, nn.Linear) and type(module._parameters.get("weight")).__name__ in _QUANT_PARAMS


def quantization_of(module: nn.Module) -> dict | None:
    """{"method": "nf4" | "fp4" | "int8", "blocksize", "double_quant"} of a bitsandbytes layer, else None."""
    if not is_quantized_linear(module):
        return None
    weight = module.weight
    if type(weight).__name__ == "Int8Params":
        return {"method": "int8", "blocksize": None, "double_quant": None}
    state = weight.quant_state
    return {"method": state.quant_type, "blocksize": int(state.blocksize), "double_quant": bool(state.nested)}


def _packed_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors that make up a bitsandbytes layer's quantized weight (packed values and their scales)."""
    weight = module.weight
    if type(weight).__name__ == "Int8Params":
        state = getattr(module, "state", None)
        found = [weight.data, weight.SCB, getattr(state, "CB", None), getattr(state, "SCB", None)]
    else:
        qs = weight.quant_state
        found = [weight.data, qs.absmax, qs.code, getattr(qs, "offset", None)]
        if qs.nested:
            found += [qs.state2.absmax, qs.state2.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def frozen_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of base weights in ``module``, each storage counted once: {"quantized": packed weights and their
    scales, "float": every other parameter and buffer}. Adapter tensors (A, B, m) are not counted."""
    seen: set[int] = set()
    total = {"quantized": 0, "float": 0}

    def add(kind: str, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if t.device.type != "meta" and ptr not in seen:
            seen.add(ptr)
            total[kind] += t.untyped_storage().nbytes()

    for m in module.modules():
        if isinstance(m, Adapter):
            continue
        if is_quantized_linear(m):
            for t in _packed_tensors(m):
                add("quantized", t)
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if not (name == "weight" and is_quantized_linear(m)) and not name.startswith("_merged"):
                add("float", t)
    return total


class QuantizedWeight:
    """W0 = dequant(Wq) of one bitsandbytes layer, offering what ``adapters.layers`` needs of a frozen weight.

    It holds no tensor of its own beyond the ‖W0‖² caches: the packed weight is read from the layer each time,
    so moving the model (``.to``) or the layer's own bookkeeping never leaves a stale copy here.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.int8 = type(layer.weight).__name__ == "Int8Params"
        self._square_sums: dict[str, tuple[tuple, torch.Tensor]] = {}

    # -- what a tensor would tell ------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.out_features, self.layer.in_features))

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer's matmul dequantizes to (Linear4bit's compute dtype; fp32 for int8 and unset)."""
        return getattr(self.layer, "compute_dtype", None) or torch.float32

    def _packed(self) -> torch.Tensor:
        state = getattr(self.layer, "state", None)
        if self.int8 and getattr(state, "CB", None) is not None:
            return state.CB  # after its first forward Linear8bitLt keeps CB and SCB in its state
        return self.layer.weight.data

    @property
    def _version(self) -> int:
        return self._packed()._version

    def data_ptr(self) -> int:
        return self._packed().data_ptr()

    # -- dequantization, a block of rows at a time ----------------------------------------------------------------

    def rows_per_block(self) -> int:
        out_f, in_f = self.shape
        step = 1
        if not self.int8:  # a block of rows must start on a 4-bit block boundary (and so on a byte)
            blocksize = self.layer.weight.quant_state.blocksize
            step = blocksize // math.gcd(in_f, blocksize)
        rows = min(BLOCK_ELEMENTS // in_f, (out_f + 1) // 2)  # never the whole layer at once
        return max(step, rows // step * step)

    def row_blocks(self):
        """Yields (first row, W0[rows] in ``self.dtype``) for consecutive blocks of ``rows_per_block()`` rows;
        each block holds exactly the values the layer's own dequantization produces for those rows."""
        out_f, in_f = self.shape
        rows = self.rows_per_block()
        if self.int8:
            cb = self._packed()
            scb = getattr(getattr(self.layer, "state", None), "SCB", None)
            scb = self.layer.weight.SCB if scb is None else scb
            for i in range(0, out_f, rows):
                # bitsandbytes' own formula (MatMul8bitFp): CB·(SCB/127), in the compute dtype
                yield i, cb[i : i + rows].to(self.dtype).mul_(scb[i : i + rows].unsqueeze(1).mul(1.0 / 127.0))
            return
        import bitsandbytes.functional as bnbf

        weight = self.layer.weight
        qs = weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "this Linear4bit was repacked by bitsandbytes for CPU inference (an eval-mode forward without "
                "gradients), which also rounded its block scales to bf16. Quantize with "
                "dreambooth_dora.sd.quantize.quantize_pipeline, which keeps the canonical layout."
            )
        absmax = qs.absmax
        if qs.nested:  # double quantization: the block scales are themselves 8-bit
            absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        data, bs = weight.data.view(torch.uint8).reshape(-1), qs.blocksize
        for i in range(0, out_f, rows):
            n0, n1 = i * in_f, min(out_f, i + rows) * in_f  # element range, n0 on a block boundary
            part = bnbf.QuantState(
                absmax=absmax[n0 // bs : -(-n1 // bs)], shape=torch.Size(((n1 - n0) // in_f, in_f)),
                blocksize=bs, quant_type=qs.quant_type, dtype=self.dtype,
            )  # fmt: skip
            yield i, bnbf.dequantize_4bit(data[n0 // 2 : (n1 + 1) // 2], part)

    # -- the operations the DoRA math needs --------------------------------------------------------------------

    @torch.no_grad()
    def square_sums(self, axis: str) -> torch.Tensor:
        """‖W0‖² per row (axis "out": (out,)) or per column ("in": (in,)), fp32; cached for the packed weight."""
        key = (self.data_ptr(), self._version, self.device)
        hit = self._square_sums.get(axis)
        if hit is None or hit[0] != key:
            if axis == "out":
                sums = torch.cat([block.float().square().sum(dim=1) for _, block in self.row_blocks()])
            else:
                sums = sum(block.float().square().sum(dim=0) for _, block in self.row_blocks())
            hit = self._square_sums[axis] = (key, sums)
        return hit[1]

    @torch.no_grad()
    def times_t(self, a: torch.Tensor) -> torch.Tensor:
        """W0 Aᵀ for A: (r, in) → (out, r) fp32, a block of rows at a time (the products in W0's dtype)."""
        at = a.t().to(self.dtype)
        out = torch.empty(self.shape[0], a.shape[0], device=a.device, dtype=torch.float32)
        for i, block in self.row_blocks():
            out[i : i + block.shape[0]] = block @ at
        return out

    @torch.no_grad()
    def left_times(self, bt: torch.Tensor) -> torch.Tensor:
        """Bᵀ W0 for Bᵀ: (r, out) → (r, in) fp32, accumulated over blocks of rows."""
        bt = bt.to(self.dtype)
        out = torch.zeros(bt.shape[0], self.shape[1], device=bt.device, dtype=torch.float32)
        for i, block in self.row_blocks():
            out += bt[:, i : i + block.shape[0]] @ block
        return out

    @torch.no_grad()
    def float(self) -> torch.Tensor:
        """The whole W0 in fp32, (out, in): for merging, analysis and export, never for a training step."""
        return torch.cat([block.float() for _, block in self.row_blocks()])

    def linear(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """W0 x [+ b] through the layer's own forward (the quantized base, bit for bit)."""
        layer = self.layer
        if bias or layer.bias is None:
            return layer(x)
        saved = layer._parameters["bias"]
        layer._parameters["bias"] = None  # the same forward, without its bias
        try:
            return layer(x)
        finally:
            layer._parameters["bias"] = saved


class QuantAdaptedLinear(AdaptedLinear):
    """Adapters around a bitsandbytes layer, which it keeps as ``base_layer`` (so its packed weight, quant state
    and state-dict hooks stay bitsandbytes'). ``weight`` is the ``QuantizedWeight`` view of W0 that the
    adapter math takes; ``bias`` is the layer's own. Everything else is ``AdaptedLinear``'s."""

    def __init__(self, base: nn.Linear) -> None:
        if not is_quantized_linear(base):
            raise TypeError(f"expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(base).__name__}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        if hasattr(base, "support_avx512bf16_for_cpu"):
            base.support_avx512bf16_for_cpu = False  # see sd.quantize: keep the canonical 4-bit layout
        self.frozen = QuantizedWeight(base)
        self.adapters = nn.ModuleDict()
        self.merged = False
        self.register_buffer("_merged_weight", None, persistent=False)  # dense W' while merged

    @property
    def weight(self) -> QuantizedWeight:
        return self.frozen

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_weight is not None:
            return F.linear(x, self._merged_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.base_layer(x)

    @torch.no_grad()
    def merge(self) -> None:
        """A dense W' = W0 + Σ λ_i (W'_i − W0) in the compute dtype; the packed weight is not touched."""
        if self.merged:
            return
        active = self.active()
        if active:
            total = sum(a.scale * a.merged_delta(self.frozen) for a in active)
            self._merged_weight = (self.frozen.float() + total).to(self.frozen.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._merged_weight = None
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """W0 = dequant(Wq), dense, in the compute dtype (computed on each call)."""
        return self.frozen.float().to(self.frozen.dtype)

    def to_linear(self, bake: bool = False) -> nn.Linear:
        """The bitsandbytes layer itself (adapters dropped, bit for bit as it was), or with ``bake`` a plain
        float ``nn.Linear`` holding the merged W' in the compute dtype (irreversible)."""
        if not bake:
            self.unmerge()
            return self.base_layer
        self.unmerge()
        self.merge()
        weight = self._merged_weight if self._merged_weight is not None else self.base_weight()
        self.unmerge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear


def adapted_linear(layer: nn.Linear) -> AdaptedLinear:
    """The adapter-carrying wrapper for ``layer``: ``QuantAdaptedLinear`` for a bitsandbytes layer."""
    return QuantAdaptedLinear(layer) if is_quantized_linear(layer) else AdaptedLinear(layer)


@torch.no_grad()
def magnitude_for_base(adapter: Adapter, trained_on, target) -> torch.Tensor:
    """DoRA magnitudes for moving an adapter from the base it was trained on (e.g. the ``QuantizedWeight`` of a
    4-bit layer) to another W0 of the same layer (its full-precision weight): m' = m · ‖target + ΔW‖ / ‖trained_on
    + ΔW‖ per row (column for axis "in"), so that the row scales m/‖W0 + ΔW‖ the training settled on are kept
    and the learned update W' − W0 carries over up to (c − 1)·(target − trained_on) (benchmarks/qdora.py
    --transfer measures it). Only DoRA has magnitudes; a LoRA update ΔW carries over as it is."""
    if adapter.kind != "dora":
        raise ValueError(f"only DoRA adapters have magnitudes; this one is {adapter.kind!r}")
    return adapter.magnitude * adapter.weight_norm(target) / adapter.weight_norm(trained_on)
