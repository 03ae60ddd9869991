"""LTX-Video 2B (0.9.0) text-to-video and image-to-video through diffusers' own classes, with VADER's
backprop cutoff.

LTXVideoTransformer3DModel + AutoencoderKLLTXVideo + T5 (transformers), sampled as LTXPipeline samples:
the latents [B, C, T, H, W] packed into tokens for the transformer (LTXPipeline._pack_latents), the rope
scaled by the frame rate and the VAE's compression (`rope_interpolation_scale`), flow-matching Euler with
the checkpoint's FlowMatchEulerDiscreteScheduler config (`scheduler/`; dynamic shifting: mu from the latent
token count, sigmas linspace(1, 1/N, N), `shift_terminal`), the T5 embeddings of the whole padded prompt
with its attention mask given to the transformer, and classifier-free guidance in one transformer pass on
the batch [negative, prompt], `uncond + g * (cond - uncond)`. With fp32 weights the latents equal
`LTXPipeline(..., output_type="latent")` unpacked (ours are [B, C, T, H, W], normalised with the VAE's
latents_mean/std as the transformer sees them).

Decoding as LTXPipeline decodes: denormalised latents, the decoder's timestep (`decode_timestep`, 0.0 as the
pipeline's default) when the VAE is timestep-conditioned (0.9.1+), pixels clamped to [-1, 1], no autocast
(the VAE in its own dtype). The published Lightricks/LTX-Video diffusers folders hold 0.9.0 (no timestep
conditioning, no decoder noise). The decoder is not causal (`decoder_causal: false`): every output frame
depends on latent frames on both sides, so chosen frames are cut from the whole decoded video (exact);
a causal decoder (`decoder_causal: true`) decodes only the latent prefix the last chosen frame needs
(exact as well: causal convolutions, per-position norms). `grad_checkpoint`: the VAE's own per-block
checkpointing.

With bf16 weights the latents equal the bf16 pipeline's too (LTXPipeline keeps them in fp32 between steps,
as vader does).

Image-to-video (`set_images`: first-frame images keyed by prompt, `image_input` 'optional'): the same
checkpoint sampled as LTXImageToVideoPipeline samples it: the image resized and encoded by the VAE, its
latent drawn from the posterior with the run's generator before the noise, kept as the first latent frame
(timestep 0 for its tokens, never stepped); equal to the pipeline's latents and video (fp32, 0.0).
method='grpo' with images is refused (its SDE would move the given frame).

`scheduler.solver` 'differentiable' and 'published' are the same step here: LTX-Video's published
scheduler is FlowMatchEulerDiscreteScheduler, the Euler step gradients go through.

Not supported (refused in one line): LTX-Video 0.9.5+ and the 13B models (their diffusers repos, e.g.
Lightricks/LTX-Video-0.9.7-dev, are LTXConditionPipeline checkpoints: conditioning frames, multi-scale latent
upsampling, and the recommended decode_noise_scale, which draws noise in the decode; their model_index.json
is refused), decode noise (`decode_noise_scale` > 0), the decoder's injected noise (`decoder_inject_noise`,
0.9.1: it draws from the global RNG), transformer patch sizes other than 1 (as LTXPipeline's unpacking
assumes), the scheduler's `stochastic_sampling`. Not exposed: `guidance_rescale` (0, the pipeline's
default), `frame_rate` (25) and `decode_timestep` (0.0) have no config keys (LTXSettings fields).

The sampler is a rectified flow, so the generator is also a `FlowSampler` (`flow_start`,
`flow_velocity`): GRPO samples it with an SDE and a log-probability per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vader.backends import common, from_config
from vader.backends.base import FlowState
from vader.errors import VaderError
from vader.sampling import cfg_combine

LTX_REPO = "Lightricks/LTX-Video"
# LTX-Video-Trainer's and diffusers' LTX LoRA scripts: the self- and cross-attention projections of every block
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SOLVERS = ("differentiable", "published")
INDEX_CLASSES = ("LTXPipeline", "LTXImageToVideoPipeline")  # a model_index.json this backend samples as its pipeline
# The published architecture, for describing the model without its files: Lightricks/LTX-Video (0.9.0) is
# the defaults of LTXVideoTransformer3DModel (1.92B parameters) and AutoencoderKLLTXVideo; its text encoder
# is T5 v1.1 XXL's encoder (4.76B).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}
# Lightricks/LTX-Video's scheduler/scheduler_config.json (diffusers' convert_ltx_to_diffusers.py writes it)
PUBLISHED_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05,
                       "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift_terminal": 0.1}


@dataclass
class LTXSettings:
    """Everything an LTX-Video backend needs; each component is a hub id or a folder (the diffusers layout:
    `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; or the part alone)."""

    pretrained: str = LTX_REPO
    transformer: str | None = None  # None: `pretrained`
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    scheduler: str | None = None
    dtype: str = "bf16"  # transformer and text encoder weights
    vae_dtype: str = "bf16"  # as LTXPipeline.from_pretrained(torch_dtype=torch.bfloat16) loads it
    height: int = 480
    width: int = 704
    num_frames: int = 161
    num_steps: int = 50
    guidance_scale: float = 3.0  # LTXPipeline's default; <= 1: no classifier-free guidance
    negative_prompt: str = ""  # LTXPipeline's default
    frame_rate: int = 25  # LTXPipeline's default: scales the temporal rope
    max_sequence_length: int = 128
    decode_timestep: float = 0.0  # the decoder's timestep (timestep-conditioned VAEs only): LTXPipeline's default
    decode_noise_scale: float | None = None  # None: decode_timestep (LTXPipeline's rule); only 0 is supported
    solver: str = "differentiable"  # both are the Euler step (see the module docstring)

    def components(self) -> dict[str, common.Component]:
        return common.pipeline_components(
            self, common.Component("scheduler", self.scheduler or self.pretrained, "scheduler", common.SCHEDULER_FILES[0], ()))

    def validate(self, spatial_multiple: int = 32, temporal: int = 8) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        for key in ("height", "width"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0 or value % spatial_multiple:
                raise VaderError(f"{key}={value!r} must be a positive multiple of {spatial_multiple} (the VAE "
                                 f"compresses {spatial_multiple}x spatially), e.g. 480 x 704")
        common.check_settings(self, 1, "480 x 704")  # steps, guidance, text length, dtypes
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise VaderError(f"num_frames={self.num_frames!r} must be {temporal}k + 1 (the VAE keeps the first "
                             f"frame and packs {temporal} frames per latent frame), e.g. 57, 121 or 161")
        if not isinstance(self.frame_rate, int) or self.frame_rate < 1:
            raise VaderError(f"frame_rate={self.frame_rate!r} must be a positive integer (LTXPipeline's 25)")
        if self.solver not in SOLVERS:
            raise VaderError(f"scheduler.solver={self.solver!r} is not valid; choose one of: {', '.join(SOLVERS)}")
        noise = self.decode_timestep if self.decode_noise_scale is None else self.decode_noise_scale
        if noise != 0:
            raise VaderError(f"decode_noise_scale={noise!r}: noise in the decode is not supported (VADER's decode is "
                             "deterministic); set decode_noise_scale=0.0")


def check_index(settings: LTXSettings) -> None:
    """One line for a checkpoint whose model_index.json (when on this machine) names a pipeline other than
    LTXPipeline / LTXImageToVideoPipeline: LTX-Video 0.9.5+ and the 13B models are LTXConditionPipeline
    checkpoints, which this backend would sample differently from their pipeline. Never downloads."""
    import json

    from vader.weights import local_file

    path = local_file(settings.pretrained, "model_index.json")
    if path is None:
        return
    try:
        name = json.loads(path.read_text()).get("_class_name", "LTXPipeline")
    except (OSError, ValueError, AttributeError):
        return  # unreadable or not an object: the parts' own loads say what is wrong
    if name not in INDEX_CLASSES:
        raise VaderError(f"pretrained={settings.pretrained!r}: its model_index.json has _class_name={name!r}; "
                         f"model.type='ltx' samples {' / '.join(INDEX_CLASSES)} checkpoints (LTX-Video 0.9.0 "
                         "2B, e.g. 'Lightricks/LTX-Video'); LTXConditionPipeline (0.9.5+, 13B) is not supported")


def meta_models(settings: LTXSettings | None = None) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published LTX-Video 2B."""
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
    from transformers import AutoConfig, T5Config, T5EncoderModel

    parts = (settings or LTXSettings()).components()
    transformer = common.architecture_config(parts["transformer"], LTXVideoTransformer3DModel.load_config,
                                             LTX_REPO, {})
    vae = common.architecture_config(parts["vae"], AutoencoderKLLTXVideo.load_config, LTX_REPO, {})
    text = common.architecture_config(parts["text_encoder"], AutoConfig.from_pretrained, LTX_REPO,
                                      T5Config(**T5_XXL))
    with torch.device("meta"):
        return {"transformer": LTXVideoTransformer3DModel.from_config(transformer),
                "vae": AutoencoderKLLTXVideo.from_config(vae), "text_encoder": T5EncoderModel(text)}


def flow_schedule(num_steps: int, video_tokens: int, scheduler_config: dict[str, Any],
                  device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(timesteps [N], sigmas [N + 1]) as LTXPipeline sets them: sigmas linspace(1, 1/N, N) and mu from the
    latent token count, through the checkpoint's FlowMatchEulerDiscreteScheduler; real tensors (also under
    `vader plan`'s fake ones)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift, retrieve_timesteps

    with common.real_tensors():
        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        conf = sched.config
        mu = calculate_shift(video_tokens, conf.get("base_image_seq_len", 256), conf.get("max_image_seq_len", 4096),
                             conf.get("base_shift", 0.5), conf.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, num_steps, device, None,
                                          sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return timesteps, sched.sigmas


@dataclass
class LTXGenerator(common.PromptsAndVideos):
    """LTXVideoTransformer3DModel, AutoencoderKLLTXVideo and the T5 encoder with `LTXSettings`, and the
    checkpoint's flow-matching scheduler config."""

    scheduler_config: dict = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)  # each prompt's T5 attention mask [1, L]
    # image-to-video: each prompt's first-frame image encoded by the VAE (its posterior, sampled per video)
    first_frames: dict[str, Any] = field(default_factory=dict)

    lora_target_modules = LORA_TARGETS

    backend_name, settings_class, pipeline_class = "ltx", LTXSettings, "LTXPipeline"
    model_classes = ("transformers.T5EncoderModel", "diffusers.LTXVideoTransformer3DModel",
                     "diffusers.AutoencoderKLLTXVideo")
    diffusers_classes = ("FlowMatchEulerDiscreteScheduler",)

    @classmethod
    def extra_fields(cls, parts: dict[str, common.Component]) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler

        loaded = common.load_part(parts["scheduler"], FlowMatchEulerDiscreteScheduler.from_pretrained)
        return {"scheduler_config": dict(loaded.config)}  # type: ignore[attr-defined]

    @classmethod
    def check_checkpoint(cls, settings: LTXSettings) -> None:
        """The pipeline class the checkpoint names (its model_index.json fetched first, online)."""
        from vader.backends.wan import fetch_model_index

        fetch_model_index(settings.pretrained)
        check_index(settings)

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        scheduler, settings: LTXSettings | None = None,
                        device: torch.device | str = "cpu") -> LTXGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied);
        `scheduler`: a FlowMatchEulerDiscreteScheduler or its config (None: the published one)."""
        settings = settings or LTXSettings()
        settings.validate()
        config = PUBLISHED_SCHEDULER if scheduler is None else dict(getattr(scheduler, "config", scheduler))
        gen = cls(transformer, vae, None, settings, torch.device(device), transformer.dtype,
                  scheduler_config=dict(config))
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    def _check_models(self) -> None:
        tcfg, vcfg = self.denoiser.config, self.vae.config
        source = self.settings.transformer or self.settings.pretrained
        if (tcfg.patch_size, tcfg.patch_size_t) != (1, 1):
            raise VaderError(f"transformer={source!r} has patch_size={tcfg.patch_size}, patch_size_t="
                             f"{tcfg.patch_size_t}; LTXPipeline's latent unpacking (and this backend) needs 1 and 1")
        if tcfg.in_channels != vcfg.latent_channels:
            raise VaderError(f"vae={self.settings.vae or self.settings.pretrained!r} has latent_channels="
                             f"{vcfg.latent_channels} but the transformer takes in_channels={tcfg.in_channels}; use "
                             "the VAE of the transformer's checkpoint")
        if any(vcfg.decoder_inject_noise):
            raise VaderError(f"vae={self.settings.vae or self.settings.pretrained!r} has decoder_inject_noise="
                             f"{list(vcfg.decoder_inject_noise)} (noise from the global RNG in every decode); this "
                             "backend decodes deterministically: use a VAE without injected noise (LTX-Video 0.9.0)")
        if self.scheduler_config.get("stochastic_sampling"):
            raise VaderError("the scheduler config has stochastic_sampling=True; this backend samples the "
                             "deterministic Euler step (set it to false)")
        self.settings.validate(spatial_multiple=self.vae.spatial_compression_ratio,
                               temporal=self.vae.temporal_compression_ratio)

    # ---- text ----
    def _prompt_encoder(self, tokenizer, model: nn.Module, name: str) -> common.PromptEncoder:
        return common.padded_t5_encoder(tokenizer, model, f"ltx:{name}", self.device,
                                        self.settings.max_sequence_length)

    def encode_prompts(self, prompts: list[str], cache=None) -> None:  # type: ignore[no-untyped-def]
        """Encode every new prompt (and the negative prompt when guidance is on) once, keeping its mask."""
        wanted = list(prompts) + ([self.settings.negative_prompt] if self.uses_guidance else [])
        todo = [p for p in dict.fromkeys(wanted) if p not in self.embeddings]
        if not todo:
            return
        if self.text_encoder is None:
            raise RuntimeError("text encoder already released; encode all prompts before releasing it")
        y, mask = cache.get_or_encode(self.text_encoder, todo) if cache is not None else self.text_encoder.encode(todo)
        for i, p in enumerate(todo):
            self.embeddings[p] = y[i].to(self.device)  # [1, L, C]
            self.masks[p] = mask[i : i + 1].to(self.device)  # [1, L]

    def _mask(self, prompt: str) -> Tensor:
        # `vader plan` gives stand-in embeddings without masks: a full mask costs the same
        found = self.masks.get(prompt)
        return found if found is not None else torch.ones(1, self.embeddings[prompt].shape[-2], dtype=torch.long,
                                                          device=self.device)

    def _text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Embeddings and masks of the transformer's batch: [negative, prompts] with guidance, else prompts."""
        self.encode_prompts(prompts)
        names = ([self.settings.negative_prompt] * len(prompts) if self.uses_guidance else []) + list(prompts)
        text = torch.cat([self.embeddings[p] for p in names]).to(self.dtype)
        return text, torch.cat([self._mask(p) for p in names])

    # ---- geometry ----
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents."""
        spatial, temporal = self.vae.spatial_compression_ratio, self.vae.temporal_compression_ratio
        return (self.denoiser.config.in_channels, (self.num_frames - 1) // temporal + 1,
                self.settings.height // spatial, self.settings.width // spatial)

    # ---- image-to-video (LTXImageToVideoPipeline) ----
    def set_images(self, images: dict[str, Any]) -> None:
        """First-frame images (PIL) keyed by prompt: resized to the video size and encoded by the VAE as
        LTXImageToVideoPipeline does; a prompt with an image is then sampled image-to-video."""
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self.vae.spatial_compression_ratio)
        for prompt, image in images.items():
            pixels = processor.preprocess(image, height=self.settings.height, width=self.settings.width)
            pixels = pixels.to(self.device, self.dtype).to(self.vae.dtype)
            with torch.no_grad(), common.autocast_off(self.device):
                self.first_frames[prompt] = self.vae.encode(pixels.unsqueeze(2)).latent_dist

    def _first_frames(self, prompts: list[str], generator: torch.Generator) -> Tensor | None:
        """The prompts' first latent frames [B, C, 1, H, W] (normalised), each drawn from its posterior with
        `generator` before the noise, as LTXImageToVideoPipeline.prepare_latents draws them; None for
        text-to-video. A batch is all image-to-video or all text-to-video."""
        given = [p in self.first_frames for p in prompts]
        if not any(given):
            return None
        if not all(given):
            missing = next(p for p, has in zip(prompts, given, strict=True) if not has)
            raise VaderError(f"prompt {missing!r} has no first-frame image but others in its batch do; give an "
                             "image for every prompt or for none")
        drawn = torch.cat([self.first_frames[p].sample(generator) for p in prompts]).float()
        vae = self.vae
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(drawn.device, drawn.dtype)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(drawn.device, drawn.dtype)
        return ((drawn - mean) / std).to(self.device)  # the pipeline normalises with scaling_factor 1.0

    def _start(self, prompts: list[str], generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The initial latents and the per-token conditioning mask [B', S] of image-to-video (None: text)."""
        first = self._first_frames(prompts, generator)
        z = self.initial_noise(len(prompts), generator)
        if first is None:
            return z, None
        from diffusers import LTXPipeline

        z = torch.cat([first, z[:, :, 1:]], dim=2)  # init * mask + noise * (1 - mask), exactly
        mask = torch.zeros((len(prompts), 1, *z.shape[2:]), device=z.device)
        mask[:, :, 0] = 1.0
        mask = LTXPipeline._pack_latents(mask).squeeze(-1)
        return z, torch.cat([mask, mask]) if self.uses_guidance else mask

    # ---- sampling ----
    def schedule(self) -> tuple[Tensor, Tensor]:
        """(timesteps [N], sigmas [N + 1]) of `flow_schedule` for this run, computed once per setting."""
        _, t, h, w = self.latent_shape
        key = (self.settings.num_steps, t * h * w, self.device)
        if self._schedule is None or self._schedule[0] != key:
            self._schedule = (key, *flow_schedule(self.settings.num_steps, t * h * w, self.scheduler_config,
                                                  self.device))
        return self._schedule[1], self._schedule[2]

    def initial_noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """fp32 noise [B, C, T, H, W] drawn as LTXPipeline.prepare_latents draws it (before packing)."""
        shape = (batch, *self.latent_shape)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(self.device)

    def velocity(self, z: Tensor, t: Tensor, text: Tensor, mask: Tensor, condition: Tensor | None = None) -> Tensor:
        """LTXPipeline's guided flow prediction (eps - x0, fp32, [B, C, T, H, W]) for latents `z`: one
        transformer pass on the packed batch [z, z] with [negative, prompt] text when guidance is on. With
        `condition` (image-to-video's per-token mask), the first latent frame's tokens get timestep 0, as
        LTXImageToVideoPipeline gives them."""
        from diffusers import LTXPipeline

        _, frames, height, width = self.latent_shape
        x = torch.cat([z, z]) if self.uses_guidance else z
        # contiguous as the pipeline's packed latents: a strided bf16 input takes another matmul path (the
        # bf16 video moved by 0.03 on the tiny model)
        tokens = LTXPipeline._pack_latents(x).to(self.dtype).contiguous()
        spatial, temporal = self.vae.spatial_compression_ratio, self.vae.temporal_compression_ratio
        timestep = t.expand(x.shape[0])
        if condition is not None:
            timestep = timestep.unsqueeze(-1) * (1 - condition)
        u = self.denoiser(hidden_states=tokens, encoder_hidden_states=text, timestep=timestep,
                          encoder_attention_mask=mask, num_frames=frames, height=height, width=width,
                          rope_interpolation_scale=(temporal / self.settings.frame_rate, spatial, spatial),
                          return_dict=False)[0].float()
        u = LTXPipeline._unpack_latents(u, frames, height, width)
        if not self.uses_guidance:
            return u
        u_uncond, u_cond = u.chunk(2)
        return cfg_combine(u_uncond, u_cond, self.settings.guidance_scale)

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W] (fp32, normalised as the transformer sees them); gradients only
        through steps >= cutoff (None: no gradients)."""
        text, mask = self._text(prompts)
        timesteps, sigmas = self.schedule()
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        z, condition = self._start(prompts, generator)
        steps = range(len(timesteps))
        for i in progress(steps) if progress else steps:
            with torch.set_grad_enabled(cutoff is not None and i >= cutoff):
                u = self.velocity(z, timesteps[i], text, mask, condition)
                if condition is None:
                    z = z + (sigmas[i + 1] - sigmas[i]) * u
                else:  # the given first frame stays; the Euler step moves the others
                    z = torch.cat([z[:, :, :1], z[:, :, 1:] + (sigmas[i + 1] - sigmas[i]) * u[:, :, 1:]], dim=2)
        return z

    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """The noise (drawn as `sample_latents` draws it), the schedule as timesteps sigma * 1000 and the
        text; flow_velocity's steps then equal `sample_latents`' Euler steps."""
        if any(p in self.first_frames for p in prompts):
            raise VaderError("method='grpo' with first-frame images is not supported for model.type='ltx' (its "
                             "SDE would move the given frame); use method='vader', or prompts without images")
        text, mask = self._text(prompts)
        timesteps, sigmas = self.schedule()
        z = self.initial_noise(len(prompts), generator)
        n = len(prompts)
        flow_t = [(sigmas[i] * 1000).float().expand(n) for i in range(len(timesteps))]
        return FlowState(z, flow_t, 1000.0, (text, mask, timesteps))

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        """-(the guided flow prediction): diffusers' flow matching predicts eps - x0 and steps
        z + (sigma_next - sigma) u; vader's convention is v ~ x0 - eps with z + v (sigma - sigma_next)."""
        text, mask, timesteps = state.condition
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        return -self.velocity(z, timesteps[i], text, mask)

    # ---- decoding ----
    def latent_frames_for(self, frames: list[int] | None) -> int | None:
        """How many leading latent frames the chosen output frames need: all (None) for a non-causal decoder."""
        if frames is None or not self.vae.config.decoder_causal:
            return None
        temporal = self.vae.temporal_compression_ratio
        return -(-max(frames) // temporal) + 1  # frame 0 <- latent 0; frames 8k-7..8k <- latent k

    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (fp32): all frames, or only `frames` (output frame indices),
        as LTXPipeline decodes. A non-causal decoder (LTX-Video's) decodes the whole latent video and the
        chosen frames are cut from it (a frame depends on latent frames on both sides); a causal one only the
        latent prefix the last chosen frame needs. Gradients flow back to `latents`; `grad_checkpoint`: the
        VAE's own per-block checkpointing. No autocast inside: the pipeline decodes in the VAE's dtype."""
        common.check_frames(frames, self.num_frames)
        vae = self.vae
        common.set_checkpointing(vae, grad_checkpoint)
        prefix = self.latent_frames_for(frames)
        z = latents if prefix is None else latents[:, :, :prefix]
        # LTXPipeline: denormalise in fp32, round to the transformer's dtype, then to the VAE's
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        z = (z * std / vae.config.scaling_factor + mean).to(self.dtype).to(vae.dtype)
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.full((z.shape[0],), float(self.settings.decode_timestep), device=z.device, dtype=z.dtype)
        with common.autocast_off(self.device):
            video = vae.decode(z, temb, return_dict=False)[0]
        video = video.clamp(-1.0, 1.0).float()
        return video if frames is None else video[:, :, list(frames)]


# ---- the backend's module functions (vader.backends.base.BackendModule) --------------------------------

Generator = LTXGenerator
Settings = LTXSettings
MEMORY_KNOBS = from_config.MEMORY_KNOBS
LOG_PROB_SAMPLING = True  # flow-matching Euler: a rectified flow (FlowSampler)


def image_input(cfg) -> str:  # type: ignore[no-untyped-def]
    """'optional': the same LTX-Video checkpoint samples text-to-video (LTXPipeline) and, given a first frame
    for every prompt, image-to-video (LTXImageToVideoPipeline)."""
    return "optional"


def settings(cfg) -> LTXSettings:  # type: ignore[no-untyped-def]
    # the VAE in the run's dtype, as LTXPipeline.from_pretrained(torch_dtype=...) loads it
    return from_config.settings(cfg, LTXSettings, vae_dtype=cfg.dtype, solver=cfg.scheduler.solver)


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    from_config.check_config(cfg, LTX_REPO, (480, 704), (), settings)
    check_index(settings(cfg))


# build, weight_problems, meta_part, resolved, plan_generator: what every diffusers backend shares
_shared = from_config.DiffusersBackend(
    settings, LTXGenerator, meta_models, common.missing_weights, LORA_TARGETS,
    lambda s, transformer, vae: LTXGenerator.from_components(transformer, vae, None, None, None, s))
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part
resolved, plan_generator = _shared.resolved, _shared.plan_generator
