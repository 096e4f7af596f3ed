"""ΔM / ΔD weight-decomposition analysis (DoRA paper Fig. 2): hand-computed numbers, then tiny runs end to end."""

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from dreambooth_dora.adapters.inject import adapter_layers, add_adapter, merge_adapters, set_adapter_scale
from dreambooth_dora.tools.analysis import analyze_runs, decomposition_stats, main
from dreambooth_dora.training.loop import train
from tests.helpers import ROOT

R2 = math.sqrt(2.0)

# W0: (out=3, in=2); row norms ‖W0_i‖ = 5, 1, 2.
W0 = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]


def _tiny(kind: str, A, B, m=None) -> nn.Module:
    """One bias-free nn.Linear(2 → 3) holding W0, with a rank-1 adapter (alpha = rank, so s = 1) set to A, B, m."""
    module = nn.Module()
    module.proj = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        module.proj.weight.copy_(torch.tensor(W0))
    add_adapter(module, targets=["proj"], kind=kind, rank=1)
    ((_, adapter),) = adapter_layers(module, "default").values()
    with torch.no_grad():
        adapter.lora_A.copy_(torch.tensor(A))
        adapter.lora_B.copy_(torch.tensor(B))
        if m is not None:
            adapter.magnitude.copy_(torch.tensor(m))
    return module


