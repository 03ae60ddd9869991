"""The method seam: what a training method module (`vader.methods.<name>`) offers the loop and the plan.

A Protocol only (no implementation inheritance): a method satisfies it by having the names. Every
method ends its step with `vader.methods.update` (gradient averaging, clipping, the one update decision).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from accelerate import Accelerator
from torch import Tensor, nn, optim

from vader.backends.base import VideoBackend
from vader.memory import LiveBytes
from vader.methods.update import StepResult


@dataclass
class PlannedStep:
    """What `plan_step` hands `vader plan`: the loss to backpropagate, and how to read what was run."""

    loss: Tensor  # what one micro-step backpropagates (already divided as the step divides it)
    cutoff: int | None  # the backprop cutoff planned (None: the method has none)
    flop_scale: dict[str, float]  # meter phase -> how many times the step runs what the plan ran once
    how: str  # the step in words, for the plan's summary line
    notes: list[str] = field(default_factory=list)
    held: tuple = ()  # what the real step still holds during its backward (latents, videos, trajectory)


class MethodModule(Protocol):
    METRICS: tuple[str, ...]  # what its StepResult adds to the loop's logged row
    DIFFERENTIABLE_REWARD: bool  # True: the reward's gradient is used, so a callable reward cannot train it
    IGNORED_KNOBS: tuple[str, ...]  # `vader plan --fit` knobs (vader.plan.KNOBS keys) this method's step does not use

    def check_config(self, cfg) -> None:  # type: ignore[no-untyped-def]
        """One-line VaderError for settings this method cannot run with (before anything loads)."""
        ...

    def step(self, gen: VideoBackend, reward: nn.Module, optimizer: optim.Optimizer, params: list[nn.Parameter],
             cfg, accelerator: Accelerator, prompts: list[str], step: int) -> StepResult:  # type: ignore[no-untyped-def]
        """One optimizer step (its micro-steps, prompts and seeds from `step`): sample, score, update."""
        ...

    def plan_step(self, gen: VideoBackend, reward: nn.Module, cfg, prompts: list[str], frames: list[int],  # type: ignore[no-untyped-def]
                  meter: LiveBytes, all_steps: bool) -> PlannedStep:
        """One micro-step's forward as `step` runs it, on the fake tensors of `vader plan`, each part under
        its meter phase (sampling_nograd, sampling, decode, reward); the memory-heaviest draw of anything
        random. The plan adds the backward and the optimizer step."""
        ...


__all__ = ["MethodModule", "PlannedStep", "StepResult"]
