"""Which programs apply an adapter file exactly, and which files a training run writes for its destinations.

This module is the one source of both facts: the ``dreambooth_dora.exact_in`` header entry of every file the
project writes, the ``use_in`` training option, the routes printed when an axis does not fit a destination, and
any UI text come from here.

"Exactly" means: the reader's patched weight equals our merged weight W' to ≤ 1e-3 relative (max over layers),
measured with the reader's own loader code by ``compat/matrix.py`` (its table is in the report of the
compatibility work; the diffusers, peft and LyCORIS rows run in CI as tests/compat). What the readers do:

  * diffusers / peft implement output-axis DoRA (one norm per output row) with a 1-D ``lora_magnitude_vector``.
    They cannot express input-axis DoRA.
  * ComfyUI, A1111 and Forge read kohya ``dora_scale``. Their input-axis branch (``dora_scale`` (1, in)) is
    right; their output-axis branch is not: ComfyUI and Forge divide by the row norms of W0 instead of
    W0 + ΔW, A1111 always takes column norms (an (out, 1) ``dora_scale`` broadcasts into the whole matrix).
    A 1-D ``dora_scale`` crashes or mis-broadcasts there.
  * LyCORIS (``lycoris-lora``) rebuilds modules from a kohya file with its default ``wd_on_output=True``: right
    for output-axis files; an input-axis file fails to load there (a (1, in) scale does not broadcast).
  * Plain LoRA in the kohya layout (alpha stored as a tensor) is read exactly by all of them.

Imports only the run-folder layout (``runs``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dreambooth_dora.runs import RunFolder

READERS = ("dreambooth_dora", "diffusers", "peft", "lycoris", "comfyui", "a1111", "forge")
DESTINATIONS = ("diffusers", "comfyui", "a1111", "forge")  # what ``use_in`` and ``convert --to`` accept
LABELS = {
    "dreambooth_dora": "this project",
    "diffusers": "diffusers",
    "peft": "peft",
    "lycoris": "LyCORIS",
    "comfyui": "ComfyUI",
    "a1111": "A1111",
    "forge": "Forge",
}
HEADER_KEY = "dreambooth_dora.exact_in"  # JSON list of READERS in the safetensors header of every file we write
# The default destinations of a training run (training config ``use_in``): the readers most Stable Diffusion users
# have. The axis follows: input-axis DoRA is exact in all three. Its quality equals the output axis' within seed
# spread on training_configs/toy_subject.yaml (600 steps, seeds 0-2, toy.eval --samples 48): subject 83.3 ± 4.2 %
# vs 81.9 ± 1.2 %, ordinary heart 86.8 ± 10.3 % vs 87.5 ± 11.0 % (benchmarks/toy_quality.py --kinds dora --axes out
# in reruns it over the lr grid). Diffusers users set use_in: [diffusers] (output axis, native file) or convert
# afterwards (routes()).
DEFAULT_USE_IN = ("comfyui", "a1111", "forge")


@dataclass(frozen=True)
class FileForm:
    """What decides who reads a file right: its key layout, kind, DoRA axis and magnitude shape.

    layout: "native" (diffusers/peft keys), "kohya" (``lora_unet_…``) or "merged" (a whole checkpoint);
    kind: "lora" or "dora" ("model" for merged); axis: "out" | "in" (DoRA only);
    magnitude: "vector" (n,), "row" (out, 1) or "column" (1, in) (DoRA only)."""

    layout: str
    kind: str
    axis: str | None = None
    magnitude: str | None = None


# Measured by compat/matrix.py (patched weight vs W' ≤ 1e-3 relative); anything absent: this project only.
_EXACT: dict[FileForm, tuple[str, ...]] = {
    FileForm("merged", "model"): ("dreambooth_dora", "diffusers", "comfyui", "a1111", "forge"),
    FileForm("native", "lora"): ("dreambooth_dora", "diffusers", "peft"),
    FileForm("native", "dora", "out", "vector"): ("dreambooth_dora", "diffusers", "peft"),
    FileForm("kohya", "lora"): ("dreambooth_dora", "diffusers", "lycoris", "comfyui", "a1111", "forge"),
    FileForm("kohya", "dora", "in", "column"): ("dreambooth_dora", "comfyui", "a1111", "forge"),
    FileForm("kohya", "dora", "out", "row"): ("dreambooth_dora", "lycoris"),
}


def written_form(layout: str, kind: str, axis: str | None = None) -> FileForm:
    """The form of a file ``save_adapter`` writes: native DoRA keeps a 1-D magnitude; kohya DoRA an (out, 1) or
    (1, in) ``dora_scale``; LoRA and full fine-tuning are plain LoRA files."""
    if kind != "dora":
        return FileForm(layout, "model" if layout == "merged" else "lora")
    magnitude = "vector" if layout == "native" else ("row" if axis == "out" else "column")
    return FileForm(layout, "dora", axis, magnitude)


def exact_readers(form: FileForm) -> tuple[str, ...]:
    """The readers (of READERS) that apply a file of this form exactly, in READERS order."""
    return _EXACT.get(form, ("dreambooth_dora",))


def readers_text(readers: Iterable[str]) -> str:
    """``ComfyUI, A1111, Forge`` — reader ids as people write them."""
    return ", ".join(LABELS[r] for r in readers)


def check_destinations(values) -> tuple[str, ...]:
    """``values`` (a name or a list) as a tuple of DESTINATIONS, or ValueError that lists the choices."""
    items = [values] if isinstance(values, str) else list(values or ())
    bad = [v for v in items if v not in DESTINATIONS]
    if bad or not items:
        got = f"{bad[0]!r} is not a destination" if bad else "no destination given"
        raise ValueError(f"{got}; choose from {', '.join(DESTINATIONS)} (e.g. use_in: [comfyui, a1111])")
    return tuple(dict.fromkeys(items))


# -- routes: how an adapter reaches a reader its axis does not fit -------------------------------------------------


def routes(destination: str) -> list[str]:
    """The ways to reach ``destination`` from an adapter it does not read exactly, each with its cost."""
    return [
        "merged checkpoint (exact; a whole model): python -m dreambooth_dora.export merged --base BASE "
        "--adapter FILE --single-file MODEL.safetensors",
        f"conversion (re-fits the adapter in the form the destination reads; prints its weight error): "
        f"python -m dreambooth_dora.convert FILE OUT.safetensors --to {destination} --base BASE",
        "plain LoRA by truncated SVD of W' − W0 (prints its error; exact at full rank): python -m "
        "dreambooth_dora.export svd --base BASE --adapter FILE --rank R --out OUT.safetensors",
    ]


def _axis_readers(axis: str) -> set[str]:
    layout = "native" if axis == "out" else "kohya"
    return set(exact_readers(written_form(layout, "dora", axis)))


def destinations_for(axis: str) -> tuple[str, ...]:
    """The DESTINATIONS that apply DoRA of ``axis`` exactly (what ``use_in`` means when only ``axis`` is given)."""
    if axis not in ("out", "in"):
        return DEFAULT_USE_IN  # not an axis: the config's own check reports it
    return tuple(d for d in DESTINATIONS if d in _axis_readers(axis))


def _conflict(use_in: tuple[str, ...], axis: str | None) -> str:
    if axis is not None:
        wrong = [d for d in use_in if d not in _axis_readers(axis)]
        other = "in" if axis == "out" else "out"
        head = (
            f"axis: {axis} conflicts with use_in {list(use_in)}: axis='{axis}' DoRA is not applied exactly by "
            f"{readers_text(wrong)}."
        )
        fixes = "Drop axis" + (" (use_in then picks axis " + other + ")" if set(use_in) <= _axis_readers(other) else "")
        missed = wrong[0]
    else:
        out_ok = [d for d in use_in if d in _axis_readers("out")]
        in_ok = [d for d in use_in if d in _axis_readers("in")]
        head = (
            f"use_in {list(use_in)}: no DoRA axis is applied exactly by all of them — axis 'out' only by "
            f"{readers_text(out_ok) or 'none of them'}, axis 'in' only by {readers_text(in_ok) or 'none of them'}."
        )
        fixes = "Keep one group in use_in"
        missed = (in_ok or out_ok)[0]
    lines = "\n    ".join(routes(missed))
    return (
        f"{head} {fixes}, or train kind: lora (a plain LoRA file is exact in every one of them). After training, "
        f"the other readers are reached by:\n    {lines}"
    )


# -- what a run writes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    """One adapter file a run writes: its layout (``save_adapter`` format) and the readers that apply it exactly."""

    layout: str  # "native" | "kohya"
    readers: tuple[str, ...]

    def path(self, run: RunFolder) -> Path:
        return run.adapter if self.layout == "native" else run.kohya_adapter


@dataclass(frozen=True)
class OutputPlan:
    """What a training run for ``use_in`` trains (``axis``) and writes (``files``); ``routes``: how each
    destination that no file reaches exactly is served (empty when every one is)."""

    use_in: tuple[str, ...]
    kind: str
    axis: str
    files: tuple[PlannedFile, ...]
    routes: dict[str, list[str]]


def plan_outputs(use_in=DEFAULT_USE_IN, axis: str | None = None, kind: str = "dora") -> OutputPlan:
    """(destinations, axis override, kind) → the axis to train and the files to write, or ValueError naming the
    conflict and the routes. ``axis=None`` lets ``use_in`` choose; an explicit axis must fit every destination."""
    use_in = check_destinations(use_in)
    if axis not in (None, "out", "in"):
        raise ValueError(f"axis: {axis!r}; choose 'out' or 'in', or leave it out to follow use_in")
    if kind != "dora":  # plain LoRA files: native for diffusers/peft, kohya for everyone else; the axis is unused
        files = tuple(PlannedFile(lay, exact_readers(written_form(lay, kind))) for lay in ("native", "kohya"))
        return OutputPlan(use_in, kind, axis or "out", files, {})
    fitting = [a for a in ("in", "out") if set(use_in) <= _axis_readers(a)]
    if axis is None and fitting:
        axis = fitting[0]
    if axis is None or axis not in fitting:
        raise ValueError(_conflict(use_in, axis))
    layout = "native" if axis == "out" else "kohya"
    files = (PlannedFile(layout, exact_readers(written_form(layout, "dora", axis))),)
    reached = set(files[0].readers)
    return OutputPlan(use_in, kind, axis, files, {d: routes(d) for d in DESTINATIONS if d not in reached})
