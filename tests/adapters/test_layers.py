"""DoRA/LoRA layer invariants: identity at init, peft as the reference, merge, strength, caching.
See docs/ARCHITECTURE.md (The DoRA math)."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from dreambooth_dora.adapters.inject import (
    AdapterError,
    adapter_layers,
    adapter_parameters,
    add_adapter,
    disable_adapters,
    list_adapters,
    merge_adapters,
    remove_adapter,
    set_adapter_enabled,
    set_adapter_scale,
    unmerge_adapters,
)
from dreambooth_dora.adapters.layers import AdaptedLinear
from tests.helpers import perturb

VARIANTS = [("dora", "out"), ("dora", "in"), ("lora", "out"), ("lora", "in")]


def _block(out_f=48, in_f=64, bias=True, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Module()
    m.attn = nn.Module()
    m.attn.to_q = nn.Linear(in_f, out_f, bias=bias)
    m.attn.to_k = nn.Linear(in_f, out_f, bias=bias)
    return m


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.attn.to_q(x) + m.attn.to_k(x)


def _perturb(model, name="default", seed=1, b_std=0.2) -> None:
    perturb(model, name, seed=seed, b_std=b_std)


def _explicit(w0, b, a, x):
    """W' computed the plain way (docs/ARCHITECTURE.md, The DoRA math), to check the factored implementation."""
    v = w0 + a.scaling * a.lora_B @ a.lora_A
    if a.kind == "dora":
        norm = v.norm(dim=1, keepdim=True) if a.axis == "out" else v.norm(dim=0, keepdim=True)
        m = a.magnitude[:, None] if a.axis == "out" else a.magnitude[None, :]
        v = m * v / norm
    return x @ v.t() + b


@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_identity_at_init(kind, axis):
    base = _block()
    x = torch.randn(3, 5, 64)
    m = copy.deepcopy(base)
    add_adapter(m, kind=kind, rank=8, axis=axis, targets=["to_q", "to_k"])
    assert (_run(m, x) - _run(base, x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_forward_matches_explicit_formula(kind, axis):
    m = _block()
    add_adapter(m, kind=kind, rank=4, alpha=6, axis=axis, targets=["to_q"])
    _perturb(m)
    layer = m.attn.to_q
    a = layer.adapters["default"]
    x = torch.randn(7, 64)
    want = _explicit(layer.weight, layer.bias, a, x)
    assert torch.allclose(layer(x), want, atol=1e-5, rtol=1e-5)


def _peft_pair(module_factory, targets, rank=8, alpha=12, seed=3):
    ours = module_factory()
    theirs = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, target_modules=list(targets)), module_factory()
    )
    add_adapter(ours, rank=rank, alpha=alpha, targets=targets)
    _perturb(ours, seed=seed, b_std=0.05)
    with torch.no_grad():
        for path, (_, a) in adapter_layers(ours, "default").items():
            p = theirs.get_submodule(path)
            p.lora_A["default"].weight.copy_(a.lora_A)
            p.lora_B["default"].weight.copy_(a.lora_B)
            p.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    for n, p in theirs.named_parameters():
        p.requires_grad_("lora_" in n)
    return ours, theirs


def _compare_with_peft(ours, theirs, run):
    out_a, out_b = run(ours), run(theirs)
    assert (out_a - out_b).abs().max().item() <= 1e-5
    g = torch.randn_like(out_a) / out_a.numel() ** 0.5
    out_a.backward(g)
    out_b.backward(g)
    for path, (_, a) in adapter_layers(ours, "default").items():
        p = theirs.get_submodule(path)
        for mine, ref in (
            (a.lora_A, p.lora_A["default"].weight),
            (a.lora_B, p.lora_B["default"].weight),
            (a.magnitude, p.lora_magnitude_vector["default"].weight),
        ):
            assert (mine.grad - ref.grad).abs().max().item() <= 1e-5, path


def test_matches_peft_on_unet_layers(tiny_sd15):
    unet = tiny_sd15.unet
    ours, theirs = _peft_pair(lambda: copy.deepcopy(unet), ["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    _compare_with_peft(ours, theirs, lambda m: m(sample, 10, encoder_hidden_states=ctx).sample)


def test_matches_peft_on_text_encoder_layers(tiny_sd15):
    te = tiny_sd15.text_encoder
    ours, theirs = _peft_pair(lambda: copy.deepcopy(te), ["q_proj", "k_proj", "v_proj", "out_proj"])
    ids = tiny_sd15.tokenizer(
        ["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    _compare_with_peft(ours, theirs, lambda m: m(ids)[0])


@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_disabled_is_base_and_merge_is_exact(kind, axis):
    base = _block()
    m = copy.deepcopy(base)
    add_adapter(m, kind=kind, rank=4, axis=axis, targets=["to_q", "to_k"])
    _perturb(m)
    x = torch.randn(4, 64)
    with torch.no_grad():
        live = _run(m, x)
        with disable_adapters(m):
            assert torch.equal(_run(m, x), _run(base, x))
        assert torch.equal(_run(m, x), live)
        merge_adapters(m)
        assert (_run(m, x) - live).abs().max().item() <= 1e-5
        with disable_adapters(m):  # disabling a merged model restores the base weights
            assert torch.equal(m.attn.to_q.weight, base.attn.to_q.weight)
        unmerge_adapters(m)
    assert torch.equal(m.attn.to_q.weight, base.attn.to_q.weight)
    assert torch.equal(m.attn.to_k.weight, base.attn.to_k.weight)


def test_hundred_merge_cycles_do_not_drift():
    base = _block()
    m = copy.deepcopy(base)
    add_adapter(m, rank=4, targets=["to_q", "to_k"])
    _perturb(m)
    x = torch.randn(4, 64)
    with torch.no_grad():
        merge_adapters(m)
        first = _run(m, x)
        for _ in range(100):
            unmerge_adapters(m)
            merge_adapters(m)
        assert (_run(m, x) - first).abs().max().item() <= 1e-6
        unmerge_adapters(m)
    assert torch.equal(m.attn.to_q.weight, base.attn.to_q.weight)


def test_strength_semantics_and_two_adapters_add():
    base = _block()
    m = copy.deepcopy(base)
    add_adapter(m, name="one", rank=4, targets=["to_q", "to_k"])
    add_adapter(m, name="two", kind="dora", rank=2, alpha=4, targets=["to_q"])
    _perturb(m, "one", seed=1)
    _perturb(m, "two", seed=2)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y0 = _run(base, x)
        set_adapter_enabled(m, "two", False)
        y1 = _run(m, x)
        set_adapter_enabled(m, "two", True)
        set_adapter_enabled(m, "one", False)
        y2 = _run(m, x)
        set_adapter_enabled(m, "one", True)
        both = _run(m, x)
        assert (both - (y0 + (y1 - y0) + (y2 - y0))).abs().max().item() <= 1e-5  # deltas add
        set_adapter_scale(m, "one", 0.0)
        set_adapter_scale(m, "two", 0.0)
        assert torch.equal(_run(m, x), y0)  # λ = 0 is the base model exactly
        set_adapter_scale(m, "one", 0.5)
        assert (_run(m, x) - (y0 + 0.5 * (y1 - y0))).abs().max().item() <= 1e-5
        merge_adapters(m)  # a merged model honours strengths too, and re-merges on change
        assert (_run(m, x) - (y0 + 0.5 * (y1 - y0))).abs().max().item() <= 1e-5
        set_adapter_scale(m, "one", 1.0)
        assert (_run(m, x) - y1).abs().max().item() <= 1e-5
    assert list_adapters(m)["one"].scale == 1.0


def _count_calls(monkeypatch, method: str) -> dict:
    """Count calls of ``torch.Tensor.<method>`` in ``calls["n"]`` (reset it by hand)."""
    calls = {"n": 0}
    orig = getattr(torch.Tensor, method)

    def counting(t, *args, **kwargs):
        calls["n"] += 1
        return orig(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, method, counting)
    return calls


def test_norm_is_computed_once_per_optimizer_step(monkeypatch):
    m = _block()
    add_adapter(m, rank=4, targets=["to_q"])
    _perturb(m)
    a = m.attn.to_q.adapters["default"]
    calls = _count_calls(monkeypatch, "sqrt")
    x = torch.randn(4, 64)
    for fused in (False, True):
        opt = torch.optim.AdamW(adapter_parameters(m), lr=1e-2, fused=fused, foreach=None if fused else True)
        for _ in range(3):  # three micro-batches of gradient accumulation
            m.attn.to_q(x).square().mean().backward()
        assert calls["n"] <= 1, "the norm must be reused within one optimizer step"
        before = a.weight_norm(m.attn.to_q.weight).clone()
        opt.step()
        opt.zero_grad()
        calls["n"] = 0
        after = a.weight_norm(m.attn.to_q.weight)
        assert calls["n"] == 1 and not torch.equal(before, after), "an optimizer step must invalidate the cache"
        calls["n"] = 0


def test_frozen_w0_square_sums_outlive_optimizer_steps(monkeypatch):
    """‖W0‖² is cached across optimizer steps while W0 is frozen (an optimizer never touches a tensor without a
    gradient); an in-place edit of W0, or a W0 that trains, recomputes it."""
    m = _block()
    add_adapter(m, rank=4, targets=["to_q"])
    _perturb(m)
    layer = m.attn.to_q
    calls = _count_calls(monkeypatch, "square")
    x = torch.randn(4, 64)
    opt = torch.optim.AdamW(adapter_parameters(m), lr=1e-2)
    for _ in range(3):
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    calls["n"] = 0
    layer(x).square().mean().backward()
    assert calls["n"] == 1, "the forward's own .square() only: ‖W0‖² must come from the cache"
    with torch.no_grad():
        layer.weight.mul_(2.0)
    calls["n"] = 0
    layer(x)
    assert calls["n"] == 1, "an in-place edit of W0 must recompute ‖W0‖²"
    layer.weight.requires_grad_(True)
    opt = torch.optim.AdamW([layer.weight], lr=1e-2)
    layer(x).sum().backward()
    opt.step()
    calls["n"] = 0
    layer(x)
    assert calls["n"] == 1, "a trained W0 must recompute ‖W0‖² after an optimizer step"


@pytest.mark.parametrize("bias,bias_trains", [(False, False), (True, False), (True, True)])
def test_dora_gradients_match_the_plain_formula(bias, bias_trains):
    """Forward and every gradient (x, A, B, m, a trained bias) of the fused training path against plain autograd
    on y = (m / ‖V‖.detach()) ⊙ (V x) + b, for 3-d inputs as in attention."""
    m = _block(bias=bias)
    add_adapter(m, rank=4, alpha=6, targets=["to_q"])
    _perturb(m)
    layer = m.attn.to_q
    a = layer.adapters["default"]
    if bias_trains:
        layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    g = torch.randn(2, 5, 48)
    params = [x, a.lora_A, a.lora_B, a.magnitude] + ([layer.bias] if bias_trains else [])
    layer(x).backward(g)
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    v = layer.weight + a.scaling * a.lora_B @ a.lora_A
    y = x @ (a.magnitude[:, None] / v.norm(dim=1, keepdim=True).detach() * v).t()
    (y + layer.bias if bias else y).backward(g)
    for p, mine in zip(params, got, strict=True):
        assert torch.allclose(mine, p.grad, atol=1e-5, rtol=1e-4)


def test_magnitude_only_change_keeps_norm_but_changes_output():
    m = _block()
    add_adapter(m, rank=4, targets=["to_q"])
    _perturb(m)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = m.attn.to_q(x)
        m.attn.to_q.adapters["default"].magnitude.mul_(1.5)
        assert not torch.allclose(m.attn.to_q(x), y)


def test_trainable_parameters_are_exactly_adapters():
    m = _block()
    add_adapter(m, rank=4, targets=["to_q"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"attn.to_q.adapters.default.{p}" for p in ("lora_A", "lora_B", "magnitude")}
    assert isinstance(m.attn.to_q, AdaptedLinear) and isinstance(m.attn.to_q, nn.Linear)
    assert "attn.to_q.weight" in m.state_dict()  # the base state dict keeps its names


def test_half_precision_base_with_fp32_adapters():
    base = _block().to(torch.bfloat16)
    m = copy.deepcopy(base)
    add_adapter(m, rank=4, targets=["to_q"])
    a = m.attn.to_q.adapters["default"]
    assert a.lora_A.dtype == a.magnitude.dtype == torch.float32
    assert m.attn.to_q.weight.dtype == torch.bfloat16
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = m.attn.to_q(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - base.attn.to_q(x).float()).abs().max().item() <= 1e-2
    y.float().sum().backward()
    assert a.lora_B.grad is not None and a.lora_B.grad.dtype == torch.float32


def test_dropout_touches_only_the_lora_branch():
    m = _block()
    add_adapter(m, rank=4, dropout=0.5, targets=["to_q"])
    layer = m.attn.to_q
    x = torch.randn(16, 64)
    with torch.no_grad():
        m.train()
        # B = 0: the LoRA branch is zero, so dropout must leave the output equal to the base output.
        assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
        _perturb(m)
        m.eval()
        y_eval = layer(x)
        assert torch.equal(layer(x), y_eval)  # no dropout in eval


def test_remove_adapter_restores_plain_linear():
    base = _block()
    m = copy.deepcopy(base)
    add_adapter(m, rank=4, targets=["to_q"])
    remove_adapter(m, "default")
    assert type(m.attn.to_q) is nn.Linear
    assert torch.equal(m.attn.to_q.weight, base.attn.to_q.weight)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(kind="loha"), "kind='loha'"),
        (dict(rank=0), "rank=0"),
        (dict(alpha=-1), "alpha=-1"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(axis="row"), "axis='row'"),
        (dict(name="a.b"), "name='a.b'"),
        (dict(targets=["nope"]), "match no nn.Linear"),
    ],
)
def test_bad_arguments_are_explained(kwargs, needle):
    m = _block()
    with pytest.raises(AdapterError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        add_adapter(m, **{"targets": ["to_q"], **kwargs})
    assert type(m.attn.to_q) is nn.Linear  # nothing changed


def test_unknown_adapter_name_suggests():
    m = _block()
    add_adapter(m, name="subject", rank=2, targets=["to_q"])
    with pytest.raises(AdapterError, match="Did you mean 'subject'"):
        set_adapter_scale(m, "subjct", 0.5)
    with pytest.raises(AdapterError, match="already exists"):
        add_adapter(m, name="subject", rank=2, targets=["to_q"])


@pytest.mark.parametrize("kind,axis", VARIANTS)
def test_identity_at_init_on_unet_and_text_encoder(kind, axis, tiny_sd15):
    """Injected but untrained adapters leave the real components' outputs unchanged (≤ 1e-6, fp32)."""
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    base = build_tiny_sd15()
    add_adapter(tiny_sd15, kind=kind, rank=4, axis=axis)
    ids = base.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        te = (tiny_sd15.text_encoder(ids)[0] - base.text_encoder(ids)[0]).abs().max().item()
        unet_a = tiny_sd15.unet(sample, 10, encoder_hidden_states=ctx).sample
        unet = (unet_a - base.unet(sample, 10, encoder_hidden_states=ctx).sample).abs().max().item()
    assert te <= 1e-6 and unet <= 1e-6, (te, unet)
