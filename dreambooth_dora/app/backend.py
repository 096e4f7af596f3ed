"""What the browser app (``app.py``) does besides widgets, testable without a browser:
upload intake, the training form → config, presets and progress text (the adapter registry is app/registry.py,
the Analysis tab's logic app/analysis.py).

Folders under the app's data dir:
    runs/<job id>/          one training job (jobs.JobManager): instance_images/, adapter*.safetensors, samples/…
    adapters/<name>.safetensors (+ <name>.json)   adapters uploaded through the UI, validated on arrival
    images/<date>/          generated images (PNG with their parameters)
    analysis/<id>/          ΔM/ΔD plots

Nothing here turns a client-sent string into a path: uploaded files are named by ``safe_filename``, and adapters
and runs are looked up by key in listings made from the data dir itself.
See docs/ARCHITECTURE.md (The browser app, Reliability).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from dreambooth_dora.app import form
from dreambooth_dora.app.jobs import JobView
from dreambooth_dora.shipped import PRESETS_DIR, SAMPLE_DATA_DIR
from dreambooth_dora.training.config import FIELDS, ConfigError, TrainConfig, read_yaml, validate
from dreambooth_dora.training.data import IMAGE_EXTENSIONS, DataError, load_image

MAX_UPLOAD_FILES = 50
MAX_FILE_BYTES = 20 * 2**20  # per image: any camera JPEG, far below a decompression-bomb PNG
MAX_TOTAL_BYTES = 200 * 2**20
MAX_CAPTION_BYTES = 64 * 2**10
IDENTIFIER_TOKENS = ("sks", "ohwx", "zwx", "xjy")  # rare tokens: the model knows little about them
# The settings the Train tab shows (app/form.py); a preset fills these, its prompts, and its other keys
# (schedulers, precision, …) go into the tab's "Other settings" box.
FORM_FIELDS = form.NAMES
# Never taken from a preset: where files live belongs to this job (a preset's images are offered separately).
_NOT_FROM_PRESET = {
    "base_model", "base_config", "instance_data_dir", "class_data_dir", "output_dir", "resume_from_checkpoint",
    "save_intermediate_every", "cpu",
}  # fmt: skip


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def safe_filename(name: str, default: str = "file") -> str:
    """A client-sent file name → a plain name: last path component, ASCII letters, digits, ``._-`` only,
    no leading dot, at most 80 characters, extension lower-cased. Never a path."""
    name = re.split(r"[\\/]", str(name))[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    stem = stem[:72] or default
    return f"{stem}.{ext.lower()[:12]}" if ext else stem


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem_2.ext`` … when taken."""
    stem, suffix = Path(name).stem, Path(name).suffix
    path, i = folder / name, 1
    while path.exists():
        i += 1
        path = folder / f"{stem}_{i}{suffix}"
    return path


# -- training images -------------------------------------------------------------------------------------------


