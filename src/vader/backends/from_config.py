"""What the diffusers backends share in answering a `VaderConfig`: the keys they cannot honour, the
mapping of config keys to their settings, their parts on the meta device for `vader inspect` and the
geometry `vader config` shows. Each backend module calls these with its own names and defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vader.backends.base import MetaModel
from vader.checkpoint import lora_on_meta
from vader.config import ModelConfig, TextEncoderConfig, VaderConfig, VAEConfig
from vader.dtypes import BACKEND_DTYPES
from vader.errors import VaderError
from vader.memory import LiveBytes, PlannedHostMemory, materialise, materialise_generator_models
from vader.models.presets import torch_dtype

# text_encoder.model_max_length's default, Open-Sora's T5 length: for a backend it means "the pipeline's own"
OPENSORA_TEXT_LENGTH = 300
# the `vader plan --fit` knobs a diffusers backend honours: diffusers' own attention, no fp8 path, no
# latent decode shortcut, and its build encodes on the device
MEMORY_KNOBS = ("reward_grad_checkpoint", "grad_checkpoint", "use_AdamW8bit", "decode_frame", "backprop_mode")
# scheduler keys only some backends read: key -> (its unset value, whose it is); a backend names those it reads
SCHEDULER_KEYS = {"scheduler.shift": (None, "Wan's flow shift"), "scheduler.use_dynamic_cfg": (False, "CogVideoX's"),
                  "scheduler.cfg_scale_2": (None, "Wan2.2's guidance of its low-noise expert")}


def check_config(cfg: VaderConfig, default_repo: str, example_size: tuple[int, int], reads: tuple[str, ...],
                 settings: Any) -> None:
    """The rules every diffusers backend shares, then its settings' own `validate()` (its size rules),
    before anything loads. `reads`: the SCHEDULER_KEYS this backend honours (the others are refused).
    `settings(cfg)` maps the config; fills the backend's defaults into `cfg` in place."""
    name = cfg.model.type
    if cfg.model.from_pretrained == ModelConfig.from_pretrained:
        cfg.model.from_pretrained = default_repo  # the Open-Sora default names no weights of this pipeline
    if cfg.model.from_pretrained is None:
        raise VaderError(f"model.from_pretrained=None: model.type={name!r} loads a diffusers pipeline (a hub id or "
                         f"a folder in its layout, default {default_repo!r}); random init is for the "
                         "Open-Sora tiny types")
    if cfg.model.overrides:
        key, value = next(iter(cfg.model.overrides.items()))
        raise VaderError(f"model.{key}={value!r}: STDiT3 architecture keys do not apply to model.type={name!r} "
                         "(its architecture is the checkpoint's config)")
    for key, value, default in (("vae.type", cfg.vae.type, VAEConfig.type), ("text_encoder.type",
                                cfg.text_encoder.type, TextEncoderConfig.type)):
        if value != default:
            part = key.split(".")[0]
            raise VaderError(f"{key}={value!r} is an Open-Sora part; model.type={name!r} uses the pipeline's own "
                             f"{part}: leave {key}={default!r} (and set {part}.from_pretrained to load another one)")
    # the Open-Sora defaults of the part sources mean "the pipeline's own part"
    if cfg.vae.from_pretrained == VAEConfig.from_pretrained:
        cfg.vae.from_pretrained = None
    if cfg.text_encoder.from_pretrained == TextEncoderConfig.from_pretrained:
        cfg.text_encoder.from_pretrained = None
    if cfg.text_encoder.offload:
        raise VaderError(f"text_encoder.offload=True is for Open-Sora's T5; model.type={name!r} encodes the "
                         "prompts on the run's device once and releases the encoder: set it to False")
    if cfg.vae.offload_cache and name != "wan":
        raise VaderError(f"vae.offload_cache=True is for Wan's checkpointed causal decode; model.type={name!r} "
                         "keeps no feature caches for backward: set it to False")
    if cfg.image_size is None:
        raise VaderError(f"model.type={name!r} needs image_size=(height, width) in pixels, e.g. "
                         f"{example_size} (resolution/aspect_ratio are Open-Sora's size tables)")
    if cfg.decode_strategy != "exact":
        raise VaderError(f"decode_strategy={cfg.decode_strategy!r} is Open-Sora's latent-frame shortcut; "
                         f"model.type={name!r} decodes only the chunks the chosen frames need: use 'exact'")
    if cfg.dtype not in BACKEND_DTYPES:
        raise VaderError(f"dtype={cfg.dtype!r} is not available for model.type={name!r}; choose one of: "
                         f"{', '.join(map(repr, BACKEND_DTYPES))}")
    for key, (unset, whose) in SCHEDULER_KEYS.items():
        value = getattr(cfg.scheduler, key.split(".")[1])
        if key not in reads and value != unset:
            raise VaderError(f"{key}={value!r} is {whose}; model.type={name!r} needs {key}={unset!r}")
    built = settings(cfg)  # normalises model_max_length: the pipeline's own when left at 300
    try:
        built.validate()
    except VaderError as exc:
        raise VaderError(f"model.type={name!r} with image_size={tuple(cfg.height_width)}, num_frames="
                         f"{cfg.num_frames!r}: {exc}") from None
    cfg.text_encoder.model_max_length = built.max_sequence_length


