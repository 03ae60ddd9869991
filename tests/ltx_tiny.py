"""A tiny random LTXPipeline saved in the published layout, for the LTX-Video backend tests.

Sizes are diffusers' own LTX test sizes (tests/pipelines/ltx/test_ltx.py: 1 transformer layer, 8 latent
channels, a 8-wide VAE with one layer per block) except the VAE's compression, kept at the published 32x
spatial / 8x temporal (patch_size 4, three spatio-temporal scalings) so that a tiny run passes the same size
rules (multiples of 32, 8k + 1 frames) as the published 2B: 64 x 64 x 17 frames are latents 2 x 2 x 3.
The builder seeds torch itself, so a folder holds the same weights whenever it is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from backend_tiny import tiny_config_text

from vader.models.text import tiny_t5_tokenizer

TEXT_LENGTH = 16
SIZE = 64
FRAMES = 17  # 3 latent frames: frame 0 <- latent 0, frames 1-8 <- latent 1, frames 9-16 <- latent 2
# the scheduler LTXPipeline's published repo ships (dynamic shifting, shift_terminal)
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                 max_image_seq_len=4096, shift_terminal=0.1)


def tiny_ltx_pipeline(decoder_causal: bool = False, timestep_conditioning: bool = False):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(64)
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=timestep_conditioning,
        patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=decoder_causal,
    )
    # non-trivial latent statistics, so that the (de)normalisation is exercised
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, 8))
    vae.latents_std.copy_(torch.linspace(0.5, 1.5, 8))
    text_config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                           feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                       text_encoder=T5EncoderModel(text_config), tokenizer=tokenizer, transformer=transformer)


def save_tiny_ltx(folder: str | Path, **variant: Any) -> Path:
    tiny_ltx_pipeline(**variant).save_pretrained(folder)
    return Path(folder)


def ltx_config_text(folder: str | Path, **keys: Any) -> str:
    """A config file for a short CPU training run of model.type 'ltx' on `folder`: backend_tiny's tiny run
    (Wan's keys replaced by LTX's sizes and scheduler); `keys` override or add top-level keys."""
    values: dict[str, Any] = dict(model=dict(type="ltx", from_pretrained=str(folder)), image_size=(SIZE, SIZE),
                                  num_frames=FRAMES, decode_frame="fml",
                                  scheduler=dict(num_sampling_steps=3, cfg_scale=3.0))
    values.update(keys)
    return tiny_config_text("wan", folder, **values)
