"""Exports: bake_adapters, merged full models (diffusers folder + ldm single file) read back by stock diffusers,
DoRA → plain LoRA by truncated SVD, and the CLI's errors (docs/ARCHITECTURE.md: Adapter files, Base models)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from dreambooth_dora.adapters.inject import (
    AdapterError,
    adapter_layers,
    bake_adapters,
    merge_adapters,
    set_adapter_enabled,
    set_adapter_scale,
)
from dreambooth_dora.adapters.io import AdapterFileError, load_adapter, parse_adapter_spec, save_adapter
from dreambooth_dora.adapters.layers import AdaptedLinear
from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl
from dreambooth_dora.sd.ldm import pipeline_to_ldm
from dreambooth_dora.sd.pipelines import export_base, load_pipeline
from dreambooth_dora.tools.export import ExportError, export_merged, export_svd_lora, main
from tests.helpers import trained_like

PROMPT = "a photo of sks dog"
TEXT = ("text_encoder", "text_encoder_2")


def _trained_like(pipe, name="default", seed=1, kind="dora", rank=4, alpha=6):
    return trained_like(pipe, name=name, seed=seed, kind=kind, rank=rank, alpha=alpha)


def _image(pipe) -> np.ndarray:
    with torch.no_grad():
        out = pipe(
            PROMPT,
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    return out.images


def _unet_output(pipe) -> torch.Tensor:
    unet, g = pipe.unet, torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * 8, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=ctx, **kwargs).sample


def _text_output(pipe, name: str) -> torch.Tensor:
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]


def _weights(pipe, component: str) -> dict[str, torch.Tensor]:
    return getattr(pipe, component).state_dict()


def _wide_sdxl(folder: Path) -> str:
    """tiny-sdxl with encoders 32 and 48 wide, as the real SDXL's differ (768, 1280). diffusers' single-file
    loader tells the two encoders apart by width only, so builtin:tiny-sdxl (32 and 32) cannot round-trip
    through from_single_file: its text_encoder_2 would be read from the first encoder's slot."""
    pipe = build_tiny_sdxl()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = CLIPTextConfig.from_dict(
            {**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48, "intermediate_size": 96}
        )
        pipe.text_encoder_2 = CLIPTextModelWithProjection(cfg).eval()
        pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48}).eval()
    pipe.register_modules(text_encoder_2=pipe.text_encoder_2, unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


# -- bake_adapters --------------------------------------------------------------------------------------------


def test_bake_adapters_equals_merge_and_leaves_a_plain_model(tiny_sd15):
    _trained_like(tiny_sd15, "a", seed=1)
    _trained_like(tiny_sd15, "b", seed=2)
    _trained_like(tiny_sd15, "off", seed=3)
    set_adapter_enabled(tiny_sd15, "off", False)  # disabled adapters are dropped, not baked
    set_adapter_scale(tiny_sd15, "b", -0.5)
    merge_adapters(tiny_sd15)
    merged = {c: {k: v.clone() for k, v in _weights(tiny_sd15, c).items()} for c in ("unet", "text_encoder")}
    expected = _unet_output(tiny_sd15)
    n_layers = len(adapter_layers(tiny_sd15, "a"))

    assert bake_adapters(tiny_sd15) == n_layers
    assert not any(
        isinstance(m, AdaptedLinear) for c in ("unet", "text_encoder") for m in getattr(tiny_sd15, c).modules()
    )
    assert torch.equal(_unet_output(tiny_sd15), expected)
    base = build_tiny_sd15()
    for c, weights in merged.items():
        baked = _weights(tiny_sd15, c)
        assert baked.keys() == _weights(base, c).keys()  # exactly the base model's keys: no adapters.*
        assert all(torch.equal(baked[k], weights[k]) for k in baked)


# -- merged full model ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sd15", "sdxl"])
def base_and_adapter(request, tmp_path):
    """(base, adapter file, pipeline class): builtin:tiny-sd15, or the wide tiny SDXL as a diffusers folder."""
    if request.param == "sd15":
        base, cls = "builtin:tiny-sd15", StableDiffusionPipeline
    else:
        base, cls = _wide_sdxl(tmp_path / "wide_sdxl"), StableDiffusionXLPipeline
    adapter = save_adapter(_trained_like(load_pipeline(base)), tmp_path / "adapter.safetensors")
    return base, adapter, cls


def test_merged_export_is_read_back_by_stock_diffusers(base_and_adapter, tmp_path):
    base, adapter, cls = base_and_adapter
    report = export_merged(
        base, [(adapter, 0.8)], tmp_path / "merged", tmp_path / "merged.safetensors", dtype=torch.float32
    )
    ours = load_pipeline(base)
    load_adapter(ours, adapter, scale=0.8)
    merge_adapters(ours)
    assert report.layers_baked == len(adapter_layers(ours, "default"))

    config = base if base.startswith("/") else str(export_base(base, tmp_path / "config"))
    folder = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    single = cls.from_single_file(str(tmp_path / "merged.safetensors"), config=config, local_files_only=True)
    expected = _image(ours)
    for loaded in (folder, single):
        assert type(loaded) is cls
        for component in ("unet", *[t for t in TEXT if getattr(ours, t, None) is not None]):
            mine, theirs = _weights(ours, component), _weights(loaded, component)
            for key, value in theirs.items():
                assert torch.equal(value, mine[key]), f"{component}.{key}"
        assert np.abs(_image(loaded) - expected).max() <= 2 / 255


def test_single_file_layout_is_what_diffusers_converters_read():
    """builtin:tiny-sdxl, component by component (see _wide_sdxl for why not as a whole pipeline)."""
    pipe = build_tiny_sdxl()
    ldm = pipeline_to_ldm(pipe, "sdxl")
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # 1x1 conv, not Linear
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    te2 = "conditioner.embedders.1.model."
    assert ldm[te2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert torch.equal(ldm[te2 + "text_projection"], pipe.text_encoder_2.text_projection.weight.t())
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in ldm
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()},
        "text_encoder_2": sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix=te2),
    }
    for component, state in back.items():
        ref = _weights(pipe, component)
        assert state.keys() == ref.keys(), component
        assert all(torch.equal(state[k], ref[k]) for k in ref), component


