"""DoRA and LoRA layers for ``nn.Linear`` (docs/ARCHITECTURE.md: The DoRA math). Imports torch only.

Shapes and conventions, for a frozen linear layer ``W0: (out, in)``, bias ``b: (out,)``:

    A: (r, in)   B: (out, r)   s = alpha / r          ΔW = s·B·A,  V = W0 + ΔW
    axis="out":  m: (out,)  ‖V‖ one L2 norm per output row     W' = diag(m/‖V‖) · V
    axis="in":   m: (in,)   ‖V‖ one L2 norm per input column   W' = V · diag(m/‖V‖)
    y = W' x + b   (the bias is never scaled)

The norm is a constant in backward (DoRA paper §4.3): gradients reach m through m/‖V‖ and reach A, B
through the B(Ax) branch. That is also what peft does, so our forward and gradients match peft's.

Speed: the norm depends on A, B and W0 only, so it is computed once per optimizer step (in the factored
form below, without building an (out, in) matrix) and cached until one of those tensors changes. Every
forward in the same step — gradient accumulation, gradient checkpointing's recomputation — reuses it.
The forward is then the LoRA forward plus one elementwise op:

    axis="out":  y = b + c ⊙ (W0 x + s·B(Ax))        c = m/‖V‖ ∈ R^out
    axis="in":   y = W0 (c⊙x) + s·B(A(c⊙x)) + b     c = m/‖V‖ ∈ R^in

Strength λ of an unmerged adapter: W(λ) = W0 + λ(W' − W0) (λ=0 is exactly the base model); several
adapters add their deltas. Merging folds them into the weight and keeps an exact copy of W0 so that
unmerging restores it bit for bit.

W0 is a float tensor here. On a quantized base (``adapters.quantized``) it is an object with the same few
operations (``linear``, ``square_sums``, ``times_t``, ``left_times``, ``float``), computed from the packed
weight without ever holding a whole float copy per step; everything else in this module is shared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

KINDS = ("dora", "lora", "full")
AXES = ("out", "in")


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (AdamW(fused=True), the default on CUDA in many scripts) update parameters without bumping
# their version counters, so every optimizer step anywhere also invalidates the cached norms. torch calls this
# global hook after the step of every torch.optim.Optimizer subclass (8-bit AdamW and Prodigy included).
register_optimizer_step_post_hook(_count_optimizer_step)


def _linear(weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ [+ bias] for a float W0, or through the quantized layer's own matmul (its own bias when given)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias=bias is not None)


def _tensor_key(*tensors: torch.Tensor) -> tuple:
    """Identifies the current contents of tensors: optimizer steps (counted globally), in-place edits (which
    bump ``_version``: copy_, load_state_dict), and moves or ``.data`` swaps (storage pointer, dtype, device)."""
    return (_optimizer_steps, *((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))


def _frozen_key(t: torch.Tensor) -> tuple:
    """``_tensor_key`` for one tensor, without the optimizer-step count when it cannot be trained: an optimizer
    (fused or not) only updates tensors that get gradients, so a frozen W0's ‖W0‖² outlives optimizer steps."""
    return (_optimizer_steps if t.requires_grad else -1, t._version, t.data_ptr(), t.dtype, t.device)


