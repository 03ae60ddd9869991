"""A Python callable as a reward (`reward_fn='module:function'`): scores without gradients, for GRPO
or as a gold reward; loaded (and checked) when the config is validated."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from vader.errors import VaderError
from vader.rewards.base import Reward, RewardOutput


class CallableReward(Reward):
    """A Python callable as a reward: fn(videos, prompts) -> scores.

    videos: a [B, 3, F, H, W] float32 tensor in [-1, 1] (the frames decode_frame selects; no
    gradient is needed or kept); prompts: a list of B strings (the cleaned prompts rewards see).
    It returns B finite floats, higher is better: a list, tuple, numpy array or 1-D tensor.
    Usable with GRPO only (no gradient reaches the video); loss = -reward.
    """

    differentiable = False

    def __init__(self, fn: Callable, spec: str, key: str = "reward_fn"):
        super().__init__()
        self.fn, self.spec, self.key = fn, spec, key
        self.name = spec

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        b = frames.shape[0]
        where = f"{self.key}={self.spec!r}"
        try:
            with torch.no_grad():
                out = self.fn(frames.detach().float().clamp(-1, 1), list(prompts))
        except Exception as exc:  # the user's function failed: its error, on one line, is what to fix
            first = " ".join(str(exc).split())[:300]
            raise VaderError(f"{where} raised {type(exc).__name__}{': ' + first if first else ''} (called with "
                             f"{b} videos {tuple(frames.shape)} and {b} prompts)") from None
        try:
            scores = out.detach().cpu() if isinstance(out, Tensor) else torch.as_tensor(out)
        except (TypeError, ValueError, RuntimeError):
            raise VaderError(f"{where} returned {type(out).__name__}; it must return {b} floats (one per video), "
                             "e.g. a list or a 1-D tensor") from None
        if scores.is_complex() or scores.dtype == torch.bool:
            raise VaderError(f"{where} returned {scores.dtype} scores; it must return {b} real floats "
                             "(one per video)")
        scores = scores.double()
        if scores.ndim != 1 or scores.numel() != b:
            raise VaderError(f"{where} returned {tuple(scores.shape)} scores for {b} videos; it must return "
                             f"{b} floats (one per video)")
        bad = [j for j in range(b) if not math.isfinite(scores[j].item())]
        if bad:
            raise VaderError(f"{where} returned a non-finite score ({scores[bad[0]].item()}) for prompt "
                             f"{prompts[bad[0]]!r}; scores must be finite floats")
        reward = scores.float().to(frames.device)
        return RewardOutput(reward=reward, loss=-reward)


def load_callable_reward(spec: str, key: str = "reward_fn") -> CallableReward:
    """Import `module:function` (the function may be a dotted attribute path) as a CallableReward."""
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr or ":" in attr:
        raise VaderError(f"{key}={spec!r} is not 'module:function' (e.g. 'my_rewards:score', the module on "
                         "PYTHONPATH)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise VaderError(f"{key}={spec!r}: module {module_name!r} not found (is it installed or on "
                             "PYTHONPATH?)") from None
        raise VaderError(f"{key}={spec!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise VaderError(f"{key}={spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {first}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise VaderError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise VaderError(f"{key}={spec!r}: {attr!r} is a {type(fn).__name__}, not a callable "
                         "fn(videos, prompts) -> scores")
    check_signature(fn, f"{key}={spec!r}")
    return CallableReward(fn, spec, key)


def check_signature(fn: Callable, where: str) -> None:
    """VaderError unless `fn` can be called as fn(videos, prompts) (checked when the module is loaded,
    not after the models are built); a callable whose signature Python cannot read is trusted."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C extensions
        return
    try:
        signature.bind(object(), object())
    except TypeError as exc:
        shown = signature.replace(return_annotation=inspect.Signature.empty)
        raise VaderError(f"{where}: {getattr(fn, '__name__', 'the callable')}{shown} cannot be called as "
                         f"fn(videos, prompts) ({exc}); it must take the videos and the prompts") from None
