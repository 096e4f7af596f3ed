"""The Train tab's settings: one table of fields, their widgets, labels and defaults, and what a preset fills.

Every default comes from ``TrainConfig`` unless the table names one for the app (``app_default``), so the form,
a config file and the headless trainer cannot disagree about a setting nobody touched. The tab builds its widgets
from ``FIELDS``, sends their values back in ``FIELDS`` order, and ``backend.build_config`` validates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreambooth_dora.adapters.readers import DESTINATIONS, LABELS
from dreambooth_dora.training.config import TrainConfig

QUANTIZE_CHOICES = (("full precision", "none"), ("4-bit NF4 (low memory)", "nf4"), ("8-bit int8", "int8"))
DESTINATION_CHOICES = tuple((LABELS[d], d) for d in DESTINATIONS)
_CONFIG_DEFAULT = object()


@dataclass(frozen=True)
class FormField:
    """One setting of the Train tab. ``widget``: number | integer | radio | checkbox | checkboxes | dropdown."""

    name: str
    label: str
    widget: str
    elem_id: str
    app_default: Any = _CONFIG_DEFAULT
    choices: tuple = ()
    info: str = ""

    @property
    def default(self) -> Any:
        if self.app_default is not _CONFIG_DEFAULT:
            return self.app_default
        field = TrainConfig.model_fields[self.name]
        return field.get_default(call_default_factory=True)


FIELDS = (
    FormField("max_train_steps", "Steps", "integer", "steps"),
    FormField("rank", "Rank", "integer", "rank"),
    FormField("alpha", "Alpha", "number", "alpha", info="empty: alpha = rank"),
    FormField("learning_rate", "Learning rate", "number", "lr"),
    FormField("kind", "Adapter", "radio", "kind", choices=("dora", "lora")),
    FormField("resolution", "Resolution (px)", "integer", "resolution", app_default=None, info="empty: the base's"),
    FormField("train_text_encoder", "Train the text encoder too", "checkbox", "train-te"),
    FormField(
        "use_in",
        "Where will you use the adapter?",
        "checkboxes",
        "use-in",
        choices=DESTINATION_CHOICES,
        info="files are written so that these programs apply them exactly (DoRA's axis follows)",
    ),  # fmt: skip
    FormField(
        "quantize_base",
        "Low memory: base model held in",
        "dropdown",
        "quantize",
        choices=QUANTIZE_CHOICES,
        info="4-bit NF4 holds the frozen base in about a quarter of fp16's memory (QDoRA); needs bitsandbytes",
    ),  # fmt: skip
    FormField("with_prior_preservation", "Prior preservation", "checkbox", "prior", info="keeps the class general"),
    FormField("num_class_images", "Class images (prior preservation)", "integer", "n-class"),
    FormField("validation_steps", "Validation images every N steps", "integer", "val-steps"),
    FormField("validation_inference_steps", "Validation denoising steps", "integer", "val-inf"),
    FormField("checkpointing_steps", "Checkpoint every N steps", "integer", "ckpt-steps"),
    FormField("seed", "Seed", "integer", "seed"),
    FormField("train_batch_size", "Batch size", "integer", "batch"),
)
NAMES = tuple(f.name for f in FIELDS)
# How the Train tab lays the table out: rows of the main settings, then rows inside "More settings".
MAIN_ROWS = (
    ("max_train_steps", "rank", "alpha", "learning_rate"),
    ("kind", "resolution", "train_text_encoder", "with_prior_preservation"),
    ("use_in", "quantize_base"),
)
MORE_ROWS = (("num_class_images", "validation_steps", "validation_inference_steps"),
             ("checkpointing_steps", "seed", "train_batch_size"))  # fmt: skip
BY_NAME = {f.name: f for f in FIELDS}
INTEGER_FIELDS = tuple(f.name for f in FIELDS if f.widget == "integer")
# Text settings the Train tab shows outside the table (prompts and the base), which a preset also fills.
PROMPT_FIELDS = ("instance_prompt", "class_prompt", "validation_prompt")


def class_prompts_from_text(text: str | None) -> str | list[str] | None:
    """The Class prompt box: one prompt, or several, one per line (class image k is made from line k mod n)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return None if not lines else lines[0] if len(lines) == 1 else lines


def class_prompts_to_text(value: str | list[str] | None) -> str:
    """A config's class_prompt (one or a list) as the Class prompt box shows it."""
    return "\n".join(value) if isinstance(value, list) else value or ""


def defaults(native_size: int | None = None) -> dict[str, Any]:
    """The form's values when nothing is chosen; ``native_size`` (the loaded base's) fills the resolution."""
    values = {f.name: f.default for f in FIELDS}
    values["resolution"] = native_size
    return values
