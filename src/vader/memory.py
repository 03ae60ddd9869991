"""Counting tensor memory without a GPU: a live-storage meter and weightless models on fake tensors.

`LiveBytes` is a TorchDispatchMode that sees every tensor an op creates and keeps the bytes of each
distinct storage alive until Python frees it (views share their storage and count once). The peak
and what held it are recorded under the label of the phase that created each storage. Under
torch's FakeTensorMode the same code runs full-size models with no memory at all: `materialise`
turns a model built on the meta device into fake tensors of the run's dtypes, so a plan runs the
real training step (sampler, decode, reward, backward, optimizer) on shapes alone.

Fake CUDA tensors fail in backward without a GPU, so plans count CPU fake tensors; on CPU
F.scaled_dot_product_attention dispatches to a fused kernel that keeps O(tokens) state for backward,
as the CUDA flash / memory-efficient kernels do, so attention memory matches a GPU's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vader.errors import VaderError

__all__ = ["LiveBytes", "fake_mode", "materialise"]


class LiveBytes(TorchDispatchMode):
    """Live bytes of every storage created while active, by label; the peak and its breakdown; and
    the FLOPs of every op by label (torch.utils.flop_counter's formulas).

    Labels come from `phase(...)`; `relabel` moves existing storages (e.g. parameter gradients once
    backward made them) to another label without changing the total. FLOPs are counted here rather
    than by FlopCounterMode because its module tracker keeps references to activations alive (under
    gradient checkpointing it held every recomputed block to the end of backward: 2x the peak).
    """

    def __init__(self) -> None:
        super().__init__()
        self.label = "other"
        self.total = 0
        self.peak = 0
        self.by_label: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}
        self.peak_label = "other"  # the phase running when the peak was reached
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [bytes, label, weakref]
        self.flops: dict[str, float] = {}
        from torch.utils.flop_counter import flop_registry

        self._flop_formulas = flop_registry

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.peak_label = self.total, dict(self.by_label), self.label

    def add(self, tensor: torch.Tensor, label: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        label = label or self.label

        def freed(_: object, key: int = key) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.total -= entry[0]
                self.by_label[entry[1]] -= entry[0]

        self._live[key] = [size, label, weakref.ref(storage, freed)]
        self.total += size
        self.by_label[label] = self.by_label.get(label, 0) + size
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_label = self.total, dict(self.by_label), self.label

    def relabel(self, tensors: Iterable[torch.Tensor | None], label: str) -> None:
        for tensor in tensors:
            if tensor is None:
                continue
            entry = self._live.get(id(tensor.untyped_storage()))
            if entry is None:
                self.add(tensor, label)
                continue
            self.by_label[entry[1]] -= entry[0]
            entry[1] = label
            self.by_label[label] = self.by_label.get(label, 0) + entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._flop_formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.label] = self.flops.get(self.label, 0) + formula(*args, **kwargs, out_val=out)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.add(item)
        return out


def materialise_generator_models(meter: LiveBytes, denoiser: nn.Module, vae: nn.Module, dtype: torch.dtype,
                                 vae_dtype: torch.dtype) -> None:
    """A generator's denoiser (its LoRA parameters, if any, in fp32 and counted as 'lora') and VAE given
    storage under the meter's 'denoiser' / 'vae' phases, as a build loads them."""
    with meter.phase("denoiser"):
        materialise(denoiser, dtype, trainable="lora_")
    meter.relabel([p for n, p in denoiser.named_parameters() if "lora_" in n], "lora")
    with meter.phase("vae"):
        materialise(vae, vae_dtype)


class PlannedSteps:
    """A sampler's `progress` hook for a plan: each sampling step runs under the meter's phase
    'sampling_nograd' (before `cutoff`; None: every step) or 'sampling' (from it). Without `all_steps`
    only the first step before the cutoff runs: the others have the same shapes and keep nothing, so the
    peak is the same, and `nograd_scale` is how many steps its FLOPs stand for.

    Every step with gradients runs (each keeps its own graph), so a plan's time grows with the window:
    more than MAX_RUN steps in all is refused in one line before the first one runs."""

    MAX_RUN = 100  # the Open-Sora v1.2 step with gradients took 9 s to plan (30 of them, 'rand': 270 s)

    def __init__(self, meter: LiveBytes, cutoff: int | None, all_steps: bool = False) -> None:
        self.meter, self.cutoff, self.all_steps = meter, cutoff, all_steps
        self.nograd_scale = 1.0

    def __call__(self, steps: Iterable[int]) -> Iterator[int]:
        steps = list(steps)
        first_grad = len(steps) if self.cutoff is None else self.cutoff
        nograd = steps[:first_grad] if self.all_steps else steps[:min(first_grad, 1)]
        run = len(nograd) + len(steps[first_grad:])
        if run > self.MAX_RUN:
            raise VaderError(f"vader plan would run {run} of scheduler.num_sampling_steps={len(steps)} sampling steps "
                             f"({len(steps) - first_grad} with gradients{', all with --all-steps' if self.all_steps else ''}"
                             f"); it runs at most {self.MAX_RUN}: plan a backprop window of at most {self.MAX_RUN} "
                             "steps (memory grows linearly with it) or fewer sampling steps")
        self.nograd_scale = first_grad / max(1, len(nograd))
        for i in [*nograd, *steps[first_grad:]]:
            with self.meter.phase("sampling" if i >= first_grad else "sampling_nograd"):
                yield i


def fake_mode():  # type: ignore[no-untyped-def]
    """A FakeTensorMode that accepts real inputs (small real tensors such as timesteps mix in)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def materialise(module: nn.Module, dtype: torch.dtype, *, trainable: str | None = None,
                trainable_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give a meta-device module real (or, under FakeTensorMode, fake) storage in place: floating
    parameters and buffers in `dtype` (fp8 ones stay fp8), parameters whose name contains `trainable` in
    `trainable_dtype` with requires_grad (LoRA trains in fp32), everything else frozen. Values are
    uninitialised: this is for counting memory, never for running a model whose outputs matter.

    Parameters are replaced, not converted: Module.to() on fake tensors swaps tensors, which the
    fake mode's own weak references forbid.
    """
    def cast(t: torch.Tensor, to: torch.dtype) -> torch.dtype:
        # integers and fp8 storage (dtype='fp8' weights) keep their own dtype
        return to if t.is_floating_point() and t.dtype.itemsize > 1 else t.dtype

    for prefix, sub in module.named_modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            train = trainable is not None and trainable in f"{prefix}.{name}"
            kind = cast(p, trainable_dtype if train else dtype)
            sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=kind), requires_grad=train)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.zeros(b.shape, dtype=cast(b, dtype))
    return module
