"""What the diffusers backends share: weight lookup with one-line errors, the text-encoder adapter
that `EmbeddingCache` accepts, decoding only the chunks a causal VAE needs, and diffusers-format LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    LoraConfig in the file's metadata) that `pipeline_class.load_lora_weights(folder)` loads."""
    state, config = peft_state_and_config(lora, config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    metadata = config.to_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=metadata)
    return folder


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


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """diffusers' per-block activation checkpointing; it acts only in steps that record a graph."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        return
    if enabled and not model.is_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    elif not enabled and model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()


class PromptsAndVideos:
    """What the diffusers generators share, once: cached prompt embeddings (the negative prompt too
    when guidance is on), releasing the encoder, and `generate`. A generator dataclass provides
    `settings` (guidance_scale, negative_prompt, num_frames), `embeddings`, `text_encoder`, `device`,
    `sample_latents` and `decode`."""

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
        gen.denoiser = load_part(parts["transformer"], transformer_class.from_pretrained, torch_dtype=dtype)
        gen.vae = load_part(parts["vae"], vae_class.from_pretrained, torch_dtype=vae_dtype)
        gen._adopt_models()
        return gen

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
