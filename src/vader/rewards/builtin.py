"""Rewards that need no weights, so the offline tiny preset can train end to end."""

from __future__ import annotations

import torch
from torch import Tensor

from vader.rewards.base import Reward, RewardOutput


class Colorfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness on [0, 1] pixels, made differentiable.

    M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²), with rg = R − G and yb = (R + G)/2 − B.
    Range: 0 for grey images; about 0.1–0.4 for natural photos; loss = −reward.
    """

    name = "colorfulness"
    eps = 1e-6  # keeps sqrt differentiable at exactly grey images

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        x = self.to_unit(images)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        spread = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + self.eps)
        mean = torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2 + self.eps)
        reward = spread + 0.3 * mean
        return RewardOutput(reward=reward, loss=-reward)


class Brightness(Reward):
    """Mean luma (Rec. 601) on [0, 1] pixels; a trivially checkable reward for tests and demos.

    Range 0..1; loss = 1 − reward.
    """

    name = "brightness"

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        x = self.to_unit(images)
        luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1).mean(1)
        return RewardOutput(reward=luma, loss=1 - luma)


def build_colorfulness(**_: object) -> Colorfulness:
    """The registry's factory (no weights: also its skeleton); options are ignored."""
    return Colorfulness()


def build_brightness(**_: object) -> Brightness:
    """The registry's factory (no weights: also its skeleton); options are ignored."""
    return Brightness()
