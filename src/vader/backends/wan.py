"""Wan2.1 and Wan2.2 text-to-video through diffusers' own classes, with VADER's backprop cutoff.

WanTransformer3DModel + AutoencoderKLWan + UMT5 (transformers), sampled with flow-matching Euler
(diffusers' FlowMatchEulerDiscreteScheduler with `shift`) and classifier-free guidance as WanPipeline
runs it: two transformer passes per step, `uncond + g * (cond - uncond)`. With fp32 weights the
latents equal `WanPipeline(..., scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
output_type="latent")`; with bf16 weights ours keep the latents and the guidance in fp32 where the
pipeline rounds them to bf16 after every step.

Checkpoints: Wan2.1-T2V-1.3B and Wan2.1-T2V-14B (one transformer), Wan2.2-T2V-A14B (two experts of the
14B shape). A two-expert folder says so in its model_index.json (`transformer_2` and `boundary_ratio`,
0.875 for A14B) and is sampled as WanPipeline (diffusers 0.42) samples it: a step whose timestep
t >= boundary_ratio * 1000 runs the high-noise expert `transformer` with `guidance_scale`, a step below
runs the low-noise expert `transformer_2` with `guidance_scale_2` (config `scheduler.cfg_scale_2`; None:
`guidance_scale`, as WanPipeline); guidance is on for both experts when guidance_scale > 1 (WanPipeline's
rule; a cfg_scale_2 > 1 with cfg_scale <= 1 is refused, the pipeline would ignore it).

LoRA on two experts: the LoRA goes on the low-noise expert `transformer_2` (`gen.denoiser`, where the
training loop injects it and what it saves); the high-noise expert (`gen.other_denoiser`) stays frozen
and without LoRA. Why that one: VADER's gradient window is the last sampling steps (backprop_mode 'last',
or a small K), and the last steps are the low-noise expert's. The high-noise expert's steps all come
before the low-noise ones (timesteps descend) and nothing they compute depends on the LoRA, so they run
without gradients: a backprop window reaching into them ('rand', 'specific', a K larger than the low-noise
steps) is clamped to the first low-noise step, which gives exactly the same LoRA gradient with less memory
(`vader config` shows the split: A14B with shift 12 and 40 steps samples steps 0-24 with `transformer`,
25-39 with `transformer_2`). method='grpo' is refused for two experts: it trains on every sampled step,
and the high-noise ones have nothing to train. Both experts move to the device, frozen and in eval mode,
and `gen.denoisers` names both (sharding shards both).

The LoRA file the run writes (<run>/lora/diffusers/pytorch_lora_weights.safetensors, keys
`transformer.<module>...` as diffusers writes a Wan LoRA) loads into WanPipeline's low-noise expert with
`load_into_transformer_2=True` (without it, diffusers would put it on the high-noise expert):

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers", vae=vae, torch_dtype=torch.bfloat16)
    pipe.load_lora_weights("<run>/lora/diffusers", load_into_transformer_2=True)
    pipe(prompt, guidance_scale=4.0, guidance_scale_2=3.0, ...)

Refused in one line before any weight loads: a model_index.json naming another pipeline class, a component
WanPipeline's text-to-video sampling does not use (image_encoder, image_processor: image-to-video),
`expand_timesteps: true` (Wan2.2-TI2V-5B), transformer_2 without boundary_ratio or the reverse; a
transformer with image conditioning (image_dim, added_kv_proj_dim, in_channels != out_channels), two
experts of different shapes, a VAE whose z_dim is not the transformer's in_channels.

Precision as the pipeline: the transformer's modules diffusers keeps in fp32 (`_keep_in_fp32_modules`:
time embedding, norms, rope) run in fp32 under the training loop's bf16 autocast, and the VAE decodes
without autocast in its own dtype (fp32 by default), as WanPipeline runs them (no autocast).

The published Wan repos ship UniPCMultistepScheduler for inference; the gradient path here is
the first-order Euler step (every step a plain function of the previous latents), so that is what
is sampled and trained. Not supported: image conditioning (I2V, FLF2V, VACE, Animate), Wan2.2-TI2V-5B's
per-token timesteps, UniPC/DPM solvers.

The sampler is a rectified flow, so the generator is also a `FlowSampler` (`flow_start`,
`flow_velocity`): GRPO samples it with an SDE and a log-probability per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vader.backends import common, from_config, wan_decode
from vader.backends.base import FlowState
from vader.errors import VaderError
from vader.weights import is_repo_id, local_file, offline

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_14B_REPO = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN_A14B_REPO = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections of every block
# The published architectures, for describing the model without its files: diffusers'
# convert_wan_to_diffusers.py "Wan-T2V-1.3B" (1.419B parameters) and "Wan-T2V-14B" (14.29B; Wan2.2-T2V-A14B's
# two experts have this shape too); the VAE of all three is AutoencoderKLWan's defaults (the Wan2.1 VAE, 127M);
# the text encoder is google/umt5-xxl's encoder (5.68B).
WAN_1_3B_TRANSFORMER = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960,
    "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
}
WAN_14B_TRANSFORMER = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824,
    "freq_dim": 256, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
}
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu"}
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's, which WanPipeline's boundary multiplies


@dataclass(frozen=True)
class WanLayout:
    """What a checkpoint's model_index.json says about its transformers (or the published one's, when its
    files are not on this machine): two experts when `boundary_ratio` is set."""

    boundary_ratio: float | None = None

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None


@dataclass(frozen=True)
class Published:
    """A published repo's transformer config (each expert's, for two) and layout, known without its files."""

    transformer: dict[str, Any]
    layout: WanLayout


PUBLISHED = {
    WAN_REPO: Published(WAN_1_3B_TRANSFORMER, WanLayout()),
    WAN_14B_REPO: Published(WAN_14B_TRANSFORMER, WanLayout()),
    WAN_A14B_REPO: Published(WAN_14B_TRANSFORMER, WanLayout(boundary_ratio=0.875)),
}
SUPPORTED = "Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.2-T2V-A14B"
# model_index.json entries of a text-to-video WanPipeline; any other present entry is refused
INDEX_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "transformer_2", "vae", "scheduler")
INDEX_SETTINGS = ("boundary_ratio", "expand_timesteps")


@dataclass
class WanSettings:
    """Everything a Wan backend needs; each component is a hub id or a folder (the diffusers layout:
    `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` (and `transformer_2/` for Wan2.2-A14B); or a
    folder holding that part alone)."""

    pretrained: str = WAN_REPO
    transformer: str | None = None  # None: `pretrained`
    transformer_2: str | None = None  # a two-expert checkpoint's low-noise expert; None: `pretrained`
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    dtype: str = "bf16"  # transformer and text encoder weights
    vae_dtype: str = "fp32"  # as diffusers' Wan examples load the VAE
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_steps: int = 50
    guidance_scale: float = 5.0  # <= 1: no classifier-free guidance (one transformer pass per step)
    guidance_scale_2: float | None = None  # two experts: the low-noise expert's guidance; None: guidance_scale
    negative_prompt: str = ""  # WanPipeline's default; Wan's authors use a long list of defects
    shift: float = 3.0  # flow shift: 3.0 for 480p, 5.0 for 720p (Wan's recommendation); 12.0 for Wan2.2-A14B
    max_sequence_length: int = 512

    def components(self) -> dict[str, common.Component]:
        """The parts to load: tokenizer, text encoder, transformer, VAE, and for two experts transformer_2."""
        extra = ()
        if checkpoint_layout(self).two_experts:
            extra = (common.Component("transformer_2", self.transformer_2 or self.pretrained, "transformer_2",
                                      "config.json", common.DIFFUSERS_WEIGHTS),)
        return common.pipeline_components(self, *extra)

    def validate(self, spatial_multiple: int = 16, temporal: int = 4) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        common.check_settings(self, spatial_multiple, "480 x 832")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise VaderError(f"num_frames={self.num_frames!r} must be {temporal}k + 1 (the VAE keeps the first "
                             f"frame and packs {temporal} frames per latent frame), e.g. 33, 49 or 81")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise VaderError(f"shift={self.shift!r} must be a positive number (3.0 for 480p, 5.0 for 720p)")
        g2 = self.guidance_scale_2
        if g2 is not None and not (isinstance(g2, (int, float)) and not isinstance(g2, bool) and math.isfinite(g2)):
            raise VaderError(f"scheduler.cfg_scale_2={g2!r} (guidance_scale_2) must be a finite number or None "
                             "(None: the same as scheduler.cfg_scale)")
        if g2 is not None and g2 > 1.0 >= self.guidance_scale:
            raise VaderError(f"scheduler.cfg_scale_2={g2!r} with scheduler.cfg_scale={self.guidance_scale!r}: "
                             "WanPipeline guides (both experts) only when cfg_scale > 1, so cfg_scale_2 would be "
                             "ignored; set cfg_scale > 1, or cfg_scale_2 to None or <= 1")


# ---- the checkpoint's layout, read before any weight loads ---------------------------------------------


def _present(value: object) -> bool:
    """A model_index.json entry that names something (diffusers writes an absent component as [null, null])."""
    if isinstance(value, (list, tuple)):
        return any(v is not None for v in value)
    return value is not None and value is not False


def layout_from_index(index: dict[str, Any], source: str) -> WanLayout:
    """The layout a model_index.json describes; a one-line VaderError for anything this backend would not
    sample in full (another pipeline, image conditioning, per-token timesteps, half of a two-expert pair)."""
    where = f"pretrained={source!r}: its model_index.json"
    name = index.get("_class_name", "WanPipeline")
    if name != "WanPipeline":
        raise VaderError(f"{where} has _class_name={name!r}; model.type='wan' samples text-to-video WanPipeline "
                         f"checkpoints only ({SUPPORTED})")
    for key, value in index.items():
        if key.startswith("_") or key in INDEX_COMPONENTS or key in INDEX_SETTINGS or not _present(value):
            continue
        raise VaderError(f"{where} has {key}={value!r}, which text-to-video WanPipeline sampling does not use "
                         "(image_encoder / image_processor: an image-to-video checkpoint); model.type='wan' "
                         f"understands {', '.join(INDEX_COMPONENTS)}, boundary_ratio ({SUPPORTED})")
    if _present(index.get("expand_timesteps")):
        raise VaderError(f"{where} has expand_timesteps={index['expand_timesteps']!r} (Wan2.2-TI2V-5B: per-token "
                         f"timesteps); model.type='wan' needs expand_timesteps=false ({SUPPORTED})")
    if not _present(index.get("transformer")):
        raise VaderError(f"{where} has transformer={index.get('transformer')!r}; model.type='wan' needs a "
                         "transformer (and, for two experts, transformer_2 with boundary_ratio)")
    boundary, second = index.get("boundary_ratio"), _present(index.get("transformer_2"))
    if second and boundary is None:
        raise VaderError(f"{where} has transformer_2 but boundary_ratio=None, so WanPipeline would never sample "
                         "it; set boundary_ratio (0.875 for Wan2.2-T2V-A14B) or remove transformer_2")
    if boundary is not None and not second:
        raise VaderError(f"{where} has boundary_ratio={boundary!r} but no transformer_2; a two-expert checkpoint "
                         "needs both experts (transformer: high noise, transformer_2: low noise)")
    if boundary is not None and not (isinstance(boundary, (int, float)) and not isinstance(boundary, bool)
                                     and 0 < boundary < 1):
        raise VaderError(f"{where} has boundary_ratio={boundary!r}; it must be a number in (0, 1) "
                         "(0.875 for Wan2.2-T2V-A14B)")
    return WanLayout(None if boundary is None else float(boundary))


def checkpoint_layout(settings: WanSettings) -> WanLayout:
    """From `settings.pretrained`'s model_index.json when it is on this machine (a folder, or the Hugging Face
    cache), else the published repo's; one transformer for anything else (a folder of bare parts). Never
    downloads (`WanGenerator.check_checkpoint` fetches the index first when it loads from the hub)."""
    path = local_file(settings.pretrained, "model_index.json")
    if path is not None:
        try:
            index = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise VaderError(f"pretrained={settings.pretrained!r}: its model_index.json is unreadable "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
        if not isinstance(index, dict):
            raise VaderError(f"pretrained={settings.pretrained!r}: its model_index.json is not a JSON object")
        return layout_from_index(index, settings.pretrained)
    published = PUBLISHED.get(settings.pretrained)
    return published.layout if published is not None else WanLayout()


def fetch_model_index(source: str) -> None:
    """Bring a hub repo's model_index.json into the cache (online only) so that its layout is known before
    `components` are listed: without it a two-expert repo would load only `transformer/`."""
    if Path(source).expanduser().exists() or not is_repo_id(source) or offline():
        return
    if local_file(source, "model_index.json") is not None:
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, "model_index.json")
    except Exception:  # noqa: BLE001 - no index (a repo of bare parts) or no network: the parts' own loads say
        pass


def check_guidance(settings: WanSettings, layout: WanLayout) -> None:
    """guidance_scale_2 belongs to a two-expert checkpoint (WanPipeline raises for it on one transformer)."""
    if settings.guidance_scale_2 is not None and not layout.two_experts:
        raise VaderError(f"scheduler.cfg_scale_2={settings.guidance_scale_2!r} (guidance_scale_2) is the guidance "
                         f"of Wan2.2's low-noise expert; pretrained={settings.pretrained!r} has one transformer (no "
                         "boundary_ratio in its model_index.json): leave it None")


def check_transformer_config(name: str, source: str, config: dict[str, Any]) -> None:
    """One-line errors for a transformer config that is not a text-to-video WanTransformer3DModel."""
    where = f"{name}={source!r}: its config.json has"
    kind = config.get("_class_name", "WanTransformer3DModel")
    if kind != "WanTransformer3DModel":
        raise VaderError(f"{where} _class_name={kind!r}; model.type='wan' samples WanTransformer3DModel "
                         f"(text-to-video: {SUPPORTED})")
    for key in ("image_dim", "added_kv_proj_dim"):
        if config.get(key) is not None:
            raise VaderError(f"{where} {key}={config[key]!r} (image conditioning: an image-to-video transformer); "
                             f"model.type='wan' samples text-to-video transformers ({key}=None)")
    if config.get("in_channels", 16) != config.get("out_channels", 16):
        raise VaderError(f"{where} in_channels={config.get('in_channels')!r} and out_channels="
                         f"{config.get('out_channels')!r} (an image-to-video transformer takes the image latents "
                         "and mask as extra channels); model.type='wan' needs in_channels == out_channels")


def _same(a: object, b: object) -> bool:
    """Config values alike (a JSON list and a tuple of the same numbers are the same patch size)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def check_experts(configs: dict[str, dict[str, Any]], vae: dict[str, Any] | None, sources: dict[str, str]) -> None:
    """The transformers' configs (each alone, the two experts alike) and the VAE's latent width against
    them; `sources`: where each part comes from, for the message."""
    for name, config in configs.items():
        check_transformer_config(name, sources[name], config)
    if "transformer" in configs and "transformer_2" in configs:
        for key in ("in_channels", "out_channels", "patch_size", "text_dim"):
            a, b = configs["transformer"].get(key), configs["transformer_2"].get(key)
            if not _same(a, b):
                raise VaderError(f"transformer_2={sources['transformer_2']!r}: its config.json has {key}={b!r} but "
                                 f"transformer's has {key}={a!r}; the two experts must take the same latents and text")
    if vae is not None and configs:
        channels = next(iter(configs.values())).get("in_channels", 16)
        z_dim = vae.get("z_dim", 16)
        if z_dim != channels:
            raise VaderError(f"vae={sources['vae']!r}: its config.json has z_dim={z_dim!r} but the transformer "
                             f"takes in_channels={channels!r}; use the VAE of the transformer's checkpoint")


