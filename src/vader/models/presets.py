"""Config -> built models: the published Open-Sora v1.2 stack, or the offline `tiny` stack.

The tiny stack has the same structure as the real one (STDiT3 blocks, AutoencoderKL + temporal VAE,
T5 encoder) at toy sizes, randomly initialised from a seed, so every code path runs on a laptop CPU
with no download.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vader.config import ModelConfig, TextEncoderConfig, VAEConfig
from vader.errors import VaderError
from vader.models.loading import load_strict, read_config, read_state_dict, resolve_weights
from vader.models.stdit3 import STDiT3, STDiT3Config, stdit3_xl_2_config
from vader.models.text import T5TextEncoder, tiny_t5
from vader.models.vae import VideoVAE, VideoVAEConfig, opensora_vae_v1_2_config, tiny_vae_config

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_T5_DIM = 32


def torch_dtype(name: str) -> torch.dtype:
    if name == "fp8":
        raise VaderError("dtype='fp8' is not supported for model weights in this version; use 'bf16' "
                         "(recommended for 240p/360p), 'fp16' or 'fp32'")
    return TORCH_DTYPES[name]


def tiny_stdit3_config(caption_channels: int = TINY_T5_DIM, model_max_length: int = 16) -> STDiT3Config:
    return STDiT3Config(hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0, caption_channels=caption_channels,
                        model_max_length=model_max_length)


def denoiser_config(cfg: ModelConfig, caption_channels: int, model_max_length: int) -> STDiT3Config:
    if cfg.type == "STDiT3-tiny":
        base = tiny_stdit3_config(caption_channels, model_max_length)
    else:
        base = stdit3_xl_2_config()
    base.qk_norm = cfg.qk_norm
    try:
        return dataclasses.replace(base, **cfg.overrides) if cfg.overrides else base
    except TypeError as exc:
        raise VaderError(f"model overrides {cfg.overrides}: {exc}") from None


def build_denoiser(cfg: ModelConfig, caption_channels: int, model_max_length: int, dtype: torch.dtype,
                   device: torch.device) -> STDiT3:
    config = denoiser_config(cfg, caption_channels, model_max_length)
    if cfg.from_pretrained:
        config_path, weights = resolve_weights(cfg.from_pretrained)
        published = read_config(config_path)
        if published:
            config = STDiT3Config.from_dict({**config.to_dict(), **published, **cfg.overrides})
        model = STDiT3(config)
        load_strict(model, read_state_dict(weights, dtype), cfg.from_pretrained)
    else:
        model = STDiT3(config)
        # Random weights (tiny preset, benchmarks): N(0, 1/sqrt(hidden)) everywhere, not the reference's
        # zero-init, so that every LoRA target changes the output and receives a reward gradient.
        model.init_weights(std=config.hidden_size**-0.5)
    return _freeze(model.to(device=device, dtype=dtype))


def build_vae(cfg: VAEConfig, dtype: torch.dtype, device: torch.device) -> VideoVAE:
    config = tiny_vae_config() if cfg.type.endswith("-tiny") else opensora_vae_v1_2_config()
    config = dataclasses.replace(config, micro_frame_size=cfg.micro_frame_size, micro_batch_size=cfg.micro_batch_size)
    if cfg.from_pretrained:
        config_path, weights = resolve_weights(cfg.from_pretrained)
        published = read_config(config_path)
        if published:
            config = VideoVAEConfig.from_dict({**config.to_dict(), **published})
        model = VideoVAE(config)
        load_strict(model, read_state_dict(weights, dtype), cfg.from_pretrained)
    else:
        model = VideoVAE(config)
    return _freeze(model.to(device=device, dtype=dtype))


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device) -> T5TextEncoder:
    # T5 runs in fp32 as in Open-Sora; it only runs once per prompt (embeddings are cached)
    if cfg.type == "t5-tiny" and not cfg.from_pretrained:
        return tiny_t5(d_model=TINY_T5_DIM, model_max_length=cfg.model_max_length, device=device)
    if not cfg.from_pretrained:
        raise VaderError("text_encoder.from_pretrained is None: the t5 text encoder needs weights "
                         "(use text_encoder.type='t5-tiny' for a random tiny encoder)")
    return T5TextEncoder.from_pretrained(cfg.from_pretrained, model_max_length=cfg.model_max_length, device=device)


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()
