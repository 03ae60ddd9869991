"""Counting tensor memory without a GPU: a live-storage meter and weightless models on fake tensors.

`LiveBytes` is a TorchDispatchMode that sees every tensor an op creates and keeps the bytes of each
distinct storage alive until Python frees it (views share their storage and count once). The peak
and what held it are recorded under the label of the phase that created each storage. Under
torch's FakeTensorMode the same code runs full-size models with no memory at all: `materialise`
turns a model built on the meta device into fake tensors of the run's dtypes, so a plan runs the
real training step (sampler, decode, reward, backward, optimizer) on shapes alone.

`PlannedFSDP` runs FSDP2's sharding of the denoiser on those fake tensors: shards and gathered units
counted as FSDP2's hooks would allocate and free them, and its all-gathers counted.

Fake CUDA tensors fail in backward without a GPU, so plans count CPU fake tensors; on CPU
F.scaled_dot_product_attention dispatches to a fused kernel that keeps O(tokens) state for backward,
as the CUDA flash / memory-efficient kernels do, so attention memory matches a GPU's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from vader.errors import VaderError
from vader.sharding import SHARDED

__all__ = ["FSDPUnit", "LiveBytes", "PlannedFSDP", "fake_mode", "materialise", "shard_nbytes"]


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
        self._reserved: dict[int, tuple[int, str]] = {}  # reserve() token -> (bytes, label)
        self._tokens = 0
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
        self._grow(size, label)

    def _grow(self, size: int, label: str) -> None:
        self.total += size
        self.by_label[label] = self.by_label.get(label, 0) + size
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_label = self.total, dict(self.by_label), self.label

    def recount(self, tensor: torch.Tensor, nbytes: int, label: str) -> None:
        """Count a live storage as `nbytes` under `label` from now on: a sharded weight keeps its full
        shape on the plan's fake tensors (the forward needs it) but holds only its shard in memory."""
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is None:
            self.add(tensor, label)
            entry = self._live[id(tensor.untyped_storage())]
        self.total -= entry[0]
        self.by_label[entry[1]] -= entry[0]
        entry[0], entry[1] = nbytes, label
        self._grow(nbytes, label)

    def resized(self, tensor: torch.Tensor) -> None:
        """A storage resized in place (FSDP2 frees and re-allocates its gathered weights that way, which
        no op shows): count its new size from now on."""
        storage = tensor.untyped_storage()
        entry = self._live.get(id(storage))
        if entry is None:
            self.add(tensor)
            return
        size = storage.nbytes()
        self.total -= entry[0]
        self.by_label[entry[1]] -= entry[0]
        entry[0] = size
        self._grow(size, entry[1])

    def reserve(self, nbytes: int, label: str) -> int:
        """Count `nbytes` that no fake tensor stands for (an FSDP unit's gathered weights) until
        `release(token)`; the peak is tracked as for any storage, under the running phase."""
        self._tokens += 1
        self._reserved[self._tokens] = (nbytes, label)
        self._grow(nbytes, label)
        return self._tokens

    def release(self, token: int) -> None:
        nbytes, label = self._reserved.pop(token)
        self.total -= nbytes
        self.by_label[label] -= nbytes

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