# (kind, A (1, 2), B (3, 1), m, ΔM, ΔD), every number worked out by hand:
CASES = {
    # ΔW = B·A = [[0,0],[0,0],[2,0]] → W' = [[3,4],[1,0],[2,2]], row norms 5, 1, 2√2.
    # ΔM = (0 + 0 + |2√2 − 2|)/3;  row 3: cos((0,2),(2,2)) = 4/(2·2√2) = 1/√2, so ΔD = (1 − 1/√2)/3.
    "lora": ("lora", [[1.0, 0.0]], [[0.0], [0.0], [2.0]], None, (2 * R2 - 2) / 3, (1 - 1 / R2) / 3),
    # Same V = W0 + B·A as above, ‖V‖ = 5, 1, 2√2; m = (10, 1, 1) → W' = [[6,8],[1,0],[1/√2,1/√2]].
    # ‖W'_i‖ = m_i: ΔM = (|10−5| + |1−1| + |1−2|)/3 = 2;  rows 1, 2 keep their direction, row 3 turns 45°:
    # ΔD = (0 + 0 + 1 − 1/√2)/3.
    "dora": ("dora", [[1.0, 0.0]], [[0.0], [0.0], [2.0]], [10.0, 1.0, 1.0], 2.0, (1 - 1 / R2) / 3),
    # Pure magnitude: B = 0 (V = W0), m = 2·‖W0‖ = (10, 2, 4) → W' = 2·W0.
    # ΔM = (5 + 1 + 2)/3 = 8/3;  directions unchanged: ΔD = 0.
    "dora magnitude only": ("dora", [[1.0, 0.0]], [[0.0], [0.0], [0.0]], [10.0, 2.0, 4.0], 8 / 3, 0.0),
    # Pure direction, DoRA: m = ‖W0‖ = (5, 1, 2); B·A = [[0,0],[0,1],[0,0]] → V row 2 = (1,1), rescaled to norm 1:
    # W' row 2 = (1/√2, 1/√2). Norms kept: ΔM = 0;  row 2 turns 45°: ΔD = (1 − cos 45°)/3 = (1 − 1/√2)/3.
    "dora direction only": ("dora", [[0.0, 1.0]], [[0.0], [1.0], [0.0]], [5.0, 1.0, 2.0], 0.0, (1 - 1 / R2) / 3),
    # Pure direction, LoRA: a 60° rotation of row 2, (1,0) → (cos 60°, sin 60°) = (1/2, √3/2), is the rank-1
    # update B·A with B = e2, A = (cos 60° − 1, sin 60°) = (−1/2, √3/2). ‖W'_2‖ = 1: ΔM = 0;  ΔD = (1 − 1/2)/3 = 1/6.
    "lora rotation": ("lora", [[-0.5, math.sqrt(3) / 2]], [[0.0], [1.0], [0.0]], None, 0.0, 1 / 6),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hand_computed_delta_m_and_delta_d(case):
    kind, A, B, m, delta_m, delta_d = CASES[case]
    module = _tiny(kind, A, B, m)
    (stats,) = decomposition_stats(module, "default")
    assert stats.layer == "proj"
    assert stats.delta_m == pytest.approx(delta_m, abs=1e-6)
    assert stats.delta_d == pytest.approx(delta_d, abs=1e-7)


def test_stats_are_at_strength_one_merged_or_not():
    module = _tiny(*CASES["dora"][:4])
    set_adapter_scale(module, "default", 0.3)
    merge_adapters(module)
    (stats,) = decomposition_stats(module, "default")
    assert (stats.delta_m, stats.delta_d) == pytest.approx((2.0, (1 - 1 / R2) / 3), abs=1e-6)


def test_untrained_adapter_is_exactly_zero():
    module = _tiny("dora", [[0.3, -0.7]], [[0.0], [0.0], [0.0]])  # B = 0, m = ‖W0‖ from init
    (stats,) = decomposition_stats(module, "default")
    assert (stats.delta_m, stats.delta_d) == (0.0, 0.0)


# -- tiny training runs end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two 6-step runs on builtin:tiny-sd15 (DoRA, LoRA) saving intermediate adapters at steps 0, 2, 4, 6."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("dora", "lora"):
        train(
            dict(
                base_model="builtin:tiny-sd15",
                instance_data_dir=str(ROOT / "sample_data" / "smoke_subject"),
                instance_prompt="a photo of sks heart",
                output_dir=str(root / kind),
                resolution=64,
                train_batch_size=2,
                max_train_steps=6,
                learning_rate=1e-3,
                rank=4,
                save_intermediate_every=2,
                checkpointing_steps=6,
                kind=kind,
                use_in=["diffusers"],  # native intermediate files (lora_A keys), read below
            )
        )
    return {kind: root / kind for kind in ("dora", "lora")}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_within_step_slope_separates_layers_from_training_progress():
    """Two steps whose layers trade magnitude for direction (ΔM = c − 2·ΔD within each step) while both grow
    with training: pooled, the slope is positive; within steps it is exactly −2."""
    from dreambooth_dora.tools.analysis import LayerStats, _fit, within_step_slope

    steps = {
        0: [LayerStats("a", 0.0, 0.0), LayerStats("b", 0.0, 0.0)],
        10: [LayerStats("a", 1.0 - 2 * 0.1, 0.1), LayerStats("b", 1.0 - 2 * 0.2, 0.2)],
        20: [LayerStats("a", 5.0 - 2 * 1.0, 1.0), LayerStats("b", 5.0 - 2 * 1.1, 1.1)],
    }
    assert _fit(steps)[0] > 0
    assert within_step_slope(steps) == pytest.approx(-2.0)
    assert math.isnan(within_step_slope({0: steps[0]}))


def test_analyze_two_runs(runs, tmp_path):
    result = analyze_runs([runs["dora"], runs["lora"]], tmp_path / "out")
    rows = _rows(result.csv_path)
    assert list(rows[0]) == ["run", "kind", "step", "layer", "delta_m", "delta_d"]
    for kind, run_dir in runs.items():
        with safe_open(run_dir / "intermediate" / "step-000000.safetensors", "pt") as f:
            layers = {k.removesuffix(".lora_A.weight") for k in f.keys() if k.endswith(".lora_A.weight")}
        mine = [r for r in rows if r["run"] == kind]
        assert {r["kind"] for r in mine} == {kind}
        for step in (0, 2, 4, 6):
            at = [r for r in mine if int(r["step"]) == step]
            assert {r["layer"] for r in at} == layers and len(at) == len(layers)
            values = [(float(r["delta_m"]), float(r["delta_d"])) for r in at]
            if step == 0:
                assert all(v == (0.0, 0.0) for v in values)
            else:
                assert all(dm > 0 and dd > 0 for dm, dd in values)
        assert len(mine) == 4 * len(layers)
    assert set(result.slopes) == {"dora", "lora"}
    assert all(math.isfinite(s) for s in result.slopes.values())
    assert all(math.isfinite(s) for s in result.within_slopes.values())
    with Image.open(result.png_path) as image:
        image.verify()
        assert image.format == "PNG" and image.width > image.height > 200


def test_cli_layer_filter_prints_a_table(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(runs["dora"]), str(runs["lora"]), "--out", str(out), "--layers", "attn1.to_q"]) == 0
    printed = capsys.readouterr().out
    assert "slope" in printed and f"wrote {out / 'decomposition.csv'}" in printed
    assert f"wrote {out / 'decomposition.png'}" in printed
    rows = _rows(out / "decomposition.csv")
    assert rows and all(r["layer"].endswith("attn1.to_q") for r in rows)
    assert main([str(runs["dora"]), "--out", str(tmp_path / "glob"), "--layers", "unet.up_*.to_k"]) == 0
    assert {r["layer"].rsplit(".", 1)[1] for r in _rows(tmp_path / "glob" / "decomposition.csv")} == {"to_k"}


def _no_intermediate(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "train_config.yaml", dst)
    return dst


def _unknown_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "intermediate", dst / "intermediate")
    text = (src / "train_config.yaml").read_text().replace("builtin:tiny-sd15", "builtin:tiny-sd51")
    (dst / "train_config.yaml").write_text(text)
    return dst


def _no_config(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "intermediate", dst / "intermediate")
    return dst


BAD = {
    "no intermediate adapters": (_no_intermediate, [], "save_intermediate_every"),
    "no train_config.yaml": (_no_config, [], "train_config.yaml"),
    "unknown base": (_unknown_base, [], "builtin:tiny-sd51"),
    "layers match nothing": (lambda src, dst: src, ["--layers", "no_such_layer"], "no_such_layer"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_cli_bad_input_exits_2_and_writes_nothing(case, runs, tmp_path, capsys):
    make, extra, expected = BAD[case]
    run_dir = make(runs["dora"], tmp_path / "bad")
    out = tmp_path / "out"
    assert main([str(runs["lora"]), str(run_dir), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not out.exists()
