"""Adapter files: save and load, native (diffusers/peft layout) and kohya, with validation.

Native file (loads in stock diffusers with ``pipe.load_lora_weights``):
    <component>.<module path>.lora_A.weight                  (r, in)
    <component>.<module path>.lora_B.weight                  (out, r)
    <component>.<module path>.lora_magnitude_vector.weight   (out,)     DoRA only; always with ``.weight``
    header "lora_adapter_metadata": peft LoraConfig fields per component ("unet.r", "unet.lora_alpha", …)
    header "dreambooth_dora": our own JSON (format version, kind, axis, base model, architecture, trigger, …)
Kohya file: <stem>.lora_down.weight (r, in), .lora_up.weight (out, r), .alpha (scalar), .dora_scale —
(out, 1) for axis="out", (1, in) for axis="in".
Every file written names the readers that apply it exactly in its header, "dreambooth_dora.exact_in" (a JSON
list from ``readers.exact_readers``): an axis="in" kohya file is exact in ComfyUI, A1111 and Forge, an axis="out"
one only here and in LyCORIS.

Read besides: peft's own save, diffusers, LyCORIS, ai-toolkit, OneTrainer and 1-D ``dora_scale`` files
(``read_adapter_file``).

Only safetensors are read; nothing is ever unpickled. Every check runs before any weight is touched, and a
failed load leaves the model as it was. Writes are atomic (temporary file + rename).
See docs/ARCHITECTURE.md (Adapter files).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dreambooth_dora.adapters import names as keys
from dreambooth_dora.adapters.inject import (
    AdapterError,
    adapter_layers,
    components,
    list_adapters,
    remove_adapter,
    set_adapter_scale,
    wrap_layer,
)
from dreambooth_dora.adapters.layers import AdaptedLinear
from dreambooth_dora.adapters.readers import HEADER_KEY as READERS_KEY
from dreambooth_dora.adapters.readers import FileForm, exact_readers, readers_text, written_form
from dreambooth_dora.runs import atomic_path

FORMAT_VERSION = 1
OUR_KEY = "dreambooth_dora"
DIFFUSERS_KEY = "lora_adapter_metadata"
MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts
# Key endings of adapter tensors in every layout read (native/diffusers, peft, kohya/LyCORIS, ai-toolkit,
# OneTrainer) → the part of LayerTensors they fill.
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_down.weight": "A",
    ".lora_B.weight": "B",
    ".lora_up.weight": "B",
    ".lora_magnitude_vector.weight": "m",  # diffusers, our native files
    ".lora_magnitude_vector": "m",  # peft's own save
    ".dora_scale": "m",  # kohya / LyCORIS / OneTrainer; diffusers' convert_state_dict_to_kohya writes it 1-D
    ".magnitude": "m",  # ai-toolkit
    ".alpha": "alpha",
}
# Magnitudes that only ever hold one norm per output row.
_ROW_MAGNITUDES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector", ".magnitude")
_PEFT_PREFIX = "base_model.model."


class AdapterFileError(AdapterError):
    """An adapter file that cannot be used with this model; the message says why and what to do."""


@dataclass
class LayerTensors:
    """One layer of an adapter file in our convention: A (r, in), B (out, r), m (out,) or (in,)."""

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    m: torch.Tensor | None = None
    alpha: float | None = None
    axis: str = "out"
    m_source: str | None = field(default=None, repr=False)  # the key ending the magnitude was read from
    m_ndim: int = field(default=1, repr=False)  # the magnitude's dimensions in the file
    candidates: list | None = field(default=None, repr=False)  # raw peft keys: components the path exists in

    @property
    def kind(self) -> str:
        return "dora" if self.m is not None else "lora"


@dataclass
class AdapterFile:
    format: str  # "native" | "kohya" | "peft" (peft's own save, ``base_model.model.`` keys)
    layers: dict[tuple[str, str], LayerTensors]  # (component, module path) -> tensors
    metadata: dict = field(default_factory=dict)  # our own header JSON ({} for foreign files)
    notes: list[str] = field(default_factory=list)  # assumptions made while reading (alpha, magnitude axis)

    @property
    def kind(self) -> str:
        return "dora" if any(t.m is not None for t in self.layers.values()) else "lora"

    @property
    def form(self) -> FileForm:
        """What decides which readers apply this file exactly (``readers.exact_readers(file.form)``). Layouts
        nobody but this project was measured with (raw peft keys, ai-toolkit's ``.magnitude``, OneTrainer's
        dotted ``dora_scale``) get forms outside the table: this project only."""
        dora = next((t for t in self.layers.values() if t.m is not None), None)
        if dora is None:
            return FileForm(self.format, "lora")
        source = (dora.m_source or "").removesuffix(" (axis inferred)")
        if source in (".lora_magnitude_vector.weight", ".lora_magnitude_vector") and self.format == "native":
            magnitude = "vector"
        elif source == ".dora_scale" and self.format == "kohya":
            magnitude = ("row" if dora.axis == "out" else "column") if dora.m_ndim == 2 else "vector"
        else:
            magnitude = source.lstrip(".") or "unknown"
        return FileForm(self.format, "dora", dora.axis, magnitude)


# -- saving -------------------------------------------------------------------------------------------------------


def _arch_of(comps: dict[str, nn.Module]) -> dict:
    return {
        "sdxl": "text_encoder_2" in comps,
        "cross_attention_dim": _cross_attention_dim(comps),
        "components": sorted(comps),
    }


def _cross_attention_dim(comps: dict[str, nn.Module]) -> int | None:
    dim = getattr(getattr(comps.get("unet"), "config", None), "cross_attention_dim", None)
    return int(dim) if dim is not None else None


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    """safetensors.save_file through a temporary file in the same folder, fsync, rename: never half a file."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def save_adapter(
    pipe,
    path: str | os.PathLike,
    name: str = "default",
    format: str = "native",
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write adapter ``name`` of ``pipe`` to ``path`` (.safetensors) in the ``native`` or ``kohya`` layout.

    ``metadata`` (JSON-serializable) is merged into our header entry: base model id, trigger phrase, a training
    summary. The header also names the readers that apply the file exactly (``dreambooth_dora.exact_in``, from
    ``readers.exact_readers``). axis="in" adapters exist only in the kohya layout: diffusers and peft implement
    the per-row norm only.
    """
    if format not in ("native", "kohya"):
        raise AdapterError(f"format={format!r}: choose 'native' (diffusers/peft keys) or 'kohya' (lora_unet_… keys)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter path {str(path)!r} must end in .safetensors (the only format we write)")
    info = list_adapters(pipe).get(name)
    if info is not None and format == "native" and info.axis == "in" and info.kind == "dora":
        raise AdapterError(
            f"adapter {name!r} uses axis='in' (one norm per input column), which diffusers' and peft's format "
            "cannot express (they normalize output rows). Save it with format='kohya' — read exactly by "
            f"{readers_text(exact_readers(written_form('kohya', 'dora', 'in')))} — or train with axis='out' "
            "(use_in: [diffusers]) for diffusers."
        )
    layers = {}
    for full, (_, a) in adapter_layers(pipe, name).items():
        comp, _, path_in = full.partition(".")
        m = a.magnitude if a.kind == "dora" else None
        layers[(comp, path_in)] = LayerTensors(a.lora_A, a.lora_B, m, a.alpha, a.axis)
    ours = {"kind": info.kind, "rank": info.rank, "alpha": info.alpha, "axis": info.axis, **(metadata or {})}
    return write_adapter(layers, components(pipe), path, format, ours, dtype)


def write_adapter(
    layers: dict[tuple[str, str], LayerTensors],
    comps: dict[str, nn.Module],
    path: Path,
    format: str,
    ours: dict,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``layers`` {(component, module path): tensors} as an adapter file for a model with components
    ``comps``, atomically. ``ours``: our header entry (kind, rank, alpha, axis and whatever the caller adds)."""
    first = next(iter(layers.values()))
    kind = "dora" if first.m is not None else "lora"
    axis = first.axis if kind == "dora" else ours.get("axis", "out")
    if kind == "dora" and format == "native" and axis == "in":
        raise AdapterError("axis='in' DoRA has no native (diffusers/peft) form; write it with format='kohya'")
    arch = _arch_of(comps)
    rank, alpha = int(ours.get("rank") or first.A.shape[0]), float(ours.get("alpha") or first.alpha)
    ours = {**ours, "format_version": FORMAT_VERSION, "kind": ours.get("kind", kind), "rank": rank}
    ours.update(alpha=alpha, axis=axis, arch=arch)
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        tensors[key] = t.detach().to("cpu", dtype).contiguous().clone()

    targets: dict[str, set[str]] = {}
    patterns: dict[str, dict[str, dict[str, float]]] = {}  # per component: layers whose rank/alpha differ
    for (comp, path_in), lt in layers.items():
        public = keys.public_path(comp, comps[comp], path_in)
        if (lt.A.shape[0], lt.alpha) != (rank, alpha):  # kind "full" (rank = in_features) or mixed files
            # peft matches pattern keys as module-path suffixes: the path without "text_model." fits both
            # transformers spellings of the text encoder
            pat = patterns.setdefault(comp, {"rank_pattern": {}, "alpha_pattern": {}})
            pat["rank_pattern"][path_in], pat["alpha_pattern"][path_in] = int(lt.A.shape[0]), lt.alpha
        # peft matches target_modules against the model's own paths, which differ between transformers
        # versions for text encoders: name the leaf there; the UNet gets exact paths.
        targets.setdefault(comp, set()).add(public if comp == "unet" else public.rsplit(".", 1)[-1])
        if format == "native":
            stem = f"{comp}.{public}"
            put(f"{stem}.lora_A.weight", lt.A)
            put(f"{stem}.lora_B.weight", lt.B)
            if lt.m is not None:
                put(f"{stem}.lora_magnitude_vector.weight", lt.m)
        else:
            stem = keys.kohya_name(comp, path_in, comps[comp], arch["sdxl"])
            put(f"{stem}.lora_down.weight", lt.A)
            put(f"{stem}.lora_up.weight", lt.B)
            put(f"{stem}.alpha", torch.tensor(lt.alpha))
            if lt.m is not None:
                put(f"{stem}.dora_scale", lt.m[:, None] if lt.axis == "out" else lt.m[None, :])
    readers = exact_readers(written_form(format, kind, axis))
    header = {OUR_KEY: json.dumps(ours, sort_keys=True), READERS_KEY: json.dumps(list(readers))}
    if format == "native":
        header[DIFFUSERS_KEY] = json.dumps(_peft_header(targets, patterns, rank, alpha, kind), sort_keys=True)
    else:
        header.update(_kohya_header(kind, rank, alpha, arch["sdxl"]))
    atomic_save_file(tensors, path, header)
    return path


