"""Wan2.1 text-to-video through diffusers' own classes, with VADER's backprop cutoff.

WanTransformer3DModel + AutoencoderKLWan + UMT5 (transformers), sampled with flow-matching Euler
(diffusers' FlowMatchEulerDiscreteScheduler with `shift`) and classifier-free guidance as WanPipeline
runs it: two transformer passes per step, `uncond + g * (cond - uncond)`. With fp32 weights the
latents equal `WanPipeline(..., scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
output_type="latent")`; with bf16 weights ours keep the latents and the guidance in fp32 where the
pipeline rounds them to bf16 after every step.

The published Wan2.1 repos ship UniPCMultistepScheduler for inference; the gradient path here is
the first-order Euler step (every step a plain function of the previous latents), so that is what
is sampled and trained. Not supported: Wan2.2's second transformer (`boundary_ratio`) and its
per-token timesteps (`expand_timesteps`), image conditioning (I2V), UniPC/DPM solvers.

The sampler is a rectified flow, so the generator is also a `FlowSampler` (`flow_start`,
`flow_velocity`): GRPO samples it with an SDE and a log-probability per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vader.backends import from_config
from vader.backends.base import FlowState
from vader.backends.common import (
    DIFFUSERS_WEIGHTS,
    TOKENIZER_FILES,
    TRANSFORMERS_WEIGHTS,
    Component,
    PromptEncoder,
    PromptsAndVideos,
    adopt,
    architecture_config,
    check_frames,
    decode_until,
    missing_weights_message,
    real_tensors,
    require_diffusers,
    save_diffusers_lora,
    set_checkpointing,
)
from vader.dtypes import parse_dtype
from vader.errors import VaderError

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections of every block
# The published architecture, for describing the model without its files: diffusers'
# convert_wan_to_diffusers.py "Wan-T2V-1.3B" (1.419B parameters); the VAE is AutoencoderKLWan's defaults
# (127M); the text encoder is google/umt5-xxl's encoder (5.68B).
WAN_1_3B_TRANSFORMER = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960,
    "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
}
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu"}


@dataclass
class WanSettings:
    """Everything a Wan backend needs; each component is a hub id or a folder (the diffusers layout:
    `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`; or a folder holding that part alone)."""

    pretrained: str = WAN_REPO
    transformer: str | None = None  # None: `pretrained`
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
    negative_prompt: str = ""  # WanPipeline's default; Wan's authors use a long list of defects
    shift: float = 3.0  # flow shift: 3.0 for 480p, 5.0 for 720p (Wan's recommendation)
    max_sequence_length: int = 512

    def components(self) -> dict[str, Component]:
        def source(value: str | None) -> str:
            return value if value is not None else self.pretrained

        return {
            "tokenizer": Component("tokenizer", source(self.tokenizer), "tokenizer", TOKENIZER_FILES[0], ()),
            "text_encoder": Component("text_encoder", source(self.text_encoder), "text_encoder", "config.json",
                                      TRANSFORMERS_WEIGHTS),
            "transformer": Component("transformer", source(self.transformer), "transformer", "config.json",
                                     DIFFUSERS_WEIGHTS),
            "vae": Component("vae", source(self.vae), "vae", "config.json", DIFFUSERS_WEIGHTS),
        }

    def validate(self, spatial_multiple: int = 16, temporal: int = 4) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        for key in ("height", "width"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0 or value % spatial_multiple:
                raise VaderError(f"{key}={value!r} must be a positive multiple of {spatial_multiple} (the VAE "
                                 f"downsamples 8x and the transformer patches 2x2), e.g. 480 x 832")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise VaderError(f"num_frames={self.num_frames!r} must be {temporal}k + 1 (the VAE keeps the first "
                             f"frame and packs {temporal} frames per latent frame), e.g. 33, 49 or 81")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise VaderError(f"num_steps={self.num_steps!r} must be a positive integer")
        if not math.isfinite(self.guidance_scale):
            raise VaderError(f"guidance_scale={self.guidance_scale!r} must be a finite number")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise VaderError(f"shift={self.shift!r} must be a positive number (3.0 for 480p, 5.0 for 720p)")
        if not isinstance(self.max_sequence_length, int) or self.max_sequence_length < 1:
            raise VaderError(f"max_sequence_length={self.max_sequence_length!r} must be a positive integer")
        parse_dtype("dtype", self.dtype)
        parse_dtype("vae_dtype", self.vae_dtype)


def missing_weights(settings: WanSettings) -> str | None:
    """The one-line message `build` would raise for absent weights, or None (for a preflight)."""
    return missing_weights_message(list(settings.components().values()))


def meta_models(settings: WanSettings | None = None) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published Wan2.1-T2V-1.3B."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoConfig, UMT5Config, UMT5EncoderModel

    parts = (settings or WanSettings()).components()
    transformer = architecture_config(parts["transformer"], WanTransformer3DModel.load_config, WAN_REPO,
                                      WAN_1_3B_TRANSFORMER)
    vae = architecture_config(parts["vae"], AutoencoderKLWan.load_config, WAN_REPO, {})
    text = architecture_config(parts["text_encoder"], AutoConfig.from_pretrained, WAN_REPO, UMT5Config(**UMT5_XXL))
    with torch.device("meta"):
        return {"transformer": WanTransformer3DModel.from_config(transformer),
                "vae": AutoencoderKLWan.from_config(vae), "text_encoder": UMT5EncoderModel(text)}


@dataclass
class WanGenerator(PromptsAndVideos):
    denoiser: nn.Module  # WanTransformer3DModel
    vae: nn.Module  # AutoencoderKLWan
    text_encoder: PromptEncoder | None  # dropped after the prompts are encoded (UMT5-XXL is 5.7B parameters)
    settings: WanSettings
    device: torch.device
    dtype: torch.dtype
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    _schedule: tuple | None = field(default=None, repr=False)

    lora_target_modules = LORA_TARGETS
    lora_formats = ("diffusers",)  # pytorch_lora_weights.safetensors for `pipe.load_lora_weights`

    @classmethod
    def build(cls, settings: WanSettings | None = None, device: torch.device | str = "cpu",
              prompts: list[str] | None = None, cache=None, **overrides) -> WanGenerator:
        """Load the parts (hub ids or folders); with `prompts`, encode them (and the negative prompt)
        and release the text encoder before the transformer and the VAE load."""
        require_diffusers("wan", "AutoencoderKLWan", "WanTransformer3DModel", "WanPipeline",
                          "FlowMatchEulerDiscreteScheduler")
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        settings = dataclasses.replace(settings or WanSettings(), **overrides)
        return cls.load(settings, device, prompts, cache, UMT5EncoderModel, WanTransformer3DModel, AutoencoderKLWan)

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        settings: WanSettings | None = None, device: torch.device | str = "cpu") -> WanGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied)."""
        settings = settings or WanSettings()
        settings.validate()
        device = torch.device(device)
        gen = cls(transformer, vae, None, settings, device, transformer.dtype)
        if text_encoder is not None:
            gen.text_encoder = gen._prompt_encoder(tokenizer, text_encoder.to(device).eval().requires_grad_(False),
                                                   name=str(getattr(text_encoder.config, "name_or_path", "umt5")))
        gen._adopt_models()
        return gen

    def _adopt_models(self) -> None:
        adopt(self.denoiser, self.device)
        adopt(self.vae, self.device)
        patch = self.denoiser.config.patch_size
        multiple = self.vae.config.scale_factor_spatial * patch[1]
        self.settings.validate(spatial_multiple=multiple, temporal=self.vae.config.scale_factor_temporal)

    # ---- text ----
    def _prompt_encoder(self, tokenizer, model: nn.Module, name: str) -> PromptEncoder:
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

        return PromptEncoder(encode, name=f"wan:{name}", dtype=model.dtype, model_max_length=length,
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
        """(timesteps [N], sigmas [N + 1]) of diffusers' FlowMatchEulerDiscreteScheduler with this run's
        shift and step count: real tensors on the device, computed once per setting."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        key = (self.settings.num_steps, self.settings.shift, self.device)
        if self._schedule is None or self._schedule[0] != key:
            with real_tensors():
                sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.settings.shift)
                sched.set_timesteps(self.settings.num_steps, device=self.device)
                self._schedule = (key, sched.timesteps, sched.sigmas)
        return self._schedule[1], self._schedule[2]

    def initial_noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """fp32 noise drawn as WanPipeline draws it from the same generator."""
        shape = (batch, *self.latent_shape)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(self.device)

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W] (fp32, normalised as the transformer sees them); gradients only
        through steps >= cutoff (None: no gradients)."""
        self.encode_prompts(prompts)
        n = len(prompts)
        cond = torch.cat([self.embeddings[p] for p in prompts]).to(self.dtype)
        uncond = None
        if self.uses_guidance:
            uncond = self.embeddings[self.settings.negative_prompt].expand(n, -1, -1).to(self.dtype)
        timesteps, sigmas = self.schedule()
        set_checkpointing(self.denoiser, grad_checkpoint)
        z = self.initial_noise(n, generator)
        steps = range(len(timesteps))
        for i in progress(steps) if progress else steps:
            with torch.set_grad_enabled(cutoff is not None and i >= cutoff):
                v = self.velocity(z, timesteps[i].expand(n), cond, uncond)
                z = z + (sigmas[i + 1] - sigmas[i]) * v
        return z

    def velocity(self, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None) -> Tensor:
        """The guided flow prediction in fp32."""
        x = z.to(self.dtype)
        v = self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()
        if uncond is None:
            return v
        v_uncond = self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=uncond,
                                 return_dict=False)[0].float()
        return v_uncond + self.settings.guidance_scale * (v - v_uncond)

    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """The noise (drawn as `sample_latents` draws it), the schedule as timesteps sigma * 1000 and the
        prompt embeddings; flow_velocity's steps then equal `sample_latents`' Euler steps."""
        self.encode_prompts(prompts)
        n = len(prompts)
        cond = torch.cat([self.embeddings[p] for p in prompts]).to(self.dtype)
        uncond = None
        if self.uses_guidance:
            uncond = self.embeddings[self.settings.negative_prompt].expand(n, -1, -1).to(self.dtype)
        timesteps, sigmas = self.schedule()
        z = self.initial_noise(n, generator)
        flow_t = [(sigmas[i] * 1000).float().expand(n) for i in range(len(timesteps))]
        return FlowState(z, flow_t, 1000.0, (cond, uncond, timesteps))

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        """-(the guided flow prediction): diffusers' flow matching predicts eps - x0 and steps
        z + (sigma_next - sigma) u; vader's convention is v ~ x0 - eps with z + v (sigma - sigma_next)."""
        cond, uncond, timesteps = state.condition
        set_checkpointing(self.denoiser, grad_checkpoint)
        return -self.velocity(z, timesteps[i].expand(z.shape[0]), cond, uncond)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (fp32): all frames, or only `frames` (output frame
        indices). The causal VAE decodes the first latent frame alone (one output frame), then one
        latent frame (4 output frames) at a time with its feature cache; decoding stops after the
        last latent frame a chosen frame needs. Gradients flow back to `latents`. `grad_checkpoint` is
        accepted for the common interface: AutoencoderKLWan has no activation checkpointing."""
        check_frames(frames, self.num_frames)
        return decode_until(self._decode_chunks(latents), frames, self.num_frames).float()

    def _decode_chunks(self, latents: Tensor) -> Iterator[Tensor]:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        cfg = vae.config
        z = latents.to(vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        z = z / inv_std + mean  # WanPipeline's own expression, so the full decode matches it bit for bit
        # AutoencoderKLWan._decode, one latent frame per call; its cache lives on the module
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i: i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0)
                if cfg.patch_size is not None:
                    out = unpatchify(out, patch_size=cfg.patch_size)
                yield out.clamp(-1.0, 1.0)
        finally:
            vae.clear_cache()

    # ---- LoRA ----
    def save_lora_diffusers(self, lora: nn.Module | dict[str, Tensor], folder: str | Path, config=None) -> Path:
        """`pytorch_lora_weights.safetensors` in `folder`, loadable by `WanPipeline.load_lora_weights`."""
        from diffusers import WanPipeline

        return save_diffusers_lora(WanPipeline, lora, folder, config)


# ---- the backend's module functions (vader.backends.base.BackendModule) --------------------------------

Generator = WanGenerator
Settings = WanSettings
MEMORY_KNOBS = from_config.MEMORY_KNOBS
LOG_PROB_SAMPLING = True  # flow-matching Euler: a rectified flow (FlowSampler)


def settings(cfg) -> WanSettings:  # type: ignore[no-untyped-def]
    return from_config.settings(cfg, WanSettings, shift=None if cfg.scheduler.shift is None
                                else float(cfg.scheduler.shift))


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    from_config.check_config(cfg, WAN_REPO, (480, 832), ("scheduler.shift",), settings)


def build(cfg, device: torch.device | str, prompts: list[str] | None = None, cache=None) -> WanGenerator:  # type: ignore[no-untyped-def]
    return WanGenerator.build(settings(cfg), device, prompts=prompts, cache=cache)


def weight_problems(cfg) -> tuple[list[str], list]:  # type: ignore[no-untyped-def]
    message = missing_weights(settings(cfg))
    return ([message] if message else []), []


def meta_part(cfg, part: str):  # type: ignore[no-untyped-def]
    s = settings(cfg)
    return from_config.meta_part(cfg, part, s, meta_models(s))


def resolved(cfg) -> dict:  # type: ignore[no-untyped-def]
    s = settings(cfg)
    return from_config.resolved(cfg, WanGenerator, s, meta_models(s))


def plan_generator(cfg, training: bool):  # type: ignore[no-untyped-def]
    s = settings(cfg)
    return from_config.plan_generator(cfg, s, meta_models(s), LORA_TARGETS, training,
                                      lambda transformer, vae: WanGenerator.from_components(transformer, vae, None,
                                                                                            None, s))
