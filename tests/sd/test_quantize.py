"""Quantizing a base (sd.quantize): which layers, what it costs, what it reports, and clear errors."""

import sys

import pytest
import torch
from torch import nn

from dreambooth_dora.adapters.inject import add_adapter
from dreambooth_dora.adapters.quantized import is_quantized_linear
from dreambooth_dora.sd import quantize as quantize_mod
from dreambooth_dora.sd.pipelines import load_pipeline
from dreambooth_dora.sd.quantize import (
    QuantizationError,
    base_bytes,
    blocksize_for,
    describe_quantization,
    quantize_module,
    quantize_pipeline,
)

pytest.importorskip("bitsandbytes")  # a dependency (requirements.txt); skipped only where it is absent


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_every_linear_of_unet_and_text_encoders_is_quantized_and_the_vae_is_not(method, tiny_sdxl):
    before = {c: _linears(getattr(tiny_sdxl, c)) for c in ("unet", "text_encoder", "text_encoder_2")}
    vae = {k: v.clone() for k, v in tiny_sdxl.vae.state_dict().items()}
    counts = quantize_pipeline(tiny_sdxl, method)
    for comp, layers in before.items():
        after = _linears(getattr(tiny_sdxl, comp))
        quantized = [n for n, m in after.items() if is_quantized_linear(m)]
        # kept in full precision: only rows bitsandbytes' CPU 4-bit kernel cannot dequantize (blocksize_for)
        kept = [n for n in layers if n not in quantized]
        assert counts[comp] == len(quantized) > 0
        assert all(method != "int8" and blocksize_for(layers[n].in_features) is None for n in kept), kept
    assert all(torch.equal(v, tiny_sdxl.vae.state_dict()[k]) for k, v in vae.items())
    info = describe_quantization(tiny_sdxl)
    assert info["method"] == method and info["components"] == counts
    assert info["bitsandbytes"] == quantize_mod.importlib.metadata.version("bitsandbytes")


def test_quantized_outputs_stay_close_and_nf4_weights_take_an_eighth_of_fp32(tiny_sd15):
    ids = tiny_sd15.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = tiny_sd15.text_encoder(ids.input_ids)[0]
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(320, 640, bias=False), nn.Linear(640, 320, bias=False))
    fp32 = base_bytes([wide])
    quantize_module(wide, "nf4")
    nf4 = base_bytes([wide])
    # 4 bits per weight, plus double-quantized scales: 8-bit absmax per 64 weights, fp32 per 256 of those
    assert fp32["float"] == 2 * 320 * 640 * 4 and nf4["float"] == 0
    assert 1 / 8 <= nf4["quantized"] / fp32["float"] <= 1 / 8 * 1.06
    quantize_pipeline(tiny_sd15, "int8", components=["text_encoder"])
    with torch.no_grad():
        got = tiny_sd15.text_encoder.train()(ids.input_ids)[0]
    assert (got - want).norm() / want.norm() < 0.05  # int8 rows: a small, not a large, change


def test_load_pipeline_quantizes_and_generation_runs_on_a_quantized_base():
    pipe = load_pipeline("builtin:tiny-sd15", quantize="nf4")
    assert describe_quantization(pipe)["method"] == "nf4"
    add_adapter(pipe, rank=4)
    image = pipe("a photo of sks dog", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    assert describe_quantization(load_pipeline("builtin:tiny-sd15")) is None


def test_missing_bitsandbytes_is_explained(monkeypatch, tiny_sd15):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes.*pip install 'bitsandbytes>="):
        quantize_pipeline(tiny_sd15, "nf4")
    assert not any(is_quantized_linear(m) for m in tiny_sd15.unet.modules())  # nothing changed
    assert quantize_pipeline(tiny_sd15, "none") == {"unet": 0, "text_encoder": 0}  # no bitsandbytes needed


def test_old_bitsandbytes_unknown_method_and_order_are_explained(monkeypatch, tiny_sd15):
    import bitsandbytes

    with pytest.raises(QuantizationError, match="quantize_base='nf5'.*nf4"):
        quantize_pipeline(tiny_sd15, "nf5")
    with pytest.raises(QuantizationError, match="components.*vae"):
        quantize_pipeline(tiny_sd15, "nf4", components=["vae"])
    monkeypatch.setattr(bitsandbytes, "__version__", "0.42.0")
    with pytest.raises(QuantizationError, match=r"bitsandbytes >= 0\.45\.0; this is 0\.42\.0"):
        quantize_pipeline(tiny_sd15, "int8")
    monkeypatch.undo()
    add_adapter(tiny_sd15, rank=2)
    with pytest.raises(QuantizationError, match="quantize the base first"):
        quantize_pipeline(tiny_sd15, "nf4")


def test_a_device_bitsandbytes_cannot_run_on_is_explained(monkeypatch, tiny_sd15):
    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(quantize_mod, "_quantized_linear", broken)
    with pytest.raises(QuantizationError, match="cannot run quantize_base='nf4' on cpu.*no kernel"):
        quantize_pipeline(tiny_sd15, "nf4")
