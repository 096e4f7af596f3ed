"""DoRA/LoRA on a bitsandbytes-quantized base (QDoRA/QLoRA): identity, peft as the reference, the per-step norm's
memory, merge/unmerge, strengths, several adapters, disable. See docs/ARCHITECTURE.md (The DoRA math)."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth_dora.adapters.inject import (
    adapter_layers,
    adapter_parameters,
    add_adapter,
    bake_adapters,
    disable_adapters,
    find_targets,
    merge_adapters,
    remove_adapter,
    set_adapter_enabled,
    set_adapter_scale,
    unmerge_adapters,
)
from dreambooth_dora.adapters.quantized import QuantAdaptedLinear, is_quantized_linear
from dreambooth_dora.sd.quantize import quantize_module, quantize_pipeline
from tests.helpers import perturb

bnb = pytest.importorskip("bitsandbytes")  # a dependency (requirements.txt); skipped only where it is absent

VARIANTS = [("dora", "out"), ("dora", "in"), ("lora", "out"), ("lora", "in")]
METHODS = ["nf4", "fp4", "int8"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _block(method: str, out_f=96, in_f=128, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Module()
    m.attn = nn.Module()
    m.attn.to_q = nn.Linear(in_f, out_f, bias=True)
    m.attn.to_k = nn.Linear(in_f, out_f, bias=False)
    quantize_module(m, method)
    return m


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.attn.to_q(x) + m.attn.to_k(x)


def _packed_state(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor of a bitsandbytes layer's quantized weight, cloned."""
    w = layer.weight
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if w.SCB is not None else layer.state.SCB
        return [w.data.clone(), scb.clone()]
    qs = w.quant_state
    return [w.data.clone(), qs.absmax.clone(), qs.state2.absmax.clone(), qs.offset.clone()]


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """W0 as bitsandbytes itself dequantizes it (whole), the reference for our blockwise reads."""
    w = layer.weight
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if w.SCB is not None else layer.state.SCB
        # the product bitsandbytes' int8 training matmul (MatMul8bitFp) forms: CB · (SCB / 127), whole
        return w.data.float().mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def _inputs(pipe):
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    return ids, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_identity_at_init_on_quantized_unet_and_text_encoder(method, kind, axis, tiny_sd15):
    """Untrained adapters on a quantized tiny UNet and text encoder give the quantized base's outputs bit for bit."""
    counts = quantize_pipeline(tiny_sd15, method, components=["unet", "text_encoder"])
    assert counts["unet"] > 0 and counts["text_encoder"] > 0
    base = copy.deepcopy(tiny_sd15)
    plan = add_adapter(tiny_sd15, kind=kind, rank=4, axis=axis)
    assert all(isinstance(tiny_sd15.unet.get_submodule(n), QuantAdaptedLinear) for n in plan["unet"][:4])
    ids, sample, ctx = _inputs(base)
    with torch.no_grad():
        assert torch.equal(tiny_sd15.text_encoder(ids)[0], base.text_encoder(ids)[0])
        ours = tiny_sd15.unet(sample, 10, encoder_hidden_states=ctx).sample
        assert torch.equal(ours, base.unet(sample, 10, encoder_hidden_states=ctx).sample)


def test_targets_found_on_quantized_layers_and_not_inside_wrappers():
    m = _block("nf4")
    assert is_quantized_linear(m.attn.to_q) and is_quantized_linear(m.attn.to_k)
    assert find_targets(m, ["to_q", "to_k"]) == ["attn.to_q", "attn.to_k"]
    add_adapter(m, rank=4, targets=["to_q"])
    # the wrapped bitsandbytes layer is not a target of its own, even for a glob that matches its path
    assert find_targets(m, ["*to_q*"]) == ["attn.to_q"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_forward_matches_explicit_formula_on_dequantized_w0(method, kind, axis):
    """W' built the plain way from bitsandbytes' own whole dequantization of Wq: our factored, blockwise layer
    must compute exactly that map (fp32 rounding only)."""
    m = _block(method)
    add_adapter(m, kind=kind, rank=4, alpha=6, axis=axis, targets=["to_q"])
    perturb(m, b_std=0.2)
    layer = m.attn.to_q
    layer.train()  # bitsandbytes' int8 layer multiplies by the dequantized W0 in training mode
    a = layer.adapters["default"]
    w0 = _dequantized(layer.base_layer)
    assert torch.equal(layer.frozen.float(), w0)  # the blockwise dequantization is bitsandbytes', bit for bit
    v = w0 + a.scaling * a.lora_B @ a.lora_A
    if kind == "dora":
        norm = v.norm(dim=1, keepdim=True) if axis == "out" else v.norm(dim=0, keepdim=True)
        v = (a.magnitude[:, None] if axis == "out" else a.magnitude[None, :]) * v / norm
    x = torch.randn(7, 128)
    assert (layer(x) - (x @ v.t() + layer.bias)).abs().max().item() <= 2e-5


def _peft_pair(module, targets, method, rank=8, alpha=12):
    """Ours and peft's DoRA on the same quantized module; peft's bitsandbytes layer classes are used because
    the module says it is loaded in 4/8 bit, as transformers' quantized models do."""
    ours, theirs = copy.deepcopy(module), copy.deepcopy(module)
    setattr(theirs, "is_loaded_in_8bit" if method == "int8" else "is_loaded_in_4bit", True)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, target_modules=targets), theirs)
    add_adapter(ours, rank=rank, alpha=alpha, targets=targets)
    for path, (_, a) in adapter_layers(ours, "default").items():  # m = ‖dequant(Wq)‖ at init, as peft's
        p = theirs.get_submodule(path)
        assert type(p).__module__ == "peft.tuners.lora.bnb", type(p)
        assert (p.lora_magnitude_vector["default"].weight - a.magnitude).abs().max().item() <= 1e-5
    perturb(ours, seed=3, b_std=0.05)
    pairs = []
    with torch.no_grad():
        for path, (_, a) in adapter_layers(ours, "default").items():
            p = theirs.get_submodule(path)
            refs = (p.lora_A["default"].weight, p.lora_B["default"].weight, p.lora_magnitude_vector["default"].weight)
            for mine, ref in zip((a.lora_A, a.lora_B, a.magnitude), refs, strict=True):
                ref.copy_(mine)
                pairs.append((path, mine, ref))
    for n, p in theirs.named_parameters():
        p.requires_grad_("lora_" in n)
    return ours, theirs, pairs


