"""Sharded training (`sharding='fsdp'`): the frozen denoiser's weights split over the processes with
FSDP2 (`torch.distributed.fsdp.fully_shard`), so a model larger than one card trains.

What is sharded: every model in `gen.denoisers` (the trained denoiser; Wan2.2-A14B's second expert
too), one FSDP unit per block (the classes the model names in `_no_split_modules`, as diffusers and
transformers do for device maps) and one for the rest at the root. Each unit is gathered for its
forward and freed after it (`reshard_after_forward=True`), gathered again for its backward, so a
process holds 1/N of the weights plus about two gathered blocks (FSDP2 overlaps the next block's
all-gather with the current block's compute). The many denoiser calls of one reward-gradient step
(every sampling step, both CFG passes, gradient-checkpoint recomputation) each gather their units;
nothing else changes in the step.

What is not: the LoRA parameters are FSDP's `ignored_params`: whole on every process, their gradients
all-reduced once per optimizer step by `vader.methods.update.average_gradients`, exactly as without
sharding. A LoRA is small next to its base (rank 16 on every attention projection of Wan2.1-14B:
52M parameters, 0.2 GiB fp32 plus 0.4 GiB of AdamW state), and keeping it whole keeps the
optimizer, clipping, the non-finite guards, the LoRA files and resume identical to the unsharded run:
a checkpoint saved under fsdp is the same full LoRA and optimizer state as one saved without, so it
resumes with or without sharding (on the same number of processes: the prompt and noise streams are
per process). The VAE, the text encoder (released after the prompts are encoded) and the reward model
stay whole on every process.

Every process must run the same denoiser calls in the same order (their all-gathers are collective):
training and validation sample the same number of batches and steps on every process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from vader.errors import VaderError

SHARDED = "_vader_sharded"  # set on a model `shard` splits (and on one `vader plan` plans split)


def is_sharded(model: nn.Module) -> bool:
    return bool(getattr(model, SHARDED, False))


def denoisers(gen: object) -> tuple[nn.Module, ...]:
    """Every transformer a generator samples with, the trained one first."""
    found = getattr(gen, "denoisers", None)
    return tuple(found) if found else (gen.denoiser,)  # type: ignore[attr-defined]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP wraps one by one: modules whose class the model names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise VaderError(f"sharding='fsdp': {type(model).__name__} names no blocks to shard (_no_split_modules); "
                         "use sharding='none'")
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def check_sharding(sharding: str, dtype: str) -> None:
    """The combinations sharding cannot run, in one line, before anything loads (the key's choices
    are checked with the config)."""
    if sharding == "fsdp" and dtype == "fp8":
        raise VaderError("sharding='fsdp' with dtype='fp8': the fp8 weights are buffers, which FSDP does not "
                         "shard; use dtype='bf16' with sharding='fsdp', or sharding='none' with dtype='fp8'")


def shard(gen: object, trainable: Iterable[nn.Parameter], num_processes: int, device: torch.device) -> int:
    """Apply FSDP2 to the generator's denoisers in place over all `num_processes` processes (the default
    process group); `trainable` (the LoRA) stays whole. Returns the number of FSDP units; 0 on one
    process, where there is nothing to split."""
    if num_processes < 2:
        return 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a wrapped model returns a view (diffusers' transformers do): an in-place op on it
    # would lose the backward all-gather. Every caller (the samplers, GRPO) combines outputs out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (num_processes,))
    keep = set(trainable)
    count = 0
    for model in denoisers(gen):
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, reshard_after_forward=True,
                        ignored_params={p for p in unit.parameters() if p in keep})
            count += 1
        fully_shard(model, mesh=mesh, reshard_after_forward=True,
                    ignored_params={p for p in model.parameters() if p in keep})
        setattr(model, SHARDED, True)
        count += 1
    return count


@dataclass
class Collectives:
    """Bytes each process received (all-gather), sent (reduce-scatter) or moved (all-reduce, counted as a
    ring: 2 (N-1)/N of the tensor) and the number of calls, per collective: what `vader bench` measures
    beside what `vader plan` predicts."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1


@contextlib.contextmanager
def count_collectives() -> Iterator[Collectives]:
    """Count the collectives FSDP2 and accelerate issue while active (torch.distributed's functions are
    looked up at call time by both, so wrapping the module attributes sees every call)."""
    import torch.distributed as dist

    seen = Collectives()
    real = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single", "all_reduce")}

    def world(group) -> int:  # type: ignore[no-untyped-def]
        return dist.get_world_size(group)

    def all_gather_single(output, input, group=None, async_op=False):  # type: ignore[no-untyped-def]
        seen.add("all_gather", output.nbytes - input.nbytes)
        return real["all_gather_single"](output, input, group=group, async_op=async_op)

    def reduce_scatter_single(output, input, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.add("reduce_scatter", input.nbytes - output.nbytes)
        return real["reduce_scatter_single"](output, input, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        n = world(kwargs.get("group"))
        seen.add("all_reduce", 2 * (n - 1) / n * tensor.nbytes)
        return real["all_reduce"](tensor, *args, **kwargs)

    try:
        dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
        dist.all_reduce = all_reduce
        yield seen
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def storage_resizes(seen: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call `seen(tensor)` after FSDP2 allocates or frees a gathered weight's storage in place (it
    resizes storages, which no tensor op shows to a dispatch mode such as vader.memory.LiveBytes)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    real_alloc, real_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc_storage(tensor: torch.Tensor) -> None:
        real_alloc(tensor)
        seen(tensor)

    def free_storage(tensor: torch.Tensor) -> None:
        real_free(tensor)
        seen(tensor)

    try:
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = alloc_storage
        _fsdp_param.free_storage = free_storage
        yield
    finally:
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = real_alloc
        _fsdp_param.free_storage = real_free


__all__ = ["SHARDED", "storage_resizes", "Collectives", "count_collectives", "is_sharded", "check_sharding", "denoisers", "shard", "shard_units"]
