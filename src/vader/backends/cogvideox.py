"""CogVideoX (1.0: 2B and 5B) text-to-video through diffusers' own classes, with VADER's backprop cutoff.

CogVideoXTransformer3DModel + AutoencoderKLCogVideoX + T5 (transformers), sampled with the
v-prediction DDIM step of CogVideoXDDIMScheduler (its config read from the checkpoint's
`scheduler/`; timesteps and coefficients computed by the scheduler before sampling, its `step`
written out term by term so that the loop also runs on fake tensors) and classifier-free guidance as CogVideoXPipeline runs it: one transformer pass on the
batch [negative, prompt], `uncond + g * (cond - uncond)`, optionally the pipeline's dynamic guidance
(`use_dynamic_cfg`). With fp32 weights the latents equal `CogVideoXPipeline(..., output_type="latent")`
(our latents are [B, C, T, H, W]; the pipeline's are [B, T, C, H, W]).

Not supported: CogVideoXDPMScheduler's stochastic second-order step (the 5B repo ships it; its
config is read into the DDIM step instead), CogVideoX 1.5 (`patch_size_t`: padded latent frames),
image or video conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vader.backends import common, from_config
from vader.errors import VaderError

COGVIDEOX_REPO = "THUDM/CogVideoX-2b"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the joint text-video attention of every block
# The published architecture, for describing the model without its files: CogVideoX-2b is the defaults of
# CogVideoXTransformer3DModel (1.69B parameters) and AutoencoderKLCogVideoX (216M); its text encoder is
# T5 v1.1 XXL's encoder (4.76B).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}


@dataclass
class CogVideoXSettings:
    """Everything a CogVideoX backend needs; each component is a hub id or a folder (the diffusers
    layout: `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; or the part alone)."""

    pretrained: str = COGVIDEOX_REPO
    transformer: str | None = None  # None: `pretrained`
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    scheduler: str | None = None
    dtype: str = "bf16"  # transformer and text encoder weights
    vae_dtype: str = "bf16"
    height: int = 480
    width: int = 720
    num_frames: int = 49
    num_steps: int = 50
    guidance_scale: float = 6.0  # <= 1: no classifier-free guidance
    use_dynamic_cfg: bool = False  # the pipeline's cosine ramp of the guidance scale over the steps
    negative_prompt: str = ""
    max_sequence_length: int = 226  # must equal the transformer's max_text_seq_length

    def components(self) -> dict[str, common.Component]:
        return common.pipeline_components(
            self, common.Component("scheduler", self.scheduler or self.pretrained, "scheduler", common.SCHEDULER_FILES[0], ()))

    def validate(self, spatial_multiple: int = 16, frame_rule: int = 8) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        common.check_settings(self, spatial_multiple, "480 x 720")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % frame_rule:
            raise VaderError(f"num_frames={self.num_frames!r} must be {frame_rule}k + 1 (an odd number of latent "
                             "frames, which the VAE decodes to exactly that many frames), e.g. 33 or 49")


def meta_models(settings: CogVideoXSettings | None = None) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published CogVideoX-2b."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoConfig, T5Config, T5EncoderModel

    parts = (settings or CogVideoXSettings()).components()
    transformer = common.architecture_config(parts["transformer"], CogVideoXTransformer3DModel.load_config,
                                      COGVIDEOX_REPO, {})
    vae = common.architecture_config(parts["vae"], AutoencoderKLCogVideoX.load_config, COGVIDEOX_REPO, {})
    text = common.architecture_config(parts["text_encoder"], AutoConfig.from_pretrained, COGVIDEOX_REPO,
                               T5Config(**T5_XXL))
    with torch.device("meta"):
        return {"transformer": CogVideoXTransformer3DModel.from_config(transformer),
                "vae": AutoencoderKLCogVideoX.from_config(vae), "text_encoder": T5EncoderModel(text)}


@dataclass(frozen=True)
class DDIMStep:
    """One sampling step: timestep, sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), the step's mixing
    coefficients a (of x_t) and b (of the predicted x_0), and the guidance scale."""

    t: Tensor
    sqrt_alpha: Tensor
    sqrt_beta: Tensor
    a: Tensor
    b: Tensor
    guidance: float


@dataclass
class CogVideoXGenerator(common.PromptsAndVideos):
    """CogVideoXTransformer3DModel, AutoencoderKLCogVideoX and the T5 encoder with `CogVideoXSettings`, and
    the checkpoint's DDIM scheduler config."""

    scheduler_config: dict = field(default_factory=dict)

    lora_target_modules = LORA_TARGETS

    backend_name, settings_class, pipeline_class = "cogvideox", CogVideoXSettings, "CogVideoXPipeline"
    model_classes = ("transformers.T5EncoderModel", "diffusers.CogVideoXTransformer3DModel",
                     "diffusers.AutoencoderKLCogVideoX")
    diffusers_classes = ("CogVideoXDDIMScheduler",)

    @classmethod
    def extra_fields(cls, parts: dict[str, common.Component]) -> dict:
        from diffusers import CogVideoXDDIMScheduler

        return {"scheduler_config": dict(common.load_part(parts["scheduler"], CogVideoXDDIMScheduler.from_pretrained).config)}

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        scheduler, settings: CogVideoXSettings | None = None,
                        device: torch.device | str = "cpu") -> CogVideoXGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied)."""
        settings = settings or CogVideoXSettings()
        settings.validate()
        device = torch.device(device)
        gen = cls(transformer, vae, None, settings, device, transformer.dtype,
                  scheduler_config=dict(scheduler.config))
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    def _check_models(self) -> None:
        tcfg = self.denoiser.config
        if tcfg.patch_size_t is not None:
            raise VaderError(f"transformer={self.settings.transformer or self.settings.pretrained!r} is CogVideoX 1.5 "
                             "(patch_size_t is set), which this backend does not support; use CogVideoX-2b or -5b")
        if tcfg.max_text_seq_length != self.settings.max_sequence_length:
            raise VaderError(f"max_sequence_length={self.settings.max_sequence_length} must equal the "
                             f"transformer's max_text_seq_length ({tcfg.max_text_seq_length})")
        spatial = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.settings.validate(spatial_multiple=spatial * tcfg.patch_size,
                               frame_rule=2 * self.vae.config.temporal_compression_ratio)

    # ---- text ----
    def _prompt_encoder(self, tokenizer, model: nn.Module, name: str) -> common.PromptEncoder:
        length = self.settings.max_sequence_length

        def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
            # CogVideoXPipeline._get_t5_prompt_embeds: padded to max length and encoded WITHOUT the
            # attention mask (the transformer was trained on embeddings of the padding too)
            tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
            hidden = model(tokens.input_ids.to(self.device))[0].to(model.dtype)
            return hidden, tokens.attention_mask.long()

        return common.PromptEncoder(encode, name=f"cogvideox:{name}", dtype=model.dtype, model_max_length=length,
                                    output_dim=int(model.config.d_model))

    @property
    def _spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents."""
        t = (self.num_frames - 1) // self.vae.config.temporal_compression_ratio + 1
        return (self.denoiser.config.in_channels, t, self.settings.height // self._spatial,
                self.settings.width // self._spatial)

    # ---- sampling ----
    def schedule(self) -> list[DDIMStep]:
        """CogVideoXDDIMScheduler's timesteps (the checkpoint's config, this run's step count) with each
        step's coefficients taken as its `step` computes them: real tensors, computed once per setting."""
        from diffusers import CogVideoXDDIMScheduler

        key = (self.settings.num_steps, self.settings.guidance_scale, self.settings.use_dynamic_cfg, self.device)
        if self._schedule is not None and self._schedule[0] == key:
            return self._schedule[1]
        with common.real_tensors():
            sched = CogVideoXDDIMScheduler.from_config(self.scheduler_config)
            sched.set_timesteps(self.settings.num_steps, device=self.device)
            steps = []
            for t in sched.timesteps:
                # CogVideoXDDIMScheduler.step with eta = 0, term by term
                prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
                alpha = sched.alphas_cumprod[t]
                alpha_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
                beta = 1 - alpha
                a = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
                steps.append(DDIMStep(t, alpha**0.5, beta**0.5, a, alpha_prev**0.5 - alpha**0.5 * a,
                                      self._guidance_at(t)))
        self._schedule = (key, steps)
        return steps

    def initial_noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """Noise [B, T, C, H, W] (the pipeline's layout) drawn as CogVideoXPipeline draws it."""
        c, t, h, w = self.latent_shape
        noise = torch.randn((batch, t, c, h, w), generator=generator, dtype=torch.float32, device=generator.device)
        return noise.to(self.device)

    def rotary_embeddings(self) -> tuple[Tensor, Tensor] | None:
        """CogVideoX-5B's 3D rotary position embedding, as the pipeline computes it (2B has none)."""
        cfg = self.denoiser.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        grid_h = self.settings.height // (self._spatial * cfg.patch_size)
        grid_w = self.settings.width // (self._spatial * cfg.patch_size)
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), cfg.sample_width // cfg.patch_size,
                                                cfg.sample_height // cfg.patch_size)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=self.latent_shape[1],
                                       device=self.device)

    def _guidance_at(self, t: Tensor) -> float:
        g = self.settings.guidance_scale
        if not self.settings.use_dynamic_cfg:
            return g
        n = self.settings.num_steps  # the pipeline's formula: t (0..999) against the step count, as it is
        return 1 + g * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W] (fp32, scaled as the transformer sees them); gradients only
        through steps >= cutoff (None: no gradients)."""
        self.encode_prompts(prompts)
        n = len(prompts)
        text = torch.cat([self.embeddings[p] for p in prompts])
        if self.uses_guidance:
            negative = self.embeddings[self.settings.negative_prompt].expand(n, -1, -1)
            text = torch.cat([negative, text])
        text = text.to(self.dtype)
        steps = self.schedule()
        with common.real_tensors():
            rotary = self.rotary_embeddings()
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        z = self.initial_noise(n, generator)  # DDIM's init_noise_sigma is 1
        indices = range(len(steps))
        for i in progress(indices) if progress else indices:
            step = steps[i]
            with torch.set_grad_enabled(cutoff is not None and i >= cutoff):
                # DDIM's scale_model_input is the identity
                x = (torch.cat([z, z]) if self.uses_guidance else z).to(self.dtype)
                v = self.denoiser(hidden_states=x, encoder_hidden_states=text, timestep=step.t.expand(x.shape[0]),
                                  image_rotary_emb=rotary, return_dict=False)[0].float()
                if self.uses_guidance:
                    v_uncond, v_cond = v.chunk(2)
                    v = v_uncond + step.guidance * (v_cond - v_uncond)
                x0 = step.sqrt_alpha * z - step.sqrt_beta * v  # v-prediction
                z = step.a * z + step.b * x0
        return z.permute(0, 2, 1, 3, 4)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (fp32): all frames, or only `frames` (output frame
        indices). The causal VAE decodes latent frames in its own chunks (the first 2 + T mod 2, then
        2 at a time: 9 output frames, then 8 each) with its conv cache; decoding stops after the
        chunk that holds the last chosen frame. Gradients flow back to `latents`.

        A chosen frame costs its whole chunk (its group norms span the chunk): at 480 x 720 the first
        frame's backward holds 66 GiB of bf16 activations; `grad_checkpoint` (the VAE's own per-block
        checkpointing) brings the step's peak from 74 to 23 GiB (a fake-tensor count, LoRA r16)."""
        common.check_frames(frames, self.num_frames)
        common.set_checkpointing(self.vae, grad_checkpoint)
        return common.decode_until(self._decode_chunks(latents), frames, self.num_frames).float()

    def _decode_chunks(self, latents: Tensor) -> Iterator[Tensor]:
        vae = self.vae
        z = 1 / vae.config.scaling_factor * latents.to(vae.dtype)  # CogVideoXPipeline.decode_latents
        # AutoencoderKLCogVideoX._decode, one chunk per yield
        size = vae.num_latent_frames_batch_size
        count = z.shape[2]
        remaining = count % size
        conv_cache = None
        for i in range(max(count // size, 1)):
            start = size * i + (0 if i == 0 else remaining)
            chunk = z[:, :, start: size * (i + 1) + remaining]
            if vae.post_quant_conv is not None:
                chunk = vae.post_quant_conv(chunk)
            chunk, conv_cache = vae.decoder(chunk, conv_cache=conv_cache)
            yield chunk.clamp(-1.0, 1.0)


# ---- the backend's module functions (vader.backends.base.BackendModule) --------------------------------

Generator = CogVideoXGenerator
Settings = CogVideoXSettings
MEMORY_KNOBS = from_config.MEMORY_KNOBS
LOG_PROB_SAMPLING = False  # v-prediction DDIM: no rectified flow for GRPO's SDE


def settings(cfg) -> CogVideoXSettings:  # type: ignore[no-untyped-def]
    # the VAE in the run's dtype, as CogVideoXPipeline loads it
    return from_config.settings(cfg, CogVideoXSettings, vae_dtype=cfg.dtype,
                                use_dynamic_cfg=bool(cfg.scheduler.use_dynamic_cfg))


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    from_config.check_config(cfg, COGVIDEOX_REPO, (480, 720), ("scheduler.use_dynamic_cfg",), settings)


def _published_scheduler(s: CogVideoXSettings):  # type: ignore[no-untyped-def]
    """The checkpoint's CogVideoXDDIMScheduler when its files are on this machine, else the published
    CogVideoX-2b one (v-prediction, trailing spacing, zero-SNR betas); its values never change memory."""
    from diffusers import CogVideoXDDIMScheduler

    try:
        return CogVideoXDDIMScheduler.from_pretrained(s.pretrained, subfolder="scheduler", local_files_only=True)
    except Exception:  # not on this machine: the plan needs no download
        return CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")


# build, weight_problems, meta_part, resolved, plan_generator: what every diffusers backend shares
_shared = from_config.DiffusersBackend(
    settings, CogVideoXGenerator, meta_models, common.missing_weights, LORA_TARGETS,
    lambda s, transformer, vae: CogVideoXGenerator.from_components(transformer, vae, None, None,
                                                                   _published_scheduler(s), s))
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part
resolved, plan_generator = _shared.resolved, _shared.plan_generator
