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

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vader.backends import common, from_config, wan_decode
from vader.backends.base import FlowState
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

    def components(self) -> dict[str, common.Component]:
        return common.pipeline_components(self)

    def validate(self, spatial_multiple: int = 16, temporal: int = 4) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        common.check_settings(self, spatial_multiple, "480 x 832")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise VaderError(f"num_frames={self.num_frames!r} must be {temporal}k + 1 (the VAE keeps the first "
                             f"frame and packs {temporal} frames per latent frame), e.g. 33, 49 or 81")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise VaderError(f"shift={self.shift!r} must be a positive number (3.0 for 480p, 5.0 for 720p)")


def meta_models(settings: WanSettings | None = None) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published Wan2.1-T2V-1.3B."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoConfig, UMT5Config, UMT5EncoderModel

    parts = (settings or WanSettings()).components()
    transformer = common.architecture_config(parts["transformer"], WanTransformer3DModel.load_config, WAN_REPO,
                                      WAN_1_3B_TRANSFORMER)
    vae = common.architecture_config(parts["vae"], AutoencoderKLWan.load_config, WAN_REPO, {})
    text = common.architecture_config(parts["text_encoder"], AutoConfig.from_pretrained, WAN_REPO, UMT5Config(**UMT5_XXL))
    with torch.device("meta"):
        return {"transformer": WanTransformer3DModel.from_config(transformer),
                "vae": AutoencoderKLWan.from_config(vae), "text_encoder": UMT5EncoderModel(text)}


@dataclass
class WanGenerator(common.PromptsAndVideos):
    """WanTransformer3DModel, AutoencoderKLWan and the UMT5 encoder with `WanSettings`."""

    lora_target_modules = LORA_TARGETS

    backend_name, settings_class, pipeline_class = "wan", WanSettings, "WanPipeline"
    model_classes = ("transformers.UMT5EncoderModel", "diffusers.WanTransformer3DModel", "diffusers.AutoencoderKLWan")
    diffusers_classes = ("FlowMatchEulerDiscreteScheduler",)

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        settings: WanSettings | None = None, device: torch.device | str = "cpu") -> WanGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied)."""
        settings = settings or WanSettings()
        settings.validate()
        device = torch.device(device)
        gen = cls(transformer, vae, None, settings, device, transformer.dtype)
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    def _check_models(self) -> None:
        patch = self.denoiser.config.patch_size
        multiple = self.vae.config.scale_factor_spatial * patch[1]
        self.settings.validate(spatial_multiple=multiple, temporal=self.vae.config.scale_factor_temporal)

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
        """(timesteps [N], sigmas [N + 1]) of diffusers' FlowMatchEulerDiscreteScheduler with this run's
        shift and step count: real tensors on the device, computed once per setting."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        key = (self.settings.num_steps, self.settings.shift, self.device)
        if self._schedule is None or self._schedule[0] != key:
            with common.real_tensors():
                sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.settings.shift)
                sched.set_timesteps(self.settings.num_steps, device=self.device)
                self._schedule = (key, sched.timesteps, sched.sigmas)
        return self._schedule[1], self._schedule[2]

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
        through steps >= cutoff (None: no gradients)."""
        n = len(prompts)
        cond, uncond = self._text(prompts)
        timesteps, sigmas = self.schedule()
        common.set_checkpointing(self.denoiser, grad_checkpoint)
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
        n = len(prompts)
        cond, uncond = self._text(prompts)
        timesteps, sigmas = self.schedule()
        z = self.initial_noise(n, generator)
        flow_t = [(sigmas[i] * 1000).float().expand(n) for i in range(len(timesteps))]
        return FlowState(z, flow_t, 1000.0, (cond, uncond, timesteps))

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        """-(the guided flow prediction): diffusers' flow matching predicts eps - x0 and steps
        z + (sigma_next - sigma) u; vader's convention is v ~ x0 - eps with z + v (sigma - sigma_next)."""
        cond, uncond, timesteps = state.condition
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        return -self.velocity(z, timesteps[i].expand(z.shape[0]), cond, uncond)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (fp32): all frames, or only `frames` (output frame
        indices). The causal VAE decodes the first latent frame alone (one output frame), then one
        latent frame (4 output frames) at a time with its feature cache; decoding stops after the
        last latent frame a chosen frame needs. Gradients flow back to `latents`. `grad_checkpoint` is
        accepted for the common interface: AutoencoderKLWan has no activation checkpointing."""
        common.check_frames(frames, self.num_frames)
        return common.decode_until(self._decode_chunks(latents), frames, self.num_frames).float()

    def _decode_chunks(self, latents: Tensor) -> Iterator[Tensor]:
        return wan_decode.decode_chunks(self.vae, latents)


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


# build, weight_problems, meta_part, resolved, plan_generator: what every diffusers backend shares
_shared = from_config.DiffusersBackend(
    settings, WanGenerator, meta_models, common.missing_weights, LORA_TARGETS,
    lambda s, transformer, vae: WanGenerator.from_components(transformer, vae, None, None, s))
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part
resolved, plan_generator = _shared.resolved, _shared.plan_generator