def _part_config(part: common.Component, read: Callable[..., object], download: bool) -> dict[str, Any] | None:
    found = common.local_part_config(part, read)
    if found is None and download and is_repo_id(part.source) and not Path(part.source).expanduser().exists() \
            and not offline():
        try:  # a config.json alone, before from_pretrained would fetch the weights
            found = read(part.source, subfolder=part.subfolder)
        except (OSError, ValueError):
            found = None
    return dict(found) if found is not None else None  # type: ignore[call-overload]


def check_part_configs(settings: WanSettings, download: bool = False) -> None:
    """`check_experts` on the configs that are on this machine (and, with `download`, online, fetched)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    parts = settings.components()
    configs = {name: c for name in ("transformer", "transformer_2") if name in parts
               and (c := _part_config(parts[name], WanTransformer3DModel.load_config, download)) is not None}
    check_experts(configs, _part_config(parts["vae"], AutoencoderKLWan.load_config, download),
                  {name: part.source for name, part in parts.items()})


def flow_schedule(num_steps: int, shift: float, boundary_ratio: float | None,
                  device: torch.device | str) -> tuple[Tensor, Tensor, list[bool]]:
    """(timesteps [N], sigmas [N + 1], first_expert [N]) of diffusers' FlowMatchEulerDiscreteScheduler with
    this shift and step count, as real tensors (also under `vader plan`'s fake ones). first_expert[i]: step i
    runs `transformer` (always, for one transformer), by WanPipeline's rule for two experts:
    t >= boundary_ratio * num_train_timesteps runs the high-noise `transformer`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with common.real_tensors():
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        sched.set_timesteps(num_steps, device=device)
        first = [boundary_ratio is None or bool(t >= boundary_ratio * NUM_TRAIN_TIMESTEPS) for t in sched.timesteps]
    return sched.timesteps, sched.sigmas, first


def high_noise_steps(settings: WanSettings, boundary_ratio: float | None) -> int:
    """How many of the first sampling steps the high-noise expert takes (0 for one transformer)."""
    if boundary_ratio is None:
        return 0
    return sum(flow_schedule(settings.num_steps, settings.shift, boundary_ratio, "cpu")[2])


def _published_repo(source: str) -> str:
    return source if source in PUBLISHED else WAN_REPO


def meta_models(settings: WanSettings | None = None) -> dict[str, nn.Module]:
    """Transformer(s), VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published architecture of
    the repo named (Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.2-T2V-A14B). A two-expert checkpoint gives
    `transformer` (high noise) and `transformer_2` (low noise: the one the LoRA goes on)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoConfig, UMT5Config, UMT5EncoderModel

    s = settings or WanSettings()
    parts = s.components()
    configs: dict[str, dict[str, Any]] = {}
    for name in ("transformer", "transformer_2"):
        if name in parts:
            repo = _published_repo(parts[name].source)
            found = common.architecture_config(parts[name], WanTransformer3DModel.load_config, repo,
                                               PUBLISHED[repo].transformer)
            configs[name] = dict(found)  # type: ignore[call-overload]  # from_config must not edit the table
    vae = dict(common.architecture_config(parts["vae"], AutoencoderKLWan.load_config,  # type: ignore[call-overload]
                                          _published_repo(parts["vae"].source), {}))
    check_experts(configs, vae, {name: part.source for name, part in parts.items()})
    text = common.architecture_config(parts["text_encoder"], AutoConfig.from_pretrained,
                                      _published_repo(parts["text_encoder"].source), UMT5Config(**UMT5_XXL))
    with torch.device("meta"):
        models: dict[str, nn.Module] = {name: WanTransformer3DModel.from_config(c) for name, c in configs.items()}
        models["vae"] = AutoencoderKLWan.from_config(vae)
        models["text_encoder"] = UMT5EncoderModel(text)
    return models


@dataclass
class WanGenerator(common.PromptsAndVideos):
    """WanTransformer3DModel(s), AutoencoderKLWan and the UMT5 encoder with `WanSettings`. Two experts:
    `denoiser` is the low-noise `transformer_2` (the LoRA's), `other_denoiser` the high-noise `transformer`."""

    other_denoiser: nn.Module | None = None  # the high-noise expert of a two-expert checkpoint; None: one transformer
    boundary_ratio: float | None = None  # its steps: timesteps >= boundary_ratio * 1000

    lora_target_modules = LORA_TARGETS

    backend_name, settings_class, pipeline_class = "wan", WanSettings, "WanPipeline"
    model_classes = ("transformers.UMT5EncoderModel", "diffusers.WanTransformer3DModel", "diffusers.AutoencoderKLWan")
    diffusers_classes = ("FlowMatchEulerDiscreteScheduler",)

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        settings: WanSettings | None = None, device: torch.device | str = "cpu", *,
                        transformer_2: nn.Module | None = None, boundary_ratio: float | None = None) -> WanGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied). Two experts:
        `transformer` (high noise), `transformer_2` (low noise, becomes `denoiser`) and `boundary_ratio`."""
        settings = settings or WanSettings()
        settings.validate()
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("two experts need both transformer_2 and boundary_ratio (one transformer: neither)")
        device = torch.device(device)
        trained = transformer if transformer_2 is None else transformer_2
        gen = cls(trained, vae, None, settings, device, trained.dtype,
                  other_denoiser=None if transformer_2 is None else transformer, boundary_ratio=boundary_ratio)
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    @property
    def denoisers(self) -> tuple[nn.Module, ...]:
        """(the trained transformer, the other expert): both sharded, adopted and frozen alike."""
        return (self.denoiser,) if self.other_denoiser is None else (self.denoiser, self.other_denoiser)

    @classmethod
    def check_checkpoint(cls, settings: WanSettings) -> None:
        """The layout, the guidance keys and the transformer/VAE configs, before any weight loads; a hub repo's
        model_index.json and configs are fetched first (online), so that its experts are all named."""
        fetch_model_index(settings.pretrained)
        check_guidance(settings, checkpoint_layout(settings))
        check_part_configs(settings, download=True)

    def _load_denoisers(self, parts: dict[str, common.Component], transformer_class: type,
                        dtype: torch.dtype) -> None:
        layout = checkpoint_layout(self.settings)
        if not layout.two_experts:
            super()._load_denoisers(parts, transformer_class, dtype)
            return
        self.other_denoiser = common.load_part(parts["transformer"], transformer_class.from_pretrained,
                                               torch_dtype=dtype)
        self.denoiser = common.load_part(parts["transformer_2"], transformer_class.from_pretrained, torch_dtype=dtype)
        self.boundary_ratio = layout.boundary_ratio

    def _check_models(self) -> None:
        patch = self.denoiser.config.patch_size
        multiple = self.vae.config.scale_factor_spatial * patch[1]
        self.settings.validate(spatial_multiple=multiple, temporal=self.vae.config.scale_factor_temporal)
        check_guidance(self.settings, WanLayout(self.boundary_ratio))
        # in memory: the same checks as the configs on disk get before a load (from_components skips those)
        experts = {"transformer": self.denoiser} if self.other_denoiser is None else \
            {"transformer": self.other_denoiser, "transformer_2": self.denoiser}
        check_experts({name: dict(model.config) for name, model in experts.items()}, dict(self.vae.config),
                      {name: f"<{type(model).__name__} in memory>" for name, model in
                       (*experts.items(), ("vae", self.vae))})

    # ---- text ----
    def _prompt_encoder(self, tokenizer, model: nn.Module, name: str) -> common.PromptEncoder:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        length = self.settings.max_sequence_length

        def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
            # WanPipeline._get_t5_prompt_embeds: cleaned text, padded to max length, and the
            # embedding rows past each prompt's own tokens set to zero
            tokens = tokenizer([prompt_clean(t) for t in texts], padding="max_length", max_length=length,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            hidden = model(ids, mask).last_hidden_state.to(model.dtype)
            seq_lens = mask.gt(0).sum(dim=1)
            keep = torch.arange(length, device=hidden.device)[None, :] < seq_lens[:, None]
            return torch.where(keep[..., None], hidden, torch.zeros_like(hidden)), mask.long()

        return common.PromptEncoder(encode, name=f"wan:{name}", dtype=model.dtype, model_max_length=length,
                                    output_dim=int(model.config.d_model))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents."""
        cfg = self.vae.config
        t = (self.num_frames - 1) // cfg.scale_factor_temporal + 1
        return (self.denoiser.config.in_channels, t, self.settings.height // cfg.scale_factor_spatial,
                self.settings.width // cfg.scale_factor_spatial)

    # ---- sampling ----
    def schedule(self) -> tuple[Tensor, Tensor]:
        """(timesteps [N], sigmas [N + 1]) of `flow_schedule` with this run's shift and step count, on the
        device, computed once per setting (with which steps belong to the high-noise expert: read here,
        where values can be read, not under `vader plan`'s fake tensors)."""
        key = (self.settings.num_steps, self.settings.shift, self.device, self.boundary_ratio)
        if self._schedule is None or self._schedule[0] != key:
            self._schedule = (key, *flow_schedule(self.settings.num_steps, self.settings.shift, self.boundary_ratio,
                                                  self.device))
        return self._schedule[1], self._schedule[2]

    def step_model(self, i: int) -> tuple[nn.Module, float]:
        """The transformer and guidance scale of sampling step i, as WanPipeline picks them."""
        if self.other_denoiser is None:
            return self.denoiser, self.settings.guidance_scale
        self.schedule()
        if self._schedule[3][i]:  # type: ignore[index]
            return self.other_denoiser, self.settings.guidance_scale
        g2 = self.settings.guidance_scale_2
        return self.denoiser, self.settings.guidance_scale if g2 is None else g2

    def initial_noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """fp32 noise drawn as WanPipeline draws it from the same generator."""
        shape = (batch, *self.latent_shape)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(self.device)

    def _text(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """The prompts' embeddings and, with guidance, the negative prompt's, in the transformer's dtype."""
        self.encode_prompts(prompts)
        cond = torch.cat([self.embeddings[p] for p in prompts]).to(self.dtype)
        if not self.uses_guidance:
            return cond, None
        return cond, self.embeddings[self.settings.negative_prompt].expand(len(prompts), -1, -1).to(self.dtype)

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W] (fp32, normalised as the transformer sees them); gradients only
        through steps >= cutoff (None: no gradients) that the trained transformer takes: the other
        expert's steps all come first and carry no LoRA, so their graph would reach no trained weight."""
        n = len(prompts)
        cond, uncond = self._text(prompts)
        timesteps, sigmas = self.schedule()
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        z = self.initial_noise(n, generator)
        steps = range(len(timesteps))
        for i in progress(steps) if progress else steps:
            model, guidance = self.step_model(i)
            with torch.set_grad_enabled(cutoff is not None and i >= cutoff and model is self.denoiser):
                v = self.velocity(z, timesteps[i].expand(n), cond, uncond, model, guidance)
                z = z + (sigmas[i + 1] - sigmas[i]) * v
        return z

    def velocity(self, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None, model: nn.Module | None = None,
                 guidance: float | None = None) -> Tensor:
        """The guided flow prediction in fp32 of `model` (default: the denoiser) with `guidance` (default:
        guidance_scale)."""
        model = self.denoiser if model is None else model
        guidance = self.settings.guidance_scale if guidance is None else guidance
        x = z.to(self.dtype)
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()
        if uncond is None:
            return v
        v_uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0].float()
        return v_uncond + guidance * (v - v_uncond)

    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """The noise (drawn as `sample_latents` draws it), the schedule as timesteps sigma * 1000 and the
        prompt embeddings; flow_velocity's steps then equal `sample_latents`' Euler steps."""
        n = len(prompts)
        cond, uncond = self._text(prompts)
        timesteps, sigmas = self.schedule()
        z = self.initial_noise(n, generator)
        flow_t = [(sigmas[i] * 1000).float().expand(n) for i in range(len(timesteps))]
        return FlowState(z, flow_t, 1000.0, (cond, uncond, timesteps))

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        """-(the guided flow prediction of step i's expert): diffusers' flow matching predicts eps - x0 and
        steps z + (sigma_next - sigma) u; vader's convention is v ~ x0 - eps with z + v (sigma - sigma_next)."""
        cond, uncond, timesteps = state.condition
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        model, guidance = self.step_model(i)
        return -self.velocity(z, timesteps[i].expand(z.shape[0]), cond, uncond, model, guidance)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (fp32): all frames, or only `frames` (output frame
        indices). The causal VAE decodes the first latent frame alone (one output frame), then one
        latent frame (4 output frames) at a time with its feature cache; decoding stops after the
        last latent frame a chosen frame needs. Gradients flow back to `latents`, exactly; with
        `grad_checkpoint` each causal chunk and residual block is recomputed in backward and the feature
        caches replayed (`wan_decode`): a late frame of 480x832x33 needs 26.6 GiB instead of 209 GiB.

        No autocast inside: WanPipeline decodes in the VAE's own dtype (fp32 as Wan's examples load it);
        under the training loop's bf16 autocast the convolutions would run in bf16 (on the tiny test VAE
        the video moved by up to 0.18)."""
        common.check_frames(frames, self.num_frames)
        with common.autocast_off(self.device):
            chunks = wan_decode.decode_chunks(self.vae, latents.to(self.vae.dtype), grad_checkpoint=grad_checkpoint)
            video = common.decode_until(chunks, frames, self.num_frames)
        return video.float()

# ---- the backend's module functions (vader.backends.base.BackendModule) --------------------------------

Generator = WanGenerator
Settings = WanSettings
MEMORY_KNOBS = from_config.MEMORY_KNOBS
LOG_PROB_SAMPLING = True  # flow-matching Euler: a rectified flow (FlowSampler)


def settings(cfg) -> WanSettings:  # type: ignore[no-untyped-def]
    return from_config.settings(cfg, WanSettings, shift=None if cfg.scheduler.shift is None
                                else float(cfg.scheduler.shift), guidance_scale_2=cfg.scheduler.cfg_scale_2)


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    """The diffusers backends' rules, then what the checkpoint's files on this machine say (its layout, its
    transformer and VAE configs) and what a two-expert checkpoint cannot run."""
    from_config.check_config(cfg, WAN_REPO, (480, 832), ("scheduler.shift", "scheduler.cfg_scale_2"), settings)
    s = settings(cfg)
    layout = checkpoint_layout(s)
    check_guidance(s, layout)
    check_part_configs(s)
    if layout.two_experts and cfg.method == "grpo":
        raise VaderError(f"method='grpo' with the two-expert model.from_pretrained={s.pretrained!r}: GRPO trains on "
                         "every sampled step and the LoRA is on the low-noise expert only (the high-noise expert's "
                         "steps have nothing to train); use method='vader', or a one-transformer Wan checkpoint")


def _wrap(s: WanSettings, denoiser: nn.Module, vae: nn.Module, other: nn.Module | None = None) -> WanGenerator:
    """The generator around meta/fake-built models (`vader plan`): `denoiser` is the trained transformer."""
    if other is None:
        return WanGenerator.from_components(denoiser, vae, None, None, s)
    return WanGenerator.from_components(other, vae, None, None, s, transformer_2=denoiser,
                                        boundary_ratio=checkpoint_layout(s).boundary_ratio)


# build, weight_problems, meta_part, resolved, plan_generator: what every diffusers backend shares
_shared = from_config.DiffusersBackend(settings, WanGenerator, meta_models, common.missing_weights, LORA_TARGETS, _wrap)
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part
plan_generator = _shared.plan_generator


def resolved(cfg) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The shared geometry, and for two experts which sampling steps each one takes."""
    out = _shared.resolved(cfg)
    s = settings(cfg)
    boundary = checkpoint_layout(s).boundary_ratio
    if boundary is not None:
        high = high_noise_steps(s, boundary)
        out["note"] = (f"two experts: transformer (high noise, frozen, no gradients) samples the first {high} of "
                       f"{s.num_steps} steps (t >= {boundary * NUM_TRAIN_TIMESTEPS:g}), transformer_2 (the LoRA) the "
                       f"last {s.num_steps - high}; a backprop window starting before step {high} (0-based) starts "
                       "there")
    return out
