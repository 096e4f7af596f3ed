"""An installed package (``pip install .``) carries every module and the shipped data, and finds them."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


def _tracked(*folders: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout's tracked files (a build in place would leave build/ behind)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in _tracked():
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not part of it
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out)
    (path,) = out.glob("dreambooth_dora-*.whl")
    return path


def test_the_wheel_holds_every_module_and_every_shipped_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = [p for p in _tracked("dreambooth_dora") if p.endswith(".py")]
    assert modules and not [p for p in modules if p not in names]
    assert not [p for p in _tracked("dreambooth_dora/sd/tokenizer") if p not in names]
    for folder in ("training_configs", "sample_data"):
        shipped = _tracked(folder)
        missing = [p for p in shipped if f"dreambooth_dora/_shipped/{p}" not in names]
        assert shipped and not missing, missing


def test_an_installed_package_finds_its_presets_and_the_toy_base(wheel, tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    probe = (
        "import pathlib; from dreambooth_dora import shipped; from dreambooth_dora.sd.pipelines import load_pipeline; "
        f"assert shipped.PACKAGE_DIR.parent == pathlib.Path(r'{target}').resolve(), shipped.PACKAGE_DIR; "
        "assert (shipped.PRESETS_DIR / 'toy_subject.yaml').is_file(); "
        "assert len(list(shipped.TOY_SUBJECT_DIR.glob('*.png'))) == 5; "
        "pipe = load_pipeline('builtin:toy'); print(type(pipe).__name__)"
    )
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "StableDiffusionPipeline"
