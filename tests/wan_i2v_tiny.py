"""Tiny random Wan image-to-video checkpoints in the diffusers layout, for tests/test_wan_i2v.py: Wan2.1-I2V
(WanImageToVideoPipeline: a CLIP vision encoder, image cross-attention, 36 input channels) and Wan2.2-TI2V-5B
(WanPipeline with expand_timesteps and the Wan2.2 VAE's layout: z_dim 48, patchified 16x spatial).

Sizes are diffusers' own Wan test sizes, except: the VAE's base_dim is 16 (backend_tiny's reason), the I2V
transformer has added_kv_proj_dim (so the image tokens go through their own add_k_proj / add_v_proj, as in the
published 14B) and the text is 512 tokens long (diffusers' Wan attention splits the image tokens off a text of
512), and the TI2V VAE's latents_mean / latents_std are not 0 / 1 (so that their use is checked).
"""

from __future__ import annotations

from pathlib import Path

import torch
from backend_tiny import save_tiny_wan

I2V_TEXT_LENGTH = 512
I2V_SIZE = dict(height=32, width=32, num_frames=9)


def tiny_images(n: int = 2, size: tuple[int, int] = (48, 40), seed: int = 0):
    """`n` random RGB PIL images of (width, height) `size` (not the video's: the pipeline resizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB") for _ in range(n)]


def _text_parts(folder: Path):
    """backend_tiny's tokenizer and UMT5 (the same weights), loaded from a saved tiny T2V folder."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(save_tiny_wan(folder))
    return pipe.tokenizer, pipe.text_encoder


def save_tiny_wan_i2v(folder: str | Path) -> Path:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    tokenizer, text_encoder = _text_parts(folder.parent / f"{folder.name}-text")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=24,
    )
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, projection_dim=8, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, intermediate_size=16,
                                               patch_size=8))
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=encoder.eval(),
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(folder)
    return folder


def save_tiny_wan_ti2v(folder: str | Path) -> Path:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    folder = Path(folder)
    tokenizer, text_encoder = _text_parts(folder.parent / f"{folder.name}-text")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                           latents_mean=[(i % 5 - 2) * 0.05 for i in range(48)],
                           latents_std=[1.0 + (i % 3) * 0.25 for i in range(48)], dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True)
    pipe.save_pretrained(folder)
    return folder


def image_pipeline(folder: str | Path, expand_timesteps: bool = False):
    """diffusers' WanImageToVideoPipeline on a tiny folder (TI2V: its WanPipeline's parts, expand_timesteps)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if not expand_timesteps:
        pipe = WanImageToVideoPipeline.from_pretrained(folder)
    else:
        parts = WanPipeline.from_pretrained(folder)
        pipe = WanImageToVideoPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                                       transformer=parts.transformer, scheduler=parts.scheduler,
                                       expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_wan_i2v_a14b(folder: str | Path, i2v_folder: str | Path) -> Path:
    """A tiny Wan2.2-I2V-A14B layout: WanImageToVideoPipeline with two experts (boundary_ratio 0.9) of 36 input
    channels and no CLIP image encoder, the text parts and VAE of the tiny I2V folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    parts = WanImageToVideoPipeline.from_pretrained(i2v_folder)

    def expert(seed: int) -> WanTransformer3DModel:
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    pipe = WanImageToVideoPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=expert(1),
                                   transformer_2=expert(2), boundary_ratio=0.9)
    pipe.save_pretrained(folder)
    return Path(folder)