def _peft_header(targets, patterns, rank: int, alpha: float, kind: str) -> dict:
    """diffusers' ``lora_adapter_metadata``: peft LoraConfig fields per component."""
    cfg = {}
    for comp, paths in targets.items():
        cfg.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.use_dora": kind == "dora"})
        cfg[f"{comp}.target_modules"] = sorted(paths)
        cfg.update({f"{comp}.{k}": v for k, v in patterns.get(comp, {}).items()})
    return cfg


def _kohya_header(kind: str, rank: int, alpha: float, sdxl: bool) -> dict[str, str]:
    """kohya's ``ss_`` training metadata, which A1111 shows and uses to tell SD1 from SDXL files."""
    return {
        "ss_network_module": "lycoris.kohya" if kind == "dora" else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_network_args": json.dumps({"dora_wd": "True"} if kind == "dora" else {}),
    }


# -- reading ------------------------------------------------------------------------------------------------------


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:WEIGHT`` → (path, strength); a colon inside a path (``C:\\x``) is not a weight."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not weight or any(c in weight for c in "/\\") or weight.endswith(".safetensors"):
        return Path(spec), 1.0
    try:
        return Path(path), float(weight)
    except ValueError:
        raise AdapterError(f"adapter {spec!r}: weight {weight!r} is not a number; write FILE or FILE:WEIGHT") from None


