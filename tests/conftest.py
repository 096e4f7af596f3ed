"""Shared test setup. Tests are offline: nothing may ever be fetched from a model hub."""

import os

# Set before anything imports huggingface_hub, which reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
# On a shared 2-core machine OpenMP threads that spin while waiting turned 0.3 s tests into 70 s ones at
# random; passive waiting keeps both threads without the stalls. Read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _hub_offline() -> None:
    """Fail loudly if huggingface_hub was imported before this file set offline mode."""
    from huggingface_hub import is_offline_mode

    assert is_offline_mode(), "huggingface_hub is not in offline mode; tests must never reach the hub"


@pytest.fixture
def tiny_sd15():
    """A fresh seeded random SD1.x pipeline (identical weights every time)."""
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    return build_tiny_sd15()


@pytest.fixture
def tiny_sdxl():
    """A fresh seeded random SDXL pipeline (identical weights every time)."""
    from dreambooth_dora.sd.fixtures import build_tiny_sdxl

    return build_tiny_sdxl()
