"""GRPO's settings (the `grpo` config key), apart from the method so that low-level modules (the resume
check in vader.checkpoint) can resolve them without importing the method."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass

from vader.errors import VaderError

MAX_GROUP_SIZE = 1024  # samples of one prompt per step: beyond it a step (and its plan) would run for hours


STD_MODES = ("global", "group")
STEP_CHOICES = ("first", "random", "per_sample")
UNCOND_MODES = ("detached", "trained")
KL_UNITS = ("flow_grpo", "gaussian")


@dataclass
class GRPOSettings:
    """GRPO's keys; defaults are Flow-GRPO's where it publishes one (config/base.py and its recipes in
    config/grpo.py: noise_level 0.7, clip_range 1e-4, beta 0, timestep_fraction 0.99 through int(), the
    first steps trained, num_inner_epochs 1, adv_clip_max 5, global_std, a round split into 2 updates,
    the unconditional branch without gradient; the EMA's decay 0.9 every 8 updates, which base.py leaves
    off). group_size 4 keeps the tiny preset fast."""

    group_size: int = 4  # samples per prompt; advantages compare the samples of one prompt
    noise_level: float = 0.7  # the SDE's exploration noise (0 would be the deterministic ODE)
    clip_range: float = 1e-4  # PPO: the ratio is clipped to [1 - clip_range, 1 + clip_range]
    kl_beta: float = 0.0  # weight of the KL to the base model (LoRA disabled); 0 skips the extra forward
    kl_units: str = "flow_grpo"  # ||mean - mean_ref||^2 / (2 s_t^2) as Flow-GRPO; 'gaussian': / (2 s_t^2 dt)
    train_steps_fraction: float = 0.99  # int(fraction x steps) sampling steps trained on (0.99: all but the last)
    train_steps: str = "first"  # which: the first K (Flow-GRPO), a random K per round, or per sample (DanceGRPO)
    train_steps_start: int = 0  # 'first' only: the window start..K-1 of the first K (0: Flow-GRPO's first K)
    inner_epochs: int = 1  # passes over the round's samples (the ratio departs from 1 after the first update)
    updates_per_round: int | None = None  # optimizer updates per pass; None: 2 if the micro-batches split evenly
    adv_clip_max: float = 5.0  # advantages clipped to [-adv_clip_max, adv_clip_max]
    std: str = "global"  # advantages (r - group mean) / std of every reward of the round, or of the group
    drop_zero_std: bool = True  # groups whose rewards are all equal are left out of the loss
    uncond: str = "detached"  # the CFG branch without the prompt: no gradient (Flow-GRPO), or 'trained'
    same_noise: bool = False  # one initial noise for every sample of a group
    # An EMA of the LoRA for validation and the final LoRA (Flow-GRPO's ema.py; on in its recipes, off in
    # its base config and here: a run shorter than ema_interval updates would end on its initial LoRA)
    ema: bool = False
    ema_decay: float = 0.9  # at most; min((1 + n) / (10 + n), ema_decay) after n updates, Flow-GRPO's warm-up
    ema_interval: int = 8  # blended in after every ema_interval-th optimizer update, as Flow-GRPO's recipes

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
        for key, choices in (("kl_units", KL_UNITS), ("train_steps", STEP_CHOICES), ("std", STD_MODES),
                             ("uncond", UNCOND_MODES)):
            if getattr(self, key) not in choices:
                raise bad(key, getattr(self, key), "one of " + ", ".join(map(repr, choices)))
        if self.updates_per_round is not None and (not _is_int(self.updates_per_round) or self.updates_per_round < 1):
            raise bad("updates_per_round", self.updates_per_round, "an integer >= 1, or None (2 where the round's "
                      "micro-batches split evenly, else 1)")
        if not _is_int(self.train_steps_start) or self.train_steps_start < 0:
            raise bad("train_steps_start", self.train_steps_start, "an integer >= 0 (the first sampling step trained)")
        if self.train_steps_start and self.train_steps != "first":
            raise bad("train_steps_start", self.train_steps_start, f"0 with train_steps={self.train_steps!r} (a "
                      "window start applies to train_steps='first')")
        if not _is_number(self.ema_decay) or not 0 < self.ema_decay < 1:
            raise bad("ema_decay", self.ema_decay, "a number in (0, 1) (Flow-GRPO: 0.9)")
        if not _is_int(self.ema_interval) or self.ema_interval < 1:
            raise bad("ema_interval", self.ema_interval, "an integer >= 1 (optimizer updates between EMA updates)")
        for key in ("drop_zero_std", "same_noise", "ema"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, getattr(self, key), "True or False")

    def updates(self, micro_batches: int) -> int:
        """Optimizer updates per pass over a round of `micro_batches` micro-batches (gradient_accumulation_steps)."""
        if self.updates_per_round is None:
            return 2 if micro_batches % 2 == 0 else 1
        if micro_batches % self.updates_per_round:
            raise VaderError(f"grpo.updates_per_round={self.updates_per_round} does not divide the round's "
                             f"{micro_batches} micro-batches (gradient_accumulation_steps): choose a divisor")
        return self.updates_per_round

    def last_step(self, num_steps: int) -> int:
        """K = int(fraction x steps), as Flow-GRPO counts them (0.99 of 12 -> 11: the last step left out),
        at least 1: steps below K are the ones 'first' may train."""
        return max(1, int(self.train_steps_fraction * num_steps + 1e-9))

    def trained_steps(self, num_steps: int) -> int:
        """How many steps each sample trains on: K, less the window's start for 'first'."""
        return self.last_step(num_steps) - self.train_steps_start

    def check_steps(self, num_steps: int) -> None:
        """One line when the window start leaves no step of the schedule's `num_steps` to train."""
        k = self.last_step(num_steps)
        if self.train_steps_start >= k:
            raise VaderError(f"grpo.train_steps_start={self.train_steps_start} is invalid: below int("
                             f"train_steps_fraction x scheduler.num_sampling_steps) = {k} (the window is start..K-1)")

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


__all__ = ["KL_UNITS", "MAX_GROUP_SIZE", "STD_MODES", "STEP_CHOICES", "UNCOND_MODES", "GRPOSettings"]