@dataclass
class UploadCheck:
    """Uploaded images split into usable ones (source path, safe name) and rejected ones (name, reason)."""

    accepted: list[tuple[Path, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    captions: list[tuple[Path, str]] = field(default_factory=list)  # (source, safe name) of image.txt files

    def describe(self) -> str:
        """Markdown for the Train tab: what is used, and each refused file with its reason."""
        if not self.accepted and not self.rejected:
            return ""
        with_captions = f", {len(self.captions)} with a caption" if self.captions else ""
        lines = [f"**{len(self.accepted)} image(s) ready{with_captions}.**"]
        if self.rejected:
            lines.append(f"**{len(self.rejected)} file(s) refused** (not used for training):")
            lines += [f"- `{name}`: {reason}" for name, reason in self.rejected]
        return "\n".join(lines)


def check_uploads(paths: Sequence[str | Path] | None) -> UploadCheck:
    """Validate uploaded files (the server's copies) as training images: count, size, type, full decode."""
    check, total, names, texts, seen = UploadCheck(), 0, set(), [], {}
    for i, src in enumerate(Path(p) for p in (paths or [])):
        shown = safe_filename(src.name, default=f"upload_{i}")
        size = src.stat().st_size if src.is_file() else 0
        if Path(shown).suffix == ".txt" and size <= MAX_CAPTION_BYTES:
            texts.append((src, shown))  # a caption: kept when an image of the same name is accepted
        elif i >= MAX_UPLOAD_FILES:
            check.rejected.append((shown, f"more than {MAX_UPLOAD_FILES} files; 5-20 photos are typical"))
        elif Path(shown).suffix not in IMAGE_EXTENSIONS:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            check.rejected.append((shown, f"not an image file name (accepted: {exts})"))
        elif size > MAX_FILE_BYTES:
            check.rejected.append((shown, f"too large ({size_text(size)} > {size_text(MAX_FILE_BYTES)} per file)"))
        elif total + size > MAX_TOTAL_BYTES:
            check.rejected.append((shown, f"over the {size_text(MAX_TOTAL_BYTES)} total for one training"))
        else:
            try:
                load_image(src)
            except DataError as e:
                check.rejected.append((shown, getattr(e, "reason", str(e))))
                continue
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            if digest in seen:
                check.rejected.append((shown, f"the same image as {seen[digest]} (a duplicate adds nothing)"))
                continue
            total += size
            name = shown
            for k in range(2, MAX_UPLOAD_FILES + 2):  # two uploads named alike stay two images
                if name.lower() not in names:
                    break
                name = f"{Path(shown).stem}_{k}{Path(shown).suffix}"
            names.add(name.lower())
            seen[digest] = name
            check.accepted.append((src, name))
    _match_captions(check, texts)
    return check


def _match_captions(check: UploadCheck, texts: list[tuple[Path, str]]) -> None:
    """``photo.txt`` beside ``photo.jpg`` is that image's caption (as the trainer reads a folder); others are
    refused with the reason."""
    stems = {Path(name).stem.lower(): Path(name).stem for _, name in check.accepted}
    for src, shown in texts:
        stem = stems.get(Path(shown).stem.lower())
        if stem is None:
            check.rejected.append((shown, "a caption file without an image of the same name"))
            continue
        try:
            src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            check.rejected.append((shown, "a caption must be UTF-8 text"))
            continue
        check.captions.append((src, f"{stem}.txt"))


def copy_uploads(check: UploadCheck, dest: Path) -> list[Path]:
    """Copy the accepted images into ``dest`` (the job's own folder) under their safe names."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src, name in [*check.accepted, *check.captions]:
        target = unique_path(dest, name)
        shutil.copyfile(src, target)
        out.append(target)
    return out


# -- the training form -----------------------------------------------------------------------------------------


def identifier_prompts(token: str, class_word: str) -> tuple[str, str]:
    """("sks", "dog") → ("a photo of sks dog", "a photo of a dog"): the instance and class prompts."""
    token, word = token.strip() or IDENTIFIER_TOKENS[0], class_word.strip() or "person"
    article = "an" if word[0].lower() in "aeiou" else "a"
    return f"a photo of {token} {word}", f"a photo of {article} {word}"


def list_presets(folder: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


@dataclass
class Preset:
    """A preset as the Train tab uses it: form values, prompts, its images (when it ships them), the other
    settings (YAML text for the Other settings box) and its purpose (the file's first comment paragraph)."""

    form: dict
    prompts: dict
    images: Path | None
    other: str
    purpose: str


def _purpose(text: str) -> str:
    """The leading comment paragraph, up to the first indented line (a command) or blank comment."""
    lines = []
    for line in text.splitlines():
        body = line[1:] if line.startswith("#") else None
        if body is None or not body.strip() or body.startswith("   "):
            break
        lines.append(body.strip())
    return " ".join(lines)


def _shipped_images(value) -> Path | None:
    """A preset's ``instance_data_dir`` when it is data this project ships (``sample_data/…``) or an existing
    absolute folder; None otherwise."""
    if not value:
        return None
    path = Path(str(value))
    if not path.is_absolute() and path.parts[:1] == ("sample_data",):
        path = SAMPLE_DATA_DIR.joinpath(*path.parts[1:])
    return path if path.is_absolute() and path.is_dir() else None


def read_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    """Preset ``name`` split for the Train tab; ConfigError when there is none by that name."""
    by_name = {p.stem: p for p in folder.glob("*.yaml")}
    if name not in by_name:
        raise ConfigError(f"preset {name!r} not found; choose one of {', '.join(sorted(by_name))}")
    text = by_name[name].read_text()
    data = read_yaml(text, str(by_name[name])) or {}
    values = {k: data[k] for k in FORM_FIELDS if k in data}
    if "rank" in values and data.get("alpha") is None:
        values["alpha"] = values["rank"]
    prompts = {k: data[k] for k in form.PROMPT_FIELDS if data.get(k)}
    if "class_prompt" in prompts:
        prompts["class_prompt"] = form.class_prompts_to_text(prompts["class_prompt"])
    taken = {*FORM_FIELDS, *form.PROMPT_FIELDS, *_NOT_FROM_PRESET}
    other = {k: v for k, v in data.items() if k not in taken}
    other_text = yaml.safe_dump(other, sort_keys=False, default_flow_style=False).strip() if other else ""
    return Preset(values, prompts, _shipped_images(data.get("instance_data_dir")), other_text, _purpose(text))


def parse_other_settings(text: str | None) -> dict:
    """The Other settings box (YAML ``key: value`` lines, any training-config key) → a dict; ConfigError."""
    if not (text or "").strip():
        return {}
    if len(text) > 20_000:
        raise ConfigError(f"Other settings: {len(text)} characters; at most 20000")
    data = read_yaml(text, "Other settings")
    if not isinstance(data, dict):
        raise ConfigError("Other settings: write one `key: value` per line (e.g. `lr_scheduler: cosine`)")
    return data


def build_config(values: dict, other: dict | None = None) -> TrainConfig:
    """The Train tab's values (+ the Other settings) → a validated config; raises ConfigError.

    ``instance_data_dir`` and ``output_dir`` are placeholders here: the job manager's run folder replaces them.
    ``save_intermediate_every`` is set so that every run can be analysed in the Analysis tab (5 points).
    """
    data = {**(other or {}), **{k: v for k, v in values.items() if v is not None and v != ""}}
    if isinstance(data.get("class_prompt"), str):
        data["class_prompt"] = form.class_prompts_from_text(data["class_prompt"])
    for key in form.INTEGER_FIELDS:
        if isinstance(data.get(key), float) and data[key].is_integer():
            data[key] = int(data[key])  # number widgets send floats
    if not data.get("validation_prompt"):
        data["validation_prompt"] = data.get("instance_prompt")
    steps = data.get("max_train_steps")
    if isinstance(steps, int) and steps > 0:
        data["save_intermediate_every"] = max(1, steps // 4)
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}; see python -m dreambooth_dora.train "
                          "--help-config")  # fmt: skip
    data.setdefault("instance_data_dir", "instance_images")
    return validate(data)


# -- progress --------------------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def progress_text(view: JobView | None) -> str:
    """One Markdown status line for the Train tab."""
    if view is None:
        return "No training yet. Upload images, write the prompt, press **Start**."
    where = f"`{view.id}`"
    step = f"step {view.step}/{view.total}" if view.total else "step 0"
    if view.status == "queued":
        return f"**Queued** {where}: position {view.queue_position}; another training is running (one at a time)."
    if view.status == "running":
        if not view.total and view.phase:
            name, done, total = view.phase
            return f"**Preparing** {where}: {name} {done}/{total} (drawn by the base model, once per run folder)…"
        if not view.total:
            return f"**Starting** {where}: loading the model…"
        return f"**Training** {where}: {step} · {view.steps_per_s:.2f} it/s · ETA {_duration(view.eta_s)}"
    if view.status == "stopping":
        return f"**Stopping** {where} at {step}: saving a checkpoint…"
    if view.status == "finished":
        return f"**Finished** {where}: {step}. Use the adapter in **Generate**; download it in **Adapters**."
    if view.status == "stopped":
        if view.checkpoints:
            return f"**Stopped** {where} at {step}. **Resume** continues from the last checkpoint."
        return f"**Stopped** {where} at {step}, before the first checkpoint: **Resume** starts it over."
    return f"**Failed** {where} at {step}: {view.message or 'see worker.log in the run folder'}"


def loss_frame(view: JobView | None) -> pd.DataFrame:
    """Loss per step for gr.LinePlot (which needs a DataFrame)."""
    rows = view.losses if view is not None else []
    return pd.DataFrame(rows, columns=["step", "loss"], dtype=float)
