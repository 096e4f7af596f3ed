"""Training on a quantized base (QDoRA): it trains, resumes bit for bit, and writes a normal adapter file that
stock diffusers loads on the full-precision base."""

import json

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_dora.training.loop import Callbacks, train
from tests.training.test_loop import _cfg

QDORA = dict(
    quantize_base="nf4", train_text_encoder=True, max_train_steps=4, checkpointing_steps=2, use_in=["diffusers"]
)


def test_qdora_trains_resumes_exactly_and_its_file_loads_in_stock_diffusers_on_the_full_base(tmp_path):
    straight = train(_cfg(tmp_path / "a", **QDORA))
    stop_at_2 = Callbacks(
        should_stop=lambda: stop_at_2.steps >= 2, on_step=lambda s: setattr(stop_at_2, "steps", s.step)
    )
    stop_at_2.steps = 0
    halted = train(_cfg(tmp_path / "b", **QDORA), stop_at_2)
    assert halted.status == "stopped" and halted.steps == 2
    resumed = train({**_cfg(tmp_path / "b", **QDORA), "resume_from_checkpoint": "latest"})
    assert resumed.steps == 4
    a = load_file(str(straight.output_dir / "adapter.safetensors"))
    b = load_file(str(resumed.output_dir / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    path = straight.output_dir / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        ours_meta = json.loads(f.metadata()["dreambooth_dora"])
    assert ours_meta["quantized_base"]["method"] == "nf4"
    assert ours_meta["magnitudes"] == "re-derived for the full-precision base"

    from dreambooth_dora.adapters.io import load_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline

    ours, stock = load_pipeline("builtin:tiny-sd15"), load_pipeline("builtin:tiny-sd15")
    load_adapter(ours, path)
    stock.load_lora_weights(str(path))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    with torch.no_grad():
        x = ours("a photo of sks heart", generator=torch.Generator().manual_seed(0), **kw).images
        y = stock("a photo of sks heart", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(x - y).max() <= 1e-4