def _compare_with_peft(ours, theirs, pairs, run):
    out_a, out_b = run(ours), run(theirs)
    assert (out_a - out_b).abs().max().item() <= 1e-5
    g = torch.randn_like(out_a) / out_a.numel() ** 0.5
    out_a.backward(g)
    out_b.backward(g)
    for path, mine, ref in pairs:
        scale = ref.grad.abs().max().item() + 1e-12
        assert (mine.grad - ref.grad).abs().max().item() <= 1e-5 * max(1.0, scale), path


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_matches_peft_qdora_on_quantized_unet_layers(method, tiny_sd15):
    unet = tiny_sd15.unet.train()  # peft's and bitsandbytes' int8 training path on the CPU
    quantize_module(unet, method)
    ours, theirs, pairs = _peft_pair(unet, UNET_TARGETS, method)
    _, sample, ctx = _inputs(tiny_sd15)
    _compare_with_peft(ours, theirs, pairs, lambda m: m(sample, 10, encoder_hidden_states=ctx).sample)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_matches_peft_qdora_on_quantized_text_encoder_layers(method, tiny_sd15):
    te = tiny_sd15.text_encoder.train()
    quantize_module(te, method)
    ours, theirs, pairs = _peft_pair(te, TEXT_TARGETS, method)
    ids, _, _ = _inputs(tiny_sd15)
    _compare_with_peft(ours, theirs, pairs, lambda m: m(ids)[0])


