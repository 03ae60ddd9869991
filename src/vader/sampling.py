"""Rectified-flow sampling as Open-Sora v1.2 runs it, with VADER's backprop cutoff.

Steps before the cutoff run without autograd; steps at or after it keep the graph so the reward's
gradient reaches the LoRA weights through them (DRaFT-style truncated backprop). The sampler knows
nothing about rewards or training: it takes a denoiser and conditioning, returns latents.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vader.sharding import is_sharded
from vader.sizes import latent_num_frames

BASE_RESOLUTION = 512 * 512


def conditioning(
    batch: int, height: int, width: int, num_frames: int, fps: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """Open-Sora's size/fps conditioning, created in the run dtype as the reference does."""

    def full(value: float) -> Tensor:
        return torch.full((batch,), float(value), dtype=dtype, device=device)

    return {
        "height": full(height),
        "width": full(width),
        "num_frames": full(num_frames),
        "ar": full(height / width),
        "fps": full(fps if num_frames > 1 else 120),  # Open-Sora conditions still images on IMG_FPS
    }


def timestep_shift_ratio(height: Tensor, width: Tensor, num_frames: int, scale: float = 1.0) -> Tensor:
    """Open-Sora's resolution × length shift, in the dtype of the conditioning tensors.

    The reference uses `num_frames // 17 * 5` latent frames, which is 0 (a NaN schedule) for fewer than
    17 frames; the true latent count equals it for every multiple of 17 ('2s', '4s', ...) and is
    right everywhere else.
    """
    ratio_space = (height * width / BASE_RESOLUTION).sqrt()
    latent_frames = torch.full_like(height, float(latent_num_frames(num_frames)))
    return ratio_space * latent_frames.sqrt() * scale


def make_timesteps(
    num_steps: int,
    batch: int,
    *,
    num_timesteps: int = 1000,
    use_timestep_transform: bool = True,
    use_discrete_timesteps: bool = False,
    transform_scale: float = 1.0,
    cond: dict[str, Tensor] | None = None,
    num_frames: int = 1,
) -> list[Tensor]:
    """The descending schedule t_0 = 1000 > ... > t_{N-1} > 0, one [batch] fp32 tensor per step."""
    device = cond["height"].device if cond else None
    steps = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
    if use_discrete_timesteps:
        steps = [float(round(t)) for t in steps]
    out = [torch.full((batch,), t, dtype=torch.float32, device=device) for t in steps]
    if use_timestep_transform:
        if cond is None:
            raise ValueError("the timestep transform needs the size conditioning")
        ratio = timestep_shift_ratio(cond["height"], cond["width"], num_frames, transform_scale)
        out = [_shift(t / num_timesteps, ratio) * num_timesteps for t in out]
    return out


def _shift(t: Tensor, ratio: Tensor) -> Tensor:
    return ratio * t / (1 + (ratio - 1) * t)


@dataclass
class TextCondition:
    """Prompt embeddings [n, 1, L, C], their mask [n, L] and the null caption [n, 1, L, C] for CFG."""

    y: Tensor
    mask: Tensor
    y_null: Tensor


def sample(
    denoiser: nn.Module,
    z: Tensor,
    text: TextCondition,
    cond: dict[str, Tensor],
    timesteps: list[Tensor],
    *,
    cfg_scale: float,
    num_timesteps: int = 1000,
    cutoff: int | None = None,
    grad_checkpoint: bool = False,
    progress: Callable | None = None,
) -> Tensor:
    """Euler-integrate the rectified flow from noise `z` (t = 1000) to t = 0 with CFG.

    With `cutoff=None` no step records a graph. Otherwise steps `i >= cutoff` do; earlier steps run
    under `torch.no_grad()`, so their activations are never kept.
    """
    y = torch.cat([text.y, text.y_null], 0)
    steps = range(len(timesteps))
    for i in progress(steps) if progress else steps:
        keep_graph = cutoff is not None and i >= cutoff
        with torch.set_grad_enabled(keep_graph):
            v = guided_velocity(denoiser, z, timesteps[i], y, text.mask, cond, cfg_scale,
                                 grad_checkpoint and keep_graph)
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(timesteps[i])
            dt = (timesteps[i] - t_next) / num_timesteps
            z = z + v * dt.to(v.dtype)[:, None, None, None, None]
    return z


# Classifier-free guidance, one home for every backend: uncond + scale * (cond - uncond). GRPO trains with
# the unconditional branch detached, as Flow-GRPO does (its gradient is not the policy's): inside
# `uncond_detached()`, that branch gives no gradient (a separate call runs under no_grad).
_UNCOND_DETACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("uncond_detached", default=False)


@contextlib.contextmanager
def uncond_detached(enabled: bool = True) -> Iterator[None]:
    token = _UNCOND_DETACHED.set(enabled)
    try:
        yield
    finally:
        _UNCOND_DETACHED.reset(token)


def uncond_context() -> contextlib.AbstractContextManager:
    """Around a separate unconditional denoiser call: no_grad inside `uncond_detached()`."""
    return torch.no_grad() if _UNCOND_DETACHED.get() else contextlib.nullcontext()


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, scale: float | Tensor) -> Tensor:
    if _UNCOND_DETACHED.get():
        v_uncond = v_uncond.detach()
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(
    denoiser: nn.Module, z: Tensor, t: Tensor, y: Tensor, mask: Tensor, cond: dict[str, Tensor],
    cfg_scale: float, use_checkpoint: bool,
) -> Tensor:
    z_in = torch.cat([z, z], 0)
    t_in = torch.cat([t, t], 0)
    # Under sharding the blocks' own checkpoints bound the activations; a checkpoint around the whole
    # call would recompute every block inside backward, where FSDP2 keeps each gathered block whole until
    # its own backward: the whole model on every process again.
    if use_checkpoint and not is_sharded(denoiser):
        out = checkpoint(_call, denoiser, z_in, t_in, y, mask, cond, use_reentrant=False)
    else:
        out = _call(denoiser, z_in, t_in, y, mask, cond)
    # pred_sigma models return [v, sigma] along channels; only v drives the flow
    v = out[:, : z.shape[1]].float()
    v_cond, v_uncond = v.chunk(2, dim=0)
    return cfg_combine(v_uncond, v_cond, cfg_scale)


def _call(denoiser: nn.Module, z: Tensor, t: Tensor, y: Tensor, mask: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return denoiser(z, t, y=y, mask=mask, **cond)
