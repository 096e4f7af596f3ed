"""Adapter files other programs write load here, and through ``convert``, to the outputs the producing program
computes (fp32, ≤ 1e-5): peft (its own save), LyCORIS (``dora_wd`` on either ``wd_on_output``), and the key layouts
of ai-toolkit, OneTrainer and diffusers' 1-D ``dora_scale``, built per their source (docs/ARCHITECTURE.md:
Adapter files)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth_dora.adapters.inject import adapter_layers, components, remove_adapter
from dreambooth_dora.adapters.io import load_adapter
from dreambooth_dora.adapters.names import kohya_name, ldm_unet_path, public_path
from dreambooth_dora.adapters.readers import exact_readers
from dreambooth_dora.sd.fixtures import build_tiny_sd15
from dreambooth_dora.tools.convert import convert_adapter
from tests.adapters.test_io import _text_outputs, _unet_output
from tests.helpers import trained_like

TOL = 1e-5
BASE = "builtin:tiny-sd15"


def _same(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _loaded_outputs(path, convert_to=None, tmp_path=None, base=None):
    """UNet and text-encoder outputs of a fresh tiny SD1.5 with ``path`` loaded (after ``convert`` when asked)."""
    if convert_to is not None:
        out = tmp_path / f"converted_{convert_to}.safetensors"
        convert_adapter(path, out, convert_to, base=base)
        path = out
    pipe = build_tiny_sd15()
    load_adapter(pipe, path)
    return _unet_output(pipe), _text_outputs(pipe)["text_encoder"]


def _check(path, ref_unet, ref_text, tmp_path, converts=("kohya",), base=None):
    for to in (None, *converts):
        unet, text = _loaded_outputs(path, to, tmp_path, base)
        assert _same(unet, ref_unet) <= TOL, to
        if ref_text is not None:
            assert _same(text, ref_text) <= TOL, to


# -- peft ----------------------------------------------------------------------------------------------------


def _train_like(model, up: str, magnitude: str, seed: int):
    """tests.helpers.perturb for another library's parameters (named ``up`` and ``magnitude``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if up in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif magnitude in name:
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
    return model


def _peft_trained(module, targets, seed):
    model = get_peft_model(module, LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=True))
    return _train_like(model, "lora_B", "lora_magnitude_vector", seed)


def test_peft_unet_dora_saved_by_peft(tmp_path):
    pipe = build_tiny_sd15()
    model = _peft_trained(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], seed=1)
    model.save_pretrained(tmp_path / "peft")  # adapter_model.safetensors + adapter_config.json (alpha lives there)
    path = tmp_path / "peft" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert any(k.endswith(".lora_magnitude_vector") and k.startswith("base_model.model.") for k in f.keys())
    reference = _unet_output(pipe)
    _check(path, reference, None, tmp_path, converts=("diffusers", "kohya"), base=BASE)


def test_peft_text_encoder_dora_saved_by_diffusers(tmp_path):
    """peft's state dict saved with diffusers' save_lora_weights (``text_encoder.`` keys, alpha in the header)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    pipe = build_tiny_sd15()
    model = _peft_trained(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed=2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=get_peft_model_state_dict(model),
        text_encoder_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    reference = _text_outputs(pipe)["text_encoder"]
    _check(path, _unet_output(build_tiny_sd15()), reference, tmp_path, converts=("diffusers", "kohya"))


# -- LyCORIS ---------------------------------------------------------------------------------------------------


class _TextModel(torch.nn.Module):
    """kohya names come from a ``text_model.`` level that transformers 5 dropped from CLIPTextModel."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


@pytest.mark.parametrize("wd_on_output", ["True", "False"])
def test_lycoris_dora_either_axis(wd_on_output, tmp_path):
    from lycoris.kohya import create_network

    pipe = build_tiny_sd15()
    te = _TextModel(pipe.text_encoder)
    net = create_network(1.0, 4, 6.0, None, te, pipe.unet, preset="attn-mlp", dora_wd="True", wd_on_output=wd_on_output)
    # this project adapts nn.Linear layers only; LyCORIS also wraps the 1×1 conv proj_in/proj_out here
    net.unet_loras = [m for m in net.unet_loras if isinstance(m.org_module[0], torch.nn.Linear)]
    net.apply_to(te, pipe.unet, apply_text_encoder=True, apply_unet=True)
    _train_like(net, "lora_up", "dora_scale", seed=3)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    with safe_open(str(path), "pt") as f:
        scale = next(f.get_slice(k).get_shape() for k in f.keys() if k.endswith("to_k.dora_scale") and "attn2" in k)
    assert (scale[1] == 1) == (wd_on_output == "True")  # (out, 1) or (1, in)
    reference_unet, reference_text = _unet_output(pipe), _text_outputs(pipe)["text_encoder"]
    _check(path, reference_unet, reference_text, tmp_path, converts=("kohya",), base=BASE)


# -- layouts written per their source: ai-toolkit, OneTrainer, diffusers' 1-D dora_scale ----------------------


def _our_adapter(axis, alpha=4):
    """A trained-like DoRA (alpha = rank: the layouts below store no alpha) and its outputs."""
    pipe = trained_like(build_tiny_sd15(), axis=axis, alpha=alpha)
    return pipe, _unet_output(pipe), _text_outputs(pipe)["text_encoder"]