class _RecordFloatAllocations(TorchDispatchMode):
    """Records the shape of every floating-point tensor any op returns (every tensor the norm allocates)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_per_step_norm_never_allocates_a_full_float_weight(method, axis):
    out_f, in_f = 256, 384
    m = _block(method, out_f=out_f, in_f=in_f)
    add_adapter(m, rank=8, axis=axis, targets=["to_q"])
    perturb(m)
    layer, a = m.attn.to_q, m.attn.to_q.adapters["default"]
    layer.frozen._square_sums.clear()  # include the ‖W0‖² pass too, as at wrap time
    with torch.no_grad():
        a.lora_B.add_(0.01)  # a new step: the cached norm is stale
    with _RecordFloatAllocations() as rec:
        norm = a.weight_norm(layer.weight)
    dequantized = [s for f, s in rec.shapes if s[-1] == in_f and len(s) == 2 and s[0] > a.rank]
    assert dequantized, "the norm must have read W0 (dequantized row blocks)"
    big = [(f, s) for f, s in rec.shapes if torch.Size(s).numel() >= out_f * in_f]
    assert not big, f"full-size float tensors allocated by the per-step norm: {big[:3]}"
    w0 = _dequantized(layer.base_layer)
    v = w0 + a.scaling * a.lora_B @ a.lora_A
    assert torch.allclose(norm, v.norm(dim=1 if axis == "out" else 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_disabled_is_quantized_base_and_unmerge_restores_it_bit_for_bit(method, kind, axis):
    base = _block(method)
    m = copy.deepcopy(base)
    add_adapter(m, kind=kind, rank=4, axis=axis, targets=["to_q", "to_k"])
    perturb(m)
    before = _packed_state(m.attn.to_q.base_layer)
    x = torch.randn(4, 128)
    with torch.no_grad():
        want = _run(base, x)
        live = _run(m, x)
        with disable_adapters(m):
            assert torch.equal(_run(m, x), want)
        assert not torch.allclose(live, want)
        merge_adapters(m)
        assert (_run(m, x) - live).abs().max().item() <= 1e-5  # merged = a dense W' in the compute dtype
        with disable_adapters(m):
            assert torch.equal(_run(m, x), want)
        for _ in range(20):
            unmerge_adapters(m)
            merge_adapters(m)
        assert (_run(m, x) - live).abs().max().item() <= 1e-5
        unmerge_adapters(m)
        assert torch.equal(_run(m, x), live)
    after = _packed_state(m.attn.to_q.base_layer)
    assert all(torch.equal(p, q) for p, q in zip(before, after, strict=True))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_strengths_and_two_adapters_on_a_quantized_base(method):
    base = _block(method)
    m = copy.deepcopy(base)
    add_adapter(m, name="one", rank=4, targets=["to_q", "to_k"])
    add_adapter(m, name="two", kind="dora", rank=2, alpha=4, axis="in", targets=["to_q"])
    perturb(m, "one", seed=1)
    perturb(m, "two", seed=2)
    x = torch.randn(6, 128)
    with torch.no_grad():
        y0 = _run(base, x)
        set_adapter_enabled(m, "two", False)
        y1 = _run(m, x)
        set_adapter_enabled(m, "two", True)
        set_adapter_enabled(m, "one", False)
        y2 = _run(m, x)
        set_adapter_enabled(m, "one", True)
        assert (_run(m, x) - (y1 + y2 - y0)).abs().max().item() <= 1e-5  # deltas add
        set_adapter_scale(m, "one", 0.0)
        set_adapter_scale(m, "two", 0.0)
        assert torch.equal(_run(m, x), y0)  # λ = 0 is the quantized base exactly
        set_adapter_scale(m, "one", 0.5)
        assert (_run(m, x) - (y0 + 0.5 * (y1 - y0))).abs().max().item() <= 1e-5
        merge_adapters(m)
        assert (_run(m, x) - (y0 + 0.5 * (y1 - y0))).abs().max().item() <= 1e-5
        set_adapter_scale(m, "one", 1.0)  # re-merges from the untouched quantized weight
        assert (_run(m, x) - y1).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_remove_restores_the_bitsandbytes_layer_and_bake_gives_a_float_layer(method):
    base = _block(method)
    m = copy.deepcopy(base)
    add_adapter(m, rank=4, targets=["to_q", "to_k"])
    perturb(m)
    x = torch.randn(5, 128)
    with torch.no_grad():
        live, want = _run(m, x), _run(base, x)
        baked = copy.deepcopy(m)
        assert bake_adapters(baked) == 2
        assert type(baked.attn.to_q) is nn.Linear and baked.attn.to_q.weight.dtype == torch.float32
        assert (_run(baked, x) - live).abs().max().item() <= 1e-5
        remove_adapter(m, "default")
        assert is_quantized_linear(m.attn.to_q) and not isinstance(m.attn.to_q, QuantAdaptedLinear)
        assert torch.equal(_run(m, x), want)


def test_training_step_on_quantized_base_computes_the_norm_once_per_step(monkeypatch):
    m = _block("nf4")
    add_adapter(m, rank=4, targets=["to_q", "to_k"])
    perturb(m)
    layer = m.attn.to_q
    calls = {"n": 0}
    orig = type(layer.frozen).times_t

    def counting(self, a):
        calls["n"] += 1
        return orig(self, a)

    monkeypatch.setattr(type(layer.frozen), "times_t", counting)
    params = adapter_parameters(m)
    assert all(p.dtype == torch.float32 for p in params) and not layer.base_layer.weight.requires_grad
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(8, 128, requires_grad=True)
    for step in range(2):
        for _ in range(3):  # gradient accumulation: one norm per layer per step
            _run(m, x).square().mean().backward()
        assert calls["n"] == 2 * (step + 1), calls
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert x.grad is not None  # gradients flow through the quantized matmul to the input
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("axis", ["out", "in"])
def test_magnitude_for_the_full_precision_base_keeps_the_trained_row_scales(axis):
    from dreambooth_dora.adapters.quantized import magnitude_for_base

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(128, 96, bias=False))
    quant = copy.deepcopy(full)
    quantize_module(quant, "nf4")
    add_adapter(quant, rank=4, axis=axis, targets=["0"])
    perturb(quant, b_std=0.05)
    a, wq, wf = quant[0].adapters["default"], quant[0].weight, full[0].weight.detach()
    trained_scale = a.norm_scale(wq).detach().clone()
    moved = magnitude_for_base(a, wq, wf)
    assert not torch.allclose(moved, a.magnitude)  # the two bases' norms differ: m must move
    with torch.no_grad():
        a.magnitude.copy_(moved)
    assert torch.allclose(a.norm_scale(wf), trained_scale, rtol=1e-6)
