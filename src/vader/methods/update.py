"""The one update decision every method's optimizer step ends with: gradients averaged across
processes, clipped, and the step applied or skipped on every process alike."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from vader.errors import VaderError


@dataclass
class StepResult:
    """What one optimizer step reports to the loop (a method may add metrics in a subclass)."""

    loss: float
    reward: float
    reward_std: float
    grad_norm: float
    cutoff: int | None
    skipped: bool = False  # no update was applied (LoRA and optimizer state unchanged)
    nonfinite: bool = False  # the loss, reward or gradient was NaN/inf (counts toward max_nonfinite_steps)


def apply_update(optimizer, params: list[torch.nn.Parameter], lr: float, accelerator: Accelerator,  # type: ignore[no-untyped-def]
                 step: int, values_finite: bool, grad_norm: float) -> tuple[bool, bool]:
    """The optimizer step, or not: a non-finite loss, reward or gradient on any process skips it on
    every process (gradients dropped). Returns (skipped, nonfinite)."""
    nonfinite = any_process(not (values_finite and math.isfinite(grad_norm)), accelerator)
    scaler = getattr(accelerator, "scaler", None)
    skipped = nonfinite
    if nonfinite and scaler is not None and values_finite:
        # fp16: inf gradients with finite values are the loss scale overflowing, routine while the
        # GradScaler calibrates; its step skips the update and lowers the scale
        optimizer.step()
        nonfinite = False
    elif nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # its unscale_ ran in clip_gradients: without update() the next unscale_ raises
            scaler.update()
    else:
        optimizer.step()
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise VaderError(f"lr={lr}: the optimizer update at step {step + 1} made the LoRA non-finite "
                             f"(parameter {bad}); nothing was saved from it: lower lr")
    return skipped, nonfinite


def any_process(flag: bool, accelerator: Accelerator) -> bool:
    """True when `flag` is true on any process, so that every process takes the same decision."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce the LoRA gradients once per optimizer step (the denoiser is not DDP-wrapped: its
    forward runs many times per backward, which DDP's reducer does not allow)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, accelerator: Accelerator) -> float:
    """Clip to `max_norm` (0 or None: no clipping) and return the total norm before clipping."""
    if max_norm and max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    accelerator.unscale_gradients()  # fp16: log the true norm, not the loss-scaled one
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class LoraEMA:
    """An exponential moving average of the trainable LoRA parameters, as Flow-GRPO's EMAModuleWrapper
    (flow_grpo/ema.py): after the n-th optimizer update, when (n + 1) % interval == 0,
    ema += (1 - min((1 + n) / (10 + n), decay)) * (param - ema). fp32 copies on the parameters' device.

    `attach(optimizer)` runs `update` after every optimizer step actually taken (a step skipped for a
    non-finite value, or by fp16's loss scaler, never reaches the optimizer's step), whatever the method."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, interval: int) -> None:
        self.params = params
        self.decay, self.interval = decay, interval
        self.shadow = [p.detach().float().clone() for p in params]
        self.updates = 0  # optimizer updates seen (Flow-GRPO's global_step)

    def current_decay(self, n: int) -> float:
        """Flow-GRPO's warm-up: early averages follow the LoRA closely, later ones at most `decay`."""
        return min((1 + n) / (10 + n), self.decay)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        n = self.updates
        if (n + 1) % self.interval:
            return
        weight = 1 - self.current_decay(n)
        for ema, p in zip(self.shadow, self.params, strict=True):
            ema.add_(weight * (p.detach().float() - ema))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        # accelerate's wrapper calls the wrapped optimizer's step: the hook belongs on that one
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.register_step_post_hook(lambda *_: self.update())

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA in the LoRA's place (validation, the final LoRA); the trained values back after."""
        kept = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, ema in zip(self.params, self.shadow, strict=True):
                    p.copy_(ema.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, kept, strict=True):
                    p.copy_(value)

    def describe(self) -> str:
        return f"EMA of the trained LoRA (decay {self.decay}, every {self.interval} updates, {self.updates} updates)"

    def state_dict(self) -> dict:
        return {"shadow": [t.cpu() for t in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise VaderError("the checkpoint's LoRA EMA does not fit this LoRA (another rank or target modules?)")
        self.shadow = [t.to(device=p.device, dtype=torch.float32).clone() for t, p in zip(shadow, self.params)]
        self.updates = int(state["updates"])


__all__ = ["LoraEMA", "StepResult", "any_process", "apply_update", "average_gradients", "clip_gradients"]
