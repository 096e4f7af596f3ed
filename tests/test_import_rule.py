"""The import rule of the layers (docs/ARCHITECTURE.md), checked by import-linter's contracts in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True)


@pytest.fixture
def copy_of_the_package(tmp_path):
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "dreambooth_dora", tmp_path / "dreambooth_dora", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_package_keeps_every_contract():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("adapters/layers.py", "from dreambooth_dora.training import config", "Layers"),
        ("sd/pipelines.py", "from dreambooth_dora.toy import world", "Layers"),
        ("tools/generate.py", "import dreambooth_dora.train", "entry point"),
        ("adapters/layers.py", "import diffusers", "torch only"),
        ("training/loop.py", "import gradio", "gradio"),
    ],
)
def test_a_wrong_import_breaks_its_contract(copy_of_the_package, module, bad_import, contract):
    path = copy_of_the_package / "dreambooth_dora" / module
    path.write_text(path.read_text() + f"\n{bad_import}  # a deliberate violation\n")
    out = _lint(copy_of_the_package)
    assert out.returncode != 0
    broken = [line for line in out.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], out.stdout
