"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from dreambooth_dora.adapters.inject import adapter_layers, add_adapter

ROOT = Path(__file__).resolve().parents[1]  # the repository
SMOKE_SUBJECT = ROOT / "sample_data" / "smoke_subject"


def perturb(model, name: str = "default", seed: int = 1, b_std: float = 0.3) -> None:
    """Give adapter ``name`` non-trivial values, as training would: random non-zero B, DoRA magnitudes moved off
    ‖W0‖ by up to ±20 %. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adapter_layers(model, name).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * b_std)
            if a.kind == "dora":
                a.magnitude.mul_(0.8 + 0.4 * torch.rand(a.magnitude.shape, generator=g))


def trained_like(model, name: str = "default", seed: int = 1, b_std: float = 0.3, **adapter_args):
    """``add_adapter(model, name, **adapter_args)`` then ``perturb``: an adapter that changes every output.
    Defaults: DoRA, rank 4, alpha 6 (alpha ≠ rank, so a file that loses alpha shows it)."""
    add_adapter(model, name=name, **{"kind": "dora", "rank": 4, "alpha": 6, **adapter_args})
    perturb(model, name, seed=seed, b_std=b_std)
    return model


def open_files_under(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder`` that this process holds open, per /proc/self/fd."""
    folder, found = Path(folder).resolve(), []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listing itself closes before it is read
            target = os.readlink(f"/proc/self/fd/{fd}")
            if Path(target).is_relative_to(folder):
                found.append(target)
    return found
