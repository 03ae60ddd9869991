"""Config -> built models: the published Open-Sora v1.2 stack, or the offline `tiny` stack.

The tiny stack has the same structure as the real one (STDiT3 blocks, AutoencoderKL + temporal VAE,
T5 encoder) at toy sizes, randomly initialised from a seed, so every code path runs on a laptop CPU
with no download.

Published weights (`from_pretrained` = a hub id or a local folder in the hub's layout) are loaded by
`load_denoiser` / `load_vae`, the equivalents of Open-Sora's `STDiT3.from_pretrained` and
`VideoAutoencoderPipeline.from_pretrained`: the architecture is the preset's, then the checkpoint's
`config.json`, then the config's overrides; the weights load strictly (every key, every shape) and
straight into the target dtype and device (see `vader.models.loading`).

The spatial SDXL VAE (`PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers`) that Open-Sora's
`VideoAutoencoderPipeline` downloads while it is being built is *not* needed: its weights are inside
`hpcai-tech/OpenSora-VAE-v1.2`'s `model.safetensors` (keys `spatial_vae.module.*`), so that one repo
is the whole VAE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import T5Config

from vader.config import ModelConfig, TextEncoderConfig, VAEConfig
from vader.dtypes import parse_dtype
from vader.errors import VaderError
from vader.models.fp8 import FP8, check_fp8_support, quantize_linears
from vader.models.loading import (
    Checkpoint,
    cached_checkpoint,
    load_checkpoint,
    local_config,
    resolve_checkpoint,
)
from vader.models.stdit3 import STDiT3, STDiT3Config, stdit3_xl_2_config
from vader.models.text import T5TextEncoder, tiny_t5
from vader.models.vae import VideoVAE, VideoVAEConfig, opensora_vae_v1_2_config, tiny_vae_config
from vader.weights import MissingWeight, download_command, is_repo_id

TINY_T5_DIM = 32

# The published checkpoints of Open-Sora v1.2 (the defaults of ModelConfig / VAEConfig / TextEncoderConfig).
STDIT3_XL2_REPO = "hpcai-tech/OpenSora-STDiT-v3"
VAE_V1_2_REPO = "hpcai-tech/OpenSora-VAE-v1.2"
T5_XXL_REPO = "DeepFloyd/t5-v1_1-xxl"

# `DeepFloyd/t5-v1_1-xxl`'s encoder (4,762,310,656 parameters), for describing it without its config.json.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              is_encoder_decoder=False, tie_word_embeddings=False)


def torch_dtype(name: str) -> torch.dtype:
    """The dtype of the run's models and tensors for config `dtype`. With 'fp8' that is bf16: only the
    denoiser's Linear weights are stored in fp8 (see `denoiser_dtype`); VAE, rewards, activations,
    conditioning and everything else stay bf16."""
    if name == "fp8":
        check_fp8_support()
        return torch.bfloat16
    return parse_dtype("dtype", name)


def denoiser_dtype(name: str) -> torch.dtype:
    """What `build_denoiser` takes for config `dtype`: torch.float8_e4m3fn for 'fp8' (Linear weights in
    fp8, the rest bf16), else the same as `torch_dtype`."""
    dtype = torch_dtype(name)
    return FP8 if name == "fp8" else dtype  # type: ignore[return-value]


def attention_backend(cfg: ModelConfig) -> str:
    """The denoiser's attention kernels: `model.attention`, or 'sdpa' when the original's
    `enable_flash_attn=True` asks for fused attention (config validation refuses it with 'math')."""
    return "sdpa" if cfg.enable_flash_attn else cfg.attention


def _is_fp8(dtype: torch.dtype) -> bool:
    return FP8 is not None and dtype == FP8


def _only_denoiser_fp8(dtype: torch.dtype, what: str) -> None:
    if _is_fp8(dtype):
        raise VaderError(f"fp8 weights are for the denoiser only; load the {what} in torch.bfloat16 "
                         "(dtype='fp8' keeps it in bf16)")


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


def tiny_stdit3_config(caption_channels: int = TINY_T5_DIM, model_max_length: int = 16) -> STDiT3Config:
    return STDiT3Config(hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0, caption_channels=caption_channels,
                        model_max_length=model_max_length)


def _stdit3_config(values: dict[str, Any], overrides: dict[str, Any], source: str) -> STDiT3Config:
    known = {f.name for f in dataclasses.fields(STDiT3Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise VaderError(f"model overrides {unknown} are not STDiT3 settings; valid: {', '.join(sorted(known))}")
    try:
        return STDiT3Config.from_dict({**values, **overrides})
    except (TypeError, ValueError) as exc:
        raise VaderError(f"STDiT3 config from {source}: {exc}") from None


def denoiser_config(cfg: ModelConfig, caption_channels: int, model_max_length: int,
                    published: dict[str, Any] | None = None) -> STDiT3Config:
    """The denoiser's architecture: preset (type), then the checkpoint's config.json, then overrides.

    The result must take the text encoder's captions (caption_channels x model_max_length), as the
    reference passes both to `STDiT3.from_pretrained`; a mismatch is a one-line VaderError.
    """
    if cfg.type == "STDiT3-tiny":
        base = tiny_stdit3_config(caption_channels, model_max_length)
    else:
        base = dataclasses.replace(stdit3_xl_2_config(), caption_channels=caption_channels,
                                   model_max_length=model_max_length)
    base.qk_norm = cfg.qk_norm
    config = _stdit3_config({**base.to_dict(), **(published or {})}, cfg.overrides,
                            cfg.from_pretrained or cfg.type)
    if (config.caption_channels, config.model_max_length) != (caption_channels, model_max_length):
        source = f"model.from_pretrained={cfg.from_pretrained!r}" if published else f"model.type={cfg.type!r}"
        raise VaderError(
            f"{source} takes captions of {config.caption_channels} channels x {config.model_max_length} tokens, "
            f"but the text encoder gives {caption_channels} x {model_max_length}; set text_encoder.type / "
            "text_encoder.model_max_length to match (Open-Sora v1.2: T5-XXL, 4096 x 300)"
        )
    return config


def vae_config(cfg: VAEConfig, published: dict[str, Any] | None = None) -> VideoVAEConfig:
    """The VAE's architecture: preset (type), then the checkpoint's config.json; chunking from `cfg`.

    The hub's config.json (`vae_2d` / `vae_temporal` sections) only names registry types with a fixed
    architecture, so from it only `shift` / `scale` are taken; a config.json in our own layout
    (`VideoVAEConfig.to_dict()`: `spatial`, `temporal`, ...) describes the whole architecture.
    """
    base = tiny_vae_config() if cfg.type.endswith("-tiny") else opensora_vae_v1_2_config()
    if published:
        if "vae_2d" in published or "vae_temporal" in published:
            published = {k: published[k] for k in ("shift", "scale") if k in published}
        try:
            base = VideoVAEConfig.from_dict({**base.to_dict(), **published})
        except (TypeError, ValueError) as exc:
            raise VaderError(f"VAE config from {cfg.from_pretrained}: {exc}") from None
    return dataclasses.replace(base, micro_frame_size=cfg.micro_frame_size, micro_batch_size=cfg.micro_batch_size)


def text_encoder_config(cfg: TextEncoderConfig) -> T5Config:
    """The T5 encoder's config with no download: the checkpoint's own if it is on this machine
    (folder or HF cache), else T5-XXL's for type 't5' and the tiny one for 't5-tiny'."""
    if cfg.type == "t5-tiny" and not cfg.from_pretrained:
        return tiny_t5(d_model=TINY_T5_DIM, model_max_length=cfg.model_max_length).model.config  # ms to build
    published = local_config(cfg.from_pretrained)
    if published.get("model_type") == "t5":
        return T5Config.from_dict(published)
    return T5Config(**T5_XXL)


