"""`decode_frame`: which frames the reward sees, and decoding exactly those.

What an index means depends on `decode_strategy`:
- 'exact': frames of the decoded video (0..num_frames-1); each is the frame the full decode gives.
- 'latent': latent frames (0..latent_frames-1), each decoded alone as a one-frame video. This is
  the original VADER's meaning: its `decode_frame='N'` sliced latent frame N and its '-1' drew a
  latent frame uniformly.

The frame/latent geometry is the VAE's (`VideoVAEConfig`); nothing here redefines it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from vader.sizes import MICRO_FRAME_SIZE, latent_num_frames

if TYPE_CHECKING:  # torch and the VAE stay unimported: config validation calls max_decode_index
    from torch import Tensor

    from vader.models.vae import VideoVAE, VideoVAEConfig

STRATEGIES = ("exact", "latent")


def decode_choices(strategy: str, num_frames: int, vae: VideoVAE | VideoVAEConfig | None = None) -> int:
    """How many indices `decode_frame` chooses among: output frames ('exact') or latent frames ('latent').

    `vae` (a model or its config) gives the geometry; None means the published Open-Sora v1.2 VAE.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decode_strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "exact":
        return num_frames
    if vae is None:
        return latent_num_frames(num_frames)
    return getattr(vae, "config", vae).latent_frames(num_frames)


def max_decode_index(strategy: str, num_frames: int, micro_frame_size: int = MICRO_FRAME_SIZE) -> int:
    """The largest valid `decode_frame='N'`, for config validation before any model is built:
    num_frames - 1 with 'exact', latent frames - 1 with 'latent' (chunks of `micro_frame_size`)."""
    if strategy == "latent":
        return latent_num_frames(num_frames, micro_frame_size) - 1
    return decode_choices(strategy, num_frames) - 1


CLIP_DECODE_FRAMES = ("all", "alt", "fml")  # the modes that decode several frames (a clip)


def select_frames(
    mode: str,
    num_frames: int,
    rng: random.Random,
    strategy: str = "exact",
    vae: VideoVAE | VideoVAEConfig | None = None,
) -> list[int]:
    """Sorted, unique indices for a validated `decode_frame` value: output frames with 'exact', latent
    frames with 'latent' (see the module docstring)."""
    count = decode_choices(strategy, num_frames, vae)
    if mode == "-1":
        return [rng.randrange(count)]
    if mode == "all":
        return list(range(count))
    if mode == "alt":
        return list(range(0, count, 2))
    if mode == "fml":
        return sorted({0, count // 2, count - 1})
    index = int(mode)
    if not 0 <= index < count:
        unit = "frames" if strategy == "exact" else "latent frames"
        raise ValueError(f"decode_frame={mode!r} is outside the {unit} 0..{count - 1}")
    return [index]


def decode_selected(vae: VideoVAE, z: Tensor, num_frames: int, frames: list[int], strategy: str = "exact") -> Tensor:
    """Pixels (nominally [-1, 1]; rewards clamp) of `frames` as [B, 3, len(frames), H, W], gradients flowing back to `z`.

    'exact': `frames` are output frames; only the temporal chunks that hold them are decoded and only
    those frames go through the spatial decoder. 'latent': `frames` are latent frames, each decoded on
    its own (the original's shortcut: cheaper, but not a frame the full decode gives).
    """
    if strategy == "exact":
        return vae.decode(z, num_frames=num_frames, frames=frames)
    if strategy != "latent":
        raise ValueError(f"unknown decode_strategy {strategy!r}; expected one of {STRATEGIES}")
    import torch

    return torch.cat([vae.decode_latent_frame(z, i) for i in frames], dim=2)
