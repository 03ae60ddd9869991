"""Reward-hacking guards: diversity across seeds, motion and temporal consistency of videos.

A reward can rise for the wrong reasons: every seed of a prompt turning into the same video, frozen
motion, flicker. The guards measure those on the videos a run or `vader eval` generated, for the base
model and the LoRA on the same prompts and seeds, and flag a guard that fell by more than guard_drop
(a fraction of the base value) while the reward rose.

    guards(videos_by_prompt)      -> {"motion": .., "temporal_consistency": .., "diversity": ..}
    guards_of_rows(rows)          the same for (prompt, video, score) rows, grouped by prompt
    guard_drops(base, lora, drop) -> ["motion 0.05 → 0", ...]: the guards that fell
    guard_warning(rose, fallen, drop, look_at) -> the one-line warning text

A bottom-layer module: torch and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

GUARD_NAMES = ("motion", "temporal_consistency", "diversity")  # the order tables and plots show them in
EMBED_SIZE = 8  # diversity embedding: the frame-mean video pooled to 8x8 pixels (3·8·8 = 192 numbers)


def _embed(videos: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, H, W] -> [N, D]: the mean frame pooled to EMBED_SIZE² pixels.

    A cheap fixed embedding, not the paper's learned features: it sees layout and colour, so it falls
    when a LoRA makes every seed of a prompt look alike, but not semantic sameness under new colours."""
    mean_frame = videos.float().mean(dim=2)
    size = (min(EMBED_SIZE, mean_frame.shape[-2]), min(EMBED_SIZE, mean_frame.shape[-1]))
    return F.adaptive_avg_pool2d(mean_frame, size).flatten(1)


def diversity(videos_by_prompt: Sequence[torch.Tensor]) -> float:
    """Mean over prompts of the variance across seeds of the embedding (mean over its dimensions);
    each element is one prompt's videos [S, 3, F, H, W]. 0 when every seed gives the same video;
    prompts with a single seed are left out."""
    per_prompt = [_embed(v).var(dim=0, unbiased=False).mean().item() for v in videos_by_prompt if v.shape[0] > 1]
    if not per_prompt:
        raise ValueError("diversity needs at least one prompt with two or more seeds")
    return math.fsum(per_prompt) / len(per_prompt)


def motion(videos: torch.Tensor) -> float:
    """Mean absolute difference of consecutive frames ([N, 3, F, H, W] in [-1, 1]); 0 for frozen videos."""
    v = videos.float()
    if v.shape[2] < 2:
        raise ValueError("motion needs videos of two or more frames")
    return (v[:, :, 1:] - v[:, :, :-1]).abs().mean().item()


def temporal_consistency(videos: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' flattened pixels (shifted to [0, 2] so that a
    black frame is not a zero vector); 1 for frozen videos, lower for flicker and jumps."""
    v = videos.float()
    if v.shape[2] < 2:
        raise ValueError("temporal_consistency needs videos of two or more frames")
    frames = (v + 1).transpose(1, 2).flatten(2)  # [N, F, 3·H·W]
    return F.cosine_similarity(frames[:, 1:], frames[:, :-1], dim=-1, eps=1e-8).mean().item()


def guards(videos_by_prompt: Sequence[torch.Tensor]) -> dict[str, float]:
    """motion and temporal_consistency over all videos, and diversity when a prompt has two or more
    seeds; each element is one prompt's videos [S, 3, F, H, W] (two or more frames)."""
    everything = torch.cat(list(videos_by_prompt))
    out = {"motion": motion(everything), "temporal_consistency": temporal_consistency(everything)}
    if any(v.shape[0] > 1 for v in videos_by_prompt):
        out["diversity"] = diversity(videos_by_prompt)
    return out


def group_by_prompt(rows: Sequence) -> list[torch.Tensor]:
    """(prompt, video [3, F, H, W], score) rows -> one stack [S, 3, F, H, W] per prompt, in the order
    each prompt first appears (videos as float)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for prompt, video, _ in rows:
        groups.setdefault(prompt, []).append(video.float())
    return [torch.stack(v) for v in groups.values()]


def guards_of_rows(rows: Sequence) -> dict[str, float]:
    """The guards of (prompt, video, score) rows, videos grouped by prompt; {} when there are no rows
    or a video has a single frame (no motion to guard)."""
    if not rows or min(v.shape[1] for _, v, _ in rows) < 2:
        return {}
    return guards(group_by_prompt(rows))


def guard_drops(base: dict[str, float], lora: dict[str, float], drop: float) -> list[str]:
    """Guards that fell by more than `drop` (a fraction of the base value), as 'name base → lora';
    a guard missing on either side, or not positive for the base, is not compared."""
    return [f"{k} {base[k]:.4g} → {lora[k]:.4g}" for k in GUARD_NAMES
            if k in base and k in lora and base[k] > 0 and lora[k] < (1 - drop) * base[k]]


def guard_warning(rose: str, fallen: Sequence[str], guard_drop: float, look_at: str | Path) -> str:
    """The one-line warning for a reward that rose (`rose` says how) while the `fallen` guards (from
    guard_drops) fell by more than guard_drop."""
    return (f"warning: {rose} while {'; '.join(fallen)} fell by more than guard_drop={guard_drop:g}: "
            f"possible reward hacking, look at {look_at}")


__all__ = ["EMBED_SIZE", "GUARD_NAMES", "diversity", "group_by_prompt", "guard_drops", "guard_warning", "guards",
           "guards_of_rows", "motion", "temporal_consistency"]
