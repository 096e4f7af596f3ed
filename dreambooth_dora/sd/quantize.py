"""Quantize a pipeline's frozen base for QDoRA/QLoRA training: bitsandbytes 4-bit (NF4, FP4) or int8.

``quantize_pipeline(pipe, "nf4")`` replaces every ``nn.Linear`` of the UNet and the text encoder(s) by a
bitsandbytes ``Linear4bit`` (NF4 or FP4, blocks of 64 weights, double-quantized block scales, compute dtype
= the layer's dtype) or ``Linear8bitLt`` (int8 rows with one fp32 scale each; outlier threshold 6.0), as
QLoRA does for every linear layer of a language model. Convolutions, norms and embeddings stay as they are
(bitsandbytes has no quantized convolution); the VAE is never touched. Adapters added afterwards
(``adapters.inject.add_adapter``) wrap the quantized layers without ever dequantizing a whole weight per
step (``adapters.quantized``).

Methods are named as bitsandbytes names them: ``none``, ``nf4``, ``fp4``, ``int8``. Without bitsandbytes,
or on a device it cannot run on, ``QuantizationError`` says what to install or change.
See docs/ARCHITECTURE.md (The DoRA math).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dreambooth_dora.adapters.inject import components as adaptable_components
from dreambooth_dora.adapters.layers import AdaptedLinear
from dreambooth_dora.adapters.quantized import frozen_bytes, quantization_of

METHODS = ("none", "nf4", "fp4", "int8")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MIN_BITSANDBYTES = "0.45.0"  # int8_vectorwise_quant and the torch-op backends; tested with 0.50.2
BLOCKSIZE = 64  # weights per 4-bit block (QLoRA's value)
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (bitsandbytes' and transformers' usual value)
INSTALL_HINT = f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"


class QuantizationError(ValueError):
    """A base cannot be quantized as asked; the message says why and how to fix it."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def require_bitsandbytes(method: str):
    """The ``bitsandbytes`` module, or QuantizationError saying how to install a version that works."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise QuantizationError(
            f"quantize_base={method!r} needs bitsandbytes, which is not installed ({err}). Install it with "
            f"`{INSTALL_HINT}`, or set quantize_base: none to train on the full-precision base."
        ) from err
    version = getattr(bnb, "__version__", None) or importlib.metadata.version("bitsandbytes")
    if _version_tuple(version) < _version_tuple(MIN_BITSANDBYTES):
        raise QuantizationError(
            f"quantize_base={method!r} needs bitsandbytes >= {MIN_BITSANDBYTES}; this is {version}. "
            f"Upgrade with `{INSTALL_HINT}`."
        )
    return bnb


def check_method(method: str) -> str:
    if method not in METHODS:
        raise QuantizationError(
            f"quantize_base={method!r}: choose one of {', '.join(METHODS)} "
            "(nf4: 4-bit as QLoRA, the least memory; int8: 8-bit, closer to the full-precision base)"
        )
    return method


def blocksize_for(in_features: int) -> int | None:
    """The 4-bit block size for a layer with ``in_features`` inputs, or None to keep it in full precision.

    bitsandbytes 0.50.2's CPU dequantization kernel returns wrong values when a row's length is a multiple of
    16 but not of the block size (measured: for block 64, rows of 16, 32, 48, 80, 96, …; for block 32, rows of
    16, 48, 80, …), in its forward as well. Every SD1.x/SDXL linear layer has rows of a multiple of 64 and gets
    QLoRA's 64; the small test models use 32 where that divides the rows and keep the rest unquantized."""
    if in_features % BLOCKSIZE == 0 or in_features % 16:
        return BLOCKSIZE
    return 32 if in_features % 32 == 0 else None


def _quantized_linear(bnb, linear: nn.Linear, method: str, device: torch.device) -> nn.Linear:
    """A bitsandbytes copy of ``linear`` on ``device`` (quantized there), sharing its bias parameter."""
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    weight = linear.weight.detach()
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            *args, compute_dtype=weight.dtype, quant_type=method, compress_statistics=True, device="meta"
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=blocksize_for(linear.in_features), compress_statistics=True,
            quant_type=method, module=layer,
        )  # fmt: skip
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first eval-mode
        # forward, rounding the block scales to bf16: the base would then differ between training and
        # generation. Keep the one canonical layout.
        layer.support_avx512bf16_for_cpu = False
    layer.bias = linear.bias
    return layer.to(device)  # bitsandbytes quantizes when the float weight moves to a device


