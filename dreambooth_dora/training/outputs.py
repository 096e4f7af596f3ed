"""The files a run writes from its live state (main process only), each under its ``RunFolder`` name: validation
images, checkpoints, intermediate adapters (for the ΔM/ΔD analysis) and the final adapter files."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from dreambooth_dora.adapters.inject import adapter_layers, components
from dreambooth_dora.adapters.io import save_adapter
from dreambooth_dora.adapters.quantized import magnitude_for_base
from dreambooth_dora.adapters.readers import plan_outputs, readers_text
from dreambooth_dora.sd.images import save_png
from dreambooth_dora.sd.pipelines import load_pipeline
from dreambooth_dora.sd.quantize import describe_quantization
from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training.runlog import RunLog
from dreambooth_dora.training.setup import ADAPTER, Session
from dreambooth_dora.training.step import TrainingError

log = logging.getLogger("dreambooth_dora.train")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and ("No space left" in str(e) or "os error 28" in str(e))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def disk_guard(s: Session, what: str, needed: int) -> Iterator[None]:
    """Turn "no space left on device" while writing ``what`` into a TrainingError that says how much room the
    run needs, how much there is, and what to change; the last complete checkpoint is named."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if not _is_disk_full(e):
            raise
        free = shutil.disk_usage(s.run.root).free
        kept = ckpt.list_checkpoints(s.run.checkpoints)
        keep = s.cfg.checkpoints_total_limit
        advice = "free some space"
        if keep:
            advice = (
                f"free space, or lower checkpoints_total_limit ({keep}): a new checkpoint is written whole before "
                f"the oldest is deleted, so the disk must hold {keep + 1} checkpoints at once "
                f"(~{_mib((keep + 1) * needed)})"
            )
        raise TrainingError(
            f"the disk is full: writing {what} needs about {_mib(needed)}, {_mib(free)} are free on "
            f"{s.run.root}. {advice[0].upper() + advice[1:]}. Last complete checkpoint: "
            f"{kept[-1] if kept else 'none'} (resume with --resume latest once there is room)."
        ) from None


def _adapter_bytes(s: Session) -> int:
    return sum(p.numel() * 4 for p in s.named.values())  # fp32 tensors


def _checkpoint_bytes(s: Session) -> int:
    """The size of the newest checkpoint, or an estimate: the adapter tensors and Adam's two moments (fp32)."""
    kept = ckpt.list_checkpoints(s.run.checkpoints)
    if kept:
        return _folder_bytes(kept[-1])
    return 3 * _adapter_bytes(s)


def wants_samples(s: Session, step: int) -> bool:
    cfg = s.cfg
    return s.main and bool(cfg.validation_prompt) and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps)


def validation_images(s: Session, step: int) -> list[Path]:
    """Sample images with the live (unmerged) adapter; main process only."""
    cfg = s.cfg
    s.unet.eval()
    paths = []
    with torch.no_grad(), s.accelerator.autocast():
        s.pipe.set_progress_bar_config(disable=True)
        for i in range(cfg.num_validation_images):
            image = s.pipe(
                cfg.validation_prompt,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=torch.Generator().manual_seed(cfg.seed + i),
            ).images[0]
            paths.append(save_png(image, s.run.sample(step, i), _sample_params(s, i)))
    s.unet.train()
    return paths


def _sample_params(s: Session, index: int) -> dict:
    """What a validation image was made with, for its PNG text chunks (as the generator writes them)."""
    cfg = s.cfg
    return {
        "prompt": cfg.validation_prompt,
        "negative_prompt": "",
        "steps": cfg.validation_inference_steps,
        "guidance": cfg.validation_guidance_scale,
        "scheduler": "default",
        "seed": cfg.seed + index,
        "width": cfg.resolution,
        "height": cfg.resolution,
        "base": cfg.base_model,
        "adapters": [],
        "mode": "toggled (training)",
    }


