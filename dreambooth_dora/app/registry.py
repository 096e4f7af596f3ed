"""The app's adapter registry: every adapter trained here, trained by the command-line trainer, or uploaded —
listed with the programs each file is exact in, looked up by key (never by a client-sent path), validated on
upload, converted for another program, deleted."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from safetensors import safe_open

from dreambooth_dora.adapters.io import OUR_KEY, AdapterFileError, read_adapter_file
from dreambooth_dora.adapters.readers import HEADER_KEY, LABELS, readers_text
from dreambooth_dora.app.backend import safe_filename, size_text, unique_path
from dreambooth_dora.runs import RunFolder
from dreambooth_dora.training.config import ConfigError

MAX_ADAPTER_BYTES = 2**30  # SDXL rank 128 with the text encoders is ~0.9 GB in fp32


@dataclass
class AdapterEntry:
    key: str  # "run:<job id>" or "upload:<file name>": what the UI sends back
    name: str
    source: str  # "trained" | "uploaded"
    path: Path
    kohya_path: Path | None
    base: str
    kind: str
    rank: int | str
    steps: int | str
    date: str
    size: int
    readers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file name -> readers that apply it exactly

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kind}, {self.base})"

    @property
    def native_path(self) -> Path | None:
        return self.path if self.path != self.kohya_path else None

    def readers_line(self) -> str:
        """``adapter_kohya.safetensors: this project, ComfyUI, A1111, Forge`` per file, for the table."""
        return "; ".join(f"{name}: {readers_text(r) if r else 'not recorded'}" for name, r in self.readers.items())


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}


def _header(path: Path) -> dict:
    return json.loads(_metadata(path).get(OUR_KEY, "{}") or "{}")


def exact_in(path: Path) -> tuple[str, ...]:
    """The readers a file's header says apply it exactly (files by this project record it; others: empty)."""
    try:
        value = json.loads(_metadata(path).get(HEADER_KEY, "[]") or "[]")
    except (ValueError, OSError):
        return ()
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _date(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def _run_entries(folder: Path | None, key: str, source: str) -> list[AdapterEntry]:
    """The adapters of the run folders directly under ``folder`` (newest name first)."""
    out = []
    for run in sorted(folder.iterdir() if folder is not None and folder.is_dir() else [], reverse=True):
        native, kohya = RunFolder(run).adapter, RunFolder(run).kohya_adapter
        path = native if native.is_file() else kohya  # input-axis runs write the kohya file only
        if not path.is_file():
            continue
        try:
            meta = _header(path)
            readers = {p.name: exact_in(p) for p in (native, kohya) if p.is_file()}
        except Exception:  # a file being replaced right now, or damaged on disk: listed next time
            continue
        prompt = str(meta.get("instance_prompt") or "")
        out.append(AdapterEntry(
            f"{key}:{run.name}", f"{prompt} · {run.name}" if prompt else run.name, source, path,
            kohya if kohya.is_file() else None, str(meta.get("base_model", "?")), str(meta.get("kind", "?")),
            meta.get("rank", "?"), meta.get("steps", "?"), _date(path), path.stat().st_size, readers,
        ))  # fmt: skip
    return out


def list_adapters(data_dir: Path, cli_runs: Path | None = None) -> list[AdapterEntry]:
    """The app's trained runs (newest first), then runs of the command-line trainer found in ``cli_runs`` (the
    server's --runs-dir, e.g. outputs/), then uploaded adapters."""
    out = _run_entries(data_dir / "runs", "run", "trained") + _run_entries(cli_runs, "cli", "command line")
    uploads = data_dir / "adapters"
    for path in sorted(uploads.glob("*.safetensors") if uploads.is_dir() else []):
        side = path.with_suffix(".json")
        info = json.loads(side.read_text()) if side.is_file() else {}
        out.append(AdapterEntry(
            f"upload:{path.name}", path.stem, "uploaded", path, None, info.get("base", "?"), info.get("kind", "?"),
            info.get("rank", "?"), info.get("steps", "?"), _date(path), path.stat().st_size,
            {path.name: exact_in(path)},
        ))  # fmt: skip
    return out


def find_adapter(data_dir: Path, key: str | None, cli_runs: Path | None = None) -> AdapterEntry | None:
    return next((e for e in list_adapters(data_dir, cli_runs) if e.key == key), None)


TABLE_COLUMNS = ("name", "files: exact in", "source", "base", "kind", "rank", "steps", "date", "size")
TABLE_WIDTHS = ("24%", "26%", "7%", "11%", "6%", "5%", "5%", "9%", "7%")


def adapter_table(entries: list[AdapterEntry]) -> pd.DataFrame:
    rows = [
        (e.name, e.readers_line(), e.source, e.base, e.kind, e.rank, e.steps, e.date, size_text(e.size))
        for e in entries
    ]
    columns = list(TABLE_COLUMNS)
    return pd.DataFrame([[str(v) for v in r] for r in rows], columns=columns)


def add_uploaded_adapter(src: Path, data_dir: Path, pipe, base_name: str) -> AdapterEntry:
    """Validate an uploaded adapter against the loaded base ``pipe`` and keep a copy; AdapterFileError when it
    is not a safetensors adapter for this base. Only safetensors are read (pickles are refused by content)."""
    src = Path(src)
    name = safe_filename(src.name, default="adapter")
    if not name.endswith(".safetensors"):
        raise AdapterFileError(
            f"{name}: only .safetensors adapter files are accepted (.ckpt/.pt/.bin files are pickles, which "
            "can run code when loaded); convert it to safetensors with a tool you trust"
        )
    if src.stat().st_size > MAX_ADAPTER_BYTES:
        raise AdapterFileError(
            f"{name}: {size_text(src.stat().st_size)} is over the {size_text(MAX_ADAPTER_BYTES)} limit"
        )
    parsed = read_adapter_file(src, pipe)  # header, keys, shapes, architecture, NaN: raises with the reason
    folder = data_dir / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_path(folder, name)
    tmp = folder / f".{uuid.uuid4().hex}.part"
    shutil.copyfile(src, tmp)
    tmp.replace(target)
    ranks = sorted({int(t.A.shape[0]) for t in parsed.layers.values() if t.A is not None})
    info = {
        "base": str(parsed.metadata.get("base_model") or f"checked on {base_name}"),
        "kind": parsed.kind,
        "rank": ranks[0] if len(ranks) == 1 else "/".join(map(str, ranks)),
        "steps": parsed.metadata.get("steps", "?"),
        "format": parsed.format,
        "original_name": src.name,
    }
    target.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return find_adapter(data_dir, f"upload:{target.name}")


def convert_for(entry: AdapterEntry, to: str, data_dir: Path, loaded_base: str) -> tuple[AdapterEntry, str]:
    """Convert an adapter for destination ``to`` into the uploaded adapters (tools.convert: exact when only the
    layout changes, else a re-fit of the other DoRA axis against the base); (new entry, Markdown report).
    ConvertError / AdapterFileError when it cannot."""
    from dreambooth_dora.tools.convert import convert_adapter

    base = entry.base if entry.base not in ("?", "") and not entry.base.startswith("checked on ") else loaded_base
    folder = data_dir / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_path(folder, safe_filename(f"{entry.path.stem}_for_{to}.safetensors"))
    report = convert_adapter(entry.path, target, to, base=base)
    info = {"base": base, "kind": report.kind, "rank": entry.rank, "steps": entry.steps, "format": report.layout,
            "original_name": entry.path.name}  # fmt: skip
    target.with_suffix(".json").write_text(json.dumps(info, indent=1))
    how = (
        f"re-fitted to the {report.axis} axis: {report.overall_error:.1%} of the learned update lost (0 = exact; a "
        "merged checkpoint is the exact route)"
        if report.refit
        else "an exact rewrite"
    )
    text = (
        f"**Converted** {entry.name} for {LABELS[to]}: `{target.name}`, {how}; exact in {readers_text(report.readers)}."
    )
    return find_adapter(data_dir, f"upload:{target.name}"), text


def delete_adapter(entry: AdapterEntry, busy: set[str]) -> str:
    """Delete an uploaded file, or a trained run's whole folder (unless its job is queued or running)."""
    if entry.source == "uploaded":
        entry.path.unlink(missing_ok=True)
        entry.path.with_suffix(".json").unlink(missing_ok=True)
        return f"deleted {entry.name}"
    run = entry.path.parent
    if entry.source != "trained":
        raise ConfigError(f"{run} was trained from the command line: the app does not delete it; remove the folder")
    if run.name in busy:
        raise ConfigError(f"{run.name} is training or queued; stop it before deleting it")
    shutil.rmtree(run)
    return f"deleted run {run.name} (adapter, checkpoints and samples)"
