"""What the diffusers backends share: weight lookup with one-line errors, the text-encoder adapter
that `EmbeddingCache` accepts, decoding only the chunks a causal VAE needs, diffusers-format LoRA, and
the pipelines' precision under autocast (the modules diffusers keeps in fp32 run in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vader.dtypes import parse_dtype
from vader.errors import VaderError
from vader.weights import cached_file, download_command, download_hint, is_repo_id, missing_message, offline

# diffusers' load_config still passes this argument to hf_hub_download, whose warning would end up on
# every `vader` command that reads a backend's config: it is diffusers' business, not the user's.
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")

# diffusers models, transformers models: single file first, then a sharded index
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer_config.json",)
SCHEDULER_FILES = ("scheduler_config.json",)


def require_diffusers(backend: str, *names: str) -> None:
    """One line naming the diffusers classes this installation lacks (older releases have no Wan)."""
    import diffusers

    missing = [name for name in names if not hasattr(diffusers, name)]
    if missing:
        raise VaderError(f"model.type={backend!r} needs {', '.join(missing)} from diffusers, which diffusers "
                         f"{diffusers.__version__} lacks: `pip install -U diffusers` (tested with 0.42.1)")


@dataclass(frozen=True)
class Component:
    """One part of a diffusers pipeline: `source` is a hub id or a folder in the pipeline layout
    (the part in `subfolder`), or a folder holding the part itself."""

    name: str  # the settings field that names it ("transformer", "vae", ...)
    source: str
    subfolder: str
    config_file: str  # config.json, tokenizer_config.json, scheduler_config.json
    weights: tuple[str, ...]  # any one of these (empty: a config-only part)

    def location(self) -> tuple[str, str | None]:
        """(name_or_path, subfolder) for `from_pretrained`."""
        local = Path(self.source).expanduser()
        if local.is_dir():
            if (local / self.subfolder).is_dir():
                return str(local), self.subfolder
            return str(local), None
        return self.source, self.subfolder


def _shards_present(index: Path, exists: Callable[[str], bool]) -> bool:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(weight_map) and all(exists(shard) for shard in set(weight_map.values()))


def _has_files(part: Component, exists: Callable[[str], bool], locate: Callable[[str], Path | None]) -> bool:
    if not exists(part.config_file):
        return False
    for name in part.weights:
        path = locate(name)
        if path is None:
            continue
        if not name.endswith(".index.json") or _shards_present(path, exists):
            return True
    return not part.weights


def component_problem(part: Component) -> tuple[str, str | None]:
    """(problem, hub repo to fetch) for a part that is not on this machine; ("", None) when it is.

    A hub part that is not cached is a problem only offline: online, `from_pretrained` downloads it.
    """
    local = Path(part.source).expanduser()
    if local.is_dir():
        path, sub = part.location()
        folder = Path(path) / sub if sub else Path(path)

        def locate(name: str) -> Path | None:
            return folder / name if (folder / name).is_file() else None

        if _has_files(part, lambda name: locate(name) is not None, locate):
            return "", None
        wanted = " or ".join(part.weights) if part.weights else part.config_file
        return (f"{part.name}={part.source!r}: {folder} lacks {part.config_file} or {wanted} (a folder in the "
                f"diffusers layout holds {part.subfolder}/ beside the other parts)"), None
    if local.exists() or not is_repo_id(part.source):
        return (f"{part.name}={part.source!r}: no such local folder, and not a hub repo id (which looks like "
                "'org/name')"), None

    def locate_hub(name: str) -> Path | None:
        return cached_file(part.source, name, part.subfolder)

    if _has_files(part, lambda name: locate_hub(name) is not None, locate_hub):
        return "", None
    if offline():
        return f"{part.name}={part.source!r}", part.source
    return "", None


def pipeline_components(settings, *extra: Component) -> dict[str, Component]:  # type: ignore[no-untyped-def]
    """The parts of a diffusers text-to-video pipeline (tokenizer, text encoder, transformer, VAE, and the
    backend's `extra` parts), each from the settings field of its name, or `settings.pretrained`."""
    def source(name: str) -> str:
        value = getattr(settings, name)
        return value if value is not None else settings.pretrained

    parts = [Component("tokenizer", source("tokenizer"), "tokenizer", TOKENIZER_FILES[0], ()),
             Component("text_encoder", source("text_encoder"), "text_encoder", "config.json", TRANSFORMERS_WEIGHTS),
             Component("transformer", source("transformer"), "transformer", "config.json", DIFFUSERS_WEIGHTS),
             Component("vae", source("vae"), "vae", "config.json", DIFFUSERS_WEIGHTS), *extra]
    return {part.name: part for part in parts}


def check_settings(settings, spatial_multiple: int, example: str) -> None:  # type: ignore[no-untyped-def]
    """One-line errors for the sizes and numbers every diffusers pipeline needs (before anything loads);
    `example`: a valid height x width."""
    for key in ("height", "width"):
        value = getattr(settings, key)
        if not isinstance(value, int) or value <= 0 or value % spatial_multiple:
            raise VaderError(f"{key}={value!r} must be a positive multiple of {spatial_multiple} (the VAE "
                             f"downsamples 8x and the transformer patches 2x2), e.g. {example}")
    if not isinstance(settings.num_steps, int) or settings.num_steps < 1:
        raise VaderError(f"num_steps={settings.num_steps!r} must be a positive integer")
    if not math.isfinite(settings.guidance_scale):
        raise VaderError(f"guidance_scale={settings.guidance_scale!r} must be a finite number")
    if not isinstance(settings.max_sequence_length, int) or settings.max_sequence_length < 1:
        raise VaderError(f"max_sequence_length={settings.max_sequence_length!r} must be a positive integer")
    parse_dtype("dtype", settings.dtype)
    parse_dtype("vae_dtype", settings.vae_dtype)


def missing_weights(settings) -> str | None:  # type: ignore[no-untyped-def]
    """The one-line message a backend's `build` would raise for absent weights, or None (for a preflight)."""
    return missing_weights_message(list(settings.components().values()))


def missing_weights_message(parts: Sequence[Component]) -> str | None:
    """One line naming every part whose files are absent (every missing repo once), or None."""
    local_problems: list[str] = []
    repos: dict[str, list[str]] = {}
    for part in parts:
        problem, repo = component_problem(part)
        if repo is not None:
            repos.setdefault(repo, []).append(part.subfolder)
        elif problem:
            local_problems.append(problem)
    messages = list(local_problems)
    if repos:
        messages.append(missing_message((f"{repo} ({', '.join(subs)})" for repo, subs in repos.items()),
                                        map(download_command, repos),
                                        "point the settings at local folders in the diffusers layout"))
    return "; also: ".join(messages) if messages else None


def check_weights(parts: Sequence[Component]) -> None:
    message = missing_weights_message(parts)
    if message:
        raise VaderError(message)


def load_part(part: Component, loader: Callable[..., object], **kwargs) -> object:
    """`loader(name_or_path, subfolder=..., **kwargs)` with a failure as one VaderError line."""
    path, sub = part.location()
    if sub is not None:
        kwargs["subfolder"] = sub
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as exc:  # missing or unreadable files, by loader
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise VaderError(f"{part.name}={part.source!r}: could not load {part.subfolder} ({first})") from None


# ---- architecture without weights ------------------------------------------------------------------


def local_part_config(part: Component, read: Callable[..., object]) -> object | None:
    """`read(name_or_path, subfolder=..., local_files_only=True)` (a class's config reader) when the
    part's config is on this machine (folder or HF cache), else None. Never downloads."""
    path, sub = part.location()
    kwargs = {"local_files_only": True}
    if sub is not None:
        kwargs["subfolder"] = sub
    try:
        return read(path, **kwargs)
    except (OSError, ValueError):
        return None


def architecture_config(part: Component, read: Callable[..., object], published_repo: str,
                        published: object) -> object:
    """The part's own config when it is on this machine; the published architecture for the
    published repo otherwise; a one-line error for any other source whose config is absent."""
    found = local_part_config(part, read)
    if found is not None:
        return found
    if part.source == published_repo:
        return published
    fetch = download_command(part.source, "--include", f"'{part.subfolder}/*.json'")
    raise VaderError(f"{part.name}={part.source!r}: its {part.subfolder}/{part.config_file} is not on this "
                     f"machine, so its architecture is unknown; fetch it with {download_hint(fetch)} or point "
                     f"{part.name} at a local folder")


# ---- text ---------------------------------------------------------------------------------------


class PromptEncoder:
    """A tokenizer + encoder with the interface `vader.models.text.EmbeddingCache` uses: `encode`
    gives y [B, 1, L, C] and mask [B, L]; `cache_id` and `model_max_length` key the cache."""

    def __init__(self, encode: Callable[[list[str]], tuple[Tensor, Tensor]], name: str, dtype: torch.dtype,
                 model_max_length: int, output_dim: int) -> None:
        self._encode = encode
        self.name = name
        self.dtype = dtype
        self.model_max_length = model_max_length
        self.output_dim = output_dim

    @property
    def cache_id(self) -> str:
        return f"{self.name}|{self.dtype}"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            empty = torch.zeros(0, 1, self.model_max_length, self.output_dim, dtype=self.dtype)
            return empty, torch.zeros(0, self.model_max_length, dtype=torch.long)
        y, mask = self._encode(list(prompts))
        return y[:, None], mask


# ---- decoding -----------------------------------------------------------------------------------


def padded_t5_encoder(tokenizer, model: nn.Module, name: str, device: torch.device, length: int) -> PromptEncoder:  # type: ignore[no-untyped-def]
    """T5 prompt embeddings as CogVideoXPipeline and LTXPipeline compute them (`_get_t5_prompt_embeds`):
    padded to `length` and encoded WITHOUT the attention mask (CogVideoX's transformer was trained on the
    padding's embeddings too); the mask is returned beside them (LTX's cross-attention takes it)."""

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        hidden = model(tokens.input_ids.to(device))[0].to(model.dtype)
        return hidden, tokens.attention_mask.long()

    return PromptEncoder(encode, name=name, dtype=model.dtype, model_max_length=length,
                         output_dim=int(model.config.d_model))


def decode_until(chunks: Iterator[Tensor], frames: list[int] | None, total: int) -> Tensor:
    """Take a causal VAE's decoded chunks ([B, 3, f, H, W], in order) only until the last wanted
    output frame exists, then pick `frames` (None: all `total`). Later chunks are never decoded."""
    last = total - 1 if frames is None else max(frames)
    pieces: list[Tensor] = []
    produced = 0
    try:
        for piece in chunks:
            pieces.append(piece)
            produced += piece.shape[2]
            if produced > last:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # runs the generator's cleanup (the VAE's feature cache) now, not at garbage collection
    video = torch.cat(pieces, dim=2)
    return video if frames is None else video[:, :, list(frames)]


def check_frames(frames: list[int] | None, total: int) -> None:
    if frames is None:
        return
    if not frames:
        raise ValueError("frames must name at least one output frame (None decodes all)")
    bad = [f for f in frames if not 0 <= f < total]
    if bad:
        raise ValueError(f"frames {bad} are outside the output frames 0..{total - 1}")


# ---- LoRA ---------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def peft_state_and_config(lora: nn.Module | dict[str, Tensor], config=None):
    """(state dict in peft's key format without the adapter name, its LoraConfig)."""
    from peft import get_peft_model_state_dict

    if isinstance(lora, nn.Module):
        if config is None:  # peft records the adapter's config on the model it injects into
            configs = getattr(lora, "peft_config", None) or {}
            config = configs.get("default") or next(iter(configs.values()), None)
        state = get_peft_model_state_dict(lora)
    else:
        state = dict(lora)
    if config is None:
        raise ValueError("a LoRA state dict needs its LoraConfig (rank and alpha set the scale diffusers applies)")
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v.detach().cpu().contiguous()
             for k, v in state.items()}
    return state, config


