"""A tiny random CogVideoX-5B-I2V style pipeline (CogVideoXImageToVideoPipeline) saved in the published
layout: diffusers' own I2V test sizes (transformer in_channels 8 = 4 latent + 4 image-latent channels,
rotary and learned positional embeddings of a 16 x 16 x 9-frame sample), the tiny T5 and VAE of
backend_tiny, and the 5B repos' scheduler config (CogVideoXDDIMScheduler, snr_shift_scale 1.0)."""

from __future__ import annotations

from pathlib import Path

import torch
from backend_tiny import TEXT_LENGTH

from vader.models.text import tiny_t5_tokenizer

SIZE, FRAMES = 16, 9  # the learned positional embedding fixes the size; 9 frames = 3 latent frames


def tiny_i2v_pipeline():
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(64)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=FRAMES, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, scaling_factor=0.7,
    )
    text_config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                           feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    return CogVideoXImageToVideoPipeline(tokenizer=tokenizer, text_encoder=T5EncoderModel(text_config), vae=vae,
                                         transformer=transformer, scheduler=scheduler)


def save_tiny_i2v(folder: str | Path) -> Path:
    tiny_i2v_pipeline().save_pretrained(folder)
    return Path(folder)


def random_images(count: int, seed: int = 0):
    """RGB PIL images of another size than the video's (the preprocessing resizes them)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(24, 20, 3, generator=gen) * 255).to(torch.uint8).numpy(), "RGB")
            for _ in range(count)]