# ---------------------------------------------------------------------------------------------
# Loading published weights (the `from_pretrained` entry points)
# ---------------------------------------------------------------------------------------------


def load_denoiser(name_or_path: str = STDIT3_XL2_REPO, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", overrides: dict[str, Any] | None = None, *,
                  base: STDiT3Config | None = None, attention: str = "sdpa") -> STDiT3:
    """`STDiT3.from_pretrained`: a hub id or folder -> frozen STDiT3 in `dtype` on `device`.

    Architecture: `base` (default XL/2), then the checkpoint's config.json, then `overrides`.
    dtype=torch.float8_e4m3fn stores the Linear weights in fp8 and everything else in bf16.
    """
    checkpoint = resolve_checkpoint(name_or_path, "model.from_pretrained")
    config = _stdit3_config({**(base or stdit3_xl_2_config()).to_dict(), **checkpoint.config}, overrides or {},
                            name_or_path)
    model = _load_denoiser(config, checkpoint, dtype, device)
    model.set_attention_backend(attention)
    return model


def load_vae(name_or_path: str = VAE_V1_2_REPO, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", overrides: dict[str, Any] | None = None, *,
             base: VideoVAEConfig | None = None) -> VideoVAE:
    """`VideoAutoencoderPipeline.from_pretrained`: a hub id or folder -> frozen VideoVAE in `dtype` on `device`.

    Architecture: `base` (default v1.2), then the checkpoint's config.json, then `overrides`
    (VideoVAEConfig fields, e.g. micro_batch_size). One repo holds the spatial and temporal weights.
    """
    _only_denoiser_fp8(dtype, "VAE")
    checkpoint = resolve_checkpoint(name_or_path, "vae.from_pretrained")
    published = dict(checkpoint.config)
    if "vae_2d" in published or "vae_temporal" in published:
        published = {k: published[k] for k in ("micro_frame_size", "shift", "scale") if k in published}
    known = {f.name for f in dataclasses.fields(VideoVAEConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise VaderError(f"VAE overrides {unknown} are not VideoVAEConfig settings; valid: {', '.join(sorted(known))}")
    try:
        config = VideoVAEConfig.from_dict({**(base or opensora_vae_v1_2_config()).to_dict(), **published,
                                           **(overrides or {})})
    except (TypeError, ValueError) as exc:
        raise VaderError(f"VAE config from {name_or_path}: {exc}") from None
    return _load_vae(config, checkpoint, dtype, device)


def _load_denoiser(config: STDiT3Config, checkpoint: Checkpoint, dtype: torch.dtype,
                   device: torch.device | str) -> STDiT3:
    if _is_fp8(dtype):
        # Loaded in bf16, then each Linear is quantised in turn: the peak is the bf16 model.
        return _to_fp8(load_checkpoint(lambda: STDiT3(config), checkpoint, torch.bfloat16, device))
    return _freeze(load_checkpoint(lambda: STDiT3(config), checkpoint, dtype, device))


def _to_fp8(model: STDiT3) -> STDiT3:
    """Linear weights -> fp8 (quantised from the model's current dtype), every other weight -> bf16."""
    quantize_linears(_freeze(model), compute_dtype=torch.bfloat16)
    return _freeze(model.to(torch.bfloat16))


def _load_vae(config: VideoVAEConfig, checkpoint: Checkpoint, dtype: torch.dtype,
              device: torch.device | str) -> VideoVAE:
    return _freeze(load_checkpoint(lambda: VideoVAE(config), checkpoint, dtype, device))


# ---------------------------------------------------------------------------------------------
# Building from the run config
# ---------------------------------------------------------------------------------------------


def build_denoiser(cfg: ModelConfig, caption_channels: int, model_max_length: int, dtype: torch.dtype,
                   device: torch.device) -> STDiT3:
    """The frozen denoiser in `dtype` (`denoiser_dtype(config dtype)`: torch.float8_e4m3fn = fp8 Linear
    weights, the rest bf16) with the attention kernels `model.attention` selects."""
    if cfg.from_pretrained:
        checkpoint = resolve_checkpoint(cfg.from_pretrained, "model.from_pretrained")
        config = denoiser_config(cfg, caption_channels, model_max_length, checkpoint.config)
        model = _load_denoiser(config, checkpoint, dtype, device)
    else:
        config = denoiser_config(cfg, caption_channels, model_max_length)
        model = STDiT3(config)
        # Random weights (tiny preset, benchmarks): N(0, 1/sqrt(hidden)) everywhere, not the reference's
        # zero-init, so that every LoRA target changes the output and receives a reward gradient.
        model.init_weights(std=config.hidden_size**-0.5)
        if _is_fp8(dtype):
            model = _to_fp8(model.to(device=device))
        else:
            model = _freeze(model.to(device=device, dtype=dtype))
    model.set_attention_backend(attention_backend(cfg))
    return model


def build_vae(cfg: VAEConfig, dtype: torch.dtype, device: torch.device) -> VideoVAE:
    _only_denoiser_fp8(dtype, "VAE")
    if cfg.from_pretrained:
        checkpoint = resolve_checkpoint(cfg.from_pretrained, "vae.from_pretrained")
        return _load_vae(vae_config(cfg, checkpoint.config), checkpoint, dtype, device)
    return _freeze(VideoVAE(vae_config(cfg)).to(device=device, dtype=dtype))


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device) -> T5TextEncoder:
    # T5 runs in fp32 as in Open-Sora; it only runs once per prompt (embeddings are cached)
    if cfg.type == "t5-tiny" and not cfg.from_pretrained:
        return tiny_t5(d_model=TINY_T5_DIM, model_max_length=cfg.model_max_length, device=device)
    if not cfg.from_pretrained:
        raise VaderError("text_encoder.from_pretrained is None: the t5 text encoder needs weights "
                         "(use text_encoder.type='t5-tiny' for a random tiny encoder)")
    return T5TextEncoder.from_pretrained(cfg.from_pretrained, model_max_length=cfg.model_max_length, device=device)


def missing_model_weights(model: ModelConfig, vae: VAEConfig, text_encoder: TextEncoderConfig) -> list[MissingWeight]:
    """Every denoiser / VAE / T5 checkpoint the config names that cannot load without network.

    Never touches the network: a hub id counts as present when its weights are in the Hugging Face
    cache; a local path must exist and hold weights. Whether a missing hub checkpoint is an error
    (offline, hub unreachable) or a download to come is the caller's decision (`vader.preflight`).
    """
    out: list[MissingWeight] = []
    for key, source in (("model.from_pretrained", model.from_pretrained), ("vae.from_pretrained", vae.from_pretrained),
                        ("text_encoder.from_pretrained", text_encoder.from_pretrained)):
        if not source:
            continue
        local = Path(source).expanduser()
        if local.exists() or not is_repo_id(source):
            try:
                resolve_checkpoint(source, what=key)  # a local path: no network call
            except VaderError as exc:
                out.append(MissingWeight(key, source, problem=str(exc)))
            continue
        if cached_checkpoint(source) is None:
            out.append(MissingWeight(key, source, fetch=download_command(source)))
    return out


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()
