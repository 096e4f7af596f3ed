"""Everything before the first step: inputs checked, output folder prepared, adapters injected, optimizer ready.

Two phases, so that bad input never leaves files behind: ``check_inputs`` reads and validates everything (data,
base model, optimizer, checkpoint to resume from) and only then writes train_config.yaml, the run's first file;
``open_session`` does the rest (prior-preservation class images, adapters, parameter groups, accelerate,
resume) and returns the ``Session`` the step loop works on. The order of every random draw here (model init,
adapter init) is part of what makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dreambooth_dora.adapters.inject import AdapterError, adapter_layers, add_adapter, check_rank
from dreambooth_dora.runs import RunFolder, write_text
from dreambooth_dora.sd.pipelines import DTYPES, BaseArchitecture, describe_architecture, load_pipeline
from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training.config import ConfigError, TrainConfig
from dreambooth_dora.training.data import DreamBoothDataset, base_fit_warning, class_prompt_list
from dreambooth_dora.training.objective import training_scheduler

log = logging.getLogger("dreambooth_dora.train")
ADAPTER = "default"


@dataclass
class Loaded:
    """The config, the run folder, the accelerator and the loaded pipeline and data: what both phases hold."""

    cfg: TrainConfig
    run: RunFolder
    accelerator: object
    pipe: object
    arch: BaseArchitecture
    dataset: DreamBoothDataset
    dtype: torch.dtype

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Inputs(Loaded):
    """What ``check_inputs`` read and validated; nothing of it has touched the output folder."""

    resume: Path | None
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]


@dataclass
class Session(Loaded):
    """A run ready to step: the live pipeline, the prepared modules and optimizer, and the step to start from."""

    unet: torch.nn.Module  # as prepared by accelerate (possibly wrapped for DDP)
    trained_encoders: list[torch.nn.Module]
    named: dict[str, torch.nn.Parameter]  # every adapter tensor by name (what a checkpoint holds)
    trainable: list[torch.nn.Parameter]  # unet's, then the text encoders' (what is clipped and stepped)
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object
    start: int

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def make_dataset(cfg: TrainConfig, with_class_images: bool) -> DreamBoothDataset:
    class_kwargs = {}
    if with_class_images:
        class_kwargs = dict(
            class_dir=cfg.resolved_class_dir, class_prompt=cfg.class_prompt, num_class_images=cfg.num_class_images
        )
    return DreamBoothDataset(
        cfg.instance_data_dir,
        cfg.instance_prompt,
        cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        repeats=cfg.repeats,
        bucketing=cfg.bucketing,
        seed=cfg.seed,
        **class_kwargs,
    )


def optimizer_factory(cfg: TrainConfig) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """The optimizer's constructor, checked now (its package, a GPU) so a missing one fails before any write."""
    betas, decay = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay
    if cfg.optimizer == "adamw":
        return lambda groups: torch.optim.AdamW(groups, betas=betas, weight_decay=decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is None or not torch.cuda.is_available():
            found = "bitsandbytes " + ("found" if bnb else "not installed")
            cuda = "CUDA " + ("available" if torch.cuda.is_available() else "not available")
            raise ConfigError(
                f"optimizer: 'adamw8bit' needs the bitsandbytes package and a CUDA GPU ({found}, {cuda}); "
                "use optimizer: adamw"
            )
        return lambda groups: bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("optimizer: 'prodigy' needs `pip install prodigyopt`; or use optimizer: adamw") from None
    return lambda groups: Prodigy(groups, betas=betas, weight_decay=decay)


@contextlib.contextmanager
def own_output(inputs: Inputs) -> Iterator[None]:
    """Hold the output folder for this run (main process): refuse a second writer (RunFolderBusy), remove what
    interrupted writes left behind, write train_config.yaml; or explain why the folder is not writable."""
    if not inputs.main:
        yield
        return
    run = inputs.run
    with contextlib.ExitStack() as held:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            held.enter_context(run.lock())
            for leftover in run.remove_stale_temps():
                log.info("removed %s, left by an interrupted write", leftover)
            write_text(run.config, inputs.cfg.to_yaml())
        except OSError as e:
            raise ConfigError(
                f"output_dir: cannot write to {str(run.root)!r} ({e.strerror or e}); choose a writable folder"
            ) from None
        yield


def check_inputs(cfg: TrainConfig) -> Inputs:
    """Read and validate every input, writing nothing. Raises ConfigError, DataError, ModelLoadError or
    CheckpointError."""
    from accelerate import Accelerator

    run = RunFolder(cfg.output_dir)
    torch.manual_seed(cfg.seed)  # the builtin models initialize from the global RNG
    dataset = make_dataset(cfg, with_class_images=False)
    make_optimizer = optimizer_factory(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # mixed_precision "no": fp32
    pipe = load_pipeline(
        cfg.base_model, torch_dtype=dtype, config=cfg.base_config, quantize=cfg.quantize_base, device=accelerator.device
    )
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16; latents are cached or cheap anyway
    arch = describe_architecture(pipe)
    if cfg.kind != "full":
        try:
            check_rank(pipe, cfg.rank, cfg.targets)
        except AdapterError as e:
            raise ConfigError(f"rank: {e}") from None
    resume = ckpt.resolve(cfg.resume_from_checkpoint, run.checkpoints) if cfg.resume_from_checkpoint else None
    return Inputs(cfg, run, accelerator, pipe, arch, dataset, dtype, resume, make_optimizer)


def _class_images(cfg: TrainConfig, pipe, accelerator, on_phase=None) -> DreamBoothDataset:
    """Generate the missing prior-preservation class images (main process) and return the paired dataset."""
    from dreambooth_dora.training.prior import ensure_class_images

    if accelerator.is_main_process:
        ensure_class_images(
            pipe,
            cfg.class_prompt,
            cfg.resolved_class_dir,
            cfg.num_class_images,
            seed=cfg.seed,
            resolution=cfg.resolution,
            on_progress=(lambda done, total: on_phase("class images", done, total)) if on_phase else None,
        )
    accelerator.wait_for_everyone()
    dataset = make_dataset(cfg, with_class_images=True)
    if accelerator.is_main_process and (note := foreign_class_images(dataset, cfg.class_prompt)):
        log.warning("%s", note)
    return dataset


def foreign_class_images(dataset: DreamBoothDataset, class_prompt: str | list[str]) -> str | None:
    """A line naming the class images that were made for prompts other than the configured ones (an earlier run
    with another class_prompt filled the folder): they train with their own captions, which may not be wanted."""
    wanted = set(class_prompt_list(class_prompt))
    other = Counter(c for c, path in zip(dataset.class_captions, dataset.class_images, strict=True)
                    if c not in wanted and path.with_suffix(".txt").is_file())  # fmt: skip
    if not other:
        return None
    shown = ", ".join(f"{text!r} ×{n}" for text, n in other.most_common(3)) + (", …" if len(other) > 3 else "")
    return (
        f"{other.total()} of the {len(dataset.class_images)} class images in {dataset.class_images[0].parent} were "
        f"made for other prompts ({shown}); they train with those captions. For class images of the prompts now "
        "set, point class_data_dir to a new folder or delete those images."
    )


def _inject(cfg: TrainConfig, pipe, arch, encoders: list[str]) -> dict[str, torch.nn.Parameter]:
    """Freeze the model, add the adapters (which unfreeze exactly themselves) and return their tensors by name."""
    comps = ["unet", *encoders] if cfg.train_text_encoder else ["unet"]
    for n in ("vae", *encoders):
        getattr(pipe, n).requires_grad_(False)
    # SDXL conditions on text_encoder's penultimate layer: adapters on its last layer would never train.
    last = pipe.text_encoder.config.num_hidden_layers - 1
    unused = [f"text_encoder.*layers.{last}.*"] if arch.arch == "sdxl" else []
    add_adapter(
        pipe,
        ADAPTER,
        kind=cfg.kind,
        rank=cfg.rank,
        alpha=cfg.alpha,
        targets=cfg.targets,
        dropout=cfg.dropout,
        axis=cfg.axis,
        components_to_adapt=comps,
        exclude=unused,
    )
    return {f"{k}.{pn}": p for k, (_, a) in adapter_layers(pipe, ADAPTER).items() for pn, p in a.named_parameters()}


def _gradient_checkpointing(cfg: TrainConfig, pipe, encoders: list[str]) -> None:
    pipe.unet.enable_gradient_checkpointing()
    if cfg.train_text_encoder:
        for n in encoders:
            enc = getattr(pipe, n)  # transformers 5 renamed it; keep both spellings working
            getattr(enc, "activation_checkpointing_enable", enc.gradient_checkpointing_enable)()


def _parameter_groups(cfg: TrainConfig, named: dict[str, torch.nn.Parameter]) -> list[dict]:
    """The unet's adapter tensors at learning_rate; the text encoders' (if trained) at text_encoder_lr."""
    unet = [p for k, p in named.items() if k.startswith("unet.") and p.requires_grad]
    text = [p for k, p in named.items() if not k.startswith("unet.") and p.requires_grad]
    groups = [{"params": unet, "lr": cfg.learning_rate}]
    if text:
        groups.append({"params": text, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    return groups


def _resume(inputs: Inputs, named: dict, optimizer, lr_scheduler) -> int:
    """Load the checkpoint to resume from (if any) into params, optimizer, schedule and grad scaler; its step."""
    if inputs.resume is None:
        return 0
    state = ckpt.load_checkpoint(inputs.resume, named, optimizer, lr_scheduler)
    scaler = inputs.accelerator.scaler
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if inputs.main:
        log.info("resumed from %s at step %d", inputs.resume, state["step"])
    return state["step"]


def open_session(inputs: Inputs, on_phase=None) -> Session:
    """Class images, adapters, parameter groups, gradient checkpointing, optimizer and schedule through
    accelerate, resume: the run ready for its first step (modules in train mode)."""
    from diffusers.optimization import get_scheduler

    cfg, pipe, accelerator, dataset = inputs.cfg, inputs.pipe, inputs.accelerator, inputs.dataset
    if inputs.main:
        log.info("dataset: %d images used, %d skipped", len(dataset.report.images), len(dataset.report.skipped))
        if dataset.report.skipped:
            log.warning("skipped files:\n%s", dataset.report.describe_skipped())
        misfit = base_fit_warning(cfg.base_model, dataset.report.sizes)
        if misfit:
            log.warning("warning: %s", misfit)
    pipe.to(accelerator.device)
    if cfg.with_prior_preservation:
        dataset = _class_images(cfg, pipe, accelerator, on_phase)
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    named = _inject(cfg, pipe, inputs.arch, encoders)
    if cfg.gradient_checkpointing:
        _gradient_checkpointing(cfg, pipe, encoders)
    groups = _parameter_groups(cfg, named)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = inputs.make_optimizer(groups)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps,
    )
    unet = accelerator.prepare(pipe.unet)
    trained_encoders = [accelerator.prepare(getattr(pipe, n)) for n in encoders] if cfg.train_text_encoder else []
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    noise_scheduler = training_scheduler(pipe, cfg.prediction_type)
    start = _resume(inputs, named, optimizer, lr_scheduler)
    for module in (unet, *trained_encoders):
        module.train()
    loaded = {f.name: getattr(inputs, f.name) for f in fields(Loaded)}
    return Session(
        **{**loaded, "dataset": dataset},  # with its class images when prior preservation is on
        unet=unet,
        trained_encoders=trained_encoders,
        named=named,
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_scheduler=noise_scheduler,
        start=start,
    )
