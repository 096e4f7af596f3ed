"""DreamBooth with DoRA: ``train(config, callbacks)`` and ``python -m dreambooth_dora.train``.

One explicit loop over named parts: ``setup`` (inputs checked, then adapters, optimizer, resume), ``batches``
(what each micro-batch holds), ``step`` (one optimizer step and the NaN policy), ``runlog`` (train.log, progress bar,
log.csv, TensorBoard, callbacks: closed on every exit) and ``outputs`` (samples, checkpoints, adapter files).
Everything random in a step (data order, crops, noise, timesteps, dropout) is derived from (seed, step), so a run
resumed from a checkpoint reproduces an uninterrupted one exactly.

Writes into ``output_dir`` (names: ``runs.RunFolder``) the adapter files its ``use_in`` needs (adapter.safetensors
for diffusers, adapter_kohya.safetensors for ComfyUI / A1111 / Forge), train_config.yaml, samples/, checkpoints/,
log.csv and train.log. Only the main process writes. See docs/ARCHITECTURE.md (Entry points, Training, Reliability).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_dora import threads
from dreambooth_dora.adapters.inject import AdapterError
from dreambooth_dora.runs import RunFolderBusy
from dreambooth_dora.sd.pipelines import ModelLoadError
from dreambooth_dora.sd.quantize import QuantizationError
from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training import outputs, setup
from dreambooth_dora.training.batches import Batches, LatentCache, TextCache
from dreambooth_dora.training.config import ConfigError, TrainConfig, describe_keys, load_config
from dreambooth_dora.training.data import DataError
from dreambooth_dora.training.runlog import Callbacks, RunLog, StepInfo
from dreambooth_dora.training.step import TrainingError, train_step

# What bad input or a failed run raises: one line, exit 2 (tracebacks only for bugs).
USER_ERRORS = (
    ConfigError,
    DataError,
    ModelLoadError,
    QuantizationError,
    ckpt.CheckpointError,
    TrainingError,
    RunFolderBusy,
    AdapterError,
)
__all__ = ["Callbacks", "StepInfo", "TrainResult", "TrainingError", "main", "train"]
log = logging.getLogger("dreambooth_dora.train")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    status: str  # "finished" | "stopped"
    adapter_files: list[Path] = field(default_factory=list)
    last_checkpoint: Path | None = None


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop (checkpoint, then exit); a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(config: TrainConfig | dict | str | Path, callbacks: Callbacks | None = None) -> TrainResult:
    """Run DreamBooth training as configured. Raises ConfigError / DataError / ModelLoadError for bad input
    (before anything is written) and TrainingError when a run must stop."""
    if isinstance(config, TrainConfig):
        cfg = config
    else:
        cfg = load_config(config) if isinstance(config, (str, Path)) else load_config(**config)
    cb = callbacks or Callbacks()
    inputs = setup.check_inputs(cfg)  # everything checked before the first write
    with setup.own_output(inputs), RunLog(inputs.run, cb, total=cfg.max_train_steps, enabled=inputs.main) as runlog:
        s = setup.open_session(inputs, cb.on_phase)
        status, step, last_ckpt = _steps(s, runlog, cb)
        s.accelerator.wait_for_everyone()
        files = outputs.save_adapters(s, step) if s.main and status == "finished" else []
    return TrainResult(cfg.output_dir, step, status, files, last_ckpt)


def _steps(s: setup.Session, runlog: RunLog, cb: Callbacks) -> tuple[str, int, Path | None]:
    """The step loop, from the session's start step: (status, steps done, last checkpoint written)."""
    cfg = s.cfg
    latents = LatentCache(s.pipe.vae, s.dtype, enabled=cfg.cache_latents and not s.dataset.augmented)
    batches = Batches(s.dataset, cfg.train_batch_size, cfg.gradient_accumulation_steps, s.world, s.rank, latents)
    text = TextCache(s.pipe, s.device, enabled=not cfg.train_text_encoder)  # frozen encoders: embed each prompt once
    status, last_ckpt, step = "finished", None, s.start
    balancer = threads.Balancer()  # follows other processes' load when the thread count was chosen for the user
    runlog.start(s.start)
    if step == 0:
        outputs.save_intermediate(s, 0)
    with _StopFlag() as stop:
        while step < cfg.max_train_steps:
            loss = train_step(s, batches, text, step)
            step += 1
            if (n := balancer.tick()) is not None:
                log.info("CPU threads now %d: other processes are using the rest", n)
            runlog.step(step, loss, s.lr_scheduler.get_last_lr()[0])
            if outputs.wants_samples(s, step):
                runlog.pause("validation images")
                runlog.samples(step, outputs.validation_images(s, step))
            outputs.save_intermediate(s, step)
            wants_stop = stop.raised or bool(cb.should_stop and cb.should_stop())
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps or wants_stop:
                runlog.pause("saving a checkpoint")
                last_ckpt = outputs.save_checkpoint(s, step, runlog) or last_ckpt
            if wants_stop and step < cfg.max_train_steps:
                status = "stopped"
                break
    return status, step, last_ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth_dora.train",
        description=__doc__.split("\n")[0],
        epilog="Config keys: --help-config lists them; training_configs/ has commented presets.",
    )
    parser.add_argument("--config", help="YAML file (see training_configs/); required unless --help-config")
    parser.add_argument("--help-config", action="store_true", help="list every config key with type and default")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from a checkpoint")
    threads.add_argument(parser)
    args = parser.parse_args(argv)
    threads.apply(args.threads)
    if args.help_config:
        print(f"Config keys (YAML file or --set KEY=VALUE):\n{describe_keys()}")
        return 0
    if not args.config:
        parser.error("--config is required (e.g. --config training_configs/toy_subject.yaml)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        extra = {"resume_from_checkpoint": args.resume} if args.resume else {}
        cfg = load_config(args.config, args.set, **extra)
        result = train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.status == "stopped":
        print(f"stopped at step {result.steps}; resume with --resume latest (checkpoint {result.last_checkpoint})")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