def save_checkpoint(s: Session, step: int, runlog: RunLog) -> Path | None:
    """Checkpoint ``step`` (main process; the others return None), keeping the newest checkpoints_total_limit."""
    if not s.main:
        return None
    scaler = s.accelerator.scaler
    extra = {
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "config": s.cfg.model_dump(mode="json"),
    }
    with disk_guard(s, f"checkpoint {step}", _checkpoint_bytes(s)):
        path = ckpt.save_checkpoint(
            s.run.checkpoint(step),
            step,
            s.named,
            s.optimizer,
            s.lr_scheduler,
            extra,
            keep=s.cfg.checkpoints_total_limit,
        )
    runlog.checkpoint(step, path)
    return path


def save_intermediate(s: Session, step: int) -> None:
    """The adapter at step 0, N, 2N… (N = save_intermediate_every), for the ΔM/ΔD analysis."""
    every = s.cfg.save_intermediate_every
    if s.main and every and step % every == 0:
        fmt = "native" if s.cfg.axis == "out" else "kohya"
        meta = {"base_model": s.cfg.base_model, "step": step}
        with disk_guard(s, f"the intermediate adapter of step {step}", _adapter_bytes(s)):
            save_adapter(s.pipe, s.run.intermediate_adapter(step), ADAPTER, fmt, meta)


@contextlib.contextmanager
def for_full_precision_base(s: Session) -> Iterator[dict]:
    """On a quantized base: while the files are written, DoRA magnitudes re-derived for the full-precision base
    (the one the file is normally loaded on), m' = m·‖W0 + ΔW‖ / ‖dequant(Wq) + ΔW‖ per row, which keeps the row
    scales training settled on (benchmarks/qdora.py --transfer: NF4 transfer error 11–17 % → 7.6 % of the learned
    update). Yields the header facts; the live adapter is restored after. On a full-precision base: nothing."""
    quantized = describe_quantization(s.pipe)
    if quantized is None:
        yield {}
        return
    facts = {"quantized_base": quantized}
    swapped = []
    if s.cfg.kind == "dora":
        full = components(load_pipeline(s.cfg.base_model, torch_dtype=s.dtype, config=s.cfg.base_config))
        for key, (layer, adapter) in adapter_layers(s.pipe, ADAPTER).items():
            comp, _, path = key.partition(".")
            w0 = full[comp].get_submodule(path).weight.detach().to(layer.weight.device)
            swapped.append((adapter, adapter.magnitude.detach().clone()))
            with torch.no_grad():
                adapter.magnitude.copy_(magnitude_for_base(adapter, layer.weight, w0))
        facts["magnitudes"] = "re-derived for the full-precision base"
    try:
        yield facts
    finally:
        with torch.no_grad():
            for adapter, m in swapped:
                adapter.magnitude.copy_(m)


def save_adapters(s: Session, steps: int) -> list[Path]:
    """The final adapter files the config's destinations need (``adapters.readers.plan_outputs``: the files that
    the ``use_in`` readers apply exactly), with the run's facts in their metadata; the routes to any other
    destination are logged."""
    cfg = s.cfg
    plan = plan_outputs(cfg.use_in, cfg.axis, cfg.kind)
    meta = {
        "base_model": cfg.base_model,
        "arch_name": s.arch.arch,
        "instance_prompt": cfg.instance_prompt,
        "class_prompt": cfg.class_prompt,
        "steps": steps,
        "resolution": cfg.resolution,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "train_text_encoder": cfg.train_text_encoder,
    }
    files = []
    with (
        for_full_precision_base(s) as quantized,
        disk_guard(s, "the adapter files", len(plan.files) * _adapter_bytes(s)),
    ):
        meta |= quantized
        for planned in plan.files:
            files.append(save_adapter(s.pipe, planned.path(s.run), ADAPTER, planned.layout, meta))
            log.info("wrote %s (exact in %s)", files[-1], readers_text(planned.readers))
    if plan.routes:  # the same three routes for each destination; only convert's --to differs
        others = list(plan.routes)
        ways = [w.replace("BASE", cfg.base_model).replace(" FILE ", f" {files[0]} ") for w in plan.routes[others[0]]]
        ways = [w.replace(f"--to {others[0]}", f"--to {'|'.join(others)}") for w in ways]
        names = readers_text(others)
        log.info("%s: this file is not read exactly there; to use it there:\n    %s", names, "\n    ".join(ways))
    return files
