"""`decode_frame`: which output video frames the reward sees, and decoding exactly those.

Indices always refer to frames of the decoded video (0..num_frames-1), never to latent frames.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from vader.sizes import TIME_COMPRESSION

# The temporal VAE turns each 5-latent-frame chunk into 17 frames, front-padded to 20 and trimmed
# by 3: latent j of a chunk covers output frames up to 4*j - 3 + 3 (causal, 4x upsampling).
CHUNK_FRAMES = 17


def select_frames(mode: str, num_frames: int, rng: random.Random) -> list[int]:
    """Sorted, unique output-frame indices for a validated `decode_frame` value."""
    if mode == "-1":
        return [rng.randrange(num_frames)]
    if mode == "all":
        return list(range(num_frames))
    if mode == "alt":
        return list(range(0, num_frames, 2))
    if mode == "fml":
        return sorted({0, num_frames // 2, num_frames - 1})
    index = int(mode)
    if not 0 <= index < num_frames:
        raise ValueError(f"frame {index} outside 0..{num_frames - 1}")
    return [index]


def latent_index_of_frame(frame: int, micro_frame_size: int = CHUNK_FRAMES, num_frames: int | None = None) -> int:
    """The latent frame whose decoding produces output `frame` (its causal right edge).

    `num_frames` (the whole video's length) matters when the last chunk is shorter than
    `micro_frame_size`: that chunk is front-padded to a multiple of 4 by its own length.
    """
    chunk, within = divmod(frame, micro_frame_size)
    length = micro_frame_size if num_frames is None else min(micro_frame_size, num_frames - chunk * micro_frame_size)
    padding = (TIME_COMPRESSION - length % TIME_COMPRESSION) % TIME_COMPRESSION
    latents_per_chunk = -(-micro_frame_size // TIME_COMPRESSION)
    return chunk * latents_per_chunk + (within + padding) // TIME_COMPRESSION


def decode_selected(vae, z: Tensor, num_frames: int, frames: list[int], strategy: str = "exact") -> Tensor:
    """Pixels (nominally [-1, 1]; rewards clamp) of `frames` as [B, 3, len(frames), H, W], gradients flowing back to `z`.

    'exact' decodes the true output frames (only the temporal chunks that hold them, only those
    frames through the spatial decoder). 'latent' is the original VADER shortcut: each chosen frame's
    latent is decoded alone as a one-frame video — cheaper, but not the frame the full decode gives.
    """
    if strategy == "exact":
        return vae.decode(z, num_frames=num_frames, frames=frames)
    latents = [min(latent_index_of_frame(f, vae.micro_frame_size, num_frames), z.shape[2] - 1) for f in frames]
    return torch.cat([vae.decode_latent_frame(z, i) for i in latents], dim=2)