# Key prefixes of whole Stable Diffusion checkpoints (original layout and diffusers' UNet): not adapters.
_MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "conv_in.")


def check_adapter_file(path: str | os.PathLike) -> list[str]:
    """Check that ``path`` is a safetensors adapter file from its header alone (no tensor is read): exists, not
    empty, not a pickle, a sane header, not a whole model checkpoint. Returns its tensor names."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {str(path)!r}")
    size = path.stat().st_size
    if size == 0:
        raise AdapterFileError(f"{path.name}: the file is empty (0 bytes); the download or copy did not finish")
    with open(path, "rb") as f:
        head = f.read(16)
    if size < 10:
        raise AdapterFileError(f"{path.name}: not a safetensors file ({size} bytes is too short for a header)")
    if head[8:9] != b"{":  # a safetensors header is JSON right after its 8-byte length
        if (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05") or head[:2] == b"PK":
            raise AdapterFileError(
                f"{path.name}: this is a PyTorch pickle/zip checkpoint renamed to .safetensors. Pickle files can "
                "run arbitrary code, so they are never loaded here; convert it to safetensors with a tool you trust"
            )
        raise AdapterFileError(
            f"{path.name}: not a safetensors file (it starts with {head[:12]!r}); an HTML error page or another "
            "format saved under this name? Download the .safetensors file again"
        )
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER:
        raise AdapterFileError(
            f"{path.name}: header claims {header_len} bytes (limit {MAX_HEADER}); the file is corrupt or hostile"
        )
    if header_len > size - 8:
        raise AdapterFileError(
            f"{path.name}: truncated or not a safetensors file (header says {header_len} bytes, file has "
            f"{size - 8} after the length field); download or copy it again"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors raises a bare SafetensorError with terse text
        raise AdapterFileError(
            f"{path.name}: truncated or corrupt safetensors file ({e}); download or copy it again"
        ) from e
    if not names:
        raise AdapterFileError(f"{path.name}: the file holds no tensors")
    if any(k.startswith(_MODEL_PREFIXES) for k in names):
        raise AdapterFileError(
            f"{path.name} is a whole model checkpoint, not a LoRA/DoRA adapter file; use it as the base model"
        )
    return names


def _open_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors adapter file after check_adapter_file; a teaching error for anything else."""
    check_adapter_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise AdapterFileError(
            f"{path.name}: truncated or corrupt safetensors file ({e}); download or copy it again"
        ) from e


