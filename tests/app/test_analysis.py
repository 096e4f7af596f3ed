"""The Analysis tab's logic (dreambooth_dora.app.analysis): the runs it offers, and the toy-world scores."""

import re

import pytest

from dreambooth_dora import add_adapter, save_adapter
from dreambooth_dora.app import analysis
from dreambooth_dora.sd.pipelines import load_pipeline
from dreambooth_dora.tools.analysis import AnalysisError
from dreambooth_dora.toy.eval import evaluate_base
from tests.helpers import perturb

SAMPLES = 8


def make_run(data_dir, name: str, pipe, base: str, wreck: bool) -> str:
    """A finished run folder as the app writes it: config, final adapter, one intermediate adapter. ``wreck``:
    an adapter that changes every output (forgets the base world); otherwise B = 0, an adapter that changes nothing."""
    run = data_dir / "runs" / name
    add_adapter(pipe, name=name, kind="dora", rank=4)
    if wreck:
        perturb(pipe.unet, name, b_std=3.0)
    save_adapter(pipe, run / "adapter.safetensors", name=name, metadata={"base_model": base})
    (run / "intermediate").mkdir()
    (run / "intermediate" / "step-000000.safetensors").write_bytes((run / "adapter.safetensors").read_bytes())
    (run / "train_config.yaml").write_text(f"kind: dora\ninstance_prompt: a sks heart\nbase_model: '{base}'\n")
    return name


def test_analysable_runs_need_intermediate_adapters(tmp_path, tiny_sd15):
    assert analysis.analysable_runs(tmp_path, set()) == []
    job = make_run(tmp_path, "20260101-000000-abcdef", tiny_sd15, "builtin:tiny-sd15", wreck=False)
    assert analysis.analysable_runs(tmp_path, set()) == [(f"{job}: dora, a sks heart", job)]
    assert analysis.analysable_runs(tmp_path, {job}) == []  # still training
    (tmp_path / "runs" / job / "intermediate" / "step-000000.safetensors").unlink()
    assert analysis.analysable_runs(tmp_path, set()) == []


def test_toy_scores_measure_forgetting_against_the_same_prompts_without_the_adapter(tmp_path, tiny_sd15):
    toy = load_pipeline("builtin:toy")
    kept = make_run(tmp_path, "20260101-000000-000001", toy, "builtin:toy", wreck=False)
    wrecked = make_run(tmp_path, "20260101-000000-000002", load_pipeline("builtin:toy"), "builtin:toy", wreck=True)
    other = make_run(tmp_path, "20260101-000000-000003", tiny_sd15, "builtin:tiny-sd15", wreck=False)
    assert "(toy world)" in dict((j, label) for label, j in analysis.analysable_runs(tmp_path, set()))[kept]
    before = evaluate_base(load_pipeline("builtin:toy"), SAMPLES, seed=analysis.TOY_SEED)[0]["all three"]
    assert before > 50  # the base draws its world

    text = analysis.toy_scores(tmp_path, [kept, wrecked, other], set(), samples=SAMPLES)
    rows = {
        m[1]: m.groups()[1:]
        for m in re.finditer(r"\| (\S+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) → (\d+) \| ([+-]\d+) \|", text)
    }
    *_, kept_before, kept_after, kept_forgot = rows[kept]
    assert (float(kept_before), float(kept_after), kept_forgot) == (round(before), round(before), "+0")
    *_, wreck_before, wreck_after, wreck_forgot = rows[wrecked]
    assert float(wreck_before) == round(before) and float(wreck_after) < before
    assert int(wreck_forgot) == round(before - float(wreck_after)) > 0
    assert other not in rows and f"Not measured (not trained on builtin:toy): {other}" in text

    with pytest.raises(AnalysisError, match=r"not trained on builtin:toy .*preset toy_subject"):
        analysis.toy_scores(tmp_path, [other], set(), samples=SAMPLES)
    with pytest.raises(AnalysisError, match="choose at least one run"):
        analysis.toy_scores(tmp_path, ["../../etc"], set(), samples=SAMPLES)
