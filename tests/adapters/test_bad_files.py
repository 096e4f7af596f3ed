"""Bad adapter files: each gets a specific, teaching error and leaves the loaded model untouched.
See docs/ARCHITECTURE.md (Adapter files, Reliability)."""

import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_dora.adapters.inject import AdapterError, add_adapter, list_adapters
from dreambooth_dora.adapters.io import AdapterFileError, load_adapter, save_adapter
from dreambooth_dora.adapters.layers import AdaptedLinear
from tests.helpers import trained_like

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def good_file(tmp_path):
    """A valid native DoRA file for the tiny SD1.x model, and its tensors."""
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    donor = build_tiny_sd15()
    trained_like(donor, rank=4, alpha=4, b_std=0.1)
    path = save_adapter(donor, tmp_path / "good.safetensors")
    return path, load_file(str(path))


def _write(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def _sdxl_file(tmp_path):
    from dreambooth_dora.sd.fixtures import build_tiny_sdxl

    donor = build_tiny_sdxl()
    add_adapter(donor, rank=2)
    return save_adapter(donor, tmp_path / "sdxl.safetensors")


def _case(name, tmp_path, good):
    path, tensors = good
    raw = path.read_bytes()
    p = tmp_path / "bad.safetensors"
    if name == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif name == "not_safetensors":
        p.write_text("<html>404 Not Found</html>" * 4)
    elif name == "pickle_zip":
        torch.save(tensors, p)  # PyTorch's zip container with pickled data
    elif name == "pickle_raw":
        p.write_bytes(pickle.dumps({"x": 1}))
    elif name == "empty":
        p.write_bytes(b"")
    elif name == "huge_header":
        p.write_bytes(struct.pack("<Q", 2**40) + b"{}" + b"\0" * 64)
    elif name == "wrong_architecture":
        return _sdxl_file(tmp_path)
    elif name == "missing_key":
        return _write(tmp_path, {k: v for k, v in tensors.items() if k != f"{Q}.lora_B.weight"})
    elif name == "missing_magnitude":
        return _write(tmp_path, {k: v for k, v in tensors.items() if k != f"{Q}.lora_magnitude_vector.weight"})
    elif name == "unexpected_key":
        return _write(tmp_path, {**tensors, "unet.down_blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 32)})
    elif name == "shape_mismatch":
        return _write(tmp_path, {**tensors, f"{Q}.lora_A.weight": torch.zeros(4, 40)})
    elif name == "rank_mismatch":
        return _write(tmp_path, {**tensors, f"{Q}.lora_B.weight": torch.zeros(32, 3)})
    elif name == "nan":
        bad = tensors[f"{Q}.lora_B.weight"].clone()
        bad[0, 0] = float("nan")
        return _write(tmp_path, {**tensors, f"{Q}.lora_B.weight": bad})
    elif name == "inf":
        bad = tensors[f"{Q}.lora_magnitude_vector.weight"].clone()
        bad[3] = float("inf")
        return _write(tmp_path, {**tensors, f"{Q}.lora_magnitude_vector.weight": bad})
    elif name == "integer_dtype":
        return _write(tmp_path, {**tensors, f"{Q}.lora_A.weight": torch.ones(4, 32, dtype=torch.int32)})
    elif name == "bad_magnitude_shape":
        return _write(tmp_path, {**tensors, f"{Q}.lora_magnitude_vector.weight": torch.ones(7)})
    elif name == "whole_model":
        return _write(tmp_path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)})
    elif name == "no_tensors":
        return _write(tmp_path, {})
    elif name.startswith("header_"):
        return _with_header(tmp_path, path, tensors, name)
    return p


def _with_header(tmp_path, path, tensors, name):
    """The good file's tensors under a damaged header entry."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    lora = json.loads(meta["lora_adapter_metadata"])
    meta |= {
        "header_ours_not_json": {"dreambooth_dora": "{not json"},
        "header_ours_list": {"dreambooth_dora": "[1, 2]"},
        "header_lora_not_json": {"lora_adapter_metadata": "{oops"},
        "header_lora_alpha_text": {"lora_adapter_metadata": json.dumps(lora | {"unet.lora_alpha": "abc"})},
    }[name]
    out = tmp_path / "bad.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


CASES = {
    "truncated": "truncated or corrupt safetensors file|truncated or not a safetensors file",
    "not_safetensors": r"not a safetensors file \(it starts with b.<html>",
    "pickle_zip": "pickle/zip checkpoint renamed",
    "pickle_raw": "pickle/zip checkpoint renamed",
    "empty": "the file is empty",
    "huge_header": "header claims 1099511627776 bytes",
    "wrong_architecture": r"trained for SDXL \(cross-attention dim 64\); the loaded base is SD-family|"
    r"trained for SDXL.*loaded base is",
    "missing_key": r"to_q: missing lora_B/lora_up weight",
    "missing_magnitude": r"DoRA magnitude missing for 1 layer\(s\), e\.g\. unet\.down_blocks\.0",
    "unexpected_key": r"unexpected key 'unet\.down_blocks\.9\.attn1\.to_q\.lora_A\.weight'",
    "shape_mismatch": r"shapes A \(4, 40\), B \(32, 4\) do not fit the layer \(32 out, 32 in\)",
    "rank_mismatch": r"rank mismatch: A has 4 rows, B 3 columns",
    "nan": r"B contains NaN or Inf",
    "inf": r"magnitude contains NaN or Inf",
    "integer_dtype": r"A has dtype torch\.int32; adapter weights must be floating point",
    "bad_magnitude_shape": r"magnitude shape \(7,\) fits neither axis",
    "no_tensors": "holds no tensors",
    "whole_model": "whole model checkpoint, not a LoRA/DoRA adapter file; use it as the base model",
    "header_ours_not_json": r"bad\.safetensors: header entry 'dreambooth_dora' is not valid JSON",
    "header_ours_list": r"header entry 'dreambooth_dora' is a JSON list, not an object of settings",
    "header_lora_not_json": r"header entry 'lora_adapter_metadata' is not valid JSON",
    "header_lora_alpha_text": r"bad\.safetensors: alpha of unet\..* is 'abc', not a finite number",
}


def _fingerprint(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {
        f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_explained_and_changes_nothing(case, tiny_sd15, tmp_path, good_file):
    path = _case(case, tmp_path, good_file)
    before = _fingerprint(tiny_sd15)
    with pytest.raises(AdapterFileError, match=CASES[case]):
        load_adapter(tiny_sd15, path)
    after = _fingerprint(tiny_sd15)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, AdaptedLinear) for m in tiny_sd15.unet.modules())
    assert list_adapters(tiny_sd15) == {}


def test_bad_file_keeps_an_already_loaded_adapter(tiny_sd15, tmp_path, good_file):
    load_adapter(tiny_sd15, good_file[0], name="first")
    path = _case("shape_mismatch", tmp_path, good_file)
    with pytest.raises(AdapterFileError):
        load_adapter(tiny_sd15, path, name="second")
    assert list(list_adapters(tiny_sd15)) == ["first"]


def test_every_problem_is_listed_at_once(tiny_sd15, tmp_path, good_file):
    _, tensors = good_file
    bad = {**tensors, f"{Q}.lora_A.weight": torch.zeros(4, 40), "unet.nowhere.lora_A.weight": torch.zeros(1, 1)}
    with pytest.raises(AdapterFileError) as err:
        load_adapter(tiny_sd15, _write(tmp_path, bad))
    assert "unexpected key 'unet.nowhere.lora_A.weight'" in str(err.value) and "shapes A (4, 40)" in str(err.value)


def test_axis_in_adapter_cannot_go_into_diffusers_format(tiny_sd15, tmp_path):
    """A legacy (axis='in') kohya file loads for generation here, but refuses to become a diffusers file."""
    add_adapter(tiny_sd15, rank=2, axis="in")
    kohya = save_adapter(tiny_sd15, tmp_path / "legacy.safetensors", format="kohya")
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    pipe = build_tiny_sd15()
    load_adapter(pipe, kohya)
    with pytest.raises(AdapterError, match="axis='in'.*cannot express"):
        save_adapter(pipe, tmp_path / "as_diffusers.safetensors", format="native")
    assert not (tmp_path / "as_diffusers.safetensors").exists()


def test_wrong_extension_and_format_names_are_explained(tiny_sd15, tmp_path):
    add_adapter(tiny_sd15, rank=2)
    with pytest.raises(AdapterError, match="must end in .safetensors"):
        save_adapter(tiny_sd15, tmp_path / "a.ckpt")
    with pytest.raises(AdapterError, match="format='comfy'"):
        save_adapter(tiny_sd15, tmp_path / "a.safetensors", format="comfy")
