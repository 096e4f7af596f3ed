"""The run log: every place a run reports to — train.log, the progress bar, log.csv, TensorBoard (when the
tensorboard package is installed) and the UI's callbacks — opened and closed as one.

``with RunLog(...)`` attaches train.log to the package logger; ``start`` opens the per-step sinks. Leaving the
block closes all of them, whichever way it is left: finished, stopped, a NaN loss, an exception. While the bar is
live, log lines for the console go through ``tqdm.write`` (above the bar, which is redrawn below them). Only the
main process reports (``enabled``); on the others every method does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dreambooth_dora.runs import RunFolder

log = logging.getLogger("dreambooth_dora.train")
PACKAGE_LOG = logging.getLogger("dreambooth_dora")
CSV_HEADER = "step,loss,lr,steps_per_s,elapsed_s\n"


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    steps_per_s: float
    eta_s: float


@dataclass
class Callbacks:
    """Hooks for the UI. ``should_stop`` is polled after every step; a stop writes a checkpoint first."""

    on_step: Callable[[StepInfo], None] | None = None
    on_samples: Callable[[int, list[Path]], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    on_phase: Callable[[str, int, int], None] | None = None  # a long phase before the steps: (name, done, total)
    should_stop: Callable[[], bool] | None = None


def _tensorboard(folder: Path):
    """A TensorBoard writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


class _AboveTheBar:
    """A console stream whose writes clear the progress bars first and redraw them after (``tqdm.write``)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def console_above_bar() -> Iterator[None]:
    """Route the console handlers of the root and the package logger (stdout/stderr ones; log files are left as
    they are) through ``tqdm.write`` while the block runs; their level, format and filters stay theirs."""
    handlers = [*logging.root.handlers, *PACKAGE_LOG.handlers]
    console = [h for h in handlers if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]
    swapped = [(h, h.setStream(_AboveTheBar(h.stream))) for h in console]
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


class RunLog(contextlib.AbstractContextManager):
    """Reports of one run to its folder and its callbacks; a context manager that closes every sink it opened."""

    def __init__(self, run: RunFolder, callbacks: Callbacks, *, total: int, enabled: bool) -> None:
        self.run, self.callbacks, self.total, self.enabled = run, callbacks, total, enabled
        self._sinks = contextlib.ExitStack()
        self._bar = self._csv = self._tensorboard = None
        self._start, self._t0 = 0, 0.0

    def __enter__(self) -> RunLog:
        if self.enabled:
            handler = logging.FileHandler(self.run.log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._sinks.callback(self._detach, handler, PACKAGE_LOG.level)
            PACKAGE_LOG.addHandler(handler)
            PACKAGE_LOG.setLevel(logging.INFO)
        return self

    @staticmethod
    def _detach(handler: logging.Handler, level: int) -> None:
        PACKAGE_LOG.removeHandler(handler)
        handler.close()
        PACKAGE_LOG.setLevel(level)

    def __exit__(self, *exc) -> None:
        self._sinks.close()

    def start(self, initial: int) -> None:
        """Open the progress bar, log.csv (appended to on resume) and TensorBoard; step rates count from now."""
        self._bar = self._sinks.enter_context(
            tqdm(total=self.total, initial=initial, disable=not self.enabled, desc="training", unit="step")
        )
        if self.enabled:
            self._sinks.enter_context(console_above_bar())
            self._csv = self._sinks.enter_context(self.run.csv.open("a"))
            if self._csv.tell() == 0:
                self._csv.write(CSV_HEADER)
            self._tensorboard = _tensorboard(self.run.tensorboard)
            if self._tensorboard is not None:
                self._sinks.callback(self._tensorboard.close)
        self._start, self._t0 = initial, time.perf_counter()

    def step(self, step: int, loss: float, lr: float) -> None:
        """Step ``step`` (1-based) is done with mean loss ``loss`` at learning rate ``lr``."""
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not self.enabled:
            return
        self._csv.write(f"{step},{loss:.6f},{lr:.6g},{rate:.4f},{elapsed:.2f}\n")
        self._csv.flush()
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("loss", loss, step)
            self._tensorboard.add_scalar("lr", lr, step)
        if self.callbacks.on_step:
            eta = (self.total - step) / rate if rate else float("inf")
            self.callbacks.on_step(StepInfo(step, self.total, loss, lr, rate, eta))

    def pause(self, what: str) -> None:
        """Say on the bar what the run does between steps (validation images, a checkpoint): no frozen bar."""
        self._bar.set_postfix_str(f"{what}…")

    def samples(self, step: int, paths: list[Path]) -> None:
        if self.enabled and self.callbacks.on_samples:
            self.callbacks.on_samples(step, paths)

    def checkpoint(self, step: int, path: Path) -> None:
        if self.enabled:
            log.info("checkpoint %s", path)
            if self.callbacks.on_checkpoint:
                self.callbacks.on_checkpoint(step, path)
