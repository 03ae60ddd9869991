"""The one reward interface: video frames in [-1, 1] and their prompts -> per-sample reward and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class RewardOutput:
    reward: Tensor  # [B], higher is better; logged
    loss: Tensor  # [B], what training minimises (keeps the original's scale for each reward)


class Reward(nn.Module):
    """Frozen scorer. Subclasses implement `score_images` or override `forward` for video rewards."""

    name: str = "reward"

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        """frames: [B, 3, K, H, W] in [-1, 1]; image rewards average over the K frames."""
        b, c, k, h, w = frames.shape
        images = frames.permute(0, 2, 1, 3, 4).reshape(b * k, c, h, w)
        repeated = [p for p in prompts for _ in range(k)]
        out = self.score_images(images, repeated)
        return RewardOutput(reward=out.reward.view(b, k).mean(1), loss=out.loss.view(b, k).mean(1))

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError

    @staticmethod
    def to_unit(images: Tensor) -> Tensor:
        """[-1, 1] -> [0, 1] with the clamp the original applies before every reward model."""
        return (images.float() / 2 + 0.5).clamp(0, 1)


class WeightedReward(Reward):
    """A weighted sum of rewards: reward = Σ w_i r_i, loss = Σ w_i loss_i."""

    name = "mix"

    def __init__(self, parts: dict[str, tuple[float, Reward]]):
        super().__init__()
        self.weights = {name: float(w) for name, (w, _) in parts.items()}
        self.parts = nn.ModuleDict({name: r for name, (_, r) in parts.items()})

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        outs = {name: reward(frames, prompts) for name, reward in self.parts.items()}
        reward = torch.stack([self.weights[n] * o.reward for n, o in outs.items()]).sum(0)
        loss = torch.stack([self.weights[n] * o.loss for n, o in outs.items()]).sum(0)
        return RewardOutput(reward=reward, loss=loss)
