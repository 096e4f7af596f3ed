"""python -m dreambooth_dora.convert: exact rewrites keep the merged weights, axis changes re-fit with the error
printed, and every refusal is one teaching line with exit status 2 that leaves no file behind."""

import json

import pytest
import torch
from safetensors import safe_open

from dreambooth_dora.adapters.inject import adapter_layers
from dreambooth_dora.adapters.io import load_adapter, save_adapter
from dreambooth_dora.adapters.readers import HEADER_KEY
from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl
from dreambooth_dora.tools.convert import fit_dora, main
from dreambooth_dora.tools.export import svd_factors
from tests.helpers import trained_like

BASE = "builtin:tiny-sd15"


def _file(tmp_path, axis="out", fmt="native", kind="dora", arch="sd15"):
    pipe = trained_like((build_tiny_sd15 if arch == "sd15" else build_tiny_sdxl)(), kind=kind, axis=axis)
    return save_adapter(pipe, tmp_path / f"{kind}_{axis}_{fmt}.safetensors", format=fmt), pipe


def _merged(pipe):
    return {
        k: layer.weight.detach() + a.merged_delta(layer.weight)
        for k, (layer, a) in adapter_layers(pipe, "default").items()
    }


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_exact_conversion_keeps_the_merged_weights_and_labels_the_readers(tmp_path, capsys):
    src, pipe = _file(tmp_path, axis="in", fmt="kohya")
    rc, out, _ = _run(capsys, src, tmp_path / "c.safetensors", "--to", "comfyui", "--base", BASE)
    assert rc == 0 and "exact conversion" in out and "ComfyUI, A1111, Forge" in out
    other = build_tiny_sd15()
    load_adapter(other, tmp_path / "c.safetensors")
    for key, w in _merged(pipe).items():
        layer, a = adapter_layers(other, "default")[key]
        assert torch.allclose(layer.weight + a.merged_delta(layer.weight), w, atol=1e-6), key
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[HEADER_KEY]) == ["dreambooth_dora", "comfyui", "a1111", "forge"]


def test_axis_change_refits_prints_its_error_and_beats_the_svd_lora(tmp_path, capsys):
    src, pipe = _file(tmp_path, axis="out")
    rc, out, _ = _run(capsys, src, tmp_path / "c.safetensors", "--to", "a1111", "--base", BASE)
    assert rc == 0 and "re-fitted" in out
    overall = float(out.split("overall relative error: ")[1].split()[0])
    assert 0 < overall < 1
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert tuple(f.get_slice(next(k for k in f.keys() if k.endswith("dora_scale"))).get_shape())[0] == 1  # (1, in)
    # per layer: the DoRA fit is never worse than the plain SVD LoRA of the same rank (its first iterate)
    for _, (layer, a) in list(adapter_layers(pipe, "default").items())[:6]:
        w0 = layer.weight.detach()
        target = w0 + a.merged_delta(w0)
        _, _, svd_err, _ = svd_factors(target - w0, 4)
        _, _, _, fit_err = fit_dora(w0, target, 4, "in")
        assert fit_err <= svd_err * (1 + 1e-6)


def test_fit_dora_recovers_a_dora_of_its_own_axis():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 16, generator=g)
    v = w0 + torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) * 0.3
    target = v * (1 + 0.2 * torch.rand(16, generator=g)) * (16**0.5) / v.norm(dim=0)  # an input-axis DoRA
    a, b, m, err = fit_dora(w0, target, 2, "in", iters=200, tol=0)
    refit = (w0 + b @ a) * (m / (w0 + b @ a).norm(dim=0))
    assert float((refit - target).norm() / target.norm()) < 1e-4 and err < 1e-3


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--to", "comfy"], "--to 'comfy': choose one of diffusers, comfyui, a1111, forge, kohya"),
        (["--to", "comfyui"], "re-fits every layer against the base weights W0 — add --base MODEL"),
        (["--to", "diffusers", "--base", BASE, "--rank", "0"], "--rank 0: must be an integer >= 1"),
        (
            ["--to", "diffusers", "--base", "builtin:tiny-sdxl"],
            "adapter was trained for an SD-family model (cross-attention dim 32)",
        ),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, expected):
    src, _ = _file(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = _run(capsys, src, tmp_path / "out.safetensors", *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_kohya_names_need_the_base_to_be_read(tmp_path, capsys):
    src, _ = _file(tmp_path, axis="in", fmt="kohya")
    rc, _, err = _run(capsys, src, tmp_path / "out.safetensors", "--to", "comfyui")
    assert rc == 2 and "only the model can resolve: add --base MODEL" in err and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_and_missing_input_are_refused(tmp_path, capsys):
    src, _ = _file(tmp_path)
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    rc, _, err = _run(capsys, src, tmp_path / "taken.safetensors", "--to", "diffusers")
    assert rc == 2 and "already exists" in err and (tmp_path / "taken.safetensors").read_bytes() == b"keep"
    rc, _, err = _run(capsys, tmp_path / "nope.safetensors", tmp_path / "o.safetensors", "--to", "diffusers")
    assert rc == 2 and "not found" in err and err.count("\n") == 1


def test_a_failure_mid_conversion_leaves_no_file(tmp_path, capsys, monkeypatch):
    import dreambooth_dora.tools.convert as convert

    src, _ = _file(tmp_path, axis="out")

    def broken(*a, **k):
        raise convert.ConvertError("interrupted")

    monkeypatch.setattr(convert, "refit_layers", broken)
    rc, _, _ = _run(capsys, src, tmp_path / "o.safetensors", "--to", "forge", "--base", BASE)
    assert rc == 2 and not any(p.name.startswith(("o.", ".tmp")) for p in tmp_path.iterdir())
