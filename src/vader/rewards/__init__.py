"""Reward registry: one name -> one factory; `build_reward` also takes {name: weight} mixes."""

from __future__ import annotations

from collections.abc import Callable

from vader.errors import VaderError
from vader.rewards.base import Reward, RewardOutput, WeightedReward
from vader.rewards.builtin import Brightness, Colorfulness

__all__ = ["Reward", "RewardOutput", "WeightedReward", "build_reward", "reward_names", "AVAILABLE", "PLANNED"]

AVAILABLE: dict[str, Callable[..., Reward]] = {
    "colorfulness": lambda **_: Colorfulness(),
    "brightness": lambda **_: Brightness(),
}
# The seed's model-based rewards; the names are valid config values so configs validate, and
# building them says plainly that this version does not ship them yet.
PLANNED = ("aesthetic", "hps", "aesthetic_hps", "pick_score", "actpred")


def reward_names() -> tuple[str, ...]:
    return (*AVAILABLE, *PLANNED)


def build_reward(reward_fn: str | dict[str, float], **options) -> Reward:
    """A frozen, eval-mode reward module for a validated `reward_fn`."""
    spec = {reward_fn: 1.0} if isinstance(reward_fn, str) else dict(reward_fn)
    parts: dict[str, tuple[float, Reward]] = {}
    for name, weight in spec.items():
        if name in PLANNED:
            raise VaderError(
                f"reward_fn={name!r} is not available yet in vader {__import__('vader').__version__} "
                f"(the model-based rewards come in a later release); available now: {', '.join(AVAILABLE)}"
            )
        parts[name] = (weight, AVAILABLE[name](**options))
    reward = parts[next(iter(parts))][1] if len(parts) == 1 and next(iter(spec.values())) == 1.0 else WeightedReward(parts)
    reward.requires_grad_(False)
    return reward.eval()