def _split(key: str) -> tuple[str, str, str] | None:
    """key → (stem, part, suffix) for the adapter-tensor suffixes of every layout, or None."""
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part, suffix
    return None


def _resolve(stem: str, table: dict, comps: dict) -> list[tuple[str, str]]:
    """(component, module path) candidates of a key stem; several only for raw peft stems without a component."""
    if stem in table:
        return [table[stem]]
    comp, _, rest = stem.partition(".")
    if comp in comps and rest.startswith(_PEFT_PREFIX):  # a PeftModel's state dict saved under a component
        return _resolve(f"{comp}.{rest[len(_PEFT_PREFIX) :]}", table, comps)
    if stem.startswith(_PEFT_PREFIX):  # peft's own save of one model: no component in the key
        rest = stem[len(_PEFT_PREFIX) :]
        return [table[f"{comp}.{rest}"] for comp in comps if f"{comp}.{rest}" in table]
    return []


def read_adapter_file(path: str | os.PathLike, pipe) -> AdapterFile:
    """Parse and validate an adapter file against ``pipe``; raises AdapterFileError listing every problem.

    Layouts: native/diffusers and peft (``lora_A``/``lora_B``, ``lora_magnitude_vector`` with or without
    ``.weight``, peft's ``base_model.model.`` keys with alpha from a sibling ``adapter_config.json``), kohya and
    LyCORIS (``lora_down``/``lora_up``/``alpha``/``dora_scale`` of either axis, 2-D or 1-D), ai-toolkit
    (``.magnitude``), OneTrainer (its kohya, diffusers — ``lora_A``/``lora_B`` beside an input-axis
    ``dora_scale`` — and ComfyUI layouts)."""
    path = Path(path)
    tensors, meta = _open_checked(path)
    ours, peft_cfg = _header_json(meta, OUR_KEY, path), _header_json(meta, DIFFUSERS_KEY, path)
    comps = components(pipe)
    fmt = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors) else "native"
    fmt = "peft" if any(_PEFT_PREFIX in k for k in tensors) else fmt  # peft's own save: a layout of its own
    table = keys.name_table(comps, "text_encoder_2" in comps)
    layers: dict[tuple[str, str], LayerTensors] = {}
    unexpected: list[str] = []
    for key, t in tensors.items():
        split = _split(key)
        targets = _resolve(split[0], table, comps) if split else []
        if split is None or not targets:
            unexpected.append(key)
            continue
        stem, part, suffix = split
        lt = layers.setdefault((stem, targets[0][0]) if len(targets) > 1 else targets[0], LayerTensors())
        if len(targets) > 1:
            lt.candidates = targets
        if part == "alpha":
            lt.alpha = float(t.float().reshape(-1)[0]) if t.numel() == 1 else float("nan")
        else:
            setattr(lt, part, t)
            lt.m_source = suffix if part == "m" else lt.m_source
    _check_architecture(path.name, tensors, comps, ours)
    problems = _place_peft_layers(layers, comps)
    try:
        notes = _fill_alpha(layers, peft_cfg, _sibling_peft_config(path, tensors))
    except AdapterFileError as e:
        raise AdapterFileError(f"{path.name}: {e}") from None
    problems += _validate(layers, comps, unexpected, ours)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise AdapterFileError(f"{path.name} does not fit the loaded model:\n  {shown}")
    return AdapterFile(fmt, layers, ours, notes + _axis_notes(layers))


