"""`vader inspect`: what a config builds, from the meta device, with no download and no weights.

For each model (denoiser, vae, text_encoder) it reports the architecture, the parameters per
top-level module, the memory its weights take in the run's dtype, and for the denoiser which
modules LoRA wraps and how many parameters `lora_rank` trains. With `keys=True` it lists every
state-dict key and its shape instead (`key<TAB>d0,d1,...`), the format of the reference listings
in tests/fixtures, so a checkpoint can be compared with what the code expects.

A checkpoint's config.json is used when it is already on this machine (a local folder or the
Hugging Face cache); otherwise the preset architecture is described.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vader.backends import backend_module
from vader.backends.base import MetaModel
from vader.checkpoint import lora_config
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.run import load_prompts
from vader.train import total_train_steps

PARTS = ("denoiser", "vae", "text_encoder")
_ALIASES = {"model": "denoiser", "text-encoder": "text_encoder", "t5": "text_encoder"}
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def inspect(cfg: VaderConfig, part: str | None = None, keys: bool = False) -> str:
    """The text `vader inspect CONFIG [--part PART] [--keys]` prints.

    part: None (all), 'denoiser', 'vae' or 'text_encoder'. keys: list `key<TAB>shape` lines (for a
    single part exactly the state-dict listing; for all parts each block follows a `# <part>` line).
    """
    parts = _parts(part)
    blocks = []
    for name in parts:
        built = build_meta(cfg, name)
        if keys:
            listing = key_listing(built.model)
            blocks.append(listing if len(parts) == 1 else f"# {name}: {built.title}\n{listing}")
        else:
            blocks.append(_summary(built, cfg))
    return ("\n" if keys else "\n\n").join(blocks)


def _parts(part: str | None) -> tuple[str, ...]:
    if part is None:
        return PARTS
    name = _ALIASES.get(part, part)
    if name not in PARTS:
        raise VaderError(f"part={part!r} is not valid; choose one of: {', '.join(PARTS)} (or leave it out for all)")
    return (name,)


# ---------------------------------------------------------------------------------------------
# Building on meta
# ---------------------------------------------------------------------------------------------


def build_meta(cfg: VaderConfig, part: str) -> MetaModel:
    """Build one part of `cfg`'s stack on the meta device (no memory, no download), as its backend says."""
    return backend_module(cfg.backend).meta_part(cfg, _parts(part)[0])


def resolved_values(cfg: VaderConfig, num_processes: int | None = None) -> dict[str, Any]:
    """What `vader config` adds to the config: the values a run derives from it, each taken from the
    code that owns the rule (the backend's latent geometry, the trainer's step count), so they cannot
    drift from what a run does. Loads no weights and downloads nothing."""
    processes = num_processes or max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    try:
        prompts: int | None = len(load_prompts(cfg)[0])
    except VaderError:
        prompts = None  # no or unreadable prompts: `vader train` says why; steps may still be known
    steps = total_train_steps(cfg, prompts or 0, processes) if prompts is not None or cfg.max_train_steps else None
    geometry = backend_module(cfg.backend).resolved(cfg)
    note = geometry.pop("note", None)
    out: dict[str, Any] = {
        **geometry,
        "prompts": prompts,
        "processes": processes,
        "total_optimizer_steps": steps,
        "videos_per_validation": cfg.num_val_runs * cfg.val_batch_size * processes,
    }
    if note:
        out["note"] = note
    return out


# ---------------------------------------------------------------------------------------------
# Counting and listing
# ---------------------------------------------------------------------------------------------


