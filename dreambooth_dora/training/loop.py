"""DreamBooth with DoRA: ``train(config, callbacks)`` and ``python -m dreambooth_dora.train``.

One explicit loop with named stages. Everything random in a step (data order, crops, noise, timesteps, dropout)
is derived from (seed, step), so a run resumed from a checkpoint reproduces an uninterrupted one exactly.

Writes into ``output_dir``: adapter.safetensors (native, diffusers-loadable), adapter_kohya.safetensors,
train_config.yaml, samples/, checkpoints/, log.csv and train.log. Only the main process writes.
See docs/ARCHITECTURE.md (Entry points, Training, Reliability).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dreambooth_dora.adapters.inject import adapter_layers, add_adapter
from dreambooth_dora.adapters.io import save_adapter
from dreambooth_dora.sd.pipelines import DTYPES, ModelLoadError, describe_architecture, load_pipeline
from dreambooth_dora.training import checkpoint as ckpt
from dreambooth_dora.training.config import ConfigError, TrainConfig, load_config
from dreambooth_dora.training.data import DataError, DreamBoothDataset
from dreambooth_dora.training.objective import (
    Conditioning,
    diffusion_loss,
    encode_images,
    encode_prompts,
    training_scheduler,
    with_time_ids,
)

log = logging.getLogger("dreambooth_dora.train")
ADAPTER = "default"


class TrainingError(RuntimeError):
    """The run had to stop (NaN loss, …); the message says what happened and what was kept."""


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    steps_per_s: float
    eta_s: float


@dataclass
class Callbacks:
    """Hooks for the UI. ``should_stop`` is polled after every step; a stop writes a checkpoint first."""

    on_step: Callable[[StepInfo], None] | None = None
    on_samples: Callable[[int, list[Path]], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    status: str  # "finished" | "stopped"
    adapter_files: list[Path] = field(default_factory=list)
    last_checkpoint: Path | None = None


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + micro * 131 + rank) % (2**63))


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop (checkpoint, then exit); a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _prepare_output(cfg: TrainConfig) -> None:
    try:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        probe = cfg.output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output_dir: cannot write to {str(cfg.output_dir)!r} ({e.strerror or e}); choose a writable folder"
        ) from None


def _dataset(cfg: TrainConfig, with_class_images: bool) -> DreamBoothDataset:
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


def _tensorboard(folder: Path):
    """A TensorBoard writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _make_optimizer(cfg: TrainConfig, groups: list[dict]):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
        )
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
        return bnb.optim.AdamW8bit(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("optimizer: 'prodigy' needs `pip install prodigyopt`; or use optimizer: adamw") from None
    return Prodigy(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay)


def _validate_images(pipe, cfg: TrainConfig, accelerator, step: int, unet) -> list[Path]:
    """Sample images with the live (unmerged) adapter; main process only."""
    out = cfg.output_dir / "samples"
    out.mkdir(exist_ok=True)
    unet.eval()
    paths = []
    with torch.no_grad(), accelerator.autocast():
        pipe.set_progress_bar_config(disable=True)
        for i in range(cfg.num_validation_images):
            g = torch.Generator().manual_seed(cfg.seed + i)
            image = pipe(
                cfg.validation_prompt,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=g,
            ).images[0]
            path = out / f"step-{step:06d}_{i}.png"
            image.save(path)
            paths.append(path)
    unet.train()
    return paths


def train(config: TrainConfig | dict | str | Path, callbacks: Callbacks | None = None) -> TrainResult:
    """Run DreamBooth training as configured. Raises ConfigError / DataError / ModelLoadError for bad input
    (before anything is written) and TrainingError when a run must stop."""
    if isinstance(config, TrainConfig):
        cfg = config
    else:
        cfg = load_config(config) if isinstance(config, (str, Path)) else load_config(**config)
    package_log = logging.getLogger("dreambooth_dora")
    before = set(package_log.handlers)
    try:
        return _run(cfg, callbacks or Callbacks(), package_log)
    finally:  # this run's train.log handler must not outlive it (several runs in one process)
        for handler in set(package_log.handlers) - before:
            package_log.removeHandler(handler)
            handler.close()


def _run(cfg: TrainConfig, cb: Callbacks, package_log: logging.Logger) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    # -- stage 1: validate inputs before writing anything --------------------------------------------------------
    torch.manual_seed(cfg.seed)
    dataset = _dataset(cfg, with_class_images=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    main = accelerator.is_main_process
    dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # mixed_precision "no": fp32
    pipe = load_pipeline(cfg.base_model, torch_dtype=dtype, config=cfg.base_config)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16; latents are cached or cheap anyway
    arch = describe_architecture(pipe)
    resume = (
        ckpt.resolve(cfg.resume_from_checkpoint, cfg.output_dir / "checkpoints")
        if (cfg.resume_from_checkpoint)
        else None
    )
    if main:
        _prepare_output(cfg)
        (cfg.output_dir / "train_config.yaml").write_text(cfg.to_yaml())
        handler = logging.FileHandler(cfg.output_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        log.info("dataset: %d images used, %d skipped", len(dataset.report.images), len(dataset.report.skipped))
        if dataset.report.skipped:
            log.warning("skipped files:\n%s", dataset.report.describe_skipped())
    device = accelerator.device
    pipe.to(device)

    # -- stage 2: prior preservation class images ----------------------------------------------------------------
    if cfg.with_prior_preservation:
        from dreambooth_dora.training.prior import ensure_class_images

        if main:
            ensure_class_images(
                pipe,
                cfg.class_prompt,
                cfg.resolved_class_dir,
                cfg.num_class_images,
                seed=cfg.seed,
                resolution=cfg.resolution,
            )
        accelerator.wait_for_everyone()
        dataset = _dataset(cfg, with_class_images=True)

    # -- stage 3: adapters ---------------------------------------------------------------------------------------
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    comps = ["unet", *encoders] if cfg.train_text_encoder else ["unet"]
    for n in ("vae", *encoders):
        getattr(pipe, n).requires_grad_(False)  # add_adapter then unfreezes exactly the adapters it adds
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
    named = {f"{k}.{pn}": p for k, (_, a) in adapter_layers(pipe, ADAPTER).items() for pn, p in a.named_parameters()}
    unet_params = [p for k, p in named.items() if k.startswith("unet.") and p.requires_grad]
    te_params = [p for k, p in named.items() if not k.startswith("unet.") and p.requires_grad]
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for n in encoders:
                enc = getattr(pipe, n)  # transformers 5 renamed it; keep both spellings working
                getattr(enc, "activation_checkpointing_enable", enc.gradient_checkpointing_enable)()

    # -- stage 4: caches (latents when images never change; text when the encoders are frozen) ------------------
    latent_cache: dict[tuple, torch.Tensor] = {}
    use_latent_cache = cfg.cache_latents and not dataset.augmented
    text_cache: dict[str, Conditioning] = {}

    def latents_for(pixels: torch.Tensor, idx: list[tuple]) -> torch.Tensor:
        """Latents of a batch; ``idx`` names each image (kind, image number) for the cache."""
        if not use_latent_cache:
            return encode_images(pipe.vae, pixels).to(dtype)
        for j, key in enumerate(idx):
            if key not in latent_cache:  # one image at a time: bitwise the same whichever batch brings it
                latent_cache[key] = encode_images(pipe.vae, pixels[j : j + 1])[0].to(dtype)
        return torch.stack([latent_cache[key] for key in idx])

    def conditioning(prompts: list[str]) -> Conditioning:
        if cfg.train_text_encoder:
            return encode_prompts(pipe, prompts, device)
        for p in set(prompts) - text_cache.keys():
            with torch.no_grad():
                text_cache[p] = encode_prompts(pipe, [p], device)
        return Conditioning.cat([text_cache[p] for p in prompts])

    # -- stage 5: optimizer, schedule, accelerate, resume --------------------------------------------------------
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = _make_optimizer(cfg, groups)
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
    start = 0
    if resume is not None:
        state = ckpt.load_checkpoint(resume, named, optimizer, lr_scheduler)
        start = state["step"]
        if accelerator.scaler is not None and state.get("grad_scaler"):
            accelerator.scaler.load_state_dict(state["grad_scaler"])
        if main:
            log.info("resumed from %s at step %d", resume, start)

    def save_ckpt(step: int) -> Path | None:
        if not main:
            return None
        extra = {
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "config": cfg.model_dump(mode="json"),
        }
        path = ckpt.save_checkpoint(
            cfg.output_dir / "checkpoints",
            step,
            named,
            optimizer,
            lr_scheduler,
            extra,
            keep=cfg.checkpoints_total_limit,
        )
        log.info("checkpoint %s", path)
        if cb.on_checkpoint:
            cb.on_checkpoint(step, path)
        return path

    def save_intermediate(step: int) -> None:
        if main and cfg.save_intermediate_every and step % cfg.save_intermediate_every == 0:
            fmt = "native" if cfg.axis == "out" else "kohya"
            save_adapter(
                pipe,
                cfg.output_dir / "intermediate" / f"step-{step:06d}.safetensors",
                ADAPTER,
                fmt,
                {"base_model": cfg.base_model, "step": step},
            )

    # -- stage 6: the loop ---------------------------------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = len(dataset.batch_sampler(cfg.train_batch_size, 0))
    epoch_batches: dict[int, list[list[int]]] = {}

    n_images, n_class = len(dataset.report.images), max(len(dataset.class_images), 1)

    def micro_batch(step: int, micro: int) -> tuple[torch.Tensor, list[str], dict, int]:
        """(latents, prompts, conditioning extras, number of prior rows) of micro-batch ``micro`` of ``step``."""
        k = (step * cfg.gradient_accumulation_steps + micro) * world + rank
        epoch, pos = divmod(k, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = dataset.batch_sampler(cfg.train_batch_size, epoch)
        dataset.set_epoch(epoch)
        indices = epoch_batches[epoch][pos]
        batch = dataset.collate([dataset[i] for i in indices])
        lat = latents_for(batch["pixel_values"], [("instance", i % n_images) for i in indices])
        prompts, sizes, crops = list(batch["prompt"]), list(batch["original_size"]), list(batch["crop_top_left"])
        num_prior = 0
        if "class_pixel_values" in batch:
            # with bucketing a class image takes the bucket of its instance image: the bucket is part of the key
            keys = [("class", i % n_class, batch["bucket"]) for i in indices]
            lat = torch.cat([lat, latents_for(batch["class_pixel_values"], keys)])
            prompts += batch["class_prompt"]
            sizes += batch["class_original_size"]
            crops += batch["class_crop_top_left"]
            num_prior = len(indices)
        w, h = batch["bucket"]
        return lat, prompts, {"original_sizes": sizes, "crop_top_lefts": crops, "target_size": (h, w)}, num_prior

    unet.train()
    for te in trained_encoders:
        te.train()
    csv = (cfg.output_dir / "log.csv").open("a") if main else None
    if csv is not None and csv.tell() == 0:
        csv.write("step,loss,lr,steps_per_s,elapsed_s\n")
    tensorboard = _tensorboard(cfg.output_dir / "tensorboard") if main else None
    bar = tqdm(total=cfg.max_train_steps, initial=start, disable=not main, desc="training", unit="step")
    t0, status, last_ckpt, step = time.perf_counter(), "finished", None, start
    if start == 0:
        save_intermediate(0)
    with _StopFlag() as stop:
        while step < cfg.max_train_steps:
            loss_sum = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                g = _step_generator(cfg.seed, step, micro, rank)
                torch.manual_seed(g.initial_seed())  # dropout and anything else using the global RNG
                lat, prompts, sizes, num_prior = micro_batch(step, micro)
                last = micro == cfg.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(unet)
                with sync, accelerator.autocast():
                    cond = with_time_ids(conditioning(prompts), **sizes)
                    loss = diffusion_loss(
                        unet,
                        noise_scheduler,
                        lat,
                        cond,
                        generator=g,
                        noise_offset=cfg.noise_offset,
                        snr_gamma=cfg.snr_gamma,
                        num_prior=num_prior,
                        prior_loss_weight=cfg.prior_loss_weight,
                    )
                    accelerator.backward(loss / cfg.gradient_accumulation_steps)
                loss_sum += loss.detach().float().item() / cfg.gradient_accumulation_steps
            if not math.isfinite(loss_sum):
                kept = ckpt.list_checkpoints(cfg.output_dir / "checkpoints")
                raise TrainingError(
                    f"loss became {loss_sum} at step {step + 1}; the run stopped without saving this state. "
                    f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower learning_rate, or use "
                    "mixed_precision bf16 instead of fp16."
                )
            accelerator.clip_grad_norm_(unet_params + te_params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - t0
            rate = (step - start) / elapsed if elapsed > 0 else 0.0
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            if csv is not None:
                csv.write(f"{step},{loss_sum:.6f},{lr:.6g},{rate:.4f},{elapsed:.2f}\n")
                csv.flush()
            if tensorboard is not None:
                tensorboard.add_scalar("loss", loss_sum, step)
                tensorboard.add_scalar("lr", lr, step)
            if cb.on_step and main:
                cb.on_step(
                    StepInfo(
                        step,
                        cfg.max_train_steps,
                        loss_sum,
                        lr,
                        rate,
                        (cfg.max_train_steps - step) / rate if rate else float("inf"),
                    )
                )
            if main and cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps):
                paths = _validate_images(pipe, cfg, accelerator, step, unet)
                if cb.on_samples:
                    cb.on_samples(step, paths)
            save_intermediate(step)
            wants_stop = stop.raised or bool(cb.should_stop and cb.should_stop())
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps or wants_stop:
                last_ckpt = save_ckpt(step) or last_ckpt
            if wants_stop and step < cfg.max_train_steps:
                status = "stopped"
                break
    bar.close()
    if csv is not None:
        csv.close()
    if tensorboard is not None:
        tensorboard.close()
    accelerator.wait_for_everyone()

    # -- stage 7: the adapter files ------------------------------------------------------------------------------
    files: list[Path] = []
    if main and status == "finished":
        meta = {
            "base_model": cfg.base_model,
            "arch_name": arch.arch,
            "instance_prompt": cfg.instance_prompt,
            "class_prompt": cfg.class_prompt,
            "steps": step,
            "resolution": cfg.resolution,
            "learning_rate": cfg.learning_rate,
            "seed": cfg.seed,
            "train_text_encoder": cfg.train_text_encoder,
        }
        if cfg.axis == "out":
            files.append(save_adapter(pipe, cfg.output_dir / "adapter.safetensors", ADAPTER, "native", meta))
        files.append(save_adapter(pipe, cfg.output_dir / "adapter_kohya.safetensors", ADAPTER, "kohya", meta))
        log.info("wrote %s", ", ".join(str(f) for f in files))
    return TrainResult(cfg.output_dir, step, status, files, last_ckpt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_dora.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file (see training_configs/)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from a checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        extra = {"resume_from_checkpoint": args.resume} if args.resume else {}
        cfg = load_config(args.config, args.set, **extra)
        result = train(cfg)
    except (ConfigError, DataError, ModelLoadError, ckpt.CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.status == "stopped":
        print(f"stopped at step {result.steps}; resume with --resume latest (checkpoint {result.last_checkpoint})")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