def save_diffusers_lora(pipeline_class: type, lora: nn.Module | dict[str, Tensor], folder: str | os.PathLike[str],
                        config=None, dtype: torch.dtype | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_A.weight`, the
    LoraConfig in the file's metadata) that `pipeline_class.load_lora_weights(folder)` loads.

    The strength is baked (`lora_formats.bake`): lora_B holds alpha / rank times the trained B and the
    metadata says lora_alpha = rank and lora_dropout = 0, so a loader reading the metadata and one
    reading the tensors alone both apply the trained LoRA, with no live dropout. NaN/inf is refused."""
    from vader.lora_formats import bake

    state, config = peft_state_and_config(lora, config)
    state, metadata = bake(state, config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a NaN LoRA is worse than none; bf16/fp16 can also overflow once the scale is baked in
        raise VaderError(f"refusing to save the diffusers-format LoRA to {folder}: {bad} holds NaN or inf")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=metadata)
    return folder


def save_renamed_lora(lora: nn.Module | dict[str, Tensor], file: str | os.PathLike[str], rename: Callable[
        [dict[str, Tensor]], dict[str, Tensor]], config=None) -> Path:  # type: ignore[no-untyped-def]
    """One .safetensors of the baked LoRA (as `save_diffusers_lora` bakes it) under `rename`'s key names
    (e.g. `lora_formats.original_wan_keys` for ComfyUI), written to a temporary name and moved into place."""
    from safetensors.torch import save_file

    from vader.lora_formats import TRANSFORMER_PREFIX, bake

    state, config = peft_state_and_config(lora, config)
    state, _ = bake(state, config)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise VaderError(f"refusing to save the LoRA to {file}: {bad} holds NaN or inf")
    state = rename({f"{TRANSFORMER_PREFIX}{k}": v.contiguous() for k, v in state.items()})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "ss_network_dim": str(config.r),
                                         "ss_network_alpha": str(config.r)})
    os.replace(tmp, file)
    return file


# ---- sampling ----------------------------------------------------------------------------------


@contextlib.contextmanager
def real_tensors() -> Iterator[None]:
    """Suspend an active FakeTensorMode (`vader plan` runs the step on fake tensors) while a schedule
    is computed: schedulers read values (`.item()`, indexing by a timestep), which fake tensors lack."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def adopt(model: nn.Module, device: torch.device) -> None:
    """Eval mode, base weights frozen (an injected LoRA keeps its requires_grad), on `device`.

    Moves only what is elsewhere: Module.to() on fake tensors (`vader plan`) would try to swap them."""
    if any(t.device != device for t in (*model.parameters(), *model.buffers())):
        model.to(device)
    model.eval()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)


# ---- precision as the pipelines run it -----------------------------------------------------------

_FP32_HOOKED = "_vader_fp32_under_autocast"  # marks a module whose forward already leaves autocast


def keep_in_fp32_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules of `model` that diffusers keeps in fp32 (`_keep_in_fp32_modules`, matched as
    `from_pretrained` matches them: a component of the dotted name). WanTransformer3DModel: rope,
    time_embedder, norm1/2/3 (scale_shift_table is a parameter: the ops reading it are elementwise, which
    autocast leaves alone)."""
    wanted = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not wanted:
        return []
    found: list[nn.Module] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in covered):
            continue
        if wanted.intersection(name.split(".")):
            found.append(module)
            covered.append(name)
    return found


def run_fp32_modules_without_autocast(model: nn.Module) -> int:
    """Make the modules diffusers keeps in fp32 run in fp32 under autocast, as the pipelines (which use no
    autocast) run them: training and validation run inside `accelerator.autocast()` (bf16), which would
    otherwise run e.g. Wan's time embedding in bf16 and move its video. A forward pre-hook leaves every
    active autocast for the module's forward, a forward hook (`always_call`: also when it raises) restores
    it; gradient-checkpoint recomputation calls the same hooks. Idempotent; returns the modules hooked."""
    modules = keep_in_fp32_modules(model)
    for module in modules:
        if getattr(module, _FP32_HOOKED, False):
            continue
        active: list[list[torch.autocast]] = []  # one entry per forward in flight (LIFO)

        def leave(_module: nn.Module, _args: Any, active: list = active) -> None:
            contexts = []
            for device_type in ("cuda", "cpu"):
                if torch.is_autocast_enabled(device_type):
                    context = torch.autocast(device_type, enabled=False)
                    context.__enter__()
                    contexts.append(context)
            active.append(contexts)

        def restore(_module: nn.Module, _args: Any, _output: Any, active: list = active) -> None:
            if not active:  # an earlier pre-hook raised before ours ran: nothing of ours to undo
                return
            for context in reversed(active.pop()):
                context.__exit__(None, None, None)

        module.register_forward_pre_hook(leave)
        module.register_forward_hook(restore, always_call=True)
        setattr(module, _FP32_HOOKED, True)
    return len(modules)


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """No autocast on `device`'s type inside (a model then runs in its own weights' dtype, as the pipelines
    run it); nothing changes where none is active."""
    with torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) \
            else contextlib.nullcontext():
        yield


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """diffusers' per-block activation checkpointing; it acts only in steps that record a graph."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        return
    if enabled and not model.is_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    elif not enabled and model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()


@dataclass
class PromptsAndVideos:
    """What the diffusers generators share, once: their fields, cached prompt embeddings (the negative
    prompt too when guidance is on), releasing the encoder, adopting models, and `generate`. A generator
    adds `lora_target_modules`, `_check_models`, `_prompt_encoder`, `sample_latents` and `decode`."""

    denoiser: nn.Module  # the pipeline's transformer (a two-expert Wan2.2: the trained expert): where the LoRA goes
    vae: nn.Module
    text_encoder: PromptEncoder | None  # dropped after the prompts are encoded (UMT5-XXL / T5-XXL: ~5B parameters)
    settings: Any  # the backend's settings dataclass (WanSettings, CogVideoXSettings)
    device: torch.device
    dtype: torch.dtype
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    _schedule: tuple | None = field(default=None, repr=False)

    lora_formats = ("diffusers",)  # pytorch_lora_weights.safetensors for `pipe.load_lora_weights`
    # what a generator class names: its model.type, settings class, the diffusers pipeline whose sampling
    # and LoRA format it matches, its (text encoder, transformer, VAE) classes as 'package.Class', and
    # the other diffusers classes it needs
    backend_name: ClassVar[str]
    settings_class: ClassVar[type]
    pipeline_class: ClassVar[str]
    model_classes: ClassVar[tuple[str, str, str]]
    diffusers_classes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def extra_fields(cls, parts: dict[str, Component]) -> dict:
        """The dataclass fields a backend adds, read from its parts (CogVideoX: its scheduler config)."""
        return {}

    @classmethod
    def build(cls, settings=None, device: torch.device | str = "cpu", prompts: list[str] | None = None,  # type: ignore[no-untyped-def]
              cache=None, **overrides):
        """Load the parts (hub ids or folders); with `prompts`, encode them (and the negative prompt)
        and release the text encoder before the transformer and the VAE load (`load`)."""
        wanted = [name.split(".")[1] for name in cls.model_classes if name.startswith("diffusers.")]
        require_diffusers(cls.backend_name, *wanted, cls.pipeline_class, *cls.diffusers_classes)
        settings = dataclasses.replace(settings or cls.settings_class(), **overrides)
        classes = [getattr(importlib.import_module(name.split(".")[0]), name.split(".")[1]) for name in cls.model_classes]
        return cls.load(settings, device, prompts, cache, *classes, extra=cls.extra_fields)

    @property
    def denoisers(self) -> tuple[nn.Module, ...]:
        """Every transformer the generator samples with, the trained one (`denoiser`) first: what sharding
        shards and what is adopted (frozen, eval, on the device) with the denoiser."""
        return (self.denoiser,)

    @classmethod
    def check_checkpoint(cls, settings) -> None:  # type: ignore[no-untyped-def]
        """One-line errors for a checkpoint layout the backend does not understand, before `components`
        are listed and any weight loads (Wan: image-to-video folders, TI2V-5B, two experts' settings)."""

    def _load_denoisers(self, parts: dict[str, Component], transformer_class: type, dtype: torch.dtype) -> None:
        """Load the transformer(s) the generator samples with (a backend with several overrides this)."""
        self.denoiser = load_part(parts["transformer"], transformer_class.from_pretrained, torch_dtype=dtype)

    def save_lora_diffusers(self, lora: nn.Module | dict[str, Tensor], folder: str | os.PathLike[str],
                            config=None) -> Path:  # type: ignore[no-untyped-def]
        """`pytorch_lora_weights.safetensors` in `folder`, loadable by the pipeline's `load_lora_weights`."""
        import diffusers

        return save_diffusers_lora(getattr(diffusers, self.pipeline_class), lora, folder, config)

    @classmethod
    def load(cls, settings, device: torch.device | str, prompts: list[str] | None, cache,
             encoder_class: type, transformer_class: type, vae_class: type,
             extra: Callable[[dict[str, Component]], dict] | None = None):
        """The one load sequence of every diffusers backend: dtypes checked, every missing weight named in
        one line before anything loads, then the tokenizer and text encoder; with `prompts`, encode them
        (and the negative prompt) and release the encoder before the transformer and the VAE load, so the
        largest model of the pipeline is never in memory beside them. `extra(parts)` gives the dataclass
        fields a backend adds (CogVideoX's scheduler config)."""
        from transformers import AutoTokenizer

        settings.validate()
        device = torch.device(device)
        dtype = parse_dtype("dtype", settings.dtype)
        vae_dtype = parse_dtype("vae_dtype", settings.vae_dtype)
        if device.type == "cpu" and torch.float16 in (dtype, vae_dtype):
            raise VaderError("dtype='fp16' needs a CUDA GPU (fp16 kernels are missing on CPU); use 'bf16' or 'fp32'")
        cls.check_checkpoint(settings)  # before the parts are listed: the layout decides which there are
        parts = settings.components()
        check_weights(list(parts.values()))
        fields = extra(parts) if extra is not None else {}
        tokenizer = load_part(parts["tokenizer"], AutoTokenizer.from_pretrained)
        encoder = load_part(parts["text_encoder"], encoder_class.from_pretrained, dtype=dtype)
        gen = cls(denoiser=None, vae=None, text_encoder=None, settings=settings, device=device, dtype=dtype, **fields)
        gen.text_encoder = gen._prompt_encoder(tokenizer, encoder.to(device).eval().requires_grad_(False),
                                               name=parts["text_encoder"].source)
        del tokenizer, encoder  # the PromptEncoder holds the only references: releasing it frees the encoder
        if prompts is not None:
            gen.encode_prompts(prompts, cache=cache)
            gen.release_text_encoder()
        gen._load_denoisers(parts, transformer_class, dtype)
        gen.vae = load_part(parts["vae"], vae_class.from_pretrained, torch_dtype=vae_dtype)
        gen._adopt_models()
        return gen

    def _adopt_components(self, text_encoder: nn.Module | None, tokenizer) -> None:  # type: ignore[no-untyped-def]
        """What `from_components` ends with: the text encoder (if given) wrapped as the pipeline encodes,
        then the models adopted and checked."""
        if text_encoder is not None:
            name = str(getattr(text_encoder.config, "name_or_path", self.backend_name))
            self.text_encoder = self._prompt_encoder(  # type: ignore[attr-defined]
                tokenizer, text_encoder.to(self.device).eval().requires_grad_(False), name=name)
        self._adopt_models()

    def _adopt_models(self) -> None:
        for model in self.denoisers:
            adopt(model, self.device)
            run_fp32_modules_without_autocast(model)
        adopt(self.vae, self.device)
        self._check_models()  # type: ignore[attr-defined]

    def reward_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts)

    def enable_gradient_checkpointing(self, enabled: bool) -> None:
        """Nothing to keep: diffusers' models take the flag per call here (`sample_latents`, `decode`)."""

    @property
    def uses_guidance(self) -> bool:
        return self.settings.guidance_scale > 1.0  # type: ignore[attr-defined]

    @property
    def num_frames(self) -> int:
        return self.settings.num_frames  # type: ignore[attr-defined]

    def encode_prompts(self, prompts: list[str], cache=None) -> None:  # type: ignore[no-untyped-def]
        """Encode every new prompt (and the negative prompt when guidance is on) once."""
        wanted = list(prompts) + ([self.settings.negative_prompt] if self.uses_guidance else [])  # type: ignore[attr-defined]
        todo = [p for p in dict.fromkeys(wanted) if p not in self.embeddings]  # type: ignore[attr-defined]
        if not todo:
            return
        if self.text_encoder is None:  # type: ignore[attr-defined]
            raise RuntimeError("text encoder already released; encode all prompts before releasing it")
        if cache is not None:
            y, _ = cache.get_or_encode(self.text_encoder, todo)  # type: ignore[attr-defined]
        else:
            y, _ = self.text_encoder.encode(todo)  # type: ignore[attr-defined]
        for i, p in enumerate(todo):
            self.embeddings[p] = y[i].to(self.device)  # type: ignore[attr-defined]  # [1, L, C]

    def release_text_encoder(self) -> None:
        self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator, progress: Callable | None = None) -> Tensor:
        """Whole videos [B, 3, F, H, W] in [-1, 1], no autograd anywhere."""
        return self.decode(self.sample_latents(prompts, generator, cutoff=None,  # type: ignore[attr-defined]
                                               progress=progress))
