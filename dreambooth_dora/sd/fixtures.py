"""Tiny random Stable Diffusion pipelines (SD1.5 and SDXL layouts) built from config, no download.

Same classes and block structure as the real models, in miniature, so every code path (adapter
injection, training, saving, generation) is the real one while a CPU runs it in milliseconds.
Weights come from a private seeded RNG: every call returns identical weights and the caller's
global torch RNG is left untouched.

Both pipelines take 64x64 images: the VAE has four levels (scale factor 8, as in the real models),
so latents are 4x8x8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreambooth_dora.sd.vocab import TOKENIZER_DIR

SEED = 0
TEXT_HIDDEN = 32  # hidden size of every tiny text encoder
MAX_TOKENS = 77  # CLIP's context length; prompts pad/truncate to it as with the real models
# SD1.5/SDXL training noise schedule (the real models' scheduler_config.json).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run module construction under a fixed seed without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The shipped CLIP tokenizer. SDXL's second tokenizer pads with ``"!"`` (OpenCLIP pads with id 0)."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS, pad_token=pad_token)


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=TEXT_HIDDEN,  # used by CLIPTextModelWithProjection (SDXL's pooled embedding)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is read at the first EOS position
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    # Four levels -> 2**3 = 8x downsampling, the real models' vae_scale_factor.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def build_tiny_sd15(seed: int = SEED) -> StableDiffusionPipeline:
    """SD1.5 layout: one CLIP text encoder, conv attention projections, epsilon prediction, PNDM."""
    tokenizer = load_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=2,  # diffusers' name for the number of heads in SD1.x configs
        )
        vae = _vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(
        **NOISE_SCHEDULE, prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1
    )
    return assemble_sd(vae, text_encoder, tokenizer, unet, scheduler)


def assemble_sd(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """An SD1.x-layout pipeline from its parts, in eval mode, without the safety checker."""
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = SEED) -> StableDiffusionXLPipeline:
    """SDXL layout: two text encoders (CLIP + projected CLIP), size/crop conditioning, Euler scheduler."""
    tokenizer, tokenizer_2 = load_tokenizer(), load_tokenizer(pad_token="!")
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            # The two encoders' penultimate hidden states are concatenated: 32 + 32.
            cross_attention_dim=2 * TEXT_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 size/crop numbers embedded at 8 dims each + text_encoder_2's pooled projection.
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
        )
        vae = _vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        **NOISE_SCHEDULE, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        add_watermarker=False,
    )
