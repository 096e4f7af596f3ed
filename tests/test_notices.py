"""The commands' first screen shows no known-harmless library notices (and every other message still gets out)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from dreambooth_dora.notices import KNOWN

# What makes each library print its notice: importing diffusers' pipelines (which import transformers' image
# processors) and peft (which imports bitsandbytes' CPU backend when it is installed). bitsandbytes prints its
# notice only on CPUs with AVX512-BF16, so each known notice is also replayed through its own logger: the filter
# is then tested on every machine, with the library's real message where the library prints it.
INSTALLED = [entry for entry in KNOWN if importlib.util.find_spec(entry[0].split(".")[0]) is not None]
TRIGGER = "import diffusers, peft; from diffusers import StableDiffusionPipeline; import logging; "
TRIGGER += "".join(f"logging.getLogger({name!r}).warning({text!r} + ' (replayed)'); " for name, text, _ in INSTALLED)
TRIGGER += "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other news')"


def _stderr(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr


@pytest.fixture(scope="module")
def screens() -> tuple[str, str]:
    """stderr of the same imports without and with the package's command start-up."""
    return _stderr(TRIGGER), _stderr(f"import sys; sys.argv = ['-m']; import dreambooth_dora; {TRIGGER}")


@pytest.mark.parametrize(("logger", "text", "why"), INSTALLED)
def test_a_command_filters_the_notice_that_a_plain_import_prints(screens, logger, text, why):
    plain, command = screens
    assert text in plain
    assert text not in command
    assert "other news" in command  # other messages of the same logger still get out
