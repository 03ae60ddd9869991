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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vader.config import VaderConfig
from vader.errors import VaderError
from vader.models.loading import build_on_meta, local_config

PARTS = ("denoiser", "vae", "text_encoder")
_ALIASES = {"model": "denoiser", "text-encoder": "text_encoder", "t5": "text_encoder"}
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class MetaModel:
    """One part of the stack built on the meta device, and what to say about where it came from."""

    part: str
    title: str  # e.g. "STDiT3-XL/2"
    source: str  # hub id / folder, and whether its config.json was read
    settings: str  # the architecture in one line
    model: nn.Module
    dtype: torch.dtype  # the dtype its weights are loaded in for a run


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
    """Build one part of `cfg`'s stack on the meta device (no memory, no download)."""
    if cfg.backend is not None:
        return _backend_part(cfg, _parts(part)[0])
    return _BUILDERS[_parts(part)[0]](cfg)


def _backend_models(cfg: VaderConfig) -> tuple[Any, dict[str, nn.Module], type]:
    from vader.backends import backend_class, backend_module, settings_from_config

    settings = settings_from_config(cfg)
    return settings, backend_module(cfg.backend).meta_models(settings), backend_class(cfg.backend)


_BACKEND_PARTS = {"denoiser": "transformer", "vae": "vae", "text_encoder": "text_encoder"}


