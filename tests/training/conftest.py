"""Fixtures of the training tests."""

import sys
import types

import pytest


class StandInSummaryWriter:
    """Stands in for TensorBoard's SummaryWriter (tensorboard is an optional package, often not installed): like the
    real one it creates its folder and holds an events file open until ``close``; it records the scalars it gets."""

    def __init__(self, log_dir: str) -> None:
        from pathlib import Path

        self.folder, self.scalars = Path(log_dir), []
        self.folder.mkdir(parents=True, exist_ok=True)
        self._events = (self.folder / "events.out.tfevents.stand-in").open("a")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))
        self._events.write(f"{tag} {value} {step}\n")

    def close(self) -> None:
        self._events.close()

    @property
    def closed(self) -> bool:
        return self._events.closed


@pytest.fixture
def tensorboard(monkeypatch) -> list[StandInSummaryWriter]:
    """``from torch.utils.tensorboard import SummaryWriter`` gives the stand-in; the writers made are listed."""
    made: list[StandInSummaryWriter] = []

    def writer(log_dir: str) -> StandInSummaryWriter:
        made.append(StandInSummaryWriter(log_dir))
        return made[-1]

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return made
