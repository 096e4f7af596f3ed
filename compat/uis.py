"""Readers that are UIs: ComfyUI, A1111 (stable-diffusion-webui) and Forge, run from their source trees.

Nothing of theirs is copied here: each reader imports the tool's own LoRA code from the folder given on the
command line (see compat/README.md for the commits and extra packages) and runs it on CPU without its UI.

* ComfyUI: the whole path — ``comfy.sd.load_checkpoint_guess_config`` on the exported single file,
  ``comfy.sd.load_lora_for_models``, then ``comfy.model_management.load_models_gpu`` (what sampling and text
  encoding call, which patches the weights; a bare ``patch_model`` on the clone skips the text encoder, whose
  modules the checkpoint load already marked patched). Tiny models need three accommodations that do not touch the
  adapted layers: a fallback model class (its detection is by size), the tiny text-encoder configs, and the token
  embedding padded to its fixed 49408 rows. Its text encoder runs in fp16 on CPU.
* A1111: ``networks.load_network`` (its key conversion) and ``networks.network_apply_weights`` (its weight
  patching: ``network_lora`` + ``network.finalize_updown`` / ``apply_weight_decompose``) on modules named as its
  model names them — built from the checkpoint's own keys, since A1111 loads a checkpoint's state dict as is. Its
  ``modules.*`` infrastructure (options, devices, file reading) is stubbed with the few values these calls read.
* Forge: its LoRA code is not A1111's: ``backend/patcher/lora.py`` (its own copy of ComfyUI's merge, including
  ``weight_decompose``) with the key mapping of ``packages_3rdparty/comfyui_lora_collection``. Both are run on the
  weights Forge's loader holds (ldm UNet names, HF CLIP names), with the UNet config its key map reads.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from compat.cases import Case, Key, comfy_locations, ldm_locations, module_tree

CLIP_VOCAB = 49408


def _on_path(*folders: Path) -> None:
    for folder in folders:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


# -- ComfyUI ------------------------------------------------------------------------------------------------------


def _text_config(base_dir: Path, name: str) -> dict:
    cfg = json.loads((base_dir / name / "config.json").read_text())
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")
    return {k: cfg[k] for k in fields} | {"projection_dim": cfg.get("projection_dim", cfg["hidden_size"])}


def _head_channels(base_dir: Path) -> int:
    cfg = json.loads((base_dir / "unet" / "config.json").read_text())
    heads = cfg["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(cfg["block_out_channels"])
    return math.gcd(*(c // h for c, h in zip(cfg["block_out_channels"], heads, strict=True)))


def _padded_checkpoint(path: Path) -> Path:
    """A copy of the checkpoint whose token embeddings have CLIP's full vocabulary (zero rows appended)."""
    out = path.with_name(path.stem + ".comfy.safetensors")
    if not out.exists():
        state = load_file(str(path))
        for key, t in state.items():
            if key.endswith("token_embedding.weight") and t.shape[0] < CLIP_VOCAB:
                state[key] = torch.cat([t, t.new_zeros(CLIP_VOCAB - t.shape[0], t.shape[1])])
        save_file(state, str(out))
    return out


def _comfy_reader(source: Path):
    _on_path(source)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    detect = comfy.model_detection.model_config_from_unet_config
    state = {}

    def fallback(unet_config, state_dict=None):  # tiny models are not recognised by size
        found = detect(unet_config, state_dict)
        if found is None:  # SD15 / SDXL, with the tiny model's attention head width (SDXL's 64 is wider)
            found = state["fallback"](unet_config)
            found.unet_config.update(num_head_channels=state["head_channels"], num_heads=-1)
        return found

    comfy.model_detection.model_config_from_unet_config = fallback

    def read(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
        state["fallback"] = comfy.supported_models.SDXL if case.arch == "sdxl" else comfy.supported_models.SD15
        state["head_channels"] = _head_channels(case.base_dir)
        options = {"clip_l_model_config": _text_config(case.base_dir, "text_encoder")}
        if case.arch == "sdxl":
            options["clip_g_model_config"] = _text_config(case.base_dir, "text_encoder_2")
        merged = case.form.layout == "merged"
        ckpt = _padded_checkpoint(case.path if merged else case.checkpoint)
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ckpt), output_vae=False, output_clip=True, te_model_options=options
        )
        if not merged:
            lora = comfy.utils.load_torch_file(str(case.path), safe_load=True)
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        # what sampling and text encoding do before they run: load (and patch) both models
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        weights = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
        where = comfy_locations(case.base_dir, keys)
        return {k: weights[where[k]].detach().float().clone() for k in keys}

    return read


