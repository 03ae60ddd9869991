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

    def decode(self, latents: Tensor, frames: list[int] | None = None) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1]: all output frames, or only `frames`, decoding only what they need."""
        ...

    def generate(self, prompts: list[str], generator: torch.Generator, progress: Callable | None = None) -> Tensor:
        ...

    def save_lora_diffusers(self, lora: nn.Module | dict[str, Tensor], folder: str | Path, config=None) -> Path:
        ...


def _entry(name: str) -> tuple[str, str, str]:
    if name not in BACKENDS:
        raise VaderError(f"model.type={name!r} is not a diffusers backend; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_class(name: str) -> type:
    """The generator class of backend `name` (e.g. 'wan' -> WanGenerator)."""
    module, cls, _ = _entry(name)
    return getattr(importlib.import_module(module), cls)


def settings_class(name: str) -> type:
    """The settings dataclass of backend `name` (e.g. 'wan' -> WanSettings)."""
    module, _, cls = _entry(name)
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "VideoBackend", "backend_class", "settings_class"]
