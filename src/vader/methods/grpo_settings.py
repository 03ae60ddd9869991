"""GRPO's settings (the `grpo` config key), apart from the method so that low-level modules (the resume
check in vader.checkpoint) can resolve them without importing the method."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass

from vader.errors import VaderError

MAX_GROUP_SIZE = 1024  # samples of one prompt per step: beyond it a step (and its plan) would run for hours


@dataclass
class GRPOSettings:
    """GRPO's keys; defaults are Flow-GRPO's (config/base.py: noise_level 0.7, clip_range 1e-4, beta 0,
    timestep_fraction 1.0, num_inner_epochs 1, adv_clip_max 5). group_size 4 keeps the tiny preset fast."""

    group_size: int = 4  # samples per prompt; advantages are normalised within each prompt's group
    noise_level: float = 0.7  # the SDE's exploration noise (0 would be the deterministic ODE)
    clip_range: float = 1e-4  # PPO: the ratio is clipped to [1 - clip_range, 1 + clip_range]
    kl_beta: float = 0.0  # weight of the KL to the base model (LoRA disabled); 0 skips the extra forward
    train_steps_fraction: float = 1.0  # share of the sampling steps trained on, drawn per optimizer step
    inner_epochs: int = 1  # optimizer updates on each batch of samples (the ratio departs from 1 after the first)
    adv_clip_max: float = 5.0  # advantages clipped to [-adv_clip_max, adv_clip_max]

    def __post_init__(self) -> None:
        def bad(key: str, value, valid: str) -> VaderError:
            return VaderError(f"grpo.{key}={value!r} is invalid: {valid}")

        if not _is_int(self.group_size) or not 2 <= self.group_size <= MAX_GROUP_SIZE:
            raise bad("group_size", self.group_size, f"an integer from 2 to {MAX_GROUP_SIZE} (advantages compare "
                      "samples of one prompt; Flow-GRPO's recipes use 12-24)")
        if not _is_int(self.inner_epochs) or self.inner_epochs < 1:
            raise bad("inner_epochs", self.inner_epochs, "an integer >= 1")
        for key in ("noise_level", "clip_range", "adv_clip_max"):
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                raise bad(key, value, "a finite number > 0")
        if not _is_number(self.kl_beta) or self.kl_beta < 0:
            raise bad("kl_beta", self.kl_beta, "a finite number >= 0")
        if not _is_number(self.train_steps_fraction) or not 0 < self.train_steps_fraction <= 1:
            raise bad("train_steps_fraction", self.train_steps_fraction, "a number in (0, 1]")

    @classmethod
    def from_config(cls, cfg) -> GRPOSettings:
        """From `cfg.grpo` (a dict or dataclass of the keys above; absent or None: the defaults)."""
        value = getattr(cfg, "grpo", None)
        if value is None:
            return cls()
        if isinstance(value, GRPOSettings):
            return value
        if is_dataclass(value):
            value = asdict(value)
        if not isinstance(value, dict):
            raise VaderError(f"grpo={value!r} must be a dict of GRPO keys ({', '.join(f.name for f in fields(cls))})")
        unknown = [k for k in value if k not in {f.name for f in fields(cls)}]
        if unknown:
            raise VaderError(f"grpo: unknown key {unknown[0]!r}; valid keys: {', '.join(f.name for f in fields(cls))}")
        return cls(**value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["MAX_GROUP_SIZE", "GRPOSettings"]
