"""Load base pipelines: the one place that calls ``from_pretrained`` / ``from_single_file``.

A base is named by one string (``--base`` on the command line, ``base_model`` in a config):

- ``builtin:tiny-sd15`` / ``builtin:tiny-sdxl``: random seeded tiny pipelines (tests);
- ``builtin:toy``: the small trained model in ``sample_data/toy_base`` (the offline default);
- a local diffusers folder (it has ``model_index.json``);
- a single-file checkpoint ``.safetensors`` (needs ``config=``, a diffusers folder of the same
  architecture, when offline);
- a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the local cache is tried first).

Every failure a user can cause raises ``ModelLoadError`` saying what was wrong and how to fix it.

CLI: ``python -m dreambooth_dora.models export NAME DIR`` writes any base as a diffusers folder.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import is_offline_mode
from safetensors import SafetensorError, safe_open

from dreambooth_dora.runs import atomic_path
from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl
from dreambooth_dora.sd.quantize import check_method, quantize_pipeline
from dreambooth_dora.shipped import TOY_BASE_DIR, TOY_BUILD_COMMAND

BUILTIN_PREFIX = "builtin:"
# Precision names as configs and command lines spell them.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TINY_BUILDERS = {"tiny-sd15": build_tiny_sd15, "tiny-sdxl": build_tiny_sdxl}
BUILTIN_NAMES: tuple[str, ...] = ("builtin:tiny-sd15", "builtin:tiny-sdxl", "builtin:toy")
# torch pickles run arbitrary code when loaded, so checkpoints are accepted as safetensors only.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WHERE_TO_GET_ONE = (
    f"Offline you can use {', '.join(BUILTIN_NAMES)}, or a local diffusers folder (one with "
    "model_index.json; `python -m dreambooth_dora.models export NAME DIR` writes one)."
)


class ModelLoadError(ValueError):
    """A base model could not be loaded; the message says what was wrong and how to fix it."""


@dataclass(frozen=True)
class BaseArchitecture:
    """What an adapter must match in its base; stored in adapter metadata and checked on load.

    arch: "sd15" (SD1.x and any other single-encoder UNet), "sd2" (OpenCLIP, cross-attention 1024)
    or "sdxl" (two text encoders, size/crop conditioning). base_id: the string the pipeline was
    loaded from ("" when it was built outside ``load_pipeline``).
    """

    arch: str
    base_id: str
    cross_attention_dim: int
    text_encoder_hidden_sizes: tuple[int, ...]
    prediction_type: str


def load_pipeline(
    base: str,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | None = None,
    quantize: str = "none",
) -> DiffusionPipeline:
    """Load the Stable Diffusion (1.x, 2.x or XL) pipeline named by ``base`` onto ``device``.

    ``config`` is only for single-file checkpoints: a local diffusers folder of the same
    architecture, whose configs (and tokenizers) complete the checkpoint.
    ``quantize`` (``none``, ``nf4``, ``fp4``, ``int8``; ``sd.quantize``) quantizes the linear layers of the
    UNet and text encoder(s) while the pipeline is still on the CPU, each one straight onto ``device``, so
    the full-precision weights never have to fit there.
    """
    check_method(quantize)
    if config is not None and Path(base).suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"config={config!r} only applies to single-file .safetensors checkpoints, but base is {base!r}. "
            "Drop config, or point base at the .safetensors file."
        )
    pipe = _load(base, torch_dtype, config)
    # describe_architecture reads base_id from here; from_pretrained would record a resolved path.
    pipe.register_to_config(_name_or_path=base)
    describe_architecture(pipe)  # refuse non-SD pipelines (no UNet / text encoder) right away
    if torch.device(device).type == "cpu":
        # Random and small models drift into subnormal floats, which x86 CPUs compute ~30x slower
        # (measured: one tiny-SDXL image 9.2 s → 0.3 s). Flushing them to zero changes no visible result.
        torch.set_flush_denormal(True)
    quantize_pipeline(pipe, quantize, device=device)
    return pipe.to(device)


def describe_architecture(pipe: DiffusionPipeline) -> BaseArchitecture:
    """Read the architecture facts adapters depend on from a loaded pipeline's configs (no compute)."""
    unet = getattr(pipe, "unet", None)
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    encoders = [encoder for encoder in encoders if encoder is not None]
    if unet is None or not encoders:
        raise ModelLoadError(
            f"{type(pipe).__name__} ({pipe.name_or_path}) has no UNet or no text encoder; only Stable "
            "Diffusion 1.x, 2.x and XL pipelines are supported. " + _WHERE_TO_GET_ONE
        )
    cross = unet.config.cross_attention_dim
    # Per-block cross-attention widths are allowed by diffusers; SD models use one width.
    cross_attention_dim = max(cross) if isinstance(cross, (list, tuple)) else int(cross)
    if unet.config.addition_embed_type == "text_time":
        arch = "sdxl"
    elif cross_attention_dim == 1024:
        arch = "sd2"
    else:
        arch = "sd15"
    return BaseArchitecture(
        arch=arch,
        base_id=pipe.name_or_path or "",
        cross_attention_dim=cross_attention_dim,
        text_encoder_hidden_sizes=tuple(int(encoder.config.hidden_size) for encoder in encoders),
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
    )