def _place_peft_layers(layers: dict, comps: dict) -> list[str]:
    """Give raw peft layers (no component in the key) the one component whose layer their shapes fit."""
    problems = []
    for key in [k for k, lt in layers.items() if lt.candidates]:
        lt = layers.pop(key)
        fits = [c for c in lt.candidates if lt.A is not None and lt.B is not None and _fits(comps, c, lt)]
        if len(fits) != 1:
            where = " or ".join(f"{c}.{m}" for c, m in lt.candidates)
            problems.append(
                f"{key[0]}: the key names no component and fits {where} — save it with a component prefix "
                "(diffusers' save_lora_weights writes unet./text_encoder./text_encoder_2.)"
            )
            continue
        lt.candidates = None
        layers[fits[0]] = lt
    return problems


def _fits(comps: dict, target: tuple[str, str], lt: LayerTensors) -> bool:
    layer = comps[target[0]].get_submodule(target[1])
    return tuple(lt.A.shape)[1:] == (layer.in_features,) and lt.B.shape[0] == layer.out_features


def _sibling_peft_config(path: Path, tensors: dict) -> dict:
    """peft's ``adapter_config.json`` next to a raw peft file (its keys start with ``base_model.model.``)."""
    cfg = path.parent / "adapter_config.json"
    if not any(k.startswith(_PEFT_PREFIX) for k in tensors) or not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _arch_label(sdxl: bool | None, dim: int | None) -> str:
    name = "SDXL" if sdxl else {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(dim, "an SD-family model")
    return f"{name} (cross-attention dim {dim})" if dim else name


def _check_architecture(fname: str, tensors: dict, comps: dict, ours: dict) -> None:
    """One clear sentence when the file was made for another architecture, before listing key problems."""
    model_sdxl = "text_encoder_2" in comps
    model_dim = _cross_attention_dim(comps)
    file_dim = (ours.get("arch") or {}).get("cross_attention_dim")
    if file_dim is None:  # foreign file: the cross-attention key/value projections read it
        for key, t in tensors.items():
            if ("attn2_to_k" in key or "attn2.to_k" in key) and ("lora_down" in key or "lora_A" in key):
                file_dim = int(t.shape[-1])
                break
    file_sdxl = (ours.get("arch") or {}).get("sdxl")
    if file_sdxl is None and any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in tensors):
        file_sdxl = True  # a second text encoder; otherwise a foreign file does not say
    dims_differ = file_dim is not None and model_dim is not None and file_dim != model_dim
    if dims_differ or (file_sdxl is not None and file_sdxl != model_sdxl):
        raise AdapterFileError(
            f"{fname}: adapter was trained for {_arch_label(file_sdxl, file_dim)}; the loaded base is "
            f"{_arch_label(model_sdxl, model_dim)}. Load it with the base model it was trained on."
        )


