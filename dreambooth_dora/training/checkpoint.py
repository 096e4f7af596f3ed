"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

    checkpoints/step-000100/
        adapter.safetensors     every trainable tensor by name (A, B, m of each adapted layer)
        optimizer.safetensors   the optimizer's per-parameter tensors ("<param index>.<name>")
        state.json              step, optimizer scalars and param groups, lr scheduler, grad scaler, config

A checkpoint is written through ``runs.atomic_path`` (a temporary folder renamed into place), so a crash mid-write
leaves the previous checkpoints intact and never a half-written one. Its place and name come from ``RunFolder``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dreambooth_dora.runs import atomic_path, parse_step

# the files inside a checkpoint folder (this module's own format)
ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE = "adapter.safetensors", "optimizer.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    extra: dict,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` as ``folder`` (``RunFolder.checkpoint(step)``) atomically; then keep only the
    newest ``keep`` checkpoints beside it."""
    with atomic_path(folder, directory=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / ADAPTER_FILE))
        opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        state = {"step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=float))
    if keep is not None:
        for old in list_checkpoints(folder.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (``RunFolder.checkpoints``), oldest first."""
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def resolve(spec: str, root: Path) -> Path:
    """``"latest"`` → the newest checkpoint under ``root``; otherwise a checkpoint folder path."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"resume 'latest': no checkpoint in {root} yet; start without --resume")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"resume: {spec!r} is not a checkpoint folder (expected step-NNNNNN/ with {STATE_FILE}); "
            f"use 'latest' or one of the folders in <output_dir>/checkpoints"
        )
    return path


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer, lr_scheduler) -> dict:
    """Restore params, optimizer and scheduler in place; returns state.json (step, extras)."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = load_file(str(path / ADAPTER_FILE))
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise CheckpointError(
            f"{path} was written for another adapter layout (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the same config (rank, targets, train_text_encoder) that wrote it"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(saved[name])
    optimizer.load_state_dict(_join_optimizer(load_file(str(path / OPTIMIZER_FILE)), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state
