"""Video-model backends beside Open-Sora v1.2: Wan2.1 and CogVideoX through diffusers.

Each backend offers the surface `vader.video.VideoGenerator` gives the training loop (`VideoBackend`
below), so the loop, the cutoff, the rewards and the checkpoints work on any of them. A backend is
named by `model.type`; `backend_class(name)` imports it only when asked (diffusers is heavy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from vader.errors import VaderError

BACKENDS: dict[str, tuple[str, str, str]] = {
    # name: (module, generator class, settings class)
    "wan": ("vader.backends.wan", "WanGenerator", "WanSettings"),
    "cogvideox": ("vader.backends.cogvideox", "CogVideoXGenerator", "CogVideoXSettings"),
}


@runtime_checkable
class VideoBackend(Protocol):
    """What the training loop uses of a text-to-video model."""

    denoiser: nn.Module  # where the LoRA goes
    vae: nn.Module
    device: torch.device
    dtype: torch.dtype
    lora_target_modules: list[str]

    @property
    def num_frames(self) -> int: ...

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents."""
        ...

    def encode_prompts(self, prompts: list[str], cache=None) -> None:
        """Encode every new prompt once (cached per prompt)."""
        ...

    def release_text_encoder(self) -> None: ...

    def reward_prompts(self, prompts: list[str]) -> list[str]: ...

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W]; gradients only through sampling steps >= cutoff (None: none)."""
        ...

    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1]: all output frames, or only `frames`, decoding only what they
        need; `grad_checkpoint`: the VAE's own activation checkpointing where it has one."""
        ...

    def generate(self, prompts: list[str], generator: torch.Generator, progress: Callable | None = None) -> Tensor:
        ...

    def save_lora_diffusers(self, lora: nn.Module | dict[str, Tensor], folder: str | Path, config=None) -> Path:
        ...


# text_encoder.model_max_length's default, Open-Sora's T5 length: for a backend it means "the pipeline's own"
OPENSORA_TEXT_LENGTH = 300


def settings_from_config(cfg) -> object:
    """The backend settings (WanSettings / CogVideoXSettings) a `VaderConfig` with a backend
    model.type describes; the one place config keys map to backend fields:

    model.from_pretrained -> pretrained; vae/text_encoder.from_pretrained -> vae/text_encoder (None: the
    pipeline's own); image_size -> height, width; num_frames; scheduler.num_sampling_steps -> num_steps;
    scheduler.cfg_scale -> guidance_scale; negative_prompt (None: the settings' default);
    text_encoder.model_max_length -> max_sequence_length (300: the settings' default); dtype -> dtype
    (and the VAE's dtype for CogVideoX; Wan's VAE stays fp32 as diffusers' Wan examples load it);
    scheduler.shift -> shift (wan); scheduler.use_dynamic_cfg (cogvideox). Not validated here: call
    `.validate()` (config validation does)."""
    name = cfg.model.type
    cls = settings_class(name)
    height, width = cfg.height_width
    values: dict[str, object] = dict(
        pretrained=cfg.model.from_pretrained, vae=cfg.vae.from_pretrained,
        text_encoder=cfg.text_encoder.from_pretrained,
        dtype=cfg.dtype, height=height, width=width, num_frames=cfg.frames,
        num_steps=cfg.scheduler.num_sampling_steps, guidance_scale=float(cfg.scheduler.cfg_scale),
    )
    if cfg.text_encoder.model_max_length != OPENSORA_TEXT_LENGTH:
        values["max_sequence_length"] = cfg.text_encoder.model_max_length
    if cfg.negative_prompt is not None:
        values["negative_prompt"] = cfg.negative_prompt
    if name == "wan":
        if cfg.scheduler.shift is not None:
            values["shift"] = float(cfg.scheduler.shift)
    else:
        values["vae_dtype"] = cfg.dtype
        values["use_dynamic_cfg"] = bool(cfg.scheduler.use_dynamic_cfg)
    return cls(**values)


def _entry(name: str) -> tuple[str, str, str]:
    if name not in BACKENDS:
        raise VaderError(f"model.type={name!r} is not a diffusers backend; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_module(name: str):
    """The module of backend `name` (its `missing_weights`, `meta_models`, ...)."""
    return importlib.import_module(_entry(name)[0])


def backend_class(name: str) -> type:
    """The generator class of backend `name` (e.g. 'wan' -> WanGenerator)."""
    module, cls, _ = _entry(name)
    return getattr(importlib.import_module(module), cls)


def settings_class(name: str) -> type:
    """The settings dataclass of backend `name` (e.g. 'wan' -> WanSettings)."""
    module, _, cls = _entry(name)
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "VideoBackend", "backend_class", "backend_module", "settings_class", "settings_from_config"]