def _header_json(meta: dict, key: str, path: Path) -> dict:
    """A JSON object stored under ``key`` in a safetensors header ({} when absent); AdapterFileError otherwise."""
    text = meta.get(key) or "{}"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise AdapterFileError(
            f"{path.name}: header entry {key!r} is not valid JSON ({e.msg} at character {e.pos}); the file was "
            "damaged or written by a broken tool. Re-save it from the program that trained it"
        ) from None
    if not isinstance(value, dict):
        raise AdapterFileError(
            f"{path.name}: header entry {key!r} is a JSON {type(value).__name__}, not an object of settings; "
            "re-save the file from the program that trained it"
        )
    return value


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number):
        raise AdapterFileError(f"{where} is {value!r}, not a finite number; fix or remove it from the file's header")
    return number


def _fill_alpha(layers: dict[tuple[str, str], LayerTensors], peft_cfg: dict, peft_file_cfg: dict) -> list[str]:
    """alpha from the file (kohya), diffusers' header (per component, with peft's alpha_pattern) or peft's
    adapter_config.json; else alpha = rank, as every reader assumes then. Returns a note when it was assumed."""
    assumed = 0
    for (comp, mod), lt in layers.items():
        if lt.alpha is not None:
            continue
        pattern = peft_cfg.get(f"{comp}.alpha_pattern") or peft_file_cfg.get("alpha_pattern") or {}
        match = next((v for k, v in pattern.items() if mod == k or mod.endswith("." + k)), None)
        alpha = match if match is not None else peft_cfg.get(f"{comp}.lora_alpha", peft_file_cfg.get("lora_alpha"))
        if alpha is None and lt.A is not None:
            alpha, assumed = float(lt.A.shape[0]), assumed + 1
        lt.alpha = _number(alpha, f"alpha of {comp}.{mod} (header {DIFFUSERS_KEY})") if alpha is not None else None
    if not assumed:
        return []
    return [f"{assumed} layer(s) store no alpha: alpha = rank (scaling 1) assumed, as every reader does"]


def _validate(layers, comps, unexpected, ours) -> list[str]:
    problems = [f"unexpected key {k!r} (no such layer in this model, or not an adapter tensor)" for k in unexpected]
    for (comp, mod), lt in sorted(layers.items()):
        where = f"{comp}.{mod}"
        layer = comps[comp].get_submodule(mod)
        if not isinstance(layer, nn.Linear):
            problems.append(f"{where}: is a {type(layer).__name__}, only nn.Linear layers take these adapters")
            continue
        if lt.A is None or lt.B is None:
            problems.append(f"{where}: missing {'lora_A/lora_down' if lt.A is None else 'lora_B/lora_up'} weight")
            continue
        out_f, in_f = layer.out_features, layer.in_features
        for label, t in (("A", lt.A), ("B", lt.B), ("magnitude", lt.m)):
            if t is None:
                continue
            if not t.dtype.is_floating_point:
                problems.append(f"{where}: {label} has dtype {t.dtype}; adapter weights must be floating point")
            elif not torch.isfinite(t).all():
                problems.append(f"{where}: {label} contains NaN or Inf values; the adapter is broken (retrain it)")
        if lt.A.ndim != 2 or lt.B.ndim != 2 or lt.A.shape[1] != in_f or lt.B.shape[0] != out_f:
            problems.append(
                f"{where}: shapes A {tuple(lt.A.shape)}, B {tuple(lt.B.shape)} do not fit the layer "
                f"({out_f} out, {in_f} in): expected A (r, {in_f}), B ({out_f}, r)"
            )
            continue
        if lt.A.shape[0] != lt.B.shape[1]:
            problems.append(f"{where}: rank mismatch: A has {lt.A.shape[0]} rows, B {lt.B.shape[1]} columns")
            continue
        if lt.alpha is None or not math.isfinite(lt.alpha) or lt.alpha <= 0:
            problems.append(f"{where}: alpha {lt.alpha} must be a finite number > 0")
        if lt.m is not None and (axis := _magnitude_axis(lt, out_f, in_f)) is None:
            problems.append(
                f"{where}: magnitude shape {tuple(lt.m.shape)} fits neither axis of the layer "
                f"(expected ({out_f},), ({out_f}, 1) or (1, {in_f}))"
            )
        elif lt.m is not None:
            lt.axis, lt.m_ndim, lt.m = axis, lt.m.ndim, lt.m.reshape(-1)
    _settle_axes(layers, ours.get("axis"), problems)
    kinds = {lt.m is not None for lt in layers.values() if lt.A is not None}
    if len(kinds) > 1:
        missing = sorted(f"{c}.{m}" for (c, m), lt in layers.items() if lt.m is None)
        problems.append(f"DoRA magnitude missing for {len(missing)} layer(s), e.g. {missing[0]}: file incomplete")
    return problems