def key_listing(model: nn.Module) -> str:
    """Every state-dict key and its shape, `key<TAB>d0,d1,...` per line, in state-dict order."""
    return "\n".join(f"{k}\t{','.join(str(d) for d in v.shape)}" for k, v in model.state_dict().items())


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def module_counts(model: nn.Module) -> list[tuple[str, int, int]]:
    """(top-level name, parameters, buffer elements); a tensor shared by two modules counts at the first."""
    seen: set[int] = set()
    rows = []

    def take(tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total

    for name, p in model.named_parameters(recurse=False):
        rows.append((name, take([p]), 0))
    for name, b in model.named_buffers(recurse=False):
        rows.append((name, 0, take([b])))
    for name, child in model.named_children():
        rows.append((name, take(list(child.parameters())), take(list(child.buffers()))))
    return rows


@dataclass
class LoraSummary:
    rank: int
    alpha: float
    dropout: float
    targets: list[str]  # the module names LoRA matches (the backend's LORA_TARGETS)
    modules: Counter  # (target name, in_features, out_features) -> how many modules
    tensors: int
    trainable: int


def lora_summary(model: nn.Module, targets: list[str], rank: int, alpha: float = 8.0,
                 dropout: float = 0.01) -> LoraSummary:
    """Inject the run's LoRA into `model` (meta is fine) with peft and count what it adds; `targets`:
    the module names (the backend's LORA_TARGETS)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = list(targets)
    inject_adapter_in_model(lora_config(rank, alpha, dropout, targets=targets), model, low_cpu_mem_usage=True)
    modules: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            short = next((t for t in targets if name.endswith(t)), name.rsplit(".", 1)[-1])  # "to_out.0"
            modules[(short, base.in_features, base.out_features)] += 1
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    return LoraSummary(rank, alpha, dropout, targets, modules, len(params),
                       sum(p.numel() for p in params))


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _summary(built: MetaModel, cfg: VaderConfig) -> str:
    model = built.model
    state = model.state_dict()
    params = list(model.parameters())
    buffers = list(model.buffers())
    total = count_parameters(model)
    buffer_elems = sum(b.numel() for b in buffers)
    # in the run's dtype, except tensors stored in one byte (fp8 weights) which stay so
    weight_bytes = sum(t.numel() * (1 if t.element_size() == 1 else _BYTES.get(built.dtype, 4))
                       for t in (*params, *buffers))
    lines = [
        f"{built.part}: {built.title}",
        f"  from: {built.source}",
        f"  architecture: {built.settings}",
    ]
    rows = module_counts(model)
    width = max(len(r[0]) for r in rows) if rows else 10
    lines.append(f"  {'module':<{width}}  {'parameters':>15}  {'buffer elements':>15}")
    for name, n_params, n_buffers in rows:
        lines.append(f"  {name:<{width}}  {n_params:>15,}  {n_buffers:>15,}")
    lines.append(f"  total: {_n(total, 'parameter')} in {_n(len(params), 'tensor')}, "
                 f"{_n(buffer_elems, 'buffer element')} in {_n(len(buffers), 'tensor')}, "
                 f"{_n(len(state), 'state-dict key')}")
    tied = len(state) - len(params) - len(buffers)
    if tied > 0:
        lines[-1] += f" ({tied} key{'s' * (tied > 1)} of tied weights, counted once)"
    dtype_name = _dtype_name(built.dtype)
    if any(t.element_size() == 1 and t.is_floating_point() for t in buffers):
        dtype_name = f"fp8 (Linear) + {dtype_name}"
    lines.append(f"  weights in {dtype_name}: {_size(weight_bytes)}"
                 + ("" if built.part != "text_encoder" else " (always fp32; used once per prompt, then dropped)"))
    if built.part == "denoiser":
        module = backend_module(cfg.backend)
        # a checkpoint may widen them (Wan2.1-I2V: the image cross-attention's add_k_proj / add_v_proj)
        targets = module.lora_targets(cfg) if hasattr(module, "lora_targets") else module.LORA_TARGETS
        lora = lora_summary(model, targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        per_target = ", ".join(f"{n} {name} {i}->{o}" for (name, i, o), n in sorted(
            lora.modules.items(), key=lambda kv: lora.targets.index(kv[0][0]) if kv[0][0] in lora.targets else 99))
        lines.append(f"  LoRA r={lora.rank} (alpha {lora.alpha:g}, scale {lora.alpha / lora.rank:g}, dropout "
                     f"{lora.dropout:g}) on Linear modules named {', '.join(lora.targets)}: "
                     f"{sum(lora.modules.values())} modules ({per_target})")
        lines.append(f"  LoRA trainable parameters: {lora.trainable:,} in {lora.tensors} tensors "
                     f"({100 * lora.trainable / total:.2f}% of the denoiser), trained in fp32: "
                     f"{_size(lora.trainable * 4)} + AdamW state {_size(lora.trainable * 8)}")
    return "\n".join(lines)