def test_sd2_layout_loads_through_stock_from_single_file(tmp_path):
    """SD2.x = the SD1.x UNet/VAE layout + an OpenCLIP text encoder under cond_stage_model.model (no tiny SD2
    builtin exists: a tiny SD1.x pipeline written in that layout stands in)."""
    pipe = build_tiny_sd15()
    ldm = pipeline_to_ldm(pipe, "sd2")
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias" in ldm
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd2.safetensors"))
    config = export_base("builtin:tiny-sd15", tmp_path / "config")
    loaded = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd2.safetensors"), config=str(config), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder"):
        mine, theirs = _weights(pipe, component), _weights(loaded, component)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), component


# -- DoRA → plain LoRA by SVD --------------------------------------------------------------------------------


@pytest.fixture
def dora_file(tmp_path) -> Path:
    return save_adapter(_trained_like(build_tiny_sd15()), tmp_path / "dora.safetensors", metadata={"trigger": "sks"})


def _layers_of(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"<component>.<model path>": {"lora_A.weight": …}} straight from a native file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        stem, _, part = key.partition(".lora_")
        out.setdefault(stem.replace("text_encoder.text_model.", "text_encoder."), {})[part] = t
    return out


def test_svd_errors_match_an_independent_recomputation(dora_file, tmp_path):
    report = export_svd_lora("builtin:tiny-sd15", dora_file, 2, tmp_path / "lora.safetensors")
    with safe_open(str(report.out), "pt") as f:
        header = f.metadata()
    peft_cfg, ours = json.loads(header["lora_adapter_metadata"]), json.loads(header["dreambooth_dora"])
    assert (peft_cfg["unet.r"], peft_cfg["unet.lora_alpha"], peft_cfg["unet.use_dora"]) == (2, 2, False)
    assert ours["kind"] == "lora" and ours["trigger"] == "sks" and ours["svd"]["source"] == "dora.safetensors"
    dora_alpha = json.loads(safe_open(str(dora_file), "pt").metadata()["lora_adapter_metadata"])["unet.lora_alpha"]

    base = build_tiny_sd15()
    source, svd = _layers_of(dora_file), _layers_of(report.out)
    assert source.keys() == svd.keys() == report.layer_errors.keys()
    err_sq = total_sq = 0.0
    for where, t in source.items():
        component, _, path = where.partition(".")
        w0 = getattr(base, component).get_submodule(path).weight.double()
        v = w0 + dora_alpha / 4 * t["B.weight"].double() @ t["A.weight"].double()
        delta = t["magnitude_vector.weight"].double()[:, None] * v / v.norm(dim=1, keepdim=True) - w0
        approx = svd[where]["B.weight"].double() @ svd[where]["A.weight"].double()  # alpha = rank: scaling 1
        err, total = (delta - approx).norm().item(), delta.norm().item()
        assert report.layer_errors[where] == pytest.approx(err / total, abs=1e-5), where
        assert svd[where]["A.weight"].shape[0] == 2
        err_sq, total_sq = err_sq + err**2, total_sq + total**2
    assert report.overall_error == pytest.approx((err_sq / total_sq) ** 0.5, abs=1e-5)
    assert 0.05 < report.overall_error < 1  # rank 2 of a full-rank Δ: a real, reported loss
    assert report.worst(3)[0][1] == max(report.layer_errors.values())


