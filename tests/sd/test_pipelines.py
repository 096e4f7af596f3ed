"""Base model loading: builtin tiny pipelines, the shipped tokenizer, export, and load errors."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from dreambooth_dora.sd import pipelines as models
from dreambooth_dora.sd.fixtures import load_tokenizer
from dreambooth_dora.sd.pipelines import ModelLoadError, describe_architecture, export_base, load_pipeline
from dreambooth_dora.sd.vocab import PROMPT_WORDS, TOKENIZER_DIR, learn_merges

TINY = ["builtin:tiny-sd15", "builtin:tiny-sdxl"]


def _image(pipe: DiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)
    return out.images


def _state_dicts(pipe: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    return {name: module.state_dict() for name, module in modules.items()}


def _assert_same_weights(a: DiffusionPipeline, b: DiffusionPipeline) -> None:
    weights_a, weights_b = _state_dicts(a), _state_dicts(b)
    assert weights_a.keys() == weights_b.keys()
    for component, tensors in weights_a.items():
        assert tensors.keys() == weights_b[component].keys(), component
        for key, tensor in tensors.items():
            assert torch.equal(tensor, weights_b[component][key]), f"{component}.{key}"


def _fake_checkpoint(path: Path, *prefixes: str) -> Path:
    save_file({f"{prefix}weight": torch.zeros(1) for prefix in prefixes}, str(path))
    return path


# --- the shipped tokenizer ---------------------------------------------------------------------


def test_every_prompt_word_is_one_distinct_token() -> None:
    tokenizer = load_tokenizer()
    ids = {}
    for word in PROMPT_WORDS:
        input_ids = tokenizer(word).input_ids
        assert input_ids[0] == tokenizer.bos_token_id and input_ids[-1] == tokenizer.eos_token_id
        assert len(input_ids) == 3, f"{word!r} -> {tokenizer.convert_ids_to_tokens(input_ids)}"
        ids[word] = input_ids[1]
    assert len(set(ids.values())) == len(set(PROMPT_WORDS))
    assert tokenizer.convert_ids_to_tokens(ids["sks"]) == "sks</w>"


def test_shipped_vocab_matches_generator_and_is_small() -> None:
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert [tuple(line.split(" ")) for line in lines[1:]] == learn_merges(PROMPT_WORDS)
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<|endoftext|>"] == len(vocab) - 1  # CLIP layout: special tokens last
    assert sum(f.stat().st_size for f in TOKENIZER_DIR.iterdir()) < 200_000


def test_tokenizer_falls_back_to_bytes_and_pads() -> None:
    tokenizer = load_tokenizer()
    ids = tokenizer("Zebra, 42!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1] and len(ids) > 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra , 4 2 !"
    padded = tokenizer("a dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.eos_token_id
    sdxl_second = load_tokenizer(pad_token="!")
    assert sdxl_second.pad_token_id == sdxl_second.convert_tokens_to_ids("!") == 0


# --- builtin tiny pipelines --------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_builtin_is_deterministic_fast_and_leaves_global_rng_alone(name: str) -> None:
    first = load_pipeline(name)
    rng_before = torch.get_rng_state()
    start = time.perf_counter()
    second = load_pipeline(name)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(torch.get_rng_state(), rng_before)
    _assert_same_weights(first, second)


@pytest.mark.parametrize(
    "name, pipeline_class",
    [("builtin:tiny-sd15", StableDiffusionPipeline), ("builtin:tiny-sdxl", StableDiffusionXLPipeline)],
)
def test_builtin_generates_a_64px_image(name: str, pipeline_class: type) -> None:
    pipe = load_pipeline(name)
    assert type(pipe) is pipeline_class
    assert pipe.vae_scale_factor == 8  # as in the real models: 64px images <-> 8x8 latents
    image = _image(pipe)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.01  # not a flat image: every stage ran


def test_builtin_dtype() -> None:
    pipe = load_pipeline("builtin:tiny-sd15", torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float16


def test_describe_architecture_of_builtins() -> None:
    sd15 = describe_architecture(load_pipeline("builtin:tiny-sd15"))
    assert (sd15.arch, sd15.base_id, sd15.cross_attention_dim) == ("sd15", "builtin:tiny-sd15", 32)
    assert (sd15.text_encoder_hidden_sizes, sd15.prediction_type) == ((32,), "epsilon")
    sdxl = describe_architecture(load_pipeline("builtin:tiny-sdxl"))
    assert (sdxl.arch, sdxl.base_id, sdxl.cross_attention_dim) == ("sdxl", "builtin:tiny-sdxl", 64)
    assert (sdxl.text_encoder_hidden_sizes, sdxl.prediction_type) == ((32, 32), "epsilon")


def test_describe_architecture_sd2_and_non_sd() -> None:
    # describe_architecture only reads configs, so stand-ins with SD2.1's config values suffice.
    encoder = SimpleNamespace(config=SimpleNamespace(hidden_size=1024))
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024, addition_embed_type=None))
    scheduler = SimpleNamespace(config={"prediction_type": "v_prediction"})
    sd2 = SimpleNamespace(unet=unet, text_encoder=encoder, scheduler=scheduler, name_or_path="x/sd21")
    assert describe_architecture(sd2) == models.BaseArchitecture("sd2", "x/sd21", 1024, (1024,), "v_prediction")
    with pytest.raises(ModelLoadError, match="only Stable Diffusion"):
        describe_architecture(SimpleNamespace(transformer=object(), scheduler=scheduler, name_or_path="x/flux"))


# --- export and local folders ------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_export_round_trips_through_stock_from_pretrained(name: str, tmp_path: Path) -> None:
    out = export_base(name, tmp_path / "base")
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    builtin = load_pipeline(name)
    reloaded = DiffusionPipeline.from_pretrained(out)
    assert type(reloaded) is type(builtin)
    _assert_same_weights(builtin, reloaded)
    # Bit-identical weights; the images may differ by ~1 ulp because tensors memory-mapped from
    # safetensors are not 64-byte aligned, which steers a few CPU matmuls onto another kernel.
    np.testing.assert_allclose(_image(reloaded), _image(builtin), atol=1e-5, rtol=0)


def test_local_folder_loads_and_records_its_path(tmp_path: Path) -> None:
    folder = export_base("builtin:tiny-sd15", tmp_path / "sd15")
    pipe = load_pipeline(str(folder))
    _assert_same_weights(pipe, load_pipeline("builtin:tiny-sd15"))
    assert describe_architecture(pipe).base_id == str(folder)


def test_folder_without_a_valid_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_pipeline(str(tmp_path))


def test_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not an empty folder"):
        export_base("builtin:tiny-sd15", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_export_writes_a_folder_and_reports_errors_in_one_line(tmp_path: Path, capsys) -> None:
    assert models.main(["export", "builtin:tiny-sd15", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model_index.json").is_file()
    capsys.readouterr()
    assert models.main(["export", "builtin:tiny-sd16", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown builtin") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


# --- builtin:toy ---------------------------------------------------------------------------------


def test_toy_not_built_names_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "TOY_BASE_DIR", tmp_path / "toy_base")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("builtin:toy")
    assert "python -m dreambooth_dora.toy.pretrain --out sample_data/toy_base" in str(info.value)
    assert "builtin:tiny-sd15" in str(info.value)


def test_toy_loads_the_sample_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "TOY_BASE_DIR", export_base("builtin:tiny-sd15", tmp_path / "toy_base"))
    pipe = load_pipeline("builtin:toy")
    assert describe_architecture(pipe).base_id == "builtin:toy"
    _assert_same_weights(pipe, load_pipeline("builtin:tiny-sd15"))


# --- names that do not load ----------------------------------------------------------------------


def test_uncached_hub_id_fails_with_a_teaching_message() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("no-such-owner/no-such-model")
    message = str(info.value)
    expected = ["'no-such-owner/no-such-model'", "not a local folder", "HF_HUB_OFFLINE"]
    expected += ["builtin:toy", "builtin:tiny-sd15", "model_index.json"]
    assert all(part in message for part in expected), message


@pytest.mark.parametrize(
    "base, suggestion", [("builtin:tiny-sd16", "builtin:tiny-sd15"), ("tiny-sdxl", "builtin:tiny-sdxl")]
)
def test_misspelled_builtin_gets_did_you_mean(base: str, suggestion: str) -> None:
    with pytest.raises(ModelLoadError, match=f"Did you mean '{suggestion}'"):
        load_pipeline(base)


def test_unknown_builtin_lists_the_valid_names() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("builtin:flux")
    assert "Did you mean" not in str(info.value)
    assert all(name in str(info.value) for name in models.BUILTIN_NAMES)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match=r"pickle checkpoint .*only \.safetensors"):
        load_pipeline(str(path))


# --- single-file checkpoints (weights-free stand-ins: only the header is read before refusing) ----


def test_single_file_offline_without_config_asks_for_one(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path / "sd15.safetensors", "model.diffusion_model.", "cond_stage_model.transformer.")
    with pytest.raises(ModelLoadError, match=r"needs config=.*to load offline.*StableDiffusionPipeline"):
        load_pipeline(str(path))


def test_single_file_config_of_another_architecture_is_refused(tmp_path: Path) -> None:
    config = export_base("builtin:tiny-sd15", tmp_path / "sd15")
    path = _fake_checkpoint(tmp_path / "xl.safetensors", "model.diffusion_model.", "conditioner.embedders.1.")
    with pytest.raises(ModelLoadError, match=r"StableDiffusionXLPipeline checkpoint .* StableDiffusionPipeline"):
        load_pipeline(str(path), config=str(config))


def test_single_file_adapter_or_garbage_or_missing_is_refused(tmp_path: Path) -> None:
    adapter = _fake_checkpoint(tmp_path / "lora.safetensors", "lora_unet_down_blocks_0.")
    with pytest.raises(ModelLoadError, match="not a full Stable Diffusion checkpoint"):
        load_pipeline(str(adapter))
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=r"not a readable \.safetensors file"):
        load_pipeline(str(garbage))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing.safetensors"))


def test_config_is_only_for_single_files() -> None:
    with pytest.raises(ModelLoadError, match="only applies to single-file"):
        load_pipeline("builtin:tiny-sd15", config="somewhere")
