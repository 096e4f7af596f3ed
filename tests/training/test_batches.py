"""Micro-batches as a pure function of (step, micro-batch, world, rank), and a latent cache whose entries do not
depend on the batch that brought them: what an exact resume and multi-process training rest on."""

import torch

from dreambooth_dora.training.batches import Batches, LatentCache
from dreambooth_dora.training.data import DreamBoothDataset
from tests.helpers import SMOKE_SUBJECT


def _dataset(**kw):
    return DreamBoothDataset(SMOKE_SUBJECT, "a photo of sks heart", 64, seed=3, **kw)


def test_processes_share_each_epoch_without_overlap():
    """Two processes, two micro-batches a step, batch size 1: each step's four micro-batches are one epoch of the
    four images, each image once; the next step is the next epoch, in its own order."""
    ds = _dataset()
    ranks = [Batches(ds, 1, 2, 2, rank, LatentCache(None, torch.float32, enabled=False)) for rank in (0, 1)]
    epochs = []
    for step in (0, 1):
        seen = [(b.indices(step, micro)) for micro in (0, 1) for b in ranks]
        assert {epoch for epoch, _ in seen} == {step}
        epochs.append([i for _, batch in seen for i in batch])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(ds)))
    assert epochs[0] != epochs[1]  # drawn from (seed, epoch): another order (for this seed)


def test_a_fresh_reader_gives_the_batches_of_one_that_ran_from_the_start():
    ds = _dataset()
    ran = Batches(ds, 3, 1, 1, 0, LatentCache(None, torch.float32, enabled=False))  # 3 does not divide 4 images
    straight = [ran.indices(step, 0) for step in range(7)]
    resumed = Batches(ds, 3, 1, 1, 0, LatentCache(None, torch.float32, enabled=False))
    assert [resumed.indices(step, 0) for step in range(4, 7)] == straight[4:]


def test_cached_latents_do_not_depend_on_the_batch_that_brought_them(tiny_sd15):
    """A batched VAE encode differs from single ones in the last bits; the cache encodes each image alone, so a
    resumed run, whose first batches bring the images in another grouping, caches the same latents."""
    ds = _dataset()
    pixels = torch.stack([ds[i]["pixel_values"] for i in range(3)])
    keys = [("instance", i) for i in range(3)]
    together = LatentCache(tiny_sd15.vae, torch.float32, enabled=True)(pixels, keys)
    alone = LatentCache(tiny_sd15.vae, torch.float32, enabled=True)
    for i in (2, 0, 1):
        alone(pixels[i : i + 1], keys[i : i + 1])
    assert torch.equal(alone(pixels, keys), together)