def _probe(bnb, method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize and run one small layer on ``device``: a clear error now instead of a deep one mid-training."""
    try:
        with torch.no_grad():
            layer = _quantized_linear(bnb, nn.Linear(64, 64, bias=False, dtype=dtype), method, device)
            layer(torch.ones(2, 64, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as err:
        raise QuantizationError(
            f"bitsandbytes {bnb.__version__} cannot run quantize_base={method!r} on {device} in {dtype} "
            f"({type(err).__name__}: {err}). bitsandbytes runs 4-bit and int8 layers on CUDA GPUs and (from "
            f"0.46 on) on x86 CPUs; upgrade with `{INSTALL_HINT}`, use another device, or set quantize_base: none."
        ) from err


def _linear_paths(module: nn.Module) -> list[str]:
    if any(isinstance(m, AdaptedLinear) for m in module.modules()):
        raise QuantizationError(
            "this model already carries adapters; quantize the base first, then add or load adapters"
        )
    return [name for name, m in module.named_modules() if type(m) is nn.Linear]


def _quantizable(method: str, layer: nn.Linear) -> bool:
    return method == "int8" or blocksize_for(layer.in_features) is not None


def quantize_module(module: nn.Module, method: str, *, device: str | torch.device | None = None) -> int:
    """Replace every plain ``nn.Linear`` in ``module`` by its bitsandbytes version (quantized on ``device``,
    default: where each weight is); returns how many layers were replaced. ``method="none"`` does nothing."""
    if check_method(method) == "none":
        return 0
    bnb = require_bitsandbytes(method)
    paths = [p for p in _linear_paths(module) if _quantizable(method, module.get_submodule(p))]
    probed: set[tuple] = set()
    for path in paths:
        old = module.get_submodule(path)
        where = torch.device(device) if device is not None else old.weight.device
        if (where, old.weight.dtype) not in probed:
            _probe(bnb, method, where, old.weight.dtype)
            probed.add((where, old.weight.dtype))
        new = _quantized_linear(bnb, old, method, where)
        parent, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, new)
    return len(paths)


def quantize_pipeline(
    pipe, method: str, *, components: Sequence[str] | None = None, device: str | torch.device | None = None
) -> dict[str, int]:
    """Quantize the linear layers of the pipeline's UNet and text encoder(s) in place (``components`` picks
    some of ``unet``, ``text_encoder``, ``text_encoder_2``). Each layer is quantized on ``device`` (default:
    where it is), so a pipeline loaded on the CPU in fp16 can be quantized straight onto a small GPU.
    Returns {component: layers replaced}. Call before adding adapters; the VAE stays as it is."""
    check_method(method)
    comps = adaptable_components(pipe)
    wanted = tuple(components) if components is not None else COMPONENTS
    unknown = [c for c in wanted if c not in COMPONENTS]
    if unknown:
        raise QuantizationError(f"components {unknown}: choose from {', '.join(COMPONENTS)}")
    return {name: quantize_module(comps[name], method, device=device) for name in wanted if name in comps}


def describe_quantization(pipe) -> dict | None:
    """What an adapter header records about the quantized base it was trained on, or None for a full-precision
    base: {"method", "components": {name: quantized layers}, "blocksizes" (4-bit: sorted; int8: []),
    "double_quant", "bitsandbytes" (version)}."""
    found: dict[str, int] = {}
    methods, blocksizes = set(), set()
    for name, module in adaptable_components(pipe).items():
        layers = [q for q in (quantization_of(m) for m in module.modules()) if q is not None]
        if layers:
            found[name or "model"] = len(layers)
            methods.update((q["method"], q["double_quant"]) for q in layers)
            blocksizes.update(q["blocksize"] for q in layers if q["blocksize"] is not None)
    if not found:
        return None
    if len(methods) != 1:
        raise QuantizationError(f"the base mixes quantization methods {sorted(map(str, methods))}; use one method")
    method, double_quant = methods.pop()
    return {
        "method": method,
        "components": found,
        "blocksizes": sorted(blocksizes),
        "double_quant": double_quant,
        "bitsandbytes": importlib.metadata.version("bitsandbytes"),
    }


def base_bytes(modules: Iterable[nn.Module]) -> dict[str, int]:
    """Bytes of frozen base weights held by ``modules``: {"quantized": packed weights + their scales,
    "float": every other parameter and buffer}. Adapter tensors are not counted."""
    total = {"quantized": 0, "float": 0}
    for module in modules:
        for key, value in frozen_bytes(module).items():
            total[key] += value
    return total