def settings(cfg: VaderConfig, settings_class: type, **extra: Any) -> Any:
    """The one place config keys map to a diffusers backend's settings:

    model.from_pretrained -> pretrained; vae/text_encoder.from_pretrained -> vae/text_encoder (None: the
    pipeline's own); image_size -> height, width; num_frames; scheduler.num_sampling_steps -> num_steps;
    scheduler.cfg_scale -> guidance_scale; negative_prompt (None: the settings' default);
    text_encoder.model_max_length -> max_sequence_length (300: the settings' default); dtype -> dtype;
    `extra`: the backend's own fields (wan: shift; cogvideox: vae_dtype, use_dynamic_cfg). Not validated
    here: call `.validate()` (config validation does)."""
    height, width = cfg.height_width
    values: dict[str, Any] = dict(
        pretrained=cfg.model.from_pretrained, vae=cfg.vae.from_pretrained,
        text_encoder=cfg.text_encoder.from_pretrained,
        dtype=cfg.dtype, height=height, width=width, num_frames=cfg.frames,
        num_steps=cfg.scheduler.num_sampling_steps, guidance_scale=float(cfg.scheduler.cfg_scale),
    )
    if cfg.text_encoder.model_max_length != OPENSORA_TEXT_LENGTH:
        values["max_sequence_length"] = cfg.text_encoder.model_max_length
    if cfg.negative_prompt is not None:
        values["negative_prompt"] = cfg.negative_prompt
    values.update({k: v for k, v in extra.items() if v is not None})
    if cfg.vae.dtype is not None:  # the user's choice over the backend's (the pipeline's own) VAE dtype
        values["vae_dtype"] = cfg.vae.dtype
    return settings_class(**values)


