"""One typed configuration for training and inference, validated once at the edge.

A config comes from a Python file of top-level assignments (the original VADER / Open-Sora format,
e.g. ``configs/opensora-v1-2/vader/vader_train.py``) plus command-line overrides
(``--lr 1e-4``, ``--num-frames 2s``, ``--scheduler.num_sampling_steps 10``). Everything a user can
get wrong is reported as one ``VaderError`` line naming the key, the bad value and the valid
choices; inner code then receives plain, already-checked values.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import runpy
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vader.backends import MODEL_TYPES, backend_module, backend_of
from vader.dtypes import BACKEND_DTYPES, DTYPES
from vader.errors import VaderError
from vader.frames import max_decode_index
from vader.methods import METHODS, method_module
from vader.sizes import SPATIAL_COMPRESSION, image_size, parse_num_frames

BACKPROP_MODES = ("last", "rand", "specific")
SPECIFIC_CUTOFF = 15  # the original's `specific` mode: gradients from step 15 (0-based) on
DECODE_FRAME_MODES = ("-1", "fml", "all", "alt")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")
LOGGER_TYPES = ("wandb", "tensorboard", "none")
HPS_VERSIONS = ("v2.1", "v2.0")
DECODE_STRATEGIES = ("exact", "latent")
VAE_TYPES = ("OpenSoraVAE_V1_2", "OpenSoraVAE_V1_2-tiny")
TEXT_ENCODER_TYPES = ("t5", "t5-tiny")
SCHEDULER_TYPES = ("rflow",)
SHARDINGS = ("none", "fsdp")
SOLVERS = ("differentiable", "published")
VIDEO_QUALITIES = ("standard", "high", "lossless")
ACTPRED_FRAMES = ("decoded", "resample")
RESIZE_MODES = ("squash", "crop")
ATTENTION_BACKENDS = ("sdpa", "math")  # the same names as vader.models.stdit3.ATTENTION_BACKENDS


def _doc(text: str, **kw: Any) -> Any:
    return {"doc": text, **kw}


@dataclass
class ModelConfig:
    """The denoiser. Keys beyond these are STDiT3 architecture overrides (hidden_size, depth, ...)."""

    type: str = field(default="STDiT3-XL/2", metadata=_doc(
        "denoiser architecture: Open-Sora v1.2's STDiT3, or a diffusers backend ('wan': Wan2.1/2.2 T2V, TI2V and I2V, "
        "'cogvideox': CogVideoX 1.0 T2V and 5B-I2V, 'ltx': LTX-Video 2B), which needs an explicit image_size", choices=MODEL_TYPES))
    from_pretrained: str | None = field(default="hpcai-tech/OpenSora-STDiT-v3", metadata=_doc(
        "hub id or local folder; None = random init (Open-Sora types only). For 'wan'/'cogvideox': the diffusers "
        "pipeline (repo id or folder in its layout); left at the Open-Sora default it becomes "
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers / THUDM/CogVideoX-2b"))
    qk_norm: bool = field(default=True, metadata=_doc("RMS-norm q and k per head (Open-Sora v1.2: True)"))
    attention: str = field(default="sdpa", metadata=_doc(
        "attention kernels: 'sdpa' (torch's fused scaled_dot_product_attention; on GPUs no attention matrix is kept "
        "for backward) or 'math' (the reference's exact numerics)", choices=ATTENTION_BACKENDS))
    enable_flash_attn: bool = field(default=False, metadata=_doc(
        "the original's flag: True selects attention='sdpa' (False leaves model.attention to decide)"))
    enable_layernorm_kernel: bool = field(default=False, metadata=_doc("accepted for compatibility; no effect"))
    overrides: dict[str, Any] = field(default_factory=dict, metadata=_doc("STDiT3 architecture overrides"))


@dataclass
class VAEConfig:
    type: str = field(default="OpenSoraVAE_V1_2", metadata=_doc(
        "VAE architecture (Open-Sora; backends use their checkpoint's VAE and need the default here)",
        choices=VAE_TYPES))
    from_pretrained: str | None = field(default="hpcai-tech/OpenSora-VAE-v1.2", metadata=_doc(
        "hub id or local folder; None = random init. Backends: another VAE (repo id or folder, its vae/ part or "
        "the part alone); None or the Open-Sora default = the pipeline's own"))
    micro_frame_size: int = field(default=17, metadata=_doc("frames per temporal VAE chunk", gt=0))
    micro_batch_size: int = field(default=4, metadata=_doc("frames per spatial VAE micro-batch", gt=0))
    dtype: str | None = field(default=None, metadata=_doc(
        "diffusers backends: dtype of the VAE's weights and decode; None = the pipeline's own (Wan: fp32, as "
        "diffusers' Wan examples load it; CogVideoX and LTX-Video: the run's dtype). 'bf16' halves the Wan "
        "decode's memory with gradients (on a tiny random VAE: frames within 0.04 of fp32's on [-1, 1], the "
        "gradient's cosine to fp32's 0.999)", choices=BACKEND_DTYPES))
    offload_cache: bool = field(default=False, metadata=_doc(
        "model.type='wan' with grad_checkpoint: keep the causal decode's checkpointed feature caches in CPU "
        "memory until backward (the same values and gradients, for a copy to the CPU and back per kept cache)"))


@dataclass
class TextEncoderConfig:
    type: str = field(default="t5", metadata=_doc(
        "text encoder (Open-Sora; backends use their checkpoint's encoder and need the default here)",
        choices=TEXT_ENCODER_TYPES))
    from_pretrained: str | None = field(default="DeepFloyd/t5-v1_1-xxl", metadata=_doc(
        "hub id or local folder; None = random init. Backends: other encoder weights (the tokenizer stays the "
        "pipeline's); None or the Open-Sora default = the pipeline's own"))
    model_max_length: int = field(default=300, metadata=_doc(
        "T5 tokens per prompt (padded); backends: left at 300 it becomes the pipeline's own (wan 512, cogvideox "
        "226, which must equal the transformer's max_text_seq_length)", gt=0))
    offload: bool = field(default=False, metadata=_doc(
        "encode the prompts with T5 on the CPU (once per prompt; the GPU never holds its fp32 weights)"))


@dataclass
class SchedulerConfig:
    type: str = field(default="rflow", metadata=_doc("sampler", choices=SCHEDULER_TYPES))
    use_timestep_transform: bool = field(default=True, metadata=_doc("Open-Sora's resolution/length shift"))
    num_sampling_steps: int = field(default=30, metadata=_doc("Euler steps of the rectified-flow sampler", gt=0))
    cfg_scale: float = field(default=7.0, metadata=_doc("classifier-free guidance scale"))
    num_timesteps: int = field(default=1000, metadata=_doc("timestep range of the denoiser", gt=0))
    use_discrete_timesteps: bool = field(default=False, metadata=_doc("round timesteps to integers"))
    transform_scale: float = field(default=1.0, metadata=_doc("extra factor in the timestep transform", gt=0))
    shift: float | None = field(default=None, metadata=_doc(
        "model.type='wan' only: flow shift of its Euler sampler; None = 3.0 (Wan's value for 480p; 5.0 for 720p)",
        gt=0))
    use_dynamic_cfg: bool = field(default=False, metadata=_doc(
        "model.type='cogvideox' only: CogVideoXPipeline's cosine ramp of cfg_scale over the steps"))
    cfg_scale_2: float | None = field(default=None, metadata=_doc(
        "model.type='wan' with a two-expert Wan2.2 checkpoint (A14B) only: guidance of the low-noise expert "
        "transformer_2 (cfg_scale guides the high-noise one); None = cfg_scale, as WanPipeline's guidance_scale_2"))
    solver: str = field(default="differentiable", metadata=_doc(
        "the step of sampling steps without gradients (validation, infer, eval, and training steps before the "
        "backprop window): 'differentiable' (the step gradients go through: flow Euler, CogVideoX's DDIM) or "
        "'published' (the scheduler the model's authors sample with: UniPC for Wan, CogVideoXDPMScheduler for "
        "CogVideoX-5B and 5B-I2V (THUDM's demo swaps it in; 2B keeps DDIM), LTX-Video's Euler; Open-Sora's is its Euler); steps with gradients always take the differentiable step",
        choices=SOLVERS))


NESTED = {"model": ModelConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig, "scheduler": SchedulerConfig}


@dataclass
class VaderConfig:
    # --- what to generate (Open-Sora keys) ---
    resolution: str = field(default="240p", metadata=_doc("Open-Sora resolution name"))
    aspect_ratio: str = field(default="9:16", metadata=_doc("Open-Sora aspect ratio, e.g. 3:4"))
    image_size: tuple[int, int] | None = field(
        default=None, metadata=_doc("(height, width) in pixels; overrides resolution/aspect_ratio")
    )
    num_frames: int | str = field(default=16, metadata=_doc("frames, or Open-Sora length '2s' (=51), '4s', ..."))
    fps: int = field(default=24, metadata=_doc("frame rate the denoiser is conditioned on", gt=0))
    frame_interval: int = field(default=1, metadata=_doc("accepted for compatibility", gt=0))
    save_fps: int = field(default=24, metadata=_doc("frame rate of saved mp4 files", gt=0))
    multi_resolution: str = field(default="STDiT2", metadata=_doc("accepted for compatibility"))
    condition_frame_length: int = field(default=5, metadata=_doc("accepted for compatibility", min=0))
    align: int = field(default=5, metadata=_doc("accepted for compatibility", min=0))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_doc("denoiser (dict)"))
    vae: VAEConfig = field(default_factory=VAEConfig, metadata=_doc("video VAE (dict)"))
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig, metadata=_doc("text encoder (dict)"))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata=_doc("sampler (dict)"))
    negative_prompt: str | None = field(default=None, metadata=_doc(
        "backends (wan, cogvideox): the prompt classifier-free guidance steers away from; None = the pipeline's "
        "default ''. Open-Sora guides against its learned null embedding: must stay None"))
    aes: float | None = field(default=6.5, metadata=_doc("aesthetic score appended to every prompt"))
    flow: float | None = field(default=None, metadata=_doc("motion score appended to every prompt"))
    camera_motion: str | None = field(default=None, metadata=_doc("camera motion appended to every prompt"))
    prompt_path: str | None = field(default=None, metadata=_doc("text file, one prompt per line"))
    prompt: list[str] | None = field(default=None, metadata=_doc("prompts given inline (instead of prompt_path)"))
    start_index: int | None = field(default=None, metadata=_doc("first prompt of the file to use"))
    end_index: int | None = field(default=None, metadata=_doc("one past the last prompt to use"))
    verbose: int = field(default=1, metadata=_doc("0 = quiet, 1 = progress bars", min=0))
    # --- VADER ---
    is_vader_training: bool = field(default=True, metadata=_doc("`vader run`: train if True, else infer"))
    train_batch_size: int = field(default=1, metadata=_doc("videos per process per micro-step", gt=0))
    val_batch_size: int = field(default=1, metadata=_doc("videos per process per validation run", gt=0))
    num_val_runs: int = field(default=2, metadata=_doc("validation runs; videos = runs × val_batch_size × processes",
                                                            min=0))
    seed: int = field(default=200, metadata=_doc("the same seed gives the same run", min=0, lt=2**63))
    lora_ckpt_path: str | None = field(default=None, metadata=_doc(
        "initial LoRA: our checkpoint, the original .pt, or a diffusers-format LoRA (a folder with "
        "pytorch_lora_weights.safetensors, or a musubi/kohya/original-key .safetensors)"))
    resume_from: str | None = field(default=None, metadata=_doc("checkpoint folder or 'latest' to resume training"))
    project_dir: str = field(
        default="./project_dir", metadata=_doc("runs are written to project_dir/<run name>/", nonempty=True)
    )
    run_name: str | None = field(default=None, metadata=_doc("name of the run folder; default: a timestamp"))
    lr: float = field(default=2e-4, metadata=_doc("AdamW learning rate (constant)", gt=0))
    reward_fn: str | dict[str, float] = field(default="hps", metadata=_doc("reward name, or {name: weight}"))
    reward_sources: dict[str, str] | None = field(
        default=None, metadata=_doc("per-model hub id or local path for reward weights (see README: Rewards)")
    )
    reward_resize: str | None = field(
        default=None, metadata=_doc("frames -> 224px: None = each reward's original ('squash' for aesthetic/hps, "
                                    "'crop' for pick_score), or 'squash' / 'crop' for all", choices=RESIZE_MODES)
    )
    reward_grad_checkpoint: bool = field(default=False, metadata=_doc("checkpoint the reward model's layers"))
    actpred_frames: str = field(
        default="decoded", metadata=_doc("actpred: VideoMAE sees the decoded frames as they are (the original) or "
                                         "'resample's them to its 16", choices=ACTPRED_FRAMES)
    )
    gradient_accumulation_steps: int = field(default=8, metadata=_doc("micro-steps per optimizer step", gt=0))
    lora_rank: int = field(default=16, metadata=_doc("LoRA rank", gt=0))
    lora_alpha: float = field(default=8.0, metadata=_doc("LoRA alpha (peft default 8, as the original)", gt=0))
    lora_dropout: float = field(
        default=0.01, metadata=_doc("LoRA dropout (peft): on while training samples, as in the original; off for "
                                    "validation and inference", min=0, lt=1)
    )
    dtype: str = field(default="bf16", metadata=_doc(
        "dtype of the frozen model weights; 'fp8': the denoiser's Linear weights in float8 e4m3 with per-channel "
        "scales, computed in bf16, everything else bf16", choices=DTYPES))
    mixed_precision: str = field(default="bf16", metadata=_doc("autocast precision", choices=MIXED_PRECISIONS))
    logger_type: str = field(default="wandb", metadata=_doc("experiment tracker", choices=LOGGER_TYPES))
    use_wandb: bool = field(default=True, metadata=_doc("False turns wandb off even if logger_type='wandb'"))
    wandb_entity: str = field(default="", metadata=_doc("wandb entity (team or user)"))
    wandb_project: str = field(default="vader", metadata=_doc("wandb project"))
    validation_steps: int = field(
        default=10, metadata=_doc("validate after step 1 and every N optimizer steps (0 = only at the end)", min=0)
    )
    checkpointing_steps: int = field(default=1, metadata=_doc("save the LoRA every N optimizer steps (0 = end only)",
                                                                 min=0))
    checkpoints_total_limit: int | None = field(default=None, metadata=_doc("keep only the newest N checkpoints", gt=0))
    debug: bool = field(default=False, metadata=_doc("no experiment tracker (wandb/tensorboard off), as the original's debug"))
    use_AdamW8bit: bool = field(default=False, metadata=_doc("bitsandbytes AdamW8bit instead of AdamW"))
    hps_version: str = field(default="v2.1", metadata=_doc("HPS checkpoint version", choices=HPS_VERSIONS))
    num_train_epochs: int = field(default=200, metadata=_doc("passes over the prompt list", min=0))
    max_train_steps: int | None = field(default=800, metadata=_doc("optimizer steps in total on any number of processes "
                                                                             "(None: num_train_epochs passes over the prompts)", gt=0))
    max_grad_norm: float = field(default=1.0, metadata=_doc("gradient clipping norm (0 = off)", min=0))
    backprop_mode: str | int = field(
        default="last", metadata=_doc("steps that get gradients: last | rand | specific | K (last K steps)")
    )
    decode_frame: str = field(
        default="-1", metadata=_doc("frames to decode: '-1' random | 'N' | fml | all | alt; 'N' is output frame N, "
                                    "or latent frame N with decode_strategy='latent' (the original's meaning)")
    )
    decode_strategy: str = field(
        default="exact", metadata=_doc("'exact' decodes the true output frames; 'latent' the original's shortcut",
                                       choices=DECODE_STRATEGIES)
    )
    is_sample_preview: bool = field(default=True, metadata=_doc("generate and save validation videos"))
    grad_checkpoint: bool = field(default=True, metadata=_doc("checkpoint each denoiser call with gradients"))
    max_nonfinite_steps: int = field(
        default=3, metadata=_doc("stop after N optimizer steps in a row with a non-finite loss, reward or gradient "
                                 "(each such step is skipped, counted and logged)", gt=0)
    )
    allow_config_change: bool = field(
        default=False, metadata=_doc("resume even where keys that change results differ from the checkpoint's run "
                                     "(the differences are logged in the run folder)")
    )
    guard_drop: float = field(default=0.5, metadata=_doc(
        "warn in one line when the validation reward rose (over the run's first validation, and at the end over the "
        "base model's on the same seeds) while motion, temporal consistency or diversity fell by more than this "
        "fraction",
        gt=0, max=1))
    gold_reward: str | dict[str, float] | None = field(default=None, metadata=_doc(
        "a held-out reward that is never trained on, scored on the same validation videos and logged as "
        "val_gold_reward beside val_reward (reward name, {name: weight} or 'module:function'): a training reward "
        "that rises while the gold one falls is being hacked"))
    method: str = field(default="vader", metadata=_doc(
        "'vader' backpropagates the reward through the sampler; 'grpo' trains the same LoRA by Flow-GRPO policy "
        "gradient (the reward needs no gradient: any registered reward or reward_fn='module:function')",
        choices=METHODS))
    grpo: dict[str, Any] | None = field(default=None, metadata=_doc(
        "method='grpo' settings (Flow-GRPO's defaults but group_size): group_size 4, noise_level 0.7, clip_range 1e-4, "
        "kl_beta 0.0 (kl_units 'flow_grpo': ||mean - mean_ref||^2 / 2 s_t^2, or 'gaussian': / 2 s_t^2 dt), "
        "train_steps_fraction 0.99 (int(): all steps but the last), train_steps 'first' (or 'random', 'per_sample'), "
        "train_steps_start 0 (a window start..K-1), inner_epochs 1, updates_per_round None (2 where the "
        "gradient_accumulation_steps micro-batches split evenly), adv_clip_max 5.0, std 'global' (or 'group'), "
        "drop_zero_std True, uncond 'detached' (or 'trained'), same_noise False, ema False (ema_decay 0.9, "
        "ema_interval 8: validation and the final LoRA use the EMA)"))
    sharding: str = field(default="none", metadata=_doc(
        "'fsdp' shards the frozen denoiser's weights over the processes with FSDP2 (each block gathered for its "
        "forward and freed after), so a model larger than one card trains; the LoRA stays whole on every process "
        "(its gradients all-reduced as with 'none', every process replicating every weight)", choices=SHARDINGS))
    video_quality: str = field(
        default="standard", metadata=_doc("saved mp4s: 'standard' (H.264 yuv420p crf 18, small, plays everywhere), "
                                          "'high' (yuv444p crf 10) or 'lossless' (H.264 RGB crf 0: `vader score` "
                                          "gives the logged reward)",
                                          choices=VIDEO_QUALITIES)
    )

    # ---- derived values (computed by validate) ----
    @property
    def height_width(self) -> tuple[int, int]:
        if self.image_size is not None:
            size = self.image_size
            if not (isinstance(size, (tuple, list)) and len(size) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
                raise VaderError(f"image_size={size!r} must be (height, width) in pixels, e.g. (240, 426)")
            return (size[0], size[1])
        return image_size(self.resolution, self.aspect_ratio)

    @property
    def frames(self) -> int:
        return parse_num_frames(self.num_frames)

    @property
    def backend(self) -> str:
        """The backend model.type selects ('opensora', 'wan', 'cogvideox', 'ltx'; vader.backends.BACKENDS)."""
        return backend_of(self.model.type)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in NESTED:
            overrides = out[name].pop("overrides", None)
            if overrides:
                out[name].update(overrides)
        return out


TOP_KEYS = {f.name for f in fields(VaderConfig)}


def _nearest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _literal(text: str) -> Any:
    """A command-line value: a Python literal where it parses as one, else the raw string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered.lstrip("+-") in ("nan", "inf", "infinity"):  # not Python literals: read as the floats meant
        return float(lowered)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Top-level assignments of a Python config file (mmengine/Open-Sora style).

    `_base_ = "vader_train.py"` (or a list of files; paths relative to this file) loads those files
    first, in order, as mmengine does: this file's assignments override theirs, and a dict (model, vae,
    scheduler, ...) is merged key by key into the base's dict, unless it holds `_delete_=True`, which
    replaces it. A base may have its own `_base_`."""
    path = Path(path)
    if path.is_dir():
        raise VaderError(f"config file {path} is a folder; give a Python config file such as "
                         "configs/tiny/vader_train.py")
    if not path.is_file():
        raise VaderError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(str(path))
    except (Exception, SystemExit) as exc:  # a user file with a syntax or runtime error, or not Python at all
        detail = " ".join(str(exc).split())[:200]
        raise VaderError(f"could not read config file {path} (a Python file of top-level assignments is "
                         f"expected): {type(exc).__name__}: {detail}") from None
    out: dict[str, Any] = {}
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        out[key] = value
    _relative_to_file(out, path.parent)
    bases = namespace.get("_base_")
    if bases is None:
        return out
    names = [bases] if isinstance(bases, (str, Path)) else bases
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (str, Path)) for n in names):
        raise VaderError(f"config file {path}: _base_={bases!r} must be a config file name (relative to this "
                         "file) or a list of them")
    chain = (*_chain, path.resolve())
    merged: dict[str, Any] = {}
    for name in names:
        base = path.parent / name
        if not base.is_file():
            raise VaderError(f"config file {path}: its _base_ {str(name)!r} is not a file (looked for {base})")
        if base.resolve() in chain:
            loop = " -> ".join(str(p) for p in (*chain[chain.index(base.resolve()):], base.resolve()))
            raise VaderError(f"config file {path}: its _base_ {str(name)!r} forms a cycle: {loop}")
        merged = _merge_base(merged, load_config_file(base, chain))
    return _merge_base(merged, out)


def _merge_base(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """mmengine's merge of a config over its _base_: own values win; a dict merges into the base's
    dict key by key (recursively) unless it holds _delete_=True (then it replaces it)."""
    out = {} if own.get("_delete_") is True else dict(base)
    for key, value in own.items():
        if key == "_delete_":
            continue
        if isinstance(value, dict):
            below = out.get(key)
            value = _merge_base(below if isinstance(below, dict) else {}, value)
        out[key] = value
    return out


def _relative_to_file(values: dict[str, Any], folder: Path) -> None:
    """A relative prompt_path that is not found from the working directory is read next to the
    config file, so shipped configs work from anywhere."""
    prompt_path = values.get("prompt_path")
    if isinstance(prompt_path, str) and not Path(prompt_path).is_absolute() and not Path(prompt_path).exists():
        beside = folder / prompt_path
        if beside.exists():
            values["prompt_path"] = str(beside)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and `key=value`; hyphens in keys become underscores; dots nest."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                key, value = body, "true"  # a bare flag such as --debug
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise VaderError(f"unexpected argument '{token}': overrides look like --key value or key=value")
        out[key.replace("-", "_")] = _literal(value)
        i += 1
    return out


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            sub = merged.get(head)
            if not isinstance(sub, dict):
                sub = {}
            sub[rest] = value
            merged[head] = sub
        elif isinstance(value, dict) and isinstance(merged.get(key), dict) and key in NESTED:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise VaderError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")


def _build_nested(name: str, raw: Any) -> Any:
    cls = NESTED[name]
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise VaderError(f"{name}={raw!r} must be a dict such as {name} = dict(type=..., from_pretrained=...)")
    own = {f.name for f in fields(cls)} - {"overrides"}
    arch = _architecture_keys(name)
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in raw.items():
        if key in own:
            kwargs[key] = value
        elif key in arch:
            overrides[key] = value
        else:
            raise VaderError(f"unknown key '{name}.{key}'{_nearest(key, sorted(own | arch))}")
    obj = cls(**kwargs)
    if overrides:
        if "overrides" not in {f.name for f in fields(cls)}:
            raise VaderError(f"{name} does not take architecture overrides: {sorted(overrides)}")
        obj.overrides = overrides  # type: ignore[attr-defined]
    return obj


def _architecture_keys(name: str) -> set[str]:
    if name != "model":
        return set()
    from vader.models.stdit3 import STDiT3Config

    return {f.name for f in fields(STDiT3Config)}


def build_config(raw: dict[str, Any]) -> VaderConfig:
    """Turn a merged dict (file + overrides) into a validated `VaderConfig`."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in TOP_KEYS:
            raise VaderError(f"unknown config key '{key}'{_nearest(key, sorted(TOP_KEYS))}")
        kwargs[key] = _build_nested(key, value) if key in NESTED else value
    cfg = VaderConfig(**kwargs)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, argv: list[str] | None = None) -> VaderConfig:
    raw = load_config_file(path) if path is not None else {}
    return build_config(_merge(raw, parse_overrides(argv or [])))


