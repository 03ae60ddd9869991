"""The method seam: what a training method module (`vader.methods.<name>`) offers the loop and the plan.

A Protocol only (no implementation inheritance): a method satisfies it by having the names. Every
method ends its step with `vader.methods.update` (gradient averaging, clipping, the one update decision).
"""

from __future__ import annotations

from typing import Protocol

from accelerate import Accelerator
from torch import nn, optim

from vader.backends.base import VideoBackend
from vader.methods.update import StepResult


class MethodModule(Protocol):
    METRICS: tuple[str, ...]  # what its StepResult adds to the loop's logged row
    DIFFERENTIABLE_REWARD: bool  # True: the reward's gradient is used, so a callable reward cannot train it

    def check_config(self, cfg) -> None:  # type: ignore[no-untyped-def]
        """One-line VaderError for settings this method cannot run with (before anything loads)."""
        ...

    def step(self, gen: VideoBackend, reward: nn.Module, optimizer: optim.Optimizer, params: list[nn.Parameter],
             cfg, accelerator: Accelerator, prompts: list[str], step: int) -> StepResult:  # type: ignore[no-untyped-def]
        """One optimizer step (its micro-steps, prompts and seeds from `step`): sample, score, update."""
        ...


__all__ = ["MethodModule", "StepResult"]