# -- A1111 ---------------------------------------------------------------------------------------------------------


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _a1111_stubs(work: Path) -> types.ModuleType:
    """The ``modules.*`` values A1111's Lora extension reads on the load-and-patch path."""
    opts = SimpleNamespace(
        lora_functional=False,
        lora_preferred_name="Alias from file",
        lora_in_memory_limit=0,
        lora_not_found_warning_console=False,
        lora_not_found_gradio_warning=False,
        lora_bundled_ti_to_infotext=False,
        lora_add_hashes_to_infotext=False,
    )
    cmd = SimpleNamespace(lora_dir=str(work), lyco_dir_backcompat=str(work))
    shared = _stub("modules.shared", opts=opts, cmd_opts=cmd, walk_files=lambda *a, **k: [], sd_model=None)
    ident = lambda x: x  # noqa: E731
    _stub(
        "modules.devices",
        cpu=torch.device("cpu"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cond_cast_unet=ident,
        torch_gc=lambda: None,
    )
    _stub("modules.sd_models", read_state_dict=lambda f, *a, **k: load_file(f), read_metadata_from_safetensors=dict)
    _stub("modules.errors", report=lambda *a, **k: None, display=lambda *a, **k: None)
    for name in ("scripts", "sd_hijack", "cache", "hashes", "patches", "extra_networks"):
        _stub(f"modules.{name}")
    _stub("modules.textual_inversion")
    _stub("modules.textual_inversion.textual_inversion")
    _stub("gradio")
    return shared


class _SdModel(torch.nn.Module):
    """The attributes of A1111's loaded model that its Lora code walks, holding the checkpoint's weights."""

    def __init__(self, state: dict, sdxl: bool) -> None:
        super().__init__()
        self.is_sdxl = sdxl
        self.model, self.params = module_tree(state, "model.")
        if sdxl:
            self.conditioner = torch.nn.Module()
            self.conditioner.embedders = torch.nn.ModuleList()
            for i in range(2):
                embedder = torch.nn.Module()
                embedder.wrapped, params = module_tree(state, f"conditioner.embedders.{i}.")
                self.conditioner.embedders.append(embedder)
                self.params.update(params)
        else:
            self.cond_stage_model = torch.nn.Module()
            self.cond_stage_model.wrapped, params = module_tree(state, "cond_stage_model.")
            self.params.update(params)


def _a1111_reader(source: Path):
    lora_dir = source / "extensions-builtin" / "Lora"
    _on_path(source, lora_dir)
    shared = _a1111_stubs(Path(__file__).resolve().parent)
    import network
    import networks

    networks.extra_network_lora = SimpleNamespace(errors={})

    def read(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
        merged = case.form.layout == "merged"
        state = load_file(str(case.path if merged else case.checkpoint))
        sd_model = _SdModel(state, case.arch == "sdxl")
        shared.sd_model = sd_model
        if not merged:
            networks.assign_network_names_to_compvis_modules(sd_model)
            net = networks.load_network("case", SimpleNamespace(filename=str(case.path)))
            networks.loaded_networks[:] = [net]
            networks.extra_network_lora.errors.clear()
            # A1111 patches these classes' forward to call it; an attention's out_proj is patched through its
            # MultiheadAttention (whose forward never calls out_proj's)
            inner = {id(m.out_proj) for m in sd_model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
            for module in sd_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.MultiheadAttention)) and id(module) not in inner:
                    networks.network_apply_weights(module)
            if networks.extra_network_lora.errors:
                raise RuntimeError(f"A1111 reported {networks.extra_network_lora.errors} failed layers")
        return _from_checkpoint_params(case, keys, sd_model.params)

    assert network  # imported for networks' own use
    return read


def _from_checkpoint_params(case: Case, keys: list[Key], params: dict) -> dict[Key, torch.Tensor]:
    where = ldm_locations(case.base_dir, case.arch, keys)
    out = {}
    for k in keys:
        ckpt_key, chunk = where[k]
        w = params[ckpt_key].detach().float()
        out[k] = (w.chunk(3)[chunk] if chunk is not None else w).clone()
    return out


# -- Forge ---------------------------------------------------------------------------------------------------------


def forge_unet_config(unet) -> dict:
    """The UNet config Forge's key map reads (``unet_to_diffusers``), in the order its model detection lists it:
    per input block its transformer depth, per output block (last first) the same."""
    cfg = unet.config
    n = len(cfg.block_out_channels)
    lpb = cfg.layers_per_block
    depth = cfg.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * n
    down = [depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(cfg.down_block_types)]
    up = [d for d in reversed(depth)]
    up = [up[i] if "CrossAttn" in t else 0 for i, t in enumerate(cfg.up_block_types)]
    output = [up[o // (lpb + 1)] for o in range(n * (lpb + 1))]
    return {
        "num_res_blocks": [lpb] * n,
        "channel_mult": [c // cfg.block_out_channels[0] for c in cfg.block_out_channels],
        "transformer_depth": [d for d in down for _ in range(lpb)],
        "transformer_depth_output": list(reversed(output)),
        "transformer_depth_middle": depth[-1],
    }


def _forge_models(case: Case):
    """Stand-ins holding what Forge's loader holds: ``diffusion_model.*`` (ldm names) with its UNet config, and
    ``clip_l`` / ``clip_g`` ``.transformer.text_model.*`` (HF names)."""
    from compat.cases import load_pipeline

    pipe = load_pipeline(str(case.base_dir))
    state = load_file(str(case.checkpoint))
    unet = torch.nn.Module()
    unet.diffusion_model, unet_params = module_tree(state, "model.diffusion_model.")
    unet.diffusion_model.config = forge_unet_config(pipe.unet)
    unet.config = SimpleNamespace(huggingface_repo="stable-diffusion-xl" if case.arch == "sdxl" else "stable-diffusion")
    text = {}
    for comp, clip in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        encoder = getattr(pipe, comp, None)
        if encoder is not None:
            for k, v in encoder.state_dict().items():
                text[f"{clip}.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    clip_model, clip_params = module_tree(text, "")
    params = {k.removeprefix("model."): v for k, v in unet_params.items()} | clip_params
    return unet, clip_model, params


def _forge_reader(source: Path):
    _on_path(source)
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]  # Forge's backend parses its flags on import
    try:
        from backend.patcher import lora as forge_lora
    finally:
        sys.argv = argv

    def read(case: Case, keys: list[Key]) -> dict[Key, torch.Tensor]:
        unet, clip, params = _forge_models(case)
        where = comfy_locations(case.base_dir, keys)
        if case.form.layout == "merged":
            state = load_file(str(case.path))
            located = ldm_locations(case.base_dir, case.arch, keys)
            return _from_checkpoint_params(case, keys, {located[k][0]: state[located[k][0]] for k in keys})
        lora = load_file(str(case.path))
        unet_keys = forge_lora.model_lora_keys_unet(unet, {})
        clip_keys = forge_lora.model_lora_keys_clip(clip, {})
        patches, rest = forge_lora.load_lora(lora, unet_keys)
        clip_patches, rest = forge_lora.load_lora(rest, clip_keys)
        if len(rest) > 12:  # what sd_forge_lora/networks.py load_lora_for_models does then
            raise RuntimeError(f"Forge skips the file ('LoRA version mismatch'): {len(rest)} keys unmatched")
        out = {}
        for k in keys:
            key = where[k]
            weight = params[key].detach()
            patch = {**patches, **clip_patches}.get(key)
            if patch is not None:
                weight = forge_lora.merge_lora_to_weight([[1.0, patch, 1.0, None, None]], weight, key)
            out[k] = weight.float().clone()
        return out

    return read


def reader(name: str, source: Path):
    """The read function of UI ``name`` (comfyui, a1111, forge) from its source tree."""
    if not source.is_dir():
        raise SystemExit(f"--{name} {source}: not a folder; give the tool's source tree (see compat/README.md)")
    return {"comfyui": _comfy_reader, "a1111": _a1111_reader, "forge": _forge_reader}[name](source.resolve())