def test_full_rank_svd_lora_reproduces_dora_and_loads_in_stock_diffusers(dora_file, tmp_path):
    report = export_svd_lora("builtin:tiny-sd15", dora_file, 64, tmp_path / "lora.safetensors")  # ≥ every layer
    assert max(report.layer_errors.values()) < 1e-5

    dora, lora = build_tiny_sd15(), build_tiny_sd15()
    load_adapter(dora, dora_file)
    load_adapter(lora, report.out)
    stock = build_tiny_sd15()
    stock.load_lora_weights(str(report.out))  # stock diffusers + peft
    assert (_unet_output(stock) - _unet_output(lora)).abs().max() <= 1e-4
    assert (_text_output(stock, "text_encoder") - _text_output(lora, "text_encoder")).abs().max() <= 1e-4
    merge_adapters(dora)
    merge_adapters(lora)
    assert np.abs(_image(lora) - _image(dora)).max() <= 2 / 255

    kohya = export_svd_lora("builtin:tiny-sd15", dora_file, 64, tmp_path / "kohya.safetensors", format="kohya")
    again = build_tiny_sd15()
    load_adapter(again, kohya.out)
    merge_adapters(again)
    assert (_unet_output(again) - _unet_output(lora)).abs().max() <= 1e-5


def test_svd_refuses_bad_rank_and_non_adapter_files(dora_file, tmp_path):
    out = tmp_path / "lora.safetensors"
    for rank in (0, -1, 2.5):
        with pytest.raises(ExportError, match="must be an integer >= 1"):
            export_svd_lora("builtin:tiny-sd15", dora_file, rank, out)
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(checkpoint))
    with pytest.raises(AdapterFileError, match="whole model checkpoint, not a LoRA/DoRA adapter"):
        export_svd_lora("builtin:tiny-sd15", checkpoint, 4, out)
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("<html>not found</html>")
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        export_svd_lora("builtin:tiny-sd15", garbage, 4, out)
    assert not out.exists()


# -- CLI ------------------------------------------------------------------------------------------------------


def test_adapter_spec_parsing():
    assert parse_adapter_spec("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_adapter_spec("dir/a.safetensors:0.5") == (Path("dir/a.safetensors"), 0.5)
    assert parse_adapter_spec("C:\\x\\a.safetensors") == (Path("C:\\x\\a.safetensors"), 1.0)
    with pytest.raises(AdapterError, match="not a number"):
        parse_adapter_spec("a.safetensors:strong")


def test_cli_errors_are_one_line_exit_2_and_write_nothing(dora_file, tmp_path, capsys):
    sdxl_adapter = save_adapter(_trained_like(build_tiny_sdxl()), tmp_path / "sdxl.safetensors")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    base = ["--base", "builtin:tiny-sd15"]
    cases = {
        "nothing to write": ["merged", *base, "--adapter", str(dora_file)],
        "adapter file not found": [
            "merged",
            *base,
            "--adapter",
            str(tmp_path / "nope.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ],
        "use a number in [-10, 10]": ["merged", *base, "--adapter", f"{dora_file}:11", "--out", str(tmp_path / "o")],
        "exists and is not empty": ["merged", *base, "--adapter", str(dora_file), "--out", str(full)],
        "trained for SDXL": [
            "merged",
            *base,
            "--adapter",
            str(sdxl_adapter),
            "--single-file",
            str(tmp_path / "m.safetensors"),
        ],
        "must be an integer >= 1": [
            "svd",
            *base,
            "--adapter",
            str(dora_file),
            "--rank",
            "0",
            "--out",
            str(tmp_path / "l.safetensors"),
        ],
        "already exists": ["svd", *base, "--adapter", str(dora_file), "--rank", "2", "--out", str(dora_file)],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("error: ") and expected in err[0], (expected, err)
        assert sum(line.startswith("error:") for line in err) == 1
    # argparse's own usage errors take the same one-line path
    with pytest.raises(SystemExit) as exit_info:
        main(["svd", *base, "--adapter", str(dora_file), "--out", str(tmp_path / "l.safetensors")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: the following arguments are required: --rank")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_writes_single_file_in_fp16_and_prints_svd_errors(dora_file, tmp_path, capsys):
    single = tmp_path / "merged.safetensors"
    assert (
        main(["merged", "--base", "builtin:tiny-sd15", "--adapter", f"{dora_file}:0.5", "--single-file", str(single)])
        == 0
    )
    with safe_open(str(single), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16  # default dtype
        assert json.loads(f.metadata()["dreambooth_dora"])["adapters"] == [[str(dora_file), 0.5]]
    out = tmp_path / "lora.safetensors"
    assert (
        main(
            [
                "svd",
                "--base",
                "builtin:tiny-sd15",
                "--adapter",
                str(dora_file),
                "--rank",
                "2",
                "--out",
                str(out),
                "--format",
                "kohya",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "worst layers" in printed and "overall relative error" in printed and out.is_file()
