"""What a micro-batch holds, as a pure function of (step, micro-batch, world size, rank), and the caches behind it.

Micro-batch ``micro`` of optimizer step ``step`` on process ``rank`` of ``world`` is batch number
``(step * accumulation + micro) * world + rank`` of the endless sequence of epochs, each epoch's batches drawn by
``DreamBoothDataset.batch_sampler`` from (seed, epoch). Nothing depends on what ran before, so a resumed run reads
exactly the batches an uninterrupted one would.

The caches hold one entry per image (latents) or prompt (text embeddings), each computed alone, so an entry is
bitwise the same whichever batch first brings it, and a resumed run that refills them matches one that did not stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth_dora.training.data import DreamBoothDataset
from dreambooth_dora.training.objective import Conditioning, encode_images, encode_prompts


def micro_index(step: int, micro: int, accumulation: int, world: int, rank: int) -> int:
    """The position of a micro-batch in the run's sequence of batches (all epochs, all processes)."""
    return (step * accumulation + micro) * world + rank


class LatentCache:
    """Latents of images by key: ("instance", image) or ("class", image, bucket). Disabled (``enabled=False``,
    when crops or flips change an image between epochs) it encodes every batch afresh."""

    def __init__(self, vae, dtype: torch.dtype, *, enabled: bool) -> None:
        self.vae, self.dtype, self.enabled = vae, dtype, enabled
        self._latents: dict[tuple, torch.Tensor] = {}

    def __call__(self, pixels: torch.Tensor, keys: list[tuple]) -> torch.Tensor:
        """Latents (B, 4, h, w) of ``pixels`` (B, 3, H, W), whose images ``keys`` name."""
        if not self.enabled:
            return encode_images(self.vae, pixels).to(self.dtype)
        for j, key in enumerate(keys):
            if key not in self._latents:  # one image at a time: bitwise the same whichever batch brings it
                self._latents[key] = encode_images(self.vae, pixels[j : j + 1])[0].to(self.dtype)
        return torch.stack([self._latents[key] for key in keys])


class TextCache:
    """Prompt embeddings, cached per prompt while the text encoders are frozen; encoded with gradients (never
    cached) when they train."""

    def __init__(self, pipe, device: torch.device, *, enabled: bool) -> None:
        self.pipe, self.device, self.enabled = pipe, device, enabled
        self._cond: dict[str, Conditioning] = {}

    def __call__(self, prompts: list[str]) -> Conditioning:
        if not self.enabled:
            return encode_prompts(self.pipe, prompts, self.device)
        for p in set(prompts) - self._cond.keys():
            with torch.no_grad():
                self._cond[p] = encode_prompts(self.pipe, [p], self.device)
        return Conditioning.cat([self._cond[p] for p in prompts])


@dataclass
class MicroBatch:
    latents: torch.Tensor  # instance rows, then class rows
    prompts: list[str]
    sizes: dict  # SDXL's size conditioning: original_sizes, crop_top_lefts, target_size (objective.with_time_ids)
    num_prior: int  # how many trailing rows are class (prior-preservation) images


class Batches:
    """Micro-batches of ``dataset`` for one process of a run, latents through ``latents``."""

    def __init__(
        self,
        dataset: DreamBoothDataset,
        batch_size: int,
        accumulation: int,
        world: int,
        rank: int,
        latents: LatentCache,
    ) -> None:
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation
        self.world, self.rank, self.latents = world, rank, latents
        self.per_epoch = len(dataset.batch_sampler(batch_size, 0))  # the same for every epoch
        self._epoch: tuple[int, list[list[int]]] | None = None  # the epoch whose batches are at hand
        self._n_images, self._n_class = len(dataset.report.images), max(len(dataset.class_images), 1)

    def indices(self, step: int, micro: int) -> tuple[int, list[int]]:
        """(epoch, dataset indices) of micro-batch ``micro`` of ``step`` on this process."""
        k = micro_index(step, micro, self.accumulation, self.world, self.rank)
        epoch, pos = divmod(k, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.dataset.batch_sampler(self.batch_size, epoch))
        return epoch, self._epoch[1][pos]

    def __call__(self, step: int, micro: int) -> MicroBatch:
        epoch, indices = self.indices(step, micro)
        self.dataset.set_epoch(epoch)
        batch = self.dataset.collate([self.dataset[i] for i in indices])
        lat = self.latents(batch["pixel_values"], [("instance", i % self._n_images) for i in indices])
        prompts, sizes, crops = list(batch["prompt"]), list(batch["original_size"]), list(batch["crop_top_left"])
        num_prior = 0
        if "class_pixel_values" in batch:
            # with bucketing a class image takes the bucket of its instance image: the bucket is part of the key
            keys = [("class", i % self._n_class, batch["bucket"]) for i in indices]
            lat = torch.cat([lat, self.latents(batch["class_pixel_values"], keys)])
            prompts += batch["class_prompt"]
            sizes += batch["class_original_size"]
            crops += batch["class_crop_top_left"]
            num_prior = len(indices)
        w, h = batch["bucket"]
        return MicroBatch(
            lat, prompts, {"original_sizes": sizes, "crop_top_lefts": crops, "target_size": (h, w)}, num_prior
        )