class PlannedHostMemory:
    """The plan's stand-in for `wan_decode.HostMemory`: a copy put in host (CPU) memory counts 0 bytes
    on the card from then on; one brought back is a new tensor on the card, counted as any other."""

    def __init__(self, meter: LiveBytes) -> None:
        self.meter = meter

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.detach().clone()
        self.meter.recount(copy, 0, "host memory")
        return copy

    def get(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.clone()


def materialise_generator_models(meter: LiveBytes, denoiser: nn.Module, vae: nn.Module, dtype: torch.dtype,
                                 vae_dtype: torch.dtype) -> None:
    """A generator's denoiser (its LoRA parameters, if any, in fp32 and counted as 'lora') and VAE given
    storage under the meter's 'denoiser' / 'vae' phases, as a build loads them."""
    with meter.phase("denoiser"):
        materialise(denoiser, dtype, trainable="lora_")
    meter.relabel([p for n, p in denoiser.named_parameters() if "lora_" in n], "lora")
    with meter.phase("vae"):
        materialise(vae, vae_dtype)


def shard_nbytes(param: torch.Tensor, num_processes: int) -> int:
    """One process's FSDP2 shard of a parameter: dim 0 split into `num_processes` chunks of
    ceil(dim0 / N) rows each (torch.chunk; FSDP2 pads every chunk to the first one's size)."""
    rows = param.shape[0] if param.dim() else 1
    per_row = param.numel() // rows if rows else 0
    return -(-rows // num_processes) * per_row * param.element_size()


@dataclass(eq=False)
class FSDPUnit:
    """One `fully_shard` module: the parameters it manages and FSDP2's state for it, as the plan runs."""

    module: nn.Module
    name: str
    is_root: bool
    params: list[nn.Parameter]
    shard_bytes: int  # what one process keeps between uses (dim 0 padded to a multiple of N)
    gathered_bytes: int  # N x shard_bytes: the whole unit, padding included, as the all-gather makes it
    state: str = "idle"  # FSDPParamGroup's training state: idle / forward / pre_backward / post_backward
    outer: str = "idle"  # FSDPState's: stays pre_backward until the end of backward (recomputation runs then)
    token: int | None = None  # set while gathered (LiveBytes.reserve)
    indices: list[int] = field(default_factory=list)  # its places in the post-forward order


@dataclass(eq=False)
class _Tree:
    """One root's units, sharing what FSDP2 shares within a root: the post-forward order and the
    once-per-backward final callback."""

    units: list[FSDPUnit]
    order: list[FSDPUnit] = field(default_factory=list)
    pending: FSDPUnit | None = None  # the unit that finished last, its memory still in use
    callback_queued: bool = False


class _AfterBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once their gradients exist: FSDP2's
    RegisterPostBackwardFunction, where it reshards the unit."""

    @staticmethod
    def forward(ctx, callback, *tensors):  # type: ignore[no-untyped-def, override]
        ctx.callback = callback
        return tensors

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[no-untyped-def, override]
        ctx.callback()
        return (None, *grads)


class PlannedFSDP:
    """FSDP2's `fully_shard` as `vader.sharding.shard` applies it, run on a plan's fake tensors: every
    block unit, then the root, of every model in `models` ((root, blocks) pairs) over `num_processes`
    processes, `reshard_after_forward=True`, no mixed precision, `ignored` parameters (the LoRA) left
    whole.

    Memory, counted by the meter as it happens: each managed parameter is recounted at its padded
    shard ('denoiser_shard'; the fake tensor keeps its full shape for the forward), and a unit's whole
    weights are counted ('gathered') from its all-gather to its reshard, following FSDP2's state
    machine through the real step: gathered in pre-forward and freed in post-forward; gathered again
    when backward reaches the unit's outputs (a hook on them), with the unit that ran before it in the
    forward order prefetched (FSDP2's implicit backward prefetch), and freed once the gradients of its
    inputs exist, or at the end of backward when its inputs need none (FSDP2's final callback; a
    unit in that state is not gathered again by a later pre-backward). Gradient-checkpoint
    recomputation runs while the unit is gathered for its backward: no gather. In forward, FSDP2 issues
    the next unit's all-gather while the current one computes, so two units are whole at once: each
    unit is freed when the next one finishes (the same two-at-a-time, without knowing the order ahead).
    A forward run inside backward (a checkpoint around the whole model recomputing units that backward
    has not reached yet) gathers them and, as FSDP2 does there, does not reshard them after it: they
    stay whole until their own post-backward.

    Communication: every all-gather is counted under the meter's phase (`gathers`, `gather_bytes`,
    received bytes = (N - 1) x shard bytes), for the plan to scale by how many times the real step
    runs each phase.
    """

    LABEL_SHARD, LABEL_GATHERED = "denoiser_shard", "gathered"

    def __init__(self, meter: LiveBytes, models: Iterable[tuple[nn.Module, Iterable[nn.Module]]],
                 num_processes: int, ignored: set[nn.Parameter]) -> None:
        self.meter, self.num_processes = meter, num_processes
        self.trees: list[_Tree] = []
        self.gathers: dict[str, int] = {}
        self.gather_bytes: dict[str, int] = {}
        self.recomputed_whole = 0  # unit forwards run inside backward ahead of the unit's own backward
        self.whole_bytes = self.most_whole_bytes = 0  # gathered now / at most at any time
        self._handles: list[Any] = []
        for root, blocks in models:
            units, managed, block_ids = [], {id(p) for p in ignored}, {id(b) for b in blocks}
            for name, module in [*((n, m) for n, m in root.named_modules() if id(m) in block_ids), ("", root)]:
                # a unit manages what no unit inside it manages (blocks come first), as fully_shard does
                params = [p for p in module.parameters() if id(p) not in managed]
                managed.update(id(p) for p in params)
                shard = sum(shard_nbytes(p, num_processes) for p in params)
                units.append(FSDPUnit(module, name or type(root).__name__, module is root, params, shard,
                                      shard * num_processes))
            tree = _Tree(units)
            self.trees.append(tree)
            setattr(root, SHARDED, True)  # what vader.sharding.shard marks: the samplers read it
            for unit in units:
                for p in unit.params:
                    meter.recount(p, shard_nbytes(p, num_processes), self.LABEL_SHARD)
                self._handles.append(unit.module.register_forward_pre_hook(
                    self._pre_forward_hook(tree, unit), prepend=True, with_kwargs=True))
                self._handles.append(unit.module.register_forward_hook(self._post_forward_hook(tree, unit)))

    @property
    def units(self) -> list[FSDPUnit]:
        return [u for tree in self.trees for u in tree.units]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for tree in self.trees:
            for unit in tree.units:
                if unit.is_root:
                    unit.module.__dict__.pop(SHARDED, None)

    # ---- gather / reshard ----
    def _gather(self, unit: FSDPUnit, again: bool = False) -> None:
        """The unit's all-gather, unless it is whole already (`again`: it is whole but FSDP2 would
        have resharded and gathered it: count the traffic, keep the memory)."""
        if unit.token is None:
            unit.token = self.meter.reserve(unit.gathered_bytes, self.LABEL_GATHERED)
            self.whole_bytes += unit.gathered_bytes
            self.most_whole_bytes = max(self.most_whole_bytes, self.whole_bytes)
        elif not again:
            return
        label = self.meter.label
        self.gathers[label] = self.gathers.get(label, 0) + 1
        self.gather_bytes[label] = self.gather_bytes.get(label, 0) + unit.shard_bytes * (self.num_processes - 1)

    def _reshard(self, unit: FSDPUnit) -> None:
        if unit.token is not None:
            self.meter.release(unit.token)
            self.whole_bytes -= unit.gathered_bytes
            unit.token = None

    # ---- FSDP2's hooks ----
    def _pre_forward_hook(self, tree: _Tree, unit: FSDPUnit):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if unit.outer == "pre_backward":  # gradient-checkpoint recomputation inside its backward: whole
                self._gather(unit)  # since its pre-backward (FSDP2 gathers it here only if it is not)
                return None
            unit.outer = unit.state = "forward"
            self._gather(unit, again=unit is tree.pending)
            if not torch.is_grad_enabled():
                return None
            flat, spec = tree_flatten((args, kwargs))
            at = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
            if not at:  # nothing will call its post-backward: the final callback reshards it
                return None
            for i, x in zip(at, _AfterBackward.apply(lambda: self._post_backward(unit), *[flat[i] for i in at]),
                            strict=True):
                flat[i] = x
            return tree_unflatten(flat, spec)

        return hook

    def _post_forward_hook(self, tree: _Tree, unit: FSDPUnit):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if unit.outer == "pre_backward":
                return
            if torch._C._current_graph_task_id() == -1:  # outside backward (FSDP2's `not is_bw()`)
                if unit.is_root:  # the root's own weights and the last block go together
                    for held in (tree.pending, unit):
                        if held is not None:
                            self._reshard(held)
                    tree.pending = None
                else:
                    if tree.pending is not None and tree.pending is not unit:
                        self._reshard(tree.pending)
                    tree.pending = unit
                unit.indices.append(len(tree.order))  # FSDP2 records every call, with or without gradients
                tree.order.append(unit)
            else:  # a recomputation inside backward (a checkpoint around the whole model) ran a unit that
                # backward has not reached: FSDP2 keeps it whole until its post-backward, so every such
                # unit is whole at once
                self.recomputed_whole += 1
            unit.outer = unit.state = "idle"
            if torch.is_grad_enabled():
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad: self._pre_backward(tree, unit))

        return hook

    def _pre_backward(self, tree: _Tree, unit: FSDPUnit) -> None:
        unit.outer = "pre_backward"
        if not tree.callback_queued:
            tree.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._final_callback(tree))
        if unit.state == "pre_backward":  # whole since an earlier pre-backward whose post-backward never ran
            return
        unit.state = "pre_backward"
        self._gather(unit)
        if unit.indices:  # FSDP2's implicit prefetch: the unit before this call in the forward order
            index = unit.indices.pop()
            if index > 0:
                self._gather(tree.order[index - 1])

    def _post_backward(self, unit: FSDPUnit) -> None:
        unit.state = "post_backward"
        self._reshard(unit)

    def _final_callback(self, tree: _Tree) -> None:
        for unit in reversed(tree.units):
            if unit.state != "post_backward":
                self._post_backward(unit)
            unit.state = unit.outer = "idle"
            unit.indices.clear()
        tree.order.clear()
        tree.callback_queued = False


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


def _kept_in_fp32(module: nn.Module, dtype: torch.dtype) -> set[str]:
    """The module names a from_pretrained in `dtype` keeps in fp32: diffusers' `_keep_in_fp32_modules` for
    any 16-bit dtype; transformers' only for fp16, its `_keep_in_fp32_modules_strict` for bf16 too."""
    if dtype.itemsize != 2:
        return set()
    names = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if hasattr(module, "_keep_in_fp32_modules_strict"):  # a transformers model
        strict = set(module._keep_in_fp32_modules_strict or ())
        return names | strict if dtype == torch.float16 else strict
    return names


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

    keep_fp32 = _kept_in_fp32(module, dtype)
    for prefix, sub in module.named_modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            train = trainable is not None and trainable in f"{prefix}.{name}"
            fp32 = keep_fp32 and not keep_fp32.isdisjoint(f"{prefix}.{name}".split("."))
            kind = cast(p, trainable_dtype if train else torch.float32 if fp32 else dtype)
            sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=kind), requires_grad=train)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.zeros(b.shape, dtype=cast(b, dtype))
    return module
