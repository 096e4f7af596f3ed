"""The run folder — what a training writes, under which name — and the atomic write every file goes through.

This is the one place that names output files; everything else asks a ``RunFolder``::

    <output_dir>/
      adapter.safetensors           the adapter, native layout (for diffusers; use_in decides which files)
      adapter_kohya.safetensors     the kohya layout (for ComfyUI, A1111, Forge; its header names its readers)
      train_config.yaml             the resolved config of the run
      train.log  log.csv  tensorboard/
      samples/step-NNNNNN_I.png     validation images
      checkpoints/step-NNNNNN/      resumable state: adapter.safetensors, optimizer.safetensors, state.json
      intermediate/step-NNNNNN.safetensors   adapters at steps 0, N, 2N… for the ΔM/ΔD analysis
      class_images/                 prior-preservation images (the default class_data_dir)
    and, for a job of the browser app:
      job.json  progress.jsonl  worker.log  instance_images/

Atomic writes: a file or folder is written under a temporary name (``.tmp-…``) in its destination folder and
renamed into place, so a crash never leaves half a file under the final name.

Imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
_STEP = re.compile(r"^step-(\d+)$")


class RunFolderBusy(RuntimeError):
    """Another process is writing this run folder; the message names it."""


def step_name(step: int) -> str:
    """``step-000100``: how checkpoints, intermediate adapters and samples spell a step."""
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step-NNNNNN`` name (a file's stem or a folder's name), else None."""
    m = _STEP.match(name)
    return int(m[1]) if m else None


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created until something is written)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- what the trainer writes ----------------------------------------------------------------------------
    @property
    def adapter(self) -> Path:
        return self.root / "adapter.safetensors"

    @property
    def kohya_adapter(self) -> Path:
        return self.root / "adapter_kohya.safetensors"

    @property
    def config(self) -> Path:
        return self.root / "train_config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def csv(self) -> Path:
        return self.root / "log.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def intermediate(self) -> Path:
        return self.root / "intermediate"

    @property
    def class_images(self) -> Path:
        return self.root / "class_images"

    def sample(self, step: int, index: int) -> Path:
        return self.samples / f"{step_name(step)}_{index}.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def intermediate_adapter(self, step: int) -> Path:
        return self.intermediate / f"{step_name(step)}.safetensors"

    def intermediate_adapters(self) -> list[tuple[int, Path]]:
        """(step, path) of every intermediate adapter, by step."""
        found = [(parse_step(p.stem), p) for p in self.intermediate.glob("step-*.safetensors")]
        return sorted((s, p) for s, p in found if s is not None)

    def adapter_files(self) -> list[Path]:
        """The final adapter files that exist (native first)."""
        return [p for p in (self.adapter, self.kohya_adapter) if p.is_file()]

    # -- what a job of the browser app adds -----------------------------------------------------------------
    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    @property
    def instance_images(self) -> Path:
        return self.root / "instance_images"

    # -- one writer at a time, and no leftovers ---------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run: a second run (or a resume) on the same folder while this one writes is
        refused with RunFolderBusy naming the first one's process. The lock is the kernel's (``flock``), so a
        killed run releases it by dying; the lock file only records who holds it."""
        import fcntl  # POSIX only, like the rest of the trainer's process handling

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise RunFolderBusy(
                    f"{self.root} is in use by a training run (PID {holder}); wait for it to finish, stop it, "
                    "or choose another output_dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def remove_stale_temps(self) -> list[Path]:
        """Delete what interrupted atomic writes left behind (``.tmp-…`` files and folders) in the run folder and
        its subfolders; call it only while holding ``lock()``. Returns what was removed."""
        found = [p for folder in (self.root, self.checkpoints, self.intermediate, self.samples) if folder.is_dir()
                 for p in folder.glob(f"{TMP_PREFIX}*")]  # fmt: skip
        for p in found:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        return found


# -- atomic writes ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success it is flushed to disk and renamed onto
    ``path`` (replacing a file, or an empty or — for ``directory`` — any existing folder); on error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not directory:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir() and any(path.iterdir()):
            shutil.rmtree(path)  # os.replace only replaces an empty folder
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)