def _magnitude_axis(lt: LayerTensors, out_f: int, in_f: int) -> str | None:
    """ "out", "in", "?" (a 1-D magnitude of a square layer: either axis) or None (fits neither)."""
    m = lt.m
    if m.ndim == 2:
        return "out" if m.shape == (out_f, 1) else "in" if m.shape == (1, in_f) else None
    if m.ndim != 1 or m.shape[0] not in (out_f, in_f):
        return None
    if lt.m_source in _ROW_MAGNITUDES:  # peft, diffusers and ai-toolkit only implement the row norm
        return "out" if m.shape[0] == out_f else None
    return "?" if out_f == in_f else ("out" if m.shape[0] == out_f else "in")


def _settle_axes(layers: dict, hint: str | None, problems: list[str]) -> None:
    """One axis per file: square layers with a 1-D ``dora_scale`` take the axis the other layers show, else our
    header's, else "out" (diffusers' convert_state_dict_to_kohya writes its row magnitudes 1-D)."""
    seen = {lt.axis for lt in layers.values() if lt.m is not None and lt.axis != "?"}
    if len(seen) > 1 and not problems:  # (a layer that failed its checks has no axis yet)
        problems.append("the file mixes output-axis and input-axis DoRA magnitudes; no tool writes that — corrupt?")
    axis = next(iter(seen)) if len(seen) == 1 else (hint or "out")
    for lt in layers.values():
        if lt.m is not None and lt.axis == "?":
            lt.axis, lt.m_source = axis, lt.m_source + " (axis inferred)"


def _axis_notes(layers: dict) -> list[str]:
    inferred = [lt for lt in layers.values() if lt.m_source and lt.m_source.endswith("(axis inferred)")]
    if not inferred:
        return []
    return [
        f"{len(inferred)} square layer(s) store a 1-D dora_scale, which does not say its axis: read as "
        f"axis='{inferred[0].axis}' like the file's other layers (or diffusers' convention, rows)"
    ]


def load_adapter(pipe, path: str | os.PathLike, name: str = "default", scale: float = 1.0) -> AdapterFile:
    """Validate ``path`` against ``pipe`` and attach it as adapter ``name`` (toggled, strength ``scale``).

    Reads native files, diffusers/peft LoRA and DoRA files, and kohya LoRA/DoRA files of either axis.
    """
    if name in list_adapters(pipe):
        raise AdapterError(f"an adapter named {name!r} is already loaded; pick another name or remove it first")
    parsed = read_adapter_file(path, pipe)
    comps = components(pipe)
    try:
        for (comp, mod), lt in parsed.layers.items():
            layer: AdaptedLinear = wrap_layer(comps[comp], mod)
            kind = "dora" if lt.m is not None else "lora"
            adapter = layer.add(name, kind=kind, rank=lt.A.shape[0], alpha=lt.alpha, axis=lt.axis)
            with torch.no_grad():
                adapter.lora_A.copy_(lt.A.float())
                adapter.lora_B.copy_(lt.B.float())
                if kind == "dora":
                    adapter.magnitude.copy_(lt.m.float())
        if scale != 1.0:
            set_adapter_scale(pipe, name, scale)
    except BaseException:
        if name in list_adapters(pipe):
            remove_adapter(pipe, name)
        raise
    return parsed