def export_base(name: str, out_dir: str | Path, *, config: str | None = None) -> Path:
    """Write base ``name`` as a diffusers folder (safetensors weights) that stock
    ``DiffusionPipeline.from_pretrained(out_dir)`` loads; returns the folder."""
    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ModelLoadError(f"export target {str(out)!r} exists and is not an empty folder. Choose a new folder.")
    return save_pipeline(load_pipeline(name, config=config), out)


def save_pipeline(pipe: DiffusionPipeline, out_dir: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a temporary sibling folder renamed onto ``out_dir``: never half a
    model under the final name."""
    with atomic_path(out_dir, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def _load(base: str, torch_dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    if base.startswith(BUILTIN_PREFIX):
        return _load_builtin(base, torch_dtype)
    path = Path(base).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{base!r} is a pickle checkpoint ({suffix}); loading one can run arbitrary code, so only "
            ".safetensors single files are accepted. Convert it on a machine you trust, or use the "
            "model's .safetensors release."
        )
    if suffix == ".safetensors":
        return _load_single_file(path, torch_dtype, config)
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if _HUB_ID.match(base) and not path.exists():
        return _load_hub(base, torch_dtype)
    hint = _did_you_mean(base)
    raise ModelLoadError(
        f"base {base!r} is not a builtin name, an existing folder, a .safetensors file or a hub id "
        f"(owner/name).{hint} " + _WHERE_TO_GET_ONE
    )


def _did_you_mean(value: str) -> str:
    # Compare bare names: the shared "builtin:" prefix would make any builtin:x look close.
    bare_names = [name.removeprefix(BUILTIN_PREFIX) for name in BUILTIN_NAMES]
    matches = difflib.get_close_matches(value.removeprefix(BUILTIN_PREFIX), bare_names, n=1, cutoff=0.6)
    return f" Did you mean {BUILTIN_PREFIX + matches[0]!r}?" if matches else ""


def _load_builtin(base: str, torch_dtype: torch.dtype) -> DiffusionPipeline:
    name = base.removeprefix(BUILTIN_PREFIX)
    if name in _TINY_BUILDERS:
        pipe = _TINY_BUILDERS[name]()
        # Built in float32; casting a float32 pipeline to float32 would only log a diffusers warning.
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    if name == "toy":
        if not (TOY_BASE_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"builtin:toy has not been built yet (expected a diffusers folder at {TOY_BASE_DIR}). "
                f"Build it with `{TOY_BUILD_COMMAND}`, or use builtin:tiny-sd15 / builtin:tiny-sdxl "
                "(random weights, for tests)."
            )
        return _load_folder(TOY_BASE_DIR, torch_dtype)
    hint = _did_you_mean(base)
    raise ModelLoadError(f"unknown builtin model {base!r}.{hint} Valid builtin names: {', '.join(BUILTIN_NAMES)}.")


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"folder {str(folder)!r} has no model_index.json, so it is not a diffusers pipeline folder "
            "(a single component such as unet/ is not enough). Point at the folder that holds "
            "model_index.json, or write one with `python -m dreambooth_dora.models export NAME DIR`."
        )
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{str(index)!r} is not valid JSON ({err}); re-export or re-download the model.") from err


def _load_folder(folder: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
    _read_model_index(folder)
    try:
        return DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as err:  # missing or corrupt component files
        raise ModelLoadError(f"could not load the diffusers folder {str(folder)!r}: {err}") from err


def _load_hub(repo_id: str, torch_dtype: torch.dtype) -> DiffusionPipeline:
    # The cache first: it works offline and never waits on an unreachable network.
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype, local_files_only=True)
    except OSError as err:  # not (fully) cached
        if is_offline_mode():
            raise ModelLoadError(
                f"{repo_id!r} is not a local folder, and as a hub id it is not in the local Hugging Face "
                "cache; HF_HUB_OFFLINE is set, so it cannot be downloaded. " + _WHERE_TO_GET_ONE
            ) from err
        # Online: fall through and let diffusers download what the cache lacks.
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype)
    except OSError as err:  # no network, unknown or gated repo
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder, and as a hub id it is neither cached nor downloadable "
            f"({err}). Check the id and your network (gated models also need `hf auth login`). " + _WHERE_TO_GET_ONE
        ) from err


def _single_file_pipeline_class(path: Path) -> type[DiffusionPipeline]:
    """Pick SD or SDXL from the checkpoint's key names, reading only its header."""
    try:
        with safe_open(path, framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{str(path)!r} is not a readable .safetensors file: {err}") from err
    # Original (LDM-layout) checkpoints keep the UNet under model.diffusion_model; adapters do not.
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ModelLoadError(
            f"{str(path)!r} has no UNet weights (model.diffusion_model.*), so it is not a full Stable "
            "Diffusion checkpoint; a LoRA/DoRA file is an adapter, pass it with --adapter instead."
        )
    # SDXL's two text encoders live under conditioner.embedders; SD1.x/2.x use cond_stage_model.
    return StableDiffusionXLPipeline if any(key.startswith("conditioner.") for key in keys) else StableDiffusionPipeline


def _load_single_file(path: Path, torch_dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {str(path)!r} does not exist.")
    pipeline_class = _single_file_pipeline_class(path)
    if config is None:
        # Without config= diffusers fetches the matching reference config from the hub.
        if is_offline_mode():
            raise ModelLoadError(
                f"single-file checkpoint {str(path)!r} needs config=<a local diffusers folder of the same "
                f"architecture> (--config on the command line) to load offline: the file holds weights but "
                f"not the model configs or tokenizers. Any {pipeline_class.__name__} folder of that model "
                "family works, e.g. one written while online by "
                "`python -m dreambooth_dora.models export <hub id> DIR`."
            )
        kwargs: dict[str, object] = {}
    else:
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise ModelLoadError(f"config {config!r} is not a folder; it must be a local diffusers folder.")
        config_class = _read_model_index(config_dir).get("_class_name")
        if config_class != pipeline_class.__name__:
            raise ModelLoadError(
                f"checkpoint {str(path)!r} is a {pipeline_class.__name__} checkpoint but config folder "
                f"{config!r} describes a {config_class}. Pass a config folder of the same architecture."
            )
        kwargs = {"config": str(config_dir), "local_files_only": True}
    try:
        return pipeline_class.from_single_file(str(path), dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # no network, or weights not matching config
        raise ModelLoadError(
            f"could not load single-file checkpoint {str(path)!r}: {err}. If you passed config=, it must "
            "describe the same architecture (SD1.x, SD2.x or SDXL) as the checkpoint."
        ) from err


def main(argv: list[str] | None = None) -> int:
    """``python -m dreambooth_dora.models export NAME DIR [--config FOLDER]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth_dora.models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a base model as a diffusers folder (safetensors)")
    export.add_argument("name", help=f"any base: {', '.join(BUILTIN_NAMES)}, a folder, a .safetensors file, a hub id")
    export.add_argument("dir", help="output folder (must be new or empty)")
    export.add_argument("--config", help="diffusers folder of the same architecture, for single-file checkpoints")
    args = parser.parse_args(argv)
    try:
        out = export_base(args.name, args.dir, config=args.config)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.name} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
