"""The training config's use_in: it picks the DoRA axis unless axis is given, --set use_in=[…] parses, and a
conflicting axis is refused with the routes (adapters.readers.plan_outputs decides)."""

import pytest
import yaml

from dreambooth_dora.training.config import ConfigError, load_config

BASE = {"instance_data_dir": "x", "instance_prompt": "a photo of sks dog"}


@pytest.mark.parametrize(
    "overrides,use_in,axis",
    [
        ([], ["comfyui", "a1111", "forge"], "in"),
        (["use_in=[diffusers]"], ["diffusers"], "out"),
        (["use_in=[comfyui,a1111]"], ["comfyui", "a1111"], "in"),
        (["use_in=forge"], ["forge"], "in"),
        (["axis=out"], ["diffusers"], "out"),  # an axis alone keeps its old meaning
        (["axis=in", "use_in=[a1111]"], ["a1111"], "in"),
        (["kind=lora", "use_in=[diffusers,comfyui]"], ["diffusers", "comfyui"], "out"),
    ],
)
def test_use_in_decides_the_axis(overrides, use_in, axis):
    cfg = load_config(None, overrides, **BASE)
    assert (cfg.use_in, cfg.axis) == (use_in, axis)
    again = load_config(None, [], **yaml.safe_load(cfg.to_yaml()))  # the resolved config round-trips
    assert (again.use_in, again.axis) == (use_in, axis)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["use_in=[diffusers,comfyui]"], "no DoRA axis is applied exactly by all of them"),
        (["axis=out", "use_in=[a1111]"], "axis: out conflicts with use_in ['a1111']"),
        (["use_in=[comfy]"], "use_in: 'comfy' is not a destination"),
        (["use_in=[]"], "use_in: no destination given"),
    ],
)
def test_conflicts_are_refused_with_the_routes(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, **BASE)
    assert expected in str(err.value)
