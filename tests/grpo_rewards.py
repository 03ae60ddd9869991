"""`module:function` rewards for tests/test_grpo.py: plain Python/numpy, no gradient anywhere."""

from __future__ import annotations

import numpy as np

NOT_CALLABLE = 3


def mean_red(videos, prompts: list[str]) -> list[float]:
    """The red channel's mean in [0, 1], computed in numpy (the tensor's graph is cut on purpose)."""
    pixels = (videos.numpy() + 1.0) / 2.0
    return [float(pixels[i, 0].mean()) for i in range(len(prompts))]


def prompt_length(videos, prompts: list[str]) -> list[float]:
    return [float(len(p)) for p in prompts]


def too_few(videos, prompts: list[str]) -> list[float]:
    return [0.0] * (len(prompts) - 1)


def returns_nan(videos, prompts: list[str]) -> np.ndarray:
    return np.full(len(prompts), np.nan)


def returns_text(videos, prompts: list[str]) -> str:
    return "good"


def raises(videos, prompts: list[str]) -> list[float]:
    raise RuntimeError("scorer service unavailable")


def no_arguments() -> list[float]:
    return [0.0]


def one_argument(videos) -> list[float]:
    return [0.0] * len(videos)


def keyword_prompts(videos, *, prompts) -> list[float]:
    return [0.0] * len(videos)


def returns_complex(videos, prompts: list[str]) -> list[complex]:
    return [1 + 2j] * len(prompts)


def with_extra_default(videos, prompts, scale: float = 1.0) -> list[float]:
    return [scale] * len(prompts)