_MODEL_PARTS = {"denoiser": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
# a two-expert pipeline (Wan2.2-A14B) trains its low-noise expert: meta_models names it "transformer_2"
TRAINED_EXPERT = "transformer_2"


def experts(models: dict[str, Any]) -> tuple[Any, Any | None]:
    """(the transformer the LoRA goes on, the other expert or None) of a backend's `meta_models`."""
    if TRAINED_EXPERT in models:
        return models[TRAINED_EXPERT], models["transformer"]
    return models["transformer"], None


def meta_part(cfg: VaderConfig, part: str, settings: Any, models: dict[str, Any]) -> MetaModel:
    """A diffusers backend's part, as its `meta_models` builds it: the checkpoint's own config when it
    is on this machine, else the published architecture. The denoiser of two experts is the trained one
    (the other has the same shape: `vader inspect` lists one of them)."""
    name = TRAINED_EXPERT if part == "denoiser" and TRAINED_EXPERT in models else _MODEL_PARTS[part]
    model = models[name]
    source = getattr(settings, name, None) or settings.pretrained
    raw = getattr(model, "config", None)
    config = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    shown = {k: v for k, v in config.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
    line = f"{type(model).__name__}: " + ", ".join(f"{k} {v}" for k, v in list(shown.items())[:12])
    dtype = torch_dtype(getattr(settings, "vae_dtype", cfg.dtype) if part == "vae" else cfg.dtype)
    title = f"{cfg.model.type} ({type(model).__name__})"
    if name == TRAINED_EXPERT:
        title = f"{cfg.model.type} ({type(model).__name__} transformer_2, the low-noise expert the LoRA trains; " \
                "transformer, the high-noise expert, has the same shape)"
    return MetaModel(part, title, str(source), line, model, dtype)


def resolved(cfg: VaderConfig, generator_class: type, settings: Any, models: dict[str, Any]) -> dict[str, Any]:
    """Frames, size and the latent shape as the generator computes it, from the meta-built transformer
    and VAE (only the geometry properties are used: no weights, nothing moved)."""
    shell = object.__new__(generator_class)
    fields = {f.name for f in dataclasses.fields(generator_class)} if dataclasses.is_dataclass(generator_class) else set()
    for name, value in (("denoiser", models["transformer"]), ("vae", models["vae"]), ("settings", settings)):
        if not fields or name in fields:
            object.__setattr__(shell, name, value)
    height, width = cfg.height_width
    return {"frames": cfg.frames, "height_width": [height, width], "latent_shape_CTHW": list(shell.latent_shape)}


class DiffusersBackend:
    """The BackendModule functions every diffusers backend shares, bound to its own parts: `settings(cfg)`
    (its config mapping), its generator class, `meta_models(settings)`, `missing_weights(settings)`, its
    LoRA targets and `wrap(settings, transformer, vae[, other])` (a generator around models already in memory;
    `other`: a two-expert pipeline's untrained expert, `transformer` then the trained one)."""

    def __init__(self, settings: Callable[[VaderConfig], Any], generator: type,
                 meta_models: Callable[[Any], dict[str, Any]], missing_weights: Callable[[Any], str | None],
                 targets: list[str], wrap: Callable[[Any, Any, Any], Any]) -> None:
        self.settings, self.generator, self.meta_models = settings, generator, meta_models
        self.missing_weights, self.targets, self.wrap = missing_weights, targets, wrap

    def build(self, cfg: VaderConfig, device: torch.device | str, prompts: list[str] | None = None,
              cache: Any = None) -> Any:
        return self.generator.build(self.settings(cfg), device, prompts=prompts, cache=cache)

    def weight_problems(self, cfg: VaderConfig) -> tuple[list[str], list]:
        message = self.missing_weights(self.settings(cfg))
        return ([message] if message else []), []

    def meta_part(self, cfg: VaderConfig, part: str) -> MetaModel:
        s = self.settings(cfg)
        return meta_part(cfg, part, s, self.meta_models(s))

    def resolved(self, cfg: VaderConfig) -> dict[str, Any]:
        s = self.settings(cfg)
        return resolved(cfg, self.generator, s, self.meta_models(s))

    def plan_generator(self, cfg: VaderConfig, training: bool) -> tuple[Any, Callable]:
        """For `vader plan`: the VAE on meta and `build(meter, prompts)`, which, inside the plan's fake
        mode, gives the transformer and the VAE storage as `build` loads them (LoRA in fp32 when training),
        wraps them and gives every prompt (and the negative prompt) an embedding of the encoder's shape.
        Two experts: the LoRA on the trained one, both given storage under 'denoiser'."""
        s = self.settings(cfg)
        models = self.meta_models(s)
        (transformer, other), vae = experts(models), models["vae"]
        if training:
            lora_on_meta(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, self.targets)
        width = models["text_encoder"].config.d_model

        def build(meter: LiveBytes, prompts: list[str]) -> Any:
            dtype = torch_dtype(cfg.dtype)
            materialise_generator_models(meter, transformer, vae, dtype, torch_dtype(getattr(s, "vae_dtype", cfg.dtype)))
            if other is None:
                gen = self.wrap(s, transformer, vae)
            else:
                with meter.phase("denoiser"):  # the other expert is loaded beside the trained one, frozen
                    materialise(other, dtype)
                gen = self.wrap(s, transformer, vae, other)
            if hasattr(gen, "host_memory"):  # what goes to CPU memory is not on the card: the plan counts it apart
                gen.host_memory = PlannedHostMemory(meter)
            with meter.phase("prompts"):
                for prompt in dict.fromkeys([*prompts, s.negative_prompt]):
                    gen.embeddings[prompt] = torch.zeros(1, s.max_sequence_length, width, dtype=dtype)
            return gen

        return vae, build


__all__ = ["DiffusersBackend", "OPENSORA_TEXT_LENGTH", "check_config", "meta_part", "resolved", "settings"]
