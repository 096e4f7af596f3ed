"""adapters.readers: the one table of who applies which file exactly, and what a run trains and writes for its
destinations (use_in), with conflicts refused by a message that names the routes."""

import pytest

from dreambooth_dora.adapters.readers import (
    DEFAULT_USE_IN,
    FileForm,
    destinations_for,
    exact_readers,
    plan_outputs,
    written_form,
)
from dreambooth_dora.runs import RunFolder


def test_no_file_is_labelled_for_a_reader_that_misreads_it():
    """The measured failures (compat/matrix.py) are absent from every label."""
    out_kohya = exact_readers(written_form("kohya", "dora", "out"))
    assert not {"comfyui", "a1111", "forge", "diffusers"} & set(out_kohya)
    in_kohya = exact_readers(written_form("kohya", "dora", "in"))
    assert not {"diffusers", "lycoris"} & set(in_kohya) and {"comfyui", "a1111", "forge"} <= set(in_kohya)
    native = exact_readers(written_form("native", "dora", "out"))
    assert not {"comfyui", "a1111", "forge"} & set(native)
    assert exact_readers(FileForm("kohya", "dora", "out", "vector")) == ("dreambooth_dora",)  # 1-D dora_scale


def test_default_trains_the_axis_the_majority_readers_apply():
    plan = plan_outputs()
    assert plan.use_in == DEFAULT_USE_IN == ("comfyui", "a1111", "forge")
    assert plan.axis == "in" and [f.layout for f in plan.files] == ["kohya"]
    assert plan.files[0].path(RunFolder("r")).name == "adapter_kohya.safetensors"
    assert set(plan.routes) == {"diffusers"} and any("convert" in r for r in plan.routes["diffusers"])


def test_diffusers_trains_the_output_axis_and_writes_the_native_file():
    plan = plan_outputs(["diffusers"])
    assert plan.axis == "out" and [(f.layout, f.readers) for f in plan.files] == [
        ("native", ("dreambooth_dora", "diffusers", "peft"))
    ]
    assert destinations_for("out") == ("diffusers",) and destinations_for("in") == DEFAULT_USE_IN


def test_lora_writes_both_files_each_exact_everywhere_it_is_named():
    plan = plan_outputs(["diffusers", "comfyui"], kind="lora")
    assert [f.layout for f in plan.files] == ["native", "kohya"] and not plan.routes
    assert {"comfyui", "a1111", "forge", "diffusers"} <= set(plan.files[1].readers)


@pytest.mark.parametrize(
    "use_in,axis,expected",
    [
        (["diffusers", "comfyui"], None, "no DoRA axis is applied exactly by all of them"),
        (["a1111"], "out", "axis='out' DoRA is not applied exactly by A1111"),
        (["diffusers"], "in", "Drop axis (use_in then picks axis out)"),
        (["comfy"], None, "'comfy' is not a destination; choose from diffusers, comfyui, a1111, forge"),
    ],
)
def test_conflicts_teach_the_routes(use_in, axis, expected):
    with pytest.raises(ValueError) as err:
        plan_outputs(use_in, axis)
    assert expected in str(err.value)
    if "destination" not in expected:
        assert "export merged" in str(err.value) and "dreambooth_dora.convert" in str(err.value)
        assert "kind: lora" in str(err.value)