def _write(path, pipe, spell):
    """Save adapter "default" of ``pipe`` with keys from ``spell(comp, path, module) -> {suffix: tensor}``."""
    comps = components(pipe)
    tensors = {}
    for full, (_, a) in adapter_layers(pipe, "default").items():
        comp, _, mod = full.partition(".")
        for key, t in spell(comp, mod, comps[comp], a).items():
            tensors[key] = t.detach().clone().contiguous()
    save_file(tensors, str(path))
    return path


def test_ai_toolkit_layout(tmp_path):
    """toolkit/models/DoRA.py (DoRAModule): lora_down/lora_up, a 1-D ``magnitude`` per output row, no alpha;
    names from toolkit/network_mixins.py's kohya key map."""
    pipe, ref_unet, ref_text = _our_adapter("out")

    def spell(comp, mod, module, a):
        stem = kohya_name(comp, mod, module, sdxl=False)
        return {
            f"{stem}.lora_down.weight": a.lora_A,
            f"{stem}.lora_up.weight": a.lora_B,
            f"{stem}.magnitude": a.magnitude,
        }

    path = _write(tmp_path / "aitk.safetensors", pipe, spell)
    _check(path, ref_unet, ref_text, tmp_path, converts=("kohya",), base=BASE)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_onetrainer_diffusers_layout(axis, tmp_path):
    """modules/util/convert_lora_util.py convert_to_diffusers: lora_A, lora_B with alpha folded in (no alpha key);
    the output-axis magnitude as ``lora_magnitude_vector.weight`` (out,), the input-axis one kept as ``dora_scale``
    (1, in) beside the lora_A/lora_B keys."""
    pipe, ref_unet, ref_text = _our_adapter(axis, alpha=6)

    def spell(comp, mod, module, a):
        stem = f"{comp}.{public_path(comp, module, mod)}"
        out = {f"{stem}.lora_A.weight": a.lora_A, f"{stem}.lora_B.weight": a.lora_B * a.scaling}
        if axis == "out":
            out[f"{stem}.lora_magnitude_vector.weight"] = a.magnitude
        else:
            out[f"{stem}.dora_scale"] = a.magnitude[None, :]
        return out

    path = _write(tmp_path / "onetrainer.safetensors", pipe, spell)
    # dotted keys name their layers: an exact conversion needs no base
    _check(path, ref_unet, ref_text, tmp_path, converts=("kohya", "diffusers" if axis == "out" else "comfyui"))


def test_onetrainer_comfy_layout(tmp_path):
    """LoRASaverMixin._save_comfy: ``diffusion_model.<ldm path>`` and ``text_encoders.clip_l.transformer.<path>``,
    lora_A/lora_B with alpha and dora_scale kept (OneTrainer's default input axis: (1, in))."""
    pipe, ref_unet, ref_text = _our_adapter("in", alpha=6)

    def spell(comp, mod, module, a):
        if comp == "unet":
            stem = f"diffusion_model.{ldm_unet_path(mod, module)}"
        else:
            stem = f"text_encoders.clip_l.transformer.{public_path(comp, module, mod)}"
        return {
            f"{stem}.lora_A.weight": a.lora_A,
            f"{stem}.lora_B.weight": a.lora_B,
            f"{stem}.alpha": torch.tensor(a.alpha),
            f"{stem}.dora_scale": a.magnitude[None, :],
        }

    path = _write(tmp_path / "onetrainer_comfy.safetensors", pipe, spell)
    _check(path, ref_unet, ref_text, tmp_path, converts=("comfyui",), base=BASE)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_one_dimensional_dora_scale(axis, tmp_path):
    """diffusers' convert_state_dict_to_kohya turns lora_magnitude_vector into a 1-D ``dora_scale``. Square layers
    do not show its axis; the file's non-square layers (the mid block's cross-attention key/value) do."""
    pipe, ref_unet, ref_text = _our_adapter(axis, alpha=6)

    def spell(comp, mod, module, a):
        stem = kohya_name(comp, mod, module, sdxl=False)
        return {
            f"{stem}.lora_down.weight": a.lora_A,
            f"{stem}.lora_up.weight": a.lora_B,
            f"{stem}.alpha": torch.tensor(a.alpha),
            f"{stem}.dora_scale": a.magnitude,
        }

    path = _write(tmp_path / "flat_scale.safetensors", pipe, spell)
    other = build_tiny_sd15()
    parsed = load_adapter(other, path)
    assert {lt.axis for lt in parsed.layers.values()} == {axis}
    assert exact_readers(parsed.form) == ("dreambooth_dora",)  # 1-D dora_scale: crashes or mis-broadcasts elsewhere
    remove_adapter(other, "default")
    _check(path, ref_unet, ref_text, tmp_path, converts=("kohya",), base=BASE)


def test_peft_raw_file_without_config_assumes_alpha_rank_and_says_so(tmp_path):
    pipe = build_tiny_sd15()
    model = _peft_trained(pipe.unet, ["to_q"], seed=4)
    model.save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()
    parsed = load_adapter(build_tiny_sd15(), tmp_path / "peft" / "adapter_model.safetensors")
    assert any("alpha = rank" in note for note in parsed.notes)
    assert parsed.format == "peft" and exact_readers(parsed.form) == ("dreambooth_dora",)  # not measured elsewhere
    assert {lt.alpha for lt in parsed.layers.values()} == {4.0}
