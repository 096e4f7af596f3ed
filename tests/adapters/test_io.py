"""Adapter files against a second loader: stock diffusers reads our native files, kohya round trips are exact,
and the key names are pinned (docs/ARCHITECTURE.md: Adapter files)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreambooth_dora.adapters.inject import AdapterError, adapter_layers, list_adapters
from dreambooth_dora.adapters.io import AdapterFileError, load_adapter, save_adapter
from tests.helpers import trained_like

PROMPT = "a photo of sks dog"


def _trained_like(pipe, kind="dora", rank=4, alpha=6, axis="out", seed=1):
    return trained_like(pipe, kind=kind, rank=rank, alpha=alpha, axis=axis, seed=seed)


def _encoders(pipe):
    return [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


def _text_outputs(pipe):
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return {n: getattr(pipe, n)(ids, output_hidden_states=True).hidden_states[-2] for n in _encoders(pipe)}


def _unet_output(pipe):
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * 8, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=ctx, **kwargs).sample


def _image(pipe):
    with torch.no_grad():
        return pipe(
            PROMPT,
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["dora", "lora", "full"])
def test_stock_diffusers_reads_native_files(arch, kind, tmp_path, request):
    ours = _trained_like(request.getfixturevalue(f"tiny_{arch}"), kind=kind)
    path = save_adapter(ours, tmp_path / "adapter.safetensors")

    from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl

    stock = (build_tiny_sd15 if arch == "sd15" else build_tiny_sdxl)()
    base_image = _image(stock)
    stock.load_lora_weights(str(path))  # stock diffusers + peft, no code of ours involved

    ours_text, stock_text = _text_outputs(ours), _text_outputs(stock)
    for name in _encoders(ours):
        assert (ours_text[name] - stock_text[name]).abs().max().item() <= 1e-4, name
    assert (_unet_output(ours) - _unet_output(stock)).abs().max().item() <= 1e-4
    ours_image, stock_image = _image(ours), _image(stock)
    assert np.abs(ours_image - stock_image).max() <= 1e-4
    assert np.abs(ours_image - base_image).max() > 1e-3  # the adapter really changes the image


def test_native_header_carries_alpha_and_our_metadata(tiny_sd15, tmp_path):
    path = save_adapter(
        _trained_like(tiny_sd15, rank=4, alpha=6),
        tmp_path / "a.safetensors",
        metadata={"base_model": "builtin:tiny-sd15", "instance_prompt": PROMPT},
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    peft_cfg = json.loads(meta["lora_adapter_metadata"])
    assert peft_cfg["unet.r"] == 4 and peft_cfg["unet.lora_alpha"] == 6.0 and peft_cfg["unet.use_dora"] is True
    assert peft_cfg["text_encoder.lora_alpha"] == 6.0
    ours = json.loads(meta["dreambooth_dora"])
    assert ours["axis"] == "out" and ours["kind"] == "dora" and ours["base_model"] == "builtin:tiny-sd15"
    assert ours["instance_prompt"] == PROMPT and ours["arch"]["cross_attention_dim"] == 32


def _assert_same_adapters(a, b):
    la, lb = adapter_layers(a, "default"), adapter_layers(b, "default")
    assert list(la) == list(lb)
    for key in la:
        x, y = la[key][1], lb[key][1]
        assert (x.kind, x.rank, x.alpha, x.axis) == (y.kind, y.rank, y.alpha, y.axis), key
        assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.lora_B, y.lora_B), key
        if x.kind == "dora":
            assert torch.equal(x.magnitude, y.magnitude), key


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize(  # axis='in' has no native form: test_axis_in_refuses_native_format
    "kind,axis,fmt",
    [
        ("dora", "out", "native"),
        ("lora", "out", "native"),
        ("dora", "out", "kohya"),
        ("dora", "in", "kohya"),
        ("lora", "out", "kohya"),
    ],
)
def test_round_trip_is_exact(arch, kind, axis, fmt, tmp_path, request):
    ours = _trained_like(request.getfixturevalue(f"tiny_{arch}"), kind=kind, axis=axis)
    path = save_adapter(ours, tmp_path / "a.safetensors", format=fmt)
    from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl

    other = (build_tiny_sd15 if arch == "sd15" else build_tiny_sdxl)()
    parsed = load_adapter(other, path)
    assert parsed.format == fmt and parsed.kind == kind
    _assert_same_adapters(ours, other)
    assert (_unet_output(ours) - _unet_output(other)).abs().max().item() == 0.0


def test_axis_in_refuses_native_format(tiny_sd15, tmp_path):
    _trained_like(tiny_sd15, axis="in")
    with pytest.raises(AdapterError, match="axis='in'.*format='kohya'"):
        save_adapter(tiny_sd15, tmp_path / "a.safetensors", format="native")
    assert not list(tmp_path.iterdir())


def _keys_and_shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_golden_key_names_sd15(tiny_sd15, tmp_path):
    _trained_like(tiny_sd15, rank=4)
    native = _keys_and_shapes(save_adapter(tiny_sd15, tmp_path / "n.safetensors"))
    kohya = _keys_and_shapes(save_adapter(tiny_sd15, tmp_path / "k.safetensors", format="kohya"))
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    assert native[f"unet.{q}.lora_A.weight"] == (4, 32)
    assert native[f"unet.{q}.lora_B.weight"] == (32, 4)
    assert native[f"unet.{q}.lora_magnitude_vector.weight"] == (32,)
    assert native["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_A.weight"] == (4, 32)
    assert native[f"text_encoder.{te}.lora_magnitude_vector.weight"] == (32,)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{k}.lora_down.weight"] == (4, 32) and kohya[f"{k}.lora_up.weight"] == (32, 4)
    assert kohya[f"{k}.alpha"] == () and kohya[f"{k}.dora_scale"] == (32, 1)
    assert kohya["lora_te_text_model_encoder_layers_1_self_attn_out_proj.dora_scale"] == (32, 1)
    # transformer blocks: 2 down + 1 mid + 3 up, × 2 attentions × 4 projections; text: 2 layers × 4
    layers = 6 * 2 * 4 + 2 * 4
    assert len(native) == 3 * layers and len(kohya) == 4 * layers


def test_golden_key_names_sdxl(tiny_sdxl, tmp_path):
    _trained_like(tiny_sdxl, rank=4, axis="in")
    kohya = _keys_and_shapes(save_adapter(tiny_sdxl, tmp_path / "k.safetensors", format="kohya"))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    unet_blocks = sorted({s.split("_1_transformer")[0] for s in stems if s.startswith("lora_unet_")})
    # kohya's SDXL trainer names: input_blocks 4,5,7,8; middle_block 1; output_blocks 0-5
    assert unet_blocks == [
        "lora_unet_input_blocks_4",
        "lora_unet_input_blocks_5",
        "lora_unet_input_blocks_7",
        "lora_unet_input_blocks_8",
        "lora_unet_middle_block",
        "lora_unet_output_blocks_0",
        "lora_unet_output_blocks_1",
        "lora_unet_output_blocks_2",
        "lora_unet_output_blocks_3",
        "lora_unet_output_blocks_4",
        "lora_unet_output_blocks_5",
    ]
    assert kohya["lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.dora_scale"] == (1, 64)  # axis in
    assert kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] == (4, 32)
    assert kohya["lora_te2_text_model_encoder_layers_1_self_attn_v_proj.dora_scale"] == (1, 32)


def test_loaded_adapter_is_toggled_with_strength(tiny_sd15, tmp_path):
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    path = save_adapter(_trained_like(tiny_sd15), tmp_path / "a.safetensors")
    pipe = build_tiny_sd15()
    base = _unet_output(pipe)
    load_adapter(pipe, path, name="subject", scale=0.0)
    assert list_adapters(pipe)["subject"].scale == 0.0
    assert torch.equal(_unet_output(pipe), base)
    with pytest.raises(AdapterError, match="already loaded"):
        load_adapter(pipe, path, name="subject")


def test_kohya_file_with_legacy_te_prefix_and_no_alpha_loads(tiny_sd15, tmp_path):
    """Files from other trainers: no .alpha (alpha = rank), dora_scale (1, in) (legacy LyCORIS axis)."""
    from safetensors.torch import save_file

    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    A, B = torch.randn(2, 32), torch.randn(32, 2) * 0.1
    save_file(
        {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B, f"{stem}.dora_scale": torch.rand(1, 32) + 0.5},
        str(tmp_path / "k.safetensors"),
    )
    load_adapter(tiny_sd15, tmp_path / "k.safetensors")
    ((layer, a),) = adapter_layers(tiny_sd15, "default").values()
    assert a.axis == "in" and a.alpha == 2.0 and torch.equal(a.lora_A, A)


def test_read_errors_are_adapter_file_errors(tiny_sd15, tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tiny_sd15, tmp_path / "missing.safetensors")