def validate(cfg: VaderConfig) -> None:
    """Check every value once, from the schema (the fields' annotations and metadata), then the few
    keys whose rules need more than their own field (AFTER_TABLE); normalise forgiving spellings in place."""
    if cfg.logger_type is None:  # `--logger_type none` parses as None
        cfg.logger_type = "none"
    if cfg.sharding is None:  # `--sharding none` likewise
        cfg.sharding = "none"
    for key, owner, f, kind in schema():
        value = getattr(owner(cfg), f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and kind[0] is str:
            value = str(value)  # `--run_name 7` parses as an int: a name is still meant
            setattr(owner(cfg), f.name, value)
        _check_field(key, value, kind, f.metadata)
    for check in AFTER_TABLE:
        check(cfg)


# ---- the schema: one row per key, read from the dataclass fields ----------------------------------

_PLAIN = (bool, int, float, str)


def _field_kind(annotation: Any) -> tuple[type, ...] | None:
    """Accepted types of a plain field (bool, int, float, str, optionally None); None for a key
    with a custom check (tuples, lists, dicts, unions of several plain types)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    kinds = tuple(a for a in args if a is not type(None))
    if len(kinds) != 1 or kinds[0] not in _PLAIN:
        return None
    return (*kinds, type(None)) if len(kinds) < len(args) else kinds


def schema() -> list[tuple[str, Callable[[VaderConfig], Any], dataclasses.Field, tuple[type, ...]]]:
    """(dotted key, how to reach its dataclass from the config, field, accepted types) for every key
    that the table checks; keys whose annotation is not a plain type must be in CUSTOM_CHECKS."""
    rows = []

    def add(cls: type, prefix: str, owner: Callable[[VaderConfig], Any]) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            key = prefix + f.name
            if f.name in NESTED and cls is VaderConfig:
                add(NESTED[f.name], key + ".", lambda cfg, name=f.name: getattr(cfg, name))
                continue
            kind = _field_kind(hints[f.name])
            if kind is None:
                if key not in CUSTOM_CHECKS and f.name != "overrides":
                    raise TypeError(f"config key {key} has no plain type and no entry in CUSTOM_CHECKS")
                continue
            rows.append((key, owner, f, kind))

    add(VaderConfig, "", lambda cfg: cfg)
    return rows


def _show(number: Any) -> str:
    """A bound as a reader knows it: 2**63 rather than 9223372036854775808."""
    if isinstance(number, int) and number >= 2**32 and number & (number - 1) == 0:
        return f"2**{number.bit_length() - 1}"
    return repr(number)


def _check_field(key: str, value: Any, kind: type | tuple[type, ...], meta: Any) -> None:
    """Type, finiteness, choices and range of one value, as the field's annotation and metadata say."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None:
        if type(None) in kinds:
            return
        raise VaderError(f"{key}=None is not valid; give a {' or '.join(k.__name__ for k in kinds)}")
    number = float in kinds or int in kinds
    if isinstance(value, bool) and bool not in kinds:
        raise VaderError(f"{key}={value!r} must be {'a number' if number else 'a ' + kinds[0].__name__}, not a bool")
    accepted = (*kinds, int) if float in kinds else kinds  # an int is a fine float: lr=1
    if not isinstance(value, accepted):
        names = " or ".join(k.__name__ for k in kinds if k is not type(None))
        raise VaderError(f"{key}={value!r} must be of type {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise VaderError(f"{key}={value!r} is not a finite number")
    choices = meta.get("choices")
    if choices is not None:
        _check_choice(key, value, choices)
    if meta.get("nonempty") and not value:
        raise VaderError(f"{key}={value!r} must not be empty")
    bounds = [(">=", meta.get("min"), lambda v, b: v >= b), (">", meta.get("gt"), lambda v, b: v > b),
              ("<=", meta.get("max"), lambda v, b: v <= b), ("<", meta.get("lt"), lambda v, b: v < b)]
    if any(bound is not None and not ok(value, bound) for _, bound, ok in bounds):
        rule = " and ".join(f"{op} {_show(bound)}" for op, bound, _ in bounds if bound is not None)
        raise VaderError(f"{key}={_show(value)} must be {rule}")


# ---- keys whose rules need more than their own annotation -----------------------------------------


def _check_sizes(cfg: VaderConfig) -> None:
    cfg.height_width  # noqa: B018 - raises VaderError on a bad resolution/aspect_ratio/image_size
    _validate_image_size(cfg)
    cfg.frames  # noqa: B018 - raises VaderError on a bad num_frames


def _check_prompts(cfg: VaderConfig) -> None:
    if cfg.prompt is not None and not (
        isinstance(cfg.prompt, list) and all(isinstance(p, str) for p in cfg.prompt) and cfg.prompt
    ):
        raise VaderError(f"prompt={cfg.prompt!r} must be a non-empty list of strings")
    if cfg.prompt_path is not None and not Path(cfg.prompt_path).is_file():
        raise VaderError(f"prompt_path={cfg.prompt_path!r}: no such file")


def _check_paths(cfg: VaderConfig) -> None:
    if cfg.lora_ckpt_path is not None and not Path(cfg.lora_ckpt_path).exists():
        raise VaderError(f"lora_ckpt_path={cfg.lora_ckpt_path!r}: no such file or folder")


def _check_steps(cfg: VaderConfig) -> None:
    if cfg.max_train_steps is None and cfg.num_train_epochs == 0:
        raise VaderError("num_train_epochs=0 with max_train_steps=None trains nothing; set either to > 0")


def _check_modes(cfg: VaderConfig) -> None:
    cfg.backprop_mode = _validate_backprop_mode(cfg.backprop_mode, cfg.scheduler.num_sampling_steps)
    cfg.decode_frame = _validate_decode_frame(cfg.decode_frame, cfg.frames, cfg.decode_strategy,
                                              cfg.vae.micro_frame_size)


def _check_attention(cfg: VaderConfig) -> None:
    if cfg.model.enable_flash_attn and cfg.model.attention == "math":
        raise VaderError("model.attention='math' contradicts model.enable_flash_attn=True (which selects 'sdpa'); "
                         "set model.enable_flash_attn=False to get the reference's math attention")


def _check_backend(cfg: VaderConfig) -> None:
    """The keys only some backends read: each backend refuses what it cannot honour (rather than ignore
    it) and checks its size rules, before anything loads (vader.backends.<name>.check_config)."""
    backend_module(cfg.backend).check_config(cfg)


def is_callable_spec(reward_fn: object) -> bool:
    """True for a `module:function` reward (no registered reward name has a colon)."""
    return isinstance(reward_fn, str) and ":" in reward_fn


def _check_rewards(cfg: VaderConfig) -> None:
    if is_callable_spec(cfg.reward_fn):  # a Python callable: for methods that need scores only
        if method_module(cfg.method).DIFFERENTIABLE_REWARD:
            raise VaderError(f"reward_fn={cfg.reward_fn!r} is a Python function with no gradient; "
                             f"method={cfg.method!r} backpropagates through the reward: use --method grpo, or a "
                             "registered reward")
        _rewards().callable.load_callable_reward(cfg.reward_fn)  # imports it now: a typo fails before anything loads
        return
    validate_reward(cfg.reward_fn)
    if method_module(cfg.method).DIFFERENTIABLE_REWARD and not _rewards().is_differentiable(cfg.reward_fn):
        raise VaderError(f"reward_fn={cfg.reward_fn!r} has no gradient (a gold reward such as 'toy_judge'); "
                         f"method={cfg.method!r} backpropagates through the reward: use it as gold_reward, "
                         "or --method grpo")
    validate_reward_inputs(cfg)


def _check_gold(cfg: VaderConfig) -> None:
    gold = cfg.gold_reward
    if gold is None:
        return
    if is_callable_spec(gold):  # a Python callable needs no gradient: any method
        _rewards().callable.load_callable_reward(gold, key="gold_reward")
        return
    try:
        validate_reward(gold)
    except VaderError as exc:
        raise VaderError(str(exc).replace("reward_fn", "gold_reward")) from None
    if _same_reward(gold, cfg.reward_fn):
        raise VaderError(f"gold_reward={gold!r} is the training reward (reward_fn={cfg.reward_fn!r}); the gold "
                         "reward is one the LoRA is not trained on (another registered reward or "
                         "'module:function'), or None")
    try:
        _rewards().check_decode_frame(gold, cfg.decode_frame)
    except VaderError as exc:
        raise VaderError(str(exc).replace("reward_fn", "gold_reward")) from None


def _same_reward(a: Any, b: Any) -> bool:
    """Whether two registered-reward specs are one reward in any spelling: 'hps', {'hps': 1.0} and
    {'hps': 2} are the same reward (a weight only scales it); a mix is the same when its weights are."""
    if is_callable_spec(a) or is_callable_spec(b):
        return a == b
    mix_a, mix_b = _rewards().reward_mix(a), _rewards().reward_mix(b)
    if set(mix_a) != set(mix_b):
        return False
    first = next(iter(mix_a))
    if mix_b[first] == 0:
        return all(mix_b[k] == 0 for k in mix_a)
    ratio = mix_a[first] / mix_b[first]
    return all(math.isclose(mix_a[k], ratio * mix_b[k], rel_tol=1e-9) for k in mix_a)


def _check_method(cfg: VaderConfig) -> None:
    if cfg.method != "grpo" and cfg.grpo is not None:
        raise VaderError(f"grpo={cfg.grpo!r} is set but method={cfg.method!r}; add --method grpo or drop grpo")
    method_module(cfg.method).check_config(cfg)


# keys whose annotation is not one plain type: the table skips them and these checks own them
CUSTOM_CHECKS: dict[str, Callable[[VaderConfig], None]] = {
    "image_size": _check_sizes,
    "num_frames": _check_sizes,
    "prompt": _check_prompts,
    "backprop_mode": _check_modes,
    "reward_fn": _check_rewards,
    "reward_sources": _check_rewards,
    "grpo": _check_method,
    "gold_reward": _check_gold,
}
# run after the table, in this order: rules that relate several keys or look beyond the config
# (files, the reward registry); decode_frame needs num_frames, actpred needs the decode_frame
AFTER_TABLE: tuple[Callable[[VaderConfig], None], ...] = (
    _check_backend, _check_sizes, _check_prompts, _check_paths, _check_steps, _check_modes, _check_method, _check_rewards,
    _check_gold,
    _check_attention,
)


def _validate_image_size(cfg: VaderConfig) -> None:
    """An explicit image_size must be what the VAE can make exactly: a multiple of its spatial
    downsampling in both directions (the denoiser pads its patches itself, so no other factor)."""
    height, width = cfg.height_width
    if height < 16 or width < 16:
        raise VaderError(f"image_size={cfg.image_size!r} must be at least 16x16 pixels")
    if cfg.image_size is None:
        return  # Open-Sora's own tables: their sizes are floored exactly as Open-Sora does (see `vader config`)
    step = SPATIAL_COMPRESSION
    if height % step or width % step:
        low = (max(16, height // step * step), max(16, width // step * step))
        high = (-(-height // step) * step, -(-width // step) * step)
        nearest = " or ".join(dict.fromkeys(str(s) for s in (low, high)))
        raise VaderError(f"image_size={cfg.image_size!r}: height and width must be multiples of {step} (the VAE "
                         f"downsamples by {step}; this size would silently become "
                         f"{height // step * step}x{width // step * step}); nearest valid: {nearest}")


def _validate_backprop_mode(mode: Any, num_steps: int) -> str | int:
    if isinstance(mode, str) and mode.isdigit():
        mode = int(mode)
    if isinstance(mode, bool) or not isinstance(mode, (str, int)):
        raise VaderError(f"backprop_mode={mode!r}: choose 'last', 'rand', 'specific' or an integer K (last K steps)")
    if isinstance(mode, int):
        if not 1 <= mode <= num_steps:
            raise VaderError(
                f"backprop_mode={mode!r}: K must be between 1 and scheduler.num_sampling_steps={num_steps}"
            )
        return mode
    _check_choice("backprop_mode", mode, (*BACKPROP_MODES, "<integer K>"))
    if mode == "specific" and num_steps <= SPECIFIC_CUTOFF:
        raise VaderError(
            f"backprop_mode='specific' starts at step {SPECIFIC_CUTOFF} but scheduler.num_sampling_steps="
            f"{num_steps}; use more steps, 'last', 'rand' or an integer K"
        )
    return mode


def _validate_decode_frame(value: Any, num_frames: int, strategy: str = "exact", micro_frame_size: int = 17) -> str:
    """'-1', 'fml', 'all', 'alt' or an index: of an output frame with decode_strategy 'exact', of a
    latent frame with 'latent' (the original's meaning); the range comes from vader.frames."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None:
        raise VaderError(f"decode_frame={value!r}: choose '-1', a frame index like '3', 'fml', 'all' or 'alt'")
    if text in DECODE_FRAME_MODES:
        return text
    if text.isdigit():
        last = max_decode_index(strategy, num_frames, micro_frame_size)
        if int(text) > last:
            what = "the video has frames" if strategy != "latent" else \
                f"decode_strategy='latent' indexes latent frames; the {num_frames}-frame video has latent frames"
            raise VaderError(f"decode_frame={value!r} is out of range: {what} 0..{last}")
        return text
    raise VaderError(f"decode_frame={value!r} is not valid; choose '-1' (random), a frame index such as '3', "
                     "'fml', 'all' or 'alt'")


def _rewards() -> types.ModuleType:
    """The reward registry, imported when a config's rewards are checked (it imports torch, which
    reading and printing a config never needs)."""
    import vader.rewards

    return vader.rewards


def validate_reward(reward_fn: Any) -> None:
    names = _rewards().reward_names()
    if isinstance(reward_fn, str):
        _check_choice("reward_fn", reward_fn, names)
        return
    if not isinstance(reward_fn, dict) or not reward_fn:
        raise VaderError(f"reward_fn={reward_fn!r} must be a reward name or a dict {{name: weight}}")
    for name, weight in reward_fn.items():
        _check_choice("reward_fn", name, names)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise VaderError(f"reward_fn[{name!r}]={weight!r} must be a number (the weight)")
        if not math.isfinite(weight):
            raise VaderError(f"reward_fn[{name!r}]={weight!r} is not a finite number (the weight)")


def validate_reward_inputs(cfg: VaderConfig) -> None:
    """Cheap checks that would otherwise fail only after the models are loaded."""
    rewards = _rewards()
    rewards.validate_sources(cfg.reward_sources)
    rewards.check_decode_frame(cfg.reward_fn, cfg.decode_frame)  # rewards that need a clip (actpred, toy_alignment)


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key: used by the README and `vader config --keys`."""
    rows: list[tuple[str, str, str]] = []
    for f in fields(VaderConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in NESTED:
            for sub in fields(NESTED[f.name]):
                if sub.name == "overrides":
                    continue
                rows.append((f"{f.name}.{sub.name}", repr(getattr(default, sub.name)), sub.metadata.get("doc", "")))
            continue
        rows.append((f.name, repr(default), f.metadata.get("doc", "")))
    return rows