class _ScaleRows(torch.autograd.Function):
    """y = h ⊙ c [+ b], c = m / ‖V‖, for h: (N, out), m and ‖V‖: (out,) fp32 (‖V‖ detached), b: (out,) or None.

    One elementwise pass and one autograd node (c is formed here, not as a separate division node).
    h must be a temporary of the caller (the output of the LoRA addmm, which nothing else saves): without a bias
    it is scaled in place and y, the output, is what is saved for backward. The magnitude's gradient needs
    h = y / c; saving the output rather than a copy of h lets autograd share storage with whatever consumes y
    (attention keeps q, k and v anyway), so for the bias-free UNet projections DoRA saves no activation beyond
    LoRA's. A row with c exactly 0 (a zero magnitude) then gets no magnitude gradient. With a bias, y = b + h⊙c
    is one fused op and h itself is saved (y − b would be a new tensor anyway), so backward needs no division.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, m: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None):
        c = m / norm
        cc = c.to(h.dtype)
        if bias is None:
            y = h.mul_(cc)
            ctx.mark_dirty(h)
            ctx.save_for_backward(y, c, norm)
        else:
            y = torch.addcmul(bias.to(h.dtype), h, cc)
            ctx.save_for_backward(h, c, norm)
        ctx.saved_h, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        t, c, norm = ctx.saved_tensors  # t = h (with a bias) or y = h ⊙ c (without)
        need_h, need_m, _, need_b = ctx.needs_input_grad
        grad_h = g * c.to(g.dtype) if need_h else None
        grad_m = grad_b = None
        if need_m:
            gt = (g * t).reshape(-1, t.shape[-1]).sum(0, dtype=torch.float32)  # ∂L/∂c ⊙ c (or ∂L/∂c, with h)
            grad_c = gt if ctx.saved_h else gt / torch.where(c != 0, c, 1.0)  # y = 0 where c = 0: gt = 0 there
            grad_m = grad_c / norm
        if need_b:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        return grad_h, grad_m, None, grad_b


class Adapter(nn.Module):
    """One named adapter on one linear layer: the trainable A, B (and m for DoRA), all fp32."""

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        kind: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        axis: str = "out",
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if kind == "full":
            # Full fine-tuning of this layer as an adapter: A = I fixed, B = ΔW trained, s = 1. One code path
            # for training, merging and files (it saves as a full-rank LoRA).
            rank = alpha = in_features
        self.kind, self.rank, self.alpha, self.axis = kind, int(rank), float(alpha), axis
        self.scaling = self.alpha / self.rank
        self.scale = 1.0  # strength λ
        self.enabled = True
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0 makes the adapter a no-op at init
        if kind == "full":
            with torch.no_grad():
                self.lora_A.copy_(torch.eye(in_features))
            self.lora_A.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._w0_sq: tuple[tuple, torch.Tensor] | None = None  # (key of W0, ‖W0‖² per row/column)
        self._norm: tuple[tuple, torch.Tensor] | None = None  # (key of W0, A, B, ‖V‖)
        if kind == "dora":
            # m = ‖W0‖ from the same fp32 computation as ‖V‖, so that at init m/‖V‖ is exactly 1.
            self.magnitude = nn.Parameter(self.weight_norm(weight).clone())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, axis={self.axis}, scale={self.scale:g}"

    # -- the norm ‖V‖, factored and cached ---------------------------------------------------------------------

    def _w0_squared(self, weight: torch.Tensor) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor):  # a quantized W0 never changes: it caches ‖W0‖² itself
            return weight.square_sums(self.axis)
        key = _frozen_key(weight)
        if self._w0_sq is None or self._w0_sq[0] != key:
            w = weight.detach().float()
            self._w0_sq = (key, w.square().sum(dim=1 if self.axis == "out" else 0))
        return self._w0_sq[1]

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖V‖ in fp32, detached: (out,) for axis="out", (in,) for axis="in".

        Factored so that no (out, in) matrix is ever built:
            rows:    ‖V_i‖² = ‖W0_i‖² + B_i·(2s·W0 Aᵀ + s²·B (A Aᵀ))_i
            columns: ‖V_j‖² = ‖W0_j‖² + A_j·(2s·Bᵀ W0 + s²·(Bᵀ B) A)_j
        The only product with W0 (out·in·r multiply-adds) is the cost floor; the rest is (out or in) × r.
        """
        A, B = self.lora_A, self.lora_B
        key = _tensor_key(weight, A, B)
        if self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        with torch.no_grad():
            norm = self._weight_norm(weight, A.detach(), B.detach())
        self._norm = (key, norm)
        return norm

    def _weight_norm(self, weight, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        dense = isinstance(weight, torch.Tensor)  # else a quantized W0 (adapters.quantized.QuantizedWeight)
        w, s = weight.detach() if dense else weight, self.scaling
        sq = self._w0_squared(weight)
        # The products with W0 run in W0's own dtype (fp32 accumulation inside the GEMM): an fp32 copy of a
        # half-precision W0 every step would cost more than the norm itself.
        if self.axis == "out":
            w_at = w @ A.t().to(w.dtype) if dense else w.times_t(A)  # W0 Aᵀ: (out, r)
            m = torch.addmm(w_at.to(B.dtype), B, A @ A.t(), beta=2.0 * s, alpha=s * s)  # 2s·W0Aᵀ + s²·B(AAᵀ)
            t = torch.linalg.vecdot(B, m)  # (out,)
        else:
            bt_w = B.t().to(w.dtype) @ w if dense else w.left_times(B.t())  # Bᵀ W0: (r, in)
            m = torch.addmm(bt_w.to(A.dtype), B.t() @ B, A, beta=2.0 * s, alpha=s * s)  # 2s·BᵀW0 + s²·(BᵀB)A
            t = torch.linalg.vecdot(A, m, dim=0)  # (in,)
        return (sq + t).clamp_min_(0.0).sqrt()

    def norm_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """c = m / ‖V‖ (fp32, differentiable in m only)."""
        return self.magnitude / self.weight_norm(weight)

    # -- forward pieces ----------------------------------------------------------------------------------------

    def lora_branch(self, x2: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """[base +] s·B(A·dropout(x2)) for x2: (N, in); with base, one GEMM with a fused epilogue."""
        dtype = x2.dtype
        ax = self.dropout(x2)
        if self.kind != "full":  # full: A = I
            ax = ax @ self.lora_A.to(dtype).t()  # (N, r)
        if base is None:
            return self.scaling * (ax @ self.lora_B.to(dtype).t())
        return torch.addmm(base, ax, self.lora_B.to(dtype).t(), alpha=self.scaling)

    def delta(self, x2: torch.Tensor, base: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W'x − W0x for x2: (N, in), given base = W0x (no bias): (N, out)."""
        if self.kind != "dora":
            return self.lora_branch(x2)
        c = self.norm_scale(weight).to(x2.dtype)
        if self.axis == "out":
            # (c − 1)⊙W0x + c⊙s·B(Ax)
            return torch.addcmul(base * (c - 1), self.lora_branch(x2), c)
        xs = x2 * c
        return _linear(weight, xs - x2) + self.lora_branch(xs)

    @torch.no_grad()
    def merged_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """W' − W0 in fp32: (out, in)."""
        w = weight.float()
        delta = self.scaling * (self.lora_B @ self.lora_A)
        if self.kind != "dora":
            return delta
        c = self.norm_scale(weight)
        v = w + delta
        return (v * c[:, None] if self.axis == "out" else v * c[None, :]) - w


class AdaptedLinear(nn.Linear):
    """An ``nn.Linear`` carrying named adapters. It owns the original ``weight`` and ``bias`` parameters
    under the same names, so base-model state dicts and ``isinstance(m, nn.Linear)`` keep working."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapters = nn.ModuleDict()
        self.merged = False
        self._w0_backup: torch.Tensor | None = None  # exact copy of W0 while merged (on CPU)

    def add(self, name: str, **kwargs) -> Adapter:
        adapter = Adapter(self.weight, **kwargs)
        self.adapters[name] = adapter
        return adapter

    def active(self) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.enabled and a.scale != 0.0]

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without live adapters: the base, or the merged weight while merged."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [] if self.merged else self.active()
        if not active:
            return self.plain_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        weight = self.weight
        if len(active) == 1 and active[0].scale == 1.0:
            y = self._forward_single(x2, active[0], weight)
        else:
            base = _linear(weight, x2)
            y = base
            for a in active:
                y = y + a.scale * a.delta(x2, base, weight)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _forward_single(self, x2: torch.Tensor, a: Adapter, weight: torch.Tensor) -> torch.Tensor:
        """The training path: one adapter at strength 1; one elementwise op beyond LoRA."""
        if a.kind != "dora":
            return a.lora_branch(x2, _linear(weight, x2, self.bias))
        if a.axis == "in":
            xs = x2 * a.norm_scale(weight).to(x2.dtype)
            return a.lora_branch(xs, _linear(weight, xs, self.bias))
        h = a.lora_branch(x2, _linear(weight, x2))  # W0x + s·B(Ax)
        return _ScaleRows.apply(h, a.magnitude, a.weight_norm(weight), self.bias)  # c ⊙ h + b, c = m/‖V‖

    # -- merge / unmerge ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + Σ λ_i (W'_i − W0) over the enabled adapters; W0 is kept to unmerge exactly."""
        if self.merged:
            return
        active = self.active()
        self._w0_backup = self.weight.detach().to("cpu", copy=True)
        if active:
            total = sum(a.scale * a.merged_delta(self.weight) for a in active)
            self.weight.copy_((self.weight.float() + total).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """W0, whether or not adapters are merged."""
        return self._w0_backup.to(self.weight.device) if self.merged else self.weight

    def to_linear(self, bake: bool = False) -> nn.Linear:
        """A plain nn.Linear sharing this layer's bias and weight: W0 (adapters dropped), or with ``bake`` the
        weight with the enabled adapters merged in (irreversible: W0 is not kept)."""
        if bake:
            self.merge()
            self._w0_backup, self.merged = None, False
        else:
            self.unmerge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear
