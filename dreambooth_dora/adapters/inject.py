"""Find target layers, wrap them with adapters, and switch adapters on, off, merged or scaled.

Every function takes either one ``nn.Module`` (a UNet, a text encoder) or a diffusers pipeline; for a pipeline
it acts on the adaptable components: ``unet``, ``text_encoder`` and ``text_encoder_2`` (SDXL).
Target layers may be plain ``nn.Linear`` or bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (a quantized base,
``sd.quantize``): those get ``adapters.quantized.QuantAdaptedLinear``, with the same API.
See docs/ARCHITECTURE.md (The DoRA math).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dreambooth_dora.adapters.layers import AXES, KINDS, AdaptedLinear, Adapter
from dreambooth_dora.adapters.quantized import adapted_linear

# Attention projections: diffusers' Attention (UNet) and CLIP's attention (text encoders).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_TARGETS = UNET_TARGETS + TEXT_ENCODER_TARGETS
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class AdapterError(ValueError):
    """A user-facing problem with adapter arguments or files; the message says what and how to fix it."""


MAX_SCALE = 10.0  # |strength| of one adapter: beyond this the weights are far outside anything trained


def check_scale(scale, what: str) -> float:
    """``scale`` as a float, or AdapterError naming ``what`` when it is not a finite number within ±MAX_SCALE."""
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and abs(scale) <= MAX_SCALE
    if not ok:  # NaN fails the comparison too
        raise AdapterError(
            f"strength {scale!r} for {what}: use a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}] (1 = as trained)"
        )
    return float(scale)


def components(model) -> dict[str, nn.Module]:
    """{prefix: module}: the pipeline's adaptable components, or {"": model} for a bare module."""
    if isinstance(model, nn.Module):
        return {"": model}
    found = {name: getattr(model, name, None) for name in COMPONENTS}
    found = {k: v for k, v in found.items() if isinstance(v, nn.Module)}
    if not found:
        raise AdapterError(f"expected an nn.Module or a diffusers pipeline with a UNet, got {type(model).__name__}")
    return found


def _matches(name: str, pattern: str) -> bool:
    """peft-style suffix match on a module-path boundary ("to_q" matches "...attn1.to_q"), or a glob."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(module: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Module paths of the nn.Linear layers (bitsandbytes' quantized ones included) whose path matches one of
    ``targets`` (suffixes or globs); the layer an AdaptedLinear wraps is not a target of its own."""
    found, wrapped = [], ()
    for name, m in module.named_modules():
        if name.startswith(wrapped):
            continue
        if isinstance(m, AdaptedLinear):
            wrapped += (name + ".",)
        if isinstance(m, nn.Linear) and any(_matches(name, t) for t in targets):
            found.append(name)
    return found


def adapted_layers(model) -> Iterator[tuple[str, str, AdaptedLinear]]:
    """(component prefix, module path, layer) for every adapted layer."""
    for prefix, module in components(model).items():
        for name, m in module.named_modules():
            if isinstance(m, AdaptedLinear):
                yield prefix, name, m


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _check_args(name: str, kind: str, rank: int, alpha: float, dropout: float, axis: str) -> None:
    problems = []
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        problems.append(f"name={name!r}: use letters, digits, '_' or '-' (no dots or spaces)")
    if kind not in KINDS:
        problems.append(f"kind={kind!r}: choose one of {KINDS} (full: fine-tune the target layers' weights)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"rank={rank!r}: must be an integer >= 1 (typical: 4-64)")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"alpha={alpha!r}: must be a number > 0 (alpha = rank gives scaling 1)")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        problems.append(f"dropout={dropout!r}: must be in [0, 1)")
    if axis not in AXES:
        problems.append(f"axis={axis!r}: choose 'out' (paper, peft, diffusers) or 'in' (legacy LyCORIS)")
    if problems:
        raise AdapterError("invalid adapter arguments:\n  " + "\n  ".join(problems))


def add_adapter(
    model,
    name: str = "default",
    kind: str = "dora",
    rank: int = 16,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    axis: str = "out",
    components_to_adapt: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Inject a new adapter into every target linear layer and freeze everything but the adapters.

    ``alpha`` defaults to ``rank`` (scaling s = alpha/rank = 1). ``targets`` are module-path suffixes or globs
    (default: UNet ``to_q/to_k/to_v/to_out.0`` and text-encoder ``q_proj/k_proj/v_proj/out_proj``).
    ``components_to_adapt`` limits a pipeline to some of ``unet``, ``text_encoder``, ``text_encoder_2``;
    ``exclude`` drops layers whose "<component>.<module path>" matches a suffix or glob.
    Returns {component prefix: [adapted module paths]}. Trainable parameters afterwards: A, B (and m).
    """
    alpha = float(rank) if alpha is None else alpha
    _check_args(name, kind, rank, alpha, dropout, axis)
    targets = tuple(targets) if targets else DEFAULT_TARGETS
    comps = components(model)
    if components_to_adapt is not None:
        unknown = set(components_to_adapt) - set(comps)
        if unknown:
            raise AdapterError(f"components {sorted(unknown)} not in this model; it has {sorted(comps)}")
        comps = {k: v for k, v in comps.items() if k in components_to_adapt}
    if name in list_adapters(model):
        raise AdapterError(f"an adapter named {name!r} already exists; remove_adapter() it or pick another name")
    plan = {
        prefix: [p for p in find_targets(module, targets) if not any(_matches(f"{prefix}.{p}", e) for e in exclude)]
        for prefix, module in comps.items()
    }
    if not any(plan.values()):
        linear = [n for m in comps.values() for n, x in m.named_modules() if isinstance(x, nn.Linear)]
        close = sorted({n.rsplit(".", 1)[-1] for n in linear})[:12]
        raise AdapterError(f"targets {list(targets)} match no nn.Linear layer; layer names here end in: {close}")
    if kind != "full":
        _check_rank(rank, comps, plan)
    for prefix, module in comps.items():
        for p in module.parameters():
            p.requires_grad_(False)
        for path in plan[prefix]:
            wrap_layer(module, path).add(name, kind=kind, rank=rank, alpha=alpha, dropout=dropout, axis=axis)
    return {k: v for k, v in plan.items() if v}


def _width(layer: nn.Module) -> int:
    return min(int(getattr(layer, "in_features", 0) or 0), int(getattr(layer, "out_features", 0) or 0))


def check_rank(model, rank: int, targets: Sequence[str] | None = None) -> None:
    """AdapterError when ``rank`` is above the width of a layer ``add_adapter`` would adapt in ``model``."""
    comps = components(model)
    _check_rank(rank, comps, {k: find_targets(m, tuple(targets or DEFAULT_TARGETS)) for k, m in comps.items()})


def _check_rank(rank: int, comps: dict, plan: dict) -> None:
    """A rank above a layer's width (min of in and out features) adds size but nothing the layer can express."""
    widths = {f"{prefix}.{path}": _width(comps[prefix].get_submodule(path)) for prefix in plan for path in plan[prefix]}
    narrow = {k: w for k, w in widths.items() if 0 < w < rank}
    if narrow:
        name, width = min(narrow.items(), key=lambda kv: kv[1])
        raise AdapterError(
            f"rank {rank} is above the width of {len(narrow)} adapted layer(s) (narrowest: {name}, {width} features); "
            f"a rank above min(in, out) features adds file size but no capacity. Use rank <= {width}, or limit "
            "targets to wider layers"
        )


def wrap_layer(module: nn.Module, path: str) -> AdaptedLinear:
    """The AdaptedLinear at ``path`` in ``module``, wrapping the nn.Linear there on first use."""
    layer = module.get_submodule(path)
    if not isinstance(layer, AdaptedLinear):
        layer = adapted_linear(layer)
        _set_submodule(module, path, layer)
    if layer.merged:
        raise AdapterError("unmerge_adapters(model) before adding an adapter to a merged model")
    return layer


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str
    rank: int
    alpha: float
    axis: str
    scale: float
    enabled: bool
    layers: int


def list_adapters(model) -> dict[str, AdapterInfo]:
    """{name: AdapterInfo} over all adapted layers (kind/rank/alpha/axis from the first layer holding it)."""
    seen: dict[str, list[Adapter]] = {}
    for _, _, layer in adapted_layers(model):
        for name, a in layer.adapters.items():
            seen.setdefault(name, []).append(a)
    return {
        n: AdapterInfo(n, a[0].kind, a[0].rank, a[0].alpha, a[0].axis, a[0].scale, a[0].enabled, len(a))
        for n, a in seen.items()
    }


def _require(model, name: str) -> None:
    names = list(list_adapters(model))
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise AdapterError(f"no adapter named {name!r}; loaded adapters: {names or 'none'}.{extra}")


def is_merged(model) -> bool:
    return any(layer.merged for _, _, layer in adapted_layers(model))


@contextlib.contextmanager
def _editing(model) -> Iterator[None]:
    """Changes to a merged model are applied by restoring W0 exactly and merging again: no drift."""
    merged = is_merged(model)
    if merged:
        unmerge_adapters(model)
    try:
        yield
    finally:
        if merged:
            merge_adapters(model)


def set_adapter_scale(model, name: str, scale: float) -> None:
    """Strength λ of adapter ``name``: W = W0 + λ(W' − W0). λ=0 is the base model, λ=1 the trained adapter."""
    _require(model, name)
    scale = check_scale(scale, f"adapter {name!r}")
    with _editing(model):
        for _, _, layer in adapted_layers(model):
            if name in layer.adapters:
                layer.adapters[name].scale = float(scale)


def set_adapter_enabled(model, name: str, enabled: bool) -> None:
    _require(model, name)
    with _editing(model):
        for _, _, layer in adapted_layers(model):
            if name in layer.adapters:
                layer.adapters[name].enabled = bool(enabled)


@contextlib.contextmanager
def disable_adapters(model) -> Iterator[None]:
    """Within the block the model is exactly the base model (merged or not); the state is restored after."""
    layers = [layer for _, _, layer in adapted_layers(model)]
    states = [[(a, a.enabled) for a in layer.adapters.values()] for layer in layers]
    with _editing(model):
        for layer in layers:
            for a in layer.adapters.values():
                a.enabled = False
        try:
            yield
        finally:
            for saved in states:
                for a, enabled in saved:
                    a.enabled = enabled


def merge_adapters(model) -> None:
    """Fold the enabled adapters (at their strengths) into the weights: inference at the base model's cost."""
    for _, _, layer in adapted_layers(model):
        layer.merge()


@torch.no_grad()
def bake_adapters(model) -> int:
    """IRREVERSIBLE: fold the enabled adapters (at their strengths) into the weights, W0 + Σ λ_i (W'_i − W0),
    and replace every AdaptedLinear by a plain nn.Linear holding that weight. W0 and all adapters (disabled
    ones included) are discarded: nothing can be unmerged afterwards, and the state dict has exactly the base
    model's keys. For exporting a merged model; use merge_adapters to merge reversibly. On a quantized base
    a baked layer becomes a float nn.Linear holding W' in the compute dtype (the other layers stay quantized).
    Returns the number of layers baked."""
    baked = 0
    for module in components(model).values():
        for path, layer in list(module.named_modules()):
            if isinstance(layer, AdaptedLinear):
                _set_submodule(module, path, layer.to_linear(bake=True))
                baked += 1
    return baked


def unmerge_adapters(model) -> None:
    """Restore W0 bit for bit; adapters run as live layers again."""
    for _, _, layer in adapted_layers(model):
        layer.unmerge()


def remove_adapter(model, name: str) -> None:
    """Delete adapter ``name``; layers left with no adapter become the layer they wrapped again (a plain
    nn.Linear, or the bitsandbytes layer of a quantized base, bit for bit)."""
    _require(model, name)
    with _editing(model):
        for module in components(model).values():
            for path, m in list(module.named_modules()):
                if isinstance(m, AdaptedLinear) and name in m.adapters:
                    del m.adapters[name]
                    if not len(m.adapters):
                        _set_submodule(module, path, m.to_linear())


def adapter_parameters(model, name: str | None = None) -> list[nn.Parameter]:
    """The trainable tensors: A, B and (DoRA) m of one adapter, or of all (full: B only)."""
    params = []
    for _, _, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if name is None or n == name:
                params.extend(p for p in a.parameters() if p.requires_grad)
    return params


def adapter_layers(model, name: str) -> dict[str, tuple[AdaptedLinear, Adapter]]:
    """{"<prefix>.<module path>": (layer, adapter)} for adapter ``name`` (no prefix for a bare module)."""
    _require(model, name)
    return {
        f"{prefix}.{path}" if prefix else path: (layer, layer.adapters[name])
        for prefix, path, layer in adapted_layers(model)
        if name in layer.adapters
    }
