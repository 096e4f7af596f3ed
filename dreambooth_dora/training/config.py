"""The training config: one typed, validated model (YAML in, YAML out), with ``--set key=value`` overrides.

Field names follow diffusers' DreamBooth scripts so users' habits carry over. Validation happens
here, at the edge: every problem is reported at once, unknown keys get a "did you mean".
See docs/ARCHITECTURE.md (Training).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreambooth_dora.adapters.readers import DEFAULT_USE_IN, check_destinations, destinations_for, plan_outputs
from dreambooth_dora.runs import RunFolder


class ConfigError(ValueError):
    """A user-facing config problem; the message lists every problem with its field, value and fix."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- model and data ---------------------------------------------------------------------------------------
    base_model: str = "builtin:toy"
    base_config: str | None = None  # a diffusers folder describing a single-file checkpoint (offline)
    instance_data_dir: Path
    instance_prompt: str = Field(min_length=1)
    class_data_dir: Path | None = None  # default: <output_dir>/class_images
    class_prompt: str | list[str] | None = None  # several: class image k is made from prompt k % n
    with_prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    output_dir: Path = Path("outputs/run")
    resolution: int = Field(512, ge=8, le=4096)
    center_crop: bool = True
    random_flip: bool = False
    repeats: int = Field(1, ge=1)
    bucketing: bool = False

    # -- optimisation -----------------------------------------------------------------------------------------
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int = Field(400, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    snr_gamma: float | None = Field(None, gt=0)  # min-SNR weighting (5.0 is the usual choice)
    noise_offset: float = Field(0.0, ge=0, le=1)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # default: the base model's scheduler

    # -- the adapter ------------------------------------------------------------------------------------------
    kind: Literal["dora", "lora", "full"] = "dora"  # full: fine-tune the targets' weights (for comparisons)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)  # default: alpha = rank
    # Where the adapter will be used (diffusers, comfyui, a1111, forge): decides the DoRA axis and the files
    # written (adapters.readers.plan_outputs). axis is the expert override; a conflict between them is refused.
    use_in: list[str] = Field(default_factory=lambda: list(DEFAULT_USE_IN))
    axis: Literal["out", "in"] | None = None  # set from use_in unless given (never None in a valid config)
    targets: list[str] | None = None  # module-path suffixes/globs; default: attention projections
    dropout: float = Field(0.0, ge=0, lt=1)
    train_text_encoder: bool = False

    # -- speed and memory -------------------------------------------------------------------------------------
    # QDoRA / QLoRA: the frozen UNet and text-encoder linear layers in 4-bit (nf4, fp4) or 8-bit (int8) with
    # bitsandbytes; the adapter file is a normal one, its magnitudes re-derived for the full-precision base.
    quantize_base: Literal["none", "nf4", "fp4", "int8"] = "none"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True  # used when images do not change between epochs (no random crop/flip)
    cpu: bool = False  # force the CPU even when a GPU is present

    # -- reproducibility, validation, checkpoints -------------------------------------------------------------
    seed: int = Field(0, ge=0, lt=2**32)  # 32-bit, like other trainers' seeds
    validation_prompt: str | None = None
    validation_steps: int = Field(100, ge=1)
    num_validation_images: int = Field(2, ge=1, le=16)
    validation_inference_steps: int = Field(25, ge=1, le=200)
    validation_guidance_scale: float = Field(7.5, ge=0)
    checkpointing_steps: int = Field(100, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    save_intermediate_every: int | None = Field(None, ge=1)  # adapters at step 0, N, 2N… for the ΔM/ΔD analysis

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); try {max(8, round(v / 8) * 8)}")
        return v

    @field_validator("class_prompt")
    @classmethod
    def _class_prompts(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (not v or any(not p.strip() for p in v)):
            raise ValueError(
                "a list of class prompts needs at least one and no empty ones, e.g. ['a photo of a dog', "
                "'a photo of a dog on a beach']"
            )
        return v[0] if isinstance(v, list) and len(v) == 1 else v

    @field_validator("use_in", mode="before")
    @classmethod
    def _destinations(cls, v: Any) -> list[str]:
        return list(check_destinations(v))

    @model_validator(mode="before")
    @classmethod
    def _axis_and_use_in(cls, data: Any) -> Any:
        """Either decides the other: an axis not given follows use_in (adapters.readers.plan_outputs), a use_in not
        given is the readers that axis is exact in (so ``axis: out`` alone keeps meaning diffusers). Given both,
        the after-check refuses a conflict; an unusable use_in is reported by its own check."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in ("axis", "use_in") and v is None)}
        if "axis" in data and "use_in" not in data:
            return {**data, "use_in": list(destinations_for(data["axis"]))}
        if "axis" not in data:
            try:
                plan = plan_outputs(data.get("use_in", DEFAULT_USE_IN), None, data.get("kind", "dora"))
                return {**data, "axis": plan.axis}
            except ValueError:
                pass  # the after-check names the conflict
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        problems = []
        if self.with_prior_preservation and not self.class_prompt:
            problems.append(
                "class_prompt: prior preservation needs a class prompt without the identifier, e.g. 'a photo "
                "of a dog' (or set with_prior_preservation: false)"
            )
        try:
            plan_outputs(self.use_in, self.axis, self.kind)
        except ValueError as e:
            problems.append(str(e))
        if self.lr_warmup_steps > self.max_train_steps:
            problems.append(f"lr_warmup_steps: {self.lr_warmup_steps} exceeds max_train_steps {self.max_train_steps}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def resolved_class_dir(self) -> Path:
        return self.class_data_dir or RunFolder(self.output_dir).class_images

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


FIELDS = tuple(TrainConfig.model_fields)
# Bounds on what a config may make us parse and print (a YAML alias bomb expands ×9 per level; a file of 190,000
# unknown keys once printed 163 MB of errors).
MAX_CONFIG_BYTES = 1_000_000
MAX_ALIASES = 64  # YAML aliases (*name) in one config: plenty for real reuse, far below a bomb
MAX_PROBLEMS = 20  # problems listed in one error; the rest are counted
MAX_SHOWN = 120  # characters of a bad value shown in a message


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + "|".join(str(v) for v in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) if get_origin(annotation) is None else str(annotation)


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}


def describe_keys() -> str:
    """Every config key with its type and default, one per line (``train --help-config``)."""
    lines = []
    for name, info in TrainConfig.model_fields.items():
        kind = _type_name(info.annotation)
        default = "required" if info.is_required() else f"default {info.default!r}"
        limits = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in _BOUNDS.items() if hasattr(m, attr)]
        lines.append(f"  {name}: {kind} ({default}{'; ' + ', '.join(limits) if limits else ''})")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}… ({len(text)} characters)"


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][0])
        hint = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
        return f"{_shown(key)[1:-1]}: unknown key" + (f"; did you mean '{hint[0]}'?" if hint else "")
    if err["type"] == "missing":
        return f"{where}: required, not set"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg} (got {_shown(err.get('input'))})" if where != "config" else msg


def validate(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, raising ConfigError that lists every problem at once (the first MAX_PROBLEMS)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config is a mapping of key: value, got {type(data).__name__}")
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        errors = e.errors()
        lines = [_describe(err) for err in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            lines.append(f"… and {len(errors) - MAX_PROBLEMS} more problems")
        if any(err["type"] == "extra_forbidden" for err in errors):
            lines.append(f"valid keys: {', '.join(FIELDS)}")
        raise ConfigError("invalid training config:\n  " + "\n  ".join(lines)) from None


def read_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with bounds: at most MAX_ALIASES aliases; a parse error becomes a ConfigError."""
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_ALIASES:
            raise ConfigError(
                f"{where}: uses {aliases} YAML aliases (*name); at most {MAX_ALIASES} are accepted. Write the "
                "values out instead of repeating anchors."
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{where}: not valid YAML: {' '.join(line.strip() for line in first[:4])}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["rank=8", "learning_rate=5e-5"]`` → {"rank": 8, "learning_rate": "5e-5"} (YAML scalars; the model
    converts types and reports what does not fit)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {_shown(pair)} (e.g. --set max_train_steps=200)")
        where = f"--set {_shown(pair)}"
        try:
            out[key.strip()] = read_yaml(value, where) if value.strip() else None
        except ConfigError as e:
            raise ConfigError(f"{e}. Quote a value with special characters: --set 'instance_prompt=\"a: b\"'") from None
    return out


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes is not a training config (at most {MAX_CONFIG_BYTES} bytes)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at position {e.start}); save the file as UTF-8"
        ) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, **extra) -> TrainConfig:
    """Read a YAML config (relative data paths resolve against the current directory), apply ``--set``
    overrides and keyword overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r} (see training_configs/ for presets)")
        data = read_yaml(_read_text(path), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training config is a mapping of key: value")
    data.update(parse_overrides(overrides or []))
    data.update(extra)
    return validate(data)