def _backend_part(cfg: VaderConfig, part: str) -> MetaModel:
    """A diffusers backend's part, as its `meta_models` builds it: the checkpoint's own config when it
    is on this machine, else the published architecture."""
    from vader.models.presets import torch_dtype

    settings, models, _ = _backend_models(cfg)
    model = models[_BACKEND_PARTS[part]]
    source = getattr(settings, part if part != "denoiser" else "transformer", None) or settings.pretrained
    raw = getattr(model, "config", None)
    config = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    shown = {k: v for k, v in config.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
    line = f"{type(model).__name__}: " + ", ".join(f"{k} {v}" for k, v in list(shown.items())[:12])
    dtype = torch_dtype(getattr(settings, "vae_dtype", cfg.dtype) if part == "vae" else cfg.dtype)
    return MetaModel(part, f"{cfg.model.type} ({type(model).__name__})", str(source), line, model, dtype)


def backend_latent_shape(cfg: VaderConfig) -> tuple[int, int, int, int]:
    """(C, T, H, W) as the backend generator computes it, from the meta-built transformer and VAE."""
    settings, models, cls = _backend_models(cfg)
    shell = object.__new__(cls)  # only the geometry properties are used: no weights, nothing moved
    shell.denoiser, shell.vae, shell.settings = models["transformer"], models["vae"], settings
    return tuple(shell.latent_shape)  # type: ignore[return-value]


def _source(name: str | None) -> tuple[str, dict]:
    if not name:
        return "random init (from_pretrained=None)", {}
    published = local_config(name)
    note = "its config.json read" if published else "config.json not on this machine: preset architecture"
    return f"{name} ({note})", published


def _run_dtype(cfg: VaderConfig) -> torch.dtype:
    from vader.models.presets import TORCH_DTYPES

    return TORCH_DTYPES.get(cfg.dtype, torch.bfloat16)  # fp8: bf16 except the denoiser's Linear weights


def _denoiser(cfg: VaderConfig) -> MetaModel:
    from vader.models.presets import denoiser_config, text_encoder_config
    from vader.models.stdit3 import STDiT3

    t5 = text_encoder_config(cfg.text_encoder)
    source, published = _source(cfg.model.from_pretrained)
    config = denoiser_config(cfg.model, t5.d_model, cfg.text_encoder.model_max_length, published)
    settings = (f"hidden_size {config.hidden_size}, depth {config.depth} spatial + {config.depth} temporal, "
                f"{config.num_heads} heads, mlp_ratio {config.mlp_ratio}, patch {list(config.patch_size)}, "
                f"in/out channels {config.in_channels}/{config.out_channels}, captions "
                f"{config.caption_channels} x {config.model_max_length}, qk_norm {config.qk_norm}")
    model = build_on_meta(lambda: STDiT3(config))
    if cfg.dtype == "fp8":  # as build_denoiser does: Linear weights stored in float8 e4m3
        from vader.models.fp8 import quantize_linears

        quantize_linears(model)
        settings += "; Linear weights in float8 e4m3 with per-channel scales (dtype='fp8')"
    return MetaModel("denoiser", cfg.model.type, source, settings, model, _run_dtype(cfg))


def _vae(cfg: VaderConfig) -> MetaModel:
    from vader.models.presets import vae_config
    from vader.models.vae import VideoVAE

    source, published = _source(cfg.vae.from_pretrained)
    config = vae_config(cfg.vae, published)
    spatial, temporal = config.spatial, config.temporal
    settings = (f"spatial AutoencoderKL channels {spatial['block_out_channels']}, layers_per_block "
                f"{spatial['layers_per_block']} (its weights are in the VAE checkpoint); temporal filters {temporal.filters}, multipliers "
                f"{list(temporal.channel_multipliers)}, {temporal.num_res_blocks} res blocks, "
                f"{temporal.time_downsample_factor}x in time; chunks of {config.micro_frame_size} frames, "
                f"spatial micro-batch {config.micro_batch_size}")
    model = build_on_meta(lambda: VideoVAE(config))
    return MetaModel("vae", cfg.vae.type, source, settings, model, _run_dtype(cfg))


def resolved_values(cfg: VaderConfig, num_processes: int | None = None) -> dict[str, Any]:
    """What `vader config` adds to the config: the values a run derives from it, each taken from the
    code that owns the rule (the VAE config's latent geometry, the trainer's step
    count), so they cannot drift from what a run does. Loads no weights and downloads nothing."""
    from vader.models.presets import vae_config
    from vader.run import load_prompts
    from vader.train import total_train_steps

    processes = num_processes or max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    if cfg.backend is not None:
        try:
            prompts_n: int | None = len(load_prompts(cfg)[0])
        except VaderError:
            prompts_n = None
        height, width = cfg.height_width
        steps_n = (total_train_steps(cfg, prompts_n or 0, processes)
                   if prompts_n is not None or cfg.max_train_steps else None)
        return {"frames": cfg.frames, "height_width": [height, width],
                "latent_shape_CTHW": list(backend_latent_shape(cfg)), "prompts": prompts_n, "processes": processes,
                "total_optimizer_steps": steps_n,
                "videos_per_validation": cfg.num_val_runs * cfg.val_batch_size * processes}
    vae = vae_config(cfg.vae, _source(cfg.vae.from_pretrained)[1])  # the VAE config owns the latent geometry
    frames = cfg.frames
    height, width = cfg.height_width
    latent_t, latent_h, latent_w = vae.latent_size(frames, height, width)
    factor = vae.spatial_factor
    try:
        prompts: int | None = len(load_prompts(cfg)[0])
    except VaderError:
        prompts = None  # no or unreadable prompts: `vader train` says why; steps may still be known
    steps = total_train_steps(cfg, prompts or 0, processes) if prompts is not None or cfg.max_train_steps else None
    out: dict[str, Any] = {
        "frames": frames,
        "height_width": [height, width],
        "video_frames_height_width": [frames, latent_h * factor, latent_w * factor],
        "latent_shape_CTHW": [vae.temporal.embed_dim, latent_t, latent_h, latent_w],
        "prompts": prompts,
        "processes": processes,
        "total_optimizer_steps": steps,
        "videos_per_validation": cfg.num_val_runs * cfg.val_batch_size * processes,
    }
    if (latent_h * factor, latent_w * factor) != (height, width):
        out["note"] = (f"{height}x{width} (Open-Sora's {cfg.resolution} {cfg.aspect_ratio}) is made as "
                       f"{latent_h * factor}x{latent_w * factor}: the VAE works in multiples of {factor}, as in "
                       "Open-Sora")
    return out


def _text_encoder(cfg: VaderConfig) -> MetaModel:
    from transformers import T5EncoderModel

    from vader.models.presets import text_encoder_config

    config = text_encoder_config(cfg.text_encoder)
    source, _ = _source(cfg.text_encoder.from_pretrained)
    settings = (f"T5 encoder: d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads x "
                f"{config.d_kv}, {config.feed_forward_proj} d_ff {config.d_ff}, vocab {config.vocab_size}; "
                f"{cfg.text_encoder.model_max_length} tokens per prompt, encoded once and cached")
    model = build_on_meta(lambda: T5EncoderModel(config))
    # Always fp32 as in Open-Sora; used once per prompt, then dropped.
    return MetaModel("text_encoder", cfg.text_encoder.type, source, settings, model, torch.float32)


_BUILDERS: dict[str, Callable[[VaderConfig], MetaModel]] = {
    "denoiser": _denoiser,
    "vae": _vae,
    "text_encoder": _text_encoder,
}


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
    targets: list[str]  # the module names LoRA matches (checkpoint.LORA_TARGETS)
    modules: Counter  # (target name, in_features, out_features) -> how many modules
    tensors: int
    trainable: int


def lora_summary(model: nn.Module, rank: int, alpha: float = 8.0, dropout: float = 0.01,
                 targets: list[str] | None = None) -> LoraSummary:
    """Inject the run's LoRA into `model` (meta is fine) with peft and count what it adds; `targets`:
    the module names (Open-Sora's checkpoint.LORA_TARGETS by default, a backend's own otherwise)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from vader.checkpoint import LORA_TARGETS, lora_config

    targets = list(targets or LORA_TARGETS)
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
        targets = None
        if cfg.backend is not None:
            from vader.backends import backend_class

            targets = list(backend_class(cfg.backend).lora_target_modules)
        lora = lora_summary(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        per_target = ", ".join(f"{n} {name} {i}->{o}" for (name, i, o), n in sorted(
            lora.modules.items(), key=lambda kv: lora.targets.index(kv[0][0]) if kv[0][0] in lora.targets else 99))
        lines.append(f"  LoRA r={lora.rank} (alpha {lora.alpha:g}, scale {lora.alpha / lora.rank:g}, dropout "
                     f"{lora.dropout:g}) on Linear modules named {', '.join(lora.targets)}: "
                     f"{sum(lora.modules.values())} modules ({per_target})")
        lines.append(f"  LoRA trainable parameters: {lora.trainable:,} in {lora.tensors} tensors "
                     f"({100 * lora.trainable / total:.2f}% of the denoiser), trained in fp32: "
                     f"{_size(lora.trainable * 4)} + AdamW state {_size(lora.trainable * 8)}")
    return "\n".join(lines)
