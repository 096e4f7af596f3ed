"""Module paths of the flat 0.1 layout keep working for one release, each naming its new home."""

import importlib
import subprocess
import sys

import pytest

from dreambooth_dora._legacy import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning_naming_it(old):
    new = importlib.import_module(f"dreambooth_dora.{MOVED[old]}")
    sys.modules.pop(f"dreambooth_dora.{old}", None)
    with pytest.warns(FutureWarning, match=f"dreambooth_dora.{MOVED[old]}"):
        module = importlib.import_module(f"dreambooth_dora.{old}")
    assert module is new


def test_old_names_import_from_old_paths():
    for old in ("dreambooth_dora.adapter_io", "dreambooth_dora.builtin.tiny", "dreambooth_dora.builtin"):
        sys.modules.pop(old, None)
    with pytest.warns(FutureWarning):
        from dreambooth_dora.adapter_io import load_adapter
        from dreambooth_dora.builtin.tiny import build_tiny_sd15
    from dreambooth_dora.adapters.io import load_adapter as new_load
    from dreambooth_dora.sd.fixtures import build_tiny_sd15 as new_build

    assert load_adapter is new_load and build_tiny_sd15 is new_build


def test_a_split_module_fails_naming_where_its_parts_went():
    with pytest.raises(ModuleNotFoundError, match="dreambooth_dora.app"):
        importlib.import_module("dreambooth_dora.ui_backend")


def test_an_old_command_runs_the_new_one():
    out = subprocess.run(
        [sys.executable, "-m", "dreambooth_dora.builtin.toy_eval", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--adapter" in out.stdout and "dreambooth_dora.toy.eval" in out.stderr
