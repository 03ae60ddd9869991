"""CogVideoX 1.0 (2B, 5B, 5B-I2V) through diffusers' own classes, with VADER's backprop cutoff.

CogVideoXTransformer3DModel + AutoencoderKLCogVideoX + T5 (transformers), sampled with the
v-prediction DDIM step of CogVideoXDDIMScheduler (its config read from the checkpoint's
`scheduler/`; timesteps and coefficients computed by the scheduler before sampling, its `step`
written out term by term so that the loop also runs on fake tensors) and classifier-free guidance as
CogVideoXPipeline runs it: one transformer pass on the batch [negative, prompt],
`uncond + g * (cond - uncond)`, optionally the pipeline's dynamic guidance (`use_dynamic_cfg`). With fp32
weights the latents equal `CogVideoXPipeline(..., output_type="latent")` (our latents are
[B, C, T, H, W]; the pipeline's are [B, T, C, H, W]).

Image-to-video (CogVideoX-5B-I2V, a CogVideoXImageToVideoPipeline checkpoint: its transformer takes
2 x the latent channels): `set_images({prompt: PIL image})` encodes each prompt's first frame as
CogVideoXImageToVideoPipeline does (`video_processor.preprocess`: resized to height x width without a
crop; the VAE's posterior kept as mean and std); every `sample_latents` call then draws each image
latent from that posterior with the run's generator, prompt by prompt and BEFORE the initial noise, exactly as the pipeline's
`prepare_latents` calls `latent_dist.sample(generator)` (the same draws in the same order), scales it by
the VAE's scaling factor (1 / it with `invert_scale_latents`), pads it with zeros to the latent frames
and concatenates it to the noisy latents as extra channels in every transformer pass (both halves of the
guidance batch). With fp32 weights the latents equal `CogVideoXImageToVideoPipeline(..., output_type=
"latent")` for the same generator. The image is conditioning only: no gradient flows into it, and the
decoded frame 0 is GENERATED (conditioned on the image, not replaced by it), so a reward on frame 0
scores the model's frame. A prompt without an image on such a checkpoint is a RuntimeError. The
learned positional embedding of the I2V transformer fixes its size: height x width must be its sample
size (480 x 720).

`solver` (config `scheduler.solver`): 'differentiable' samples every step with the DDIM step above.
'published' samples the steps WITHOUT gradients (all of validation / infer / eval, and the training
steps before the backprop cutoff) with the inference scheduler the checkpoint is published with, and
keeps the differentiable DDIM step (same timesteps) for the steps with gradients. CogVideoX-2B: DDIM
(nothing changes). CogVideoX-5B and 5B-I2V: their repos' scheduler configs name CogVideoXDDIMScheduler,
but THUDM's inference (CogVideo `inference/cli_demo.py`) replaces it with
`CogVideoXDPMScheduler.from_config(pipe.scheduler.config)`, so 'published' takes the DPM step for a
checkpoint whose scheduler config names CogVideoXDPMScheduler OR whose transformer is the 5B family
(rotary position embeddings). CogVideoXDPMScheduler.step is stochastic (DPM-Solver++(2M) with SDE
noise): we call nothing of it at sampling time but compute its coefficients from the scheduler
beforehand and draw its noise with `randn_tensor(..., generator)` as its `step` does (one draw on the
first and the last step, two on the others, the first discarded), so that with fp32 weights and no
gradients the latents equal the pipeline with a CogVideoXDPMScheduler for the same generator. At the
switch into the gradient window the DPM state (the previous step's predicted x0) is dropped and DDIM
continues from the current latents; the DPM draws make the training noise differ from 'differentiable'.

CogVideoX-5B-I2V (1.0) has no `ofs` embedding (ofs_embed_dim None); CogVideoX 1.5's I2V has one.
Not supported: CogVideoX 1.5 (`patch_size_t`: padded latent frames, and its I2V `ofs` embedding;
refused when the models load; an `ofs_embed_dim` without `patch_size_t` would be passed the
pipeline's ofs of 2.0), video-to-video (CogVideoXVideoToVideoPipeline), the Fun/control pipelines,
GRPO (no log-probability sampler: v-prediction DDIM, not a rectified flow).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vader.backends import common, from_config
from vader.errors import VaderError
from vader.sampling import cfg_combine

COGVIDEOX_REPO = "THUDM/CogVideoX-2b"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the joint text-video attention of every block
T2V_PIPELINE, I2V_PIPELINE = "CogVideoXPipeline", "CogVideoXImageToVideoPipeline"
DPM_SCHEDULER = "CogVideoXDPMScheduler"
SOLVERS = ("differentiable", "published")
# The published architectures, for describing a model without its files. CogVideoX-2b is the defaults of
# CogVideoXTransformer3DModel (1.69B parameters) and AutoencoderKLCogVideoX (216M); CogVideoX-5b has 42
# blocks of 48 heads and 3D rotary embeddings (5.57B); CogVideoX-5b-I2V adds the image latents' 16 input
# channels (+197K) and a learned positional embedding of its 480 x 720 x 49 sample size (a 54.6M persistent
# buffer, saved with the weights; no `ofs`, which is CogVideoX 1.5's). The 5B VAEs scale latents by 0.7. The text encoder of all is T5 v1.1 XXL's encoder (4.76B).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}
_5B = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
# CogVideoXDDIMScheduler as the repos ship it (CogVideoX-2b's scheduler_config.json; the 5B ones differ
# in snr_shift_scale 1.0)
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                  snr_shift_scale=3.0, timestep_spacing="trailing")


@dataclass(frozen=True)
class Published:
    """What a published checkpoint is, without its files: its pipeline class, and the arguments of its
    transformer, VAE and (DDIM) scheduler that differ from diffusers' defaults."""

    pipeline: str
    transformer: dict
    vae: dict
    scheduler: dict


PUBLISHED: dict[str, Published] = {}
for _org in ("THUDM", "zai-org"):  # THUDM's repos moved to zai-org; both ids resolve on the hub
    PUBLISHED[f"{_org}/CogVideoX-2b"] = Published(T2V_PIPELINE, {}, {}, _SCHEDULER)
    PUBLISHED[f"{_org}/CogVideoX-5b"] = Published(T2V_PIPELINE, _5B, {"scaling_factor": 0.7},
                                                  {**_SCHEDULER, "snr_shift_scale": 1.0})
    PUBLISHED[f"{_org}/CogVideoX-5b-I2V"] = Published(
        I2V_PIPELINE, {**_5B, "in_channels": 32, "use_learned_positional_embeddings": True},
        {"scaling_factor": 0.7}, {**_SCHEDULER, "snr_shift_scale": 1.0})


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
    # the step of the steps without gradients: 'differentiable' (DDIM) or 'published' (the checkpoint's
    # inference scheduler: DPM for the 5B family; see the module docstring)
    solver: str = "differentiable"

    def components(self) -> dict[str, common.Component]:
        return common.pipeline_components(
            self, common.Component("scheduler", self.scheduler or self.pretrained, "scheduler", common.SCHEDULER_FILES[0], ()))

    def validate(self, spatial_multiple: int = 16, frame_rule: int = 8) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        common.check_settings(self, spatial_multiple, "480 x 720")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % frame_rule:
            raise VaderError(f"num_frames={self.num_frames!r} must be {frame_rule}k + 1 (an odd number of latent "
                             "frames, which the VAE decodes to exactly that many frames), e.g. 33 or 49")
        if self.solver not in SOLVERS:
            raise VaderError(f"solver={self.solver!r} must be one of {', '.join(map(repr, SOLVERS))}")


def _published(source: str) -> Published | None:
    return PUBLISHED.get(source)


def meta_models(settings: CogVideoXSettings | None = None) -> dict[str, nn.Module]:
    """Transformer, VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published architecture of
    a published repo id (CogVideoX-2b, -5b, -5b-I2V)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoConfig, T5Config, T5EncoderModel

    parts = (settings or CogVideoXSettings()).components()

    def config(name: str, read: Callable, published: Callable[[Published], Any]) -> Any:
        source = parts[name].source
        known = _published(source)
        return common.architecture_config(parts[name], read, source if known else COGVIDEOX_REPO,
                                          published(known or PUBLISHED[COGVIDEOX_REPO]))

    transformer = config("transformer", CogVideoXTransformer3DModel.load_config, lambda p: dict(p.transformer))
    vae = config("vae", AutoencoderKLCogVideoX.load_config, lambda p: dict(p.vae))
    text = config("text_encoder", AutoConfig.from_pretrained, lambda p: T5Config(**T5_XXL))
    with torch.device("meta"):
        return {"transformer": CogVideoXTransformer3DModel.from_config(transformer),
                "vae": AutoencoderKLCogVideoX.from_config(vae), "text_encoder": T5EncoderModel(text)}


def checkpoint_pipeline(s: CogVideoXSettings) -> str:
    """CogVideoXPipeline or CogVideoXImageToVideoPipeline, before any weight loads (nothing downloaded):
    the transformer's own config when it is on this machine (2 x the latent channels in: image-to-video),
    else the pipeline's model_index.json, else the published repo id; else text-to-video."""
    from vader.weights import local_file

    part = s.components()["transformer"]
    path, sub = part.location()
    found = local_file(path, "config.json", sub)
    if found is not None:
        try:
            tcfg = json.loads(found.read_text())
            if tcfg.get("in_channels", 16) == 2 * tcfg.get("out_channels", 16):
                return I2V_PIPELINE
            return T2V_PIPELINE
        except (OSError, ValueError):
            pass
    index = local_file(s.pretrained, "model_index.json")
    if index is not None:
        try:
            name = json.loads(index.read_text()).get("_class_name")
            if name in (T2V_PIPELINE, I2V_PIPELINE):
                return name
        except (OSError, ValueError):
            pass
    known = _published(part.source) or _published(s.pretrained)
    return known.pipeline if known else T2V_PIPELINE


@dataclass(frozen=True)
class DPMStep:
    """CogVideoXDPMScheduler.step's coefficients at one step, computed by the scheduler itself:
    sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), mult1..mult4 (`get_mult`; mult3/4 None on the first step)
    and the noise scale; `last`: prev_timestep < 0 (a first-order step with one noise draw)."""

    sqrt_alpha: Tensor
    sqrt_beta: Tensor
    mult1: Tensor
    mult2: Tensor
    mult3: Tensor | None
    mult4: Tensor | None
    noise: Tensor
    last: bool


@dataclass(frozen=True)
class DDIMStep:
    """One sampling step: timestep, sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), the step's mixing
    coefficients a (of x_t) and b (of the predicted x_0), and the guidance scale; `dpm`: the
    published DPM step's coefficients at this timestep (solver 'published' on a DPM checkpoint)."""

    t: Tensor
    sqrt_alpha: Tensor
    sqrt_beta: Tensor
    a: Tensor
    b: Tensor
    guidance: float
    dpm: DPMStep | None = None


@dataclass
class CogVideoXGenerator(common.PromptsAndVideos):
    """CogVideoXTransformer3DModel, AutoencoderKLCogVideoX and the T5 encoder with `CogVideoXSettings`, and
    the checkpoint's scheduler config (read into the DDIM step) and the class it names."""

    scheduler_config: dict = field(default_factory=dict)
    scheduler_class: str = "CogVideoXDDIMScheduler"
    # image-to-video: prompt -> the VAE posterior (mean, std) [1, C, 1, h, w] of its first frame
    image_latents: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    lora_target_modules = LORA_TARGETS

    backend_name, settings_class, pipeline_class = "cogvideox", CogVideoXSettings, T2V_PIPELINE
    model_classes = ("transformers.T5EncoderModel", "diffusers.CogVideoXTransformer3DModel",
                     "diffusers.AutoencoderKLCogVideoX")
    diffusers_classes = ("CogVideoXDDIMScheduler", DPM_SCHEDULER, I2V_PIPELINE)

    @classmethod
    def extra_fields(cls, parts: dict[str, common.Component]) -> dict:
        from diffusers import CogVideoXDDIMScheduler

        raw = dict(common.load_part(parts["scheduler"], CogVideoXDDIMScheduler.load_config))
        return {"scheduler_config": dict(CogVideoXDDIMScheduler.from_config(raw).config),
                "scheduler_class": str(raw.get("_class_name") or "CogVideoXDDIMScheduler")}

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        scheduler, settings: CogVideoXSettings | None = None,
                        device: torch.device | str = "cpu") -> CogVideoXGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied)."""
        settings = settings or CogVideoXSettings()
        settings.validate()
        device = torch.device(device)
        gen = cls(transformer, vae, None, settings, device, transformer.dtype,
                  scheduler_config=dict(scheduler.config), scheduler_class=type(scheduler).__name__)
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    def save_lora_diffusers(self, lora, folder, config=None):  # type: ignore[no-untyped-def]
        """`pytorch_lora_weights.safetensors` for the checkpoint's own pipeline's `load_lora_weights`
        (CogVideoXPipeline and CogVideoXImageToVideoPipeline read the same file)."""
        import diffusers

        name = I2V_PIPELINE if self.takes_images else T2V_PIPELINE
        return common.save_diffusers_lora(getattr(diffusers, name), lora, folder, config)

    def _check_models(self) -> None:
        tcfg = self.denoiser.config
        source = self.settings.transformer or self.settings.pretrained
        if tcfg.patch_size_t is not None:
            raise VaderError(f"transformer={source!r} is CogVideoX 1.5 (patch_size_t is set), which this backend "
                             "does not support; use CogVideoX-2b, -5b or -5b-I2V")
        if tcfg.max_text_seq_length != self.settings.max_sequence_length:
            raise VaderError(f"max_sequence_length={self.settings.max_sequence_length} must equal the "
                             f"transformer's max_text_seq_length ({tcfg.max_text_seq_length})")
        spatial = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.settings.validate(spatial_multiple=spatial * tcfg.patch_size,
                               frame_rule=2 * self.vae.config.temporal_compression_ratio)
        if tcfg.use_learned_positional_embeddings:
            size = (tcfg.sample_height * spatial, tcfg.sample_width * spatial)
            if (self.settings.height, self.settings.width) != size:
                raise VaderError(f"image_size=({self.settings.height}, {self.settings.width}): transformer={source!r} "
                                 f"has learned positional embeddings of its sample size; use image_size={size}")

    @property
    def takes_images(self) -> bool:
        """Image-to-video: the transformer takes the image latents as as many extra input channels."""
        cfg = self.denoiser.config
        return cfg.in_channels == 2 * cfg.out_channels

    # ---- images ----
    def set_images(self, images: dict[str, Any]) -> None:
        """The first frame of each prompt's video (RGB PIL images keyed by prompt), for an image-to-video
        checkpoint: preprocessed as CogVideoXImageToVideoPipeline does (`VideoProcessor.preprocess`: resized to
        height x width, no crop, to [-1, 1]) and encoded by the VAE once, keeping its posterior (mean, std); `sample_latents` draws the
        latent from it with the run's generator (see the module docstring). Replaces earlier images of the
        same prompts."""
        if not self.takes_images:
            raise VaderError(f"model.from_pretrained={self.settings.pretrained!r} is text-to-video "
                             f"({T2V_PIPELINE}); it takes no images")
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self._spatial)
        with torch.no_grad(), common.autocast_off(self.device):
            for prompt, image in images.items():
                pixels = processor.preprocess(image, height=self.settings.height, width=self.settings.width)
                pixels = pixels.to(self.device, dtype=self.vae.dtype).unsqueeze(2)  # [1, 3, 1, H, W]
                posterior = self.vae.encode(pixels).latent_dist
                self.image_latents[prompt] = (posterior.mean, posterior.std)

    def image_condition(self, prompts: list[str], generator: torch.Generator) -> Tensor | None:
        """The image latents [B, T, C, h, w] (the run's dtype) CogVideoXImageToVideoPipeline.prepare_latents
        makes, drawn from `generator` prompt by prompt; None for text-to-video."""
        if not self.takes_images:
            return None
        missing = [p for p in prompts if p not in self.image_latents]
        if missing:
            raise RuntimeError(f"no image for prompt {missing[0]!r}: model.from_pretrained="
                               f"{self.settings.pretrained!r} is image-to-video ({I2V_PIPELINE}); give every "
                               "prompt its first frame (set_images)")
        from diffusers.utils.torch_utils import randn_tensor

        drawn = []
        for prompt in prompts:  # DiagonalGaussianDistribution.sample(generator), one image at a time
            mean, std = self.image_latents[prompt]
            drawn.append(mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device,
                                                   dtype=mean.dtype))
        image = torch.cat(drawn).to(self.dtype).permute(0, 2, 1, 3, 4)  # [B, 1, C, h, w]
        vae = self.vae.config
        scale = vae.scaling_factor
        image = (1 / scale * image) if getattr(vae, "invert_scale_latents", False) else scale * image
        c, t, h, w = self.latent_shape
        padding = torch.zeros((len(prompts), t - 1, c, h, w), device=image.device, dtype=image.dtype)
        return torch.cat([image, padding], dim=1).to(self.device)

    # ---- text ----
    def _prompt_encoder(self, tokenizer, model: nn.Module, name: str) -> common.PromptEncoder:
        return common.padded_t5_encoder(tokenizer, model, f"cogvideox:{name}", self.device,
                                        self.settings.max_sequence_length)

    @property
    def _spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents (image-to-video: the transformer's input is 2C channels)."""
        cfg = self.denoiser.config
        t = (self.num_frames - 1) // self.vae.config.temporal_compression_ratio + 1
        channels = cfg.in_channels // 2 if cfg.in_channels == 2 * cfg.out_channels else cfg.in_channels
        return (channels, t, self.settings.height // self._spatial, self.settings.width // self._spatial)

    # ---- sampling ----
    @property
    def published_dpm(self) -> bool:
        """Whether solver 'published' takes CogVideoXDPMScheduler's step: the checkpoint's scheduler config
        names it, or the transformer is the 5B family (rotary embeddings), which THUDM samples with DPM."""
        return self.scheduler_class == DPM_SCHEDULER or bool(self.denoiser.config.use_rotary_positional_embeddings)

    def schedule(self) -> list[DDIMStep]:
        """CogVideoXDDIMScheduler's timesteps (the checkpoint's config, this run's step count) with each
        step's coefficients taken as its `step` computes them: real tensors, computed once per setting;
        with solver 'published' on a DPM checkpoint, CogVideoXDPMScheduler's too (the same timesteps)."""
        from diffusers import CogVideoXDDIMScheduler

        dpm = self.settings.solver == "published" and self.published_dpm
        key = (self.settings.num_steps, self.settings.guidance_scale, self.settings.use_dynamic_cfg, self.device, dpm)
        if self._schedule is not None and self._schedule[0] == key:
            return self._schedule[1]
        with common.real_tensors():
            sched = CogVideoXDDIMScheduler.from_config(self.scheduler_config)
            sched.set_timesteps(self.settings.num_steps, device=self.device)
            dpm_steps = self._dpm_steps(sched.timesteps) if dpm else [None] * len(sched.timesteps)
            steps = []
            for t, dpm_step in zip(sched.timesteps, dpm_steps, strict=True):
                # CogVideoXDDIMScheduler.step with eta = 0, term by term
                prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
                alpha = sched.alphas_cumprod[t]
                alpha_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
                beta = 1 - alpha
                a = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
                steps.append(DDIMStep(t, alpha**0.5, beta**0.5, a, alpha_prev**0.5 - alpha**0.5 * a,
                                      self._guidance_at(t), dpm_step))
        self._schedule = (key, steps)
        return steps

    def _dpm_steps(self, timesteps: Tensor) -> list[DPMStep]:
        """CogVideoXDPMScheduler.step's coefficients at each timestep (its own `get_variables`/`get_mult`),
        with `timestep_back` the previous timestep as the pipelines pass it."""
        from diffusers import CogVideoXDPMScheduler

        sched = CogVideoXDPMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(self.settings.num_steps, device=self.device)
        if not torch.equal(sched.timesteps.cpu(), timesteps.cpu()):  # one config: never, but the loop relies on it
            raise RuntimeError("CogVideoXDPMScheduler and CogVideoXDDIMScheduler disagree on the timesteps")
        steps = []
        for i, t in enumerate(sched.timesteps):
            prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
            alpha = sched.alphas_cumprod[t]
            alpha_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
            alpha_back = sched.alphas_cumprod[sched.timesteps[i - 1]] if i > 0 else None
            h, r, _, _ = sched.get_variables(alpha, alpha_prev, alpha_back)
            mult = list(sched.get_mult(h, r, alpha, alpha_prev, alpha_back))
            mult += [None] * (4 - len(mult))
            noise = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
            steps.append(DPMStep(alpha**0.5, (1 - alpha) ** 0.5, mult[0], mult[1], mult[2], mult[3], noise,
                                 bool(prev < 0)))
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
        through steps >= cutoff (None: no gradients), which always take the DDIM step. Image-to-video:
        each prompt conditioned on its image (`set_images`; drawn from `generator` before the noise)."""
        from diffusers.utils.torch_utils import randn_tensor

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
        image = self.image_condition(prompts, generator)  # the pipeline draws the image latents first
        if image is not None and self.uses_guidance:
            image = torch.cat([image, image])
        ofs = None  # CogVideoXImageToVideoPipeline's ofs embedding input (CogVideoX 1.5 only)
        if self.denoiser.config.ofs_embed_dim is not None:
            ofs = torch.full((1,), 2.0, dtype=self.dtype, device=self.device)
        z = self.initial_noise(n, generator)  # DDIM's and DPM's init_noise_sigma is 1
        old_x0 = None  # the DPM step's previous predicted x0
        indices = range(len(steps))
        for i in progress(indices) if progress else indices:
            step = steps[i]
            grad = cutoff is not None and i >= cutoff
            with torch.set_grad_enabled(grad):
                # DDIM's and DPM's scale_model_input are the identity
                x = (torch.cat([z, z]) if self.uses_guidance else z).to(self.dtype)
                if image is not None:
                    x = torch.cat([x, image], dim=2)
                v = self.denoiser(hidden_states=x, encoder_hidden_states=text, timestep=step.t.expand(x.shape[0]),
                                  ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0].float()
                if self.uses_guidance:
                    v_uncond, v_cond = v.chunk(2)
                    v = cfg_combine(v_uncond, v_cond, step.guidance)
                dpm = None if grad else step.dpm
                if dpm is None:
                    x0 = step.sqrt_alpha * z - step.sqrt_beta * v  # v-prediction
                    z = step.a * z + step.b * x0
                    old_x0 = None  # entering the gradient window drops the DPM state
                    continue
                # CogVideoXDPMScheduler.step term by term, its noise drawn as it draws it
                x0 = dpm.sqrt_alpha * z - dpm.sqrt_beta * v
                noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                if old_x0 is None or dpm.last:
                    z_next = dpm.mult1 * z - dpm.mult2 * x0 + dpm.noise * noise
                else:
                    noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                    denoised = dpm.mult3 * x0 - dpm.mult4 * old_x0
                    z_next = dpm.mult1 * z - dpm.mult2 * denoised + dpm.noise * noise
                z, old_x0 = z_next, x0
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
                                use_dynamic_cfg=bool(cfg.scheduler.use_dynamic_cfg),
                                solver=getattr(cfg.scheduler, "solver", None))


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    from_config.check_config(cfg, COGVIDEOX_REPO, (480, 720), ("scheduler.use_dynamic_cfg",), settings)
    if getattr(cfg, "method", "vader") == "grpo" and getattr(cfg.scheduler, "solver", None) == "published" \
            and LOG_PROB_SAMPLING:
        raise VaderError("scheduler.solver='published' with method='grpo': GRPO samples with its own SDE and "
                         "log-probabilities; use scheduler.solver='differentiable'")


def image_input(cfg) -> str:  # type: ignore[no-untyped-def]
    """'required' for a CogVideoXImageToVideoPipeline checkpoint (CogVideoX-5b-I2V: every prompt needs its
    first frame), else 'none' (text-to-video only). Decided before any weight loads (`checkpoint_pipeline`)."""
    return "required" if checkpoint_pipeline(settings(cfg)) == I2V_PIPELINE else "none"


def first_frame_generated(cfg) -> bool:  # type: ignore[no-untyped-def]
    """CogVideoX-5B-I2V concatenates the image latents as extra channels and samples every latent frame: the
    video's frame 0 is generated (conditioned on the image), so a reward on it trains the model."""
    return True


def _published_scheduler(s: CogVideoXSettings):  # type: ignore[no-untyped-def]
    """The checkpoint's scheduler (its config, in the class it names) when its files are on this machine,
    else the published repo's CogVideoXDDIMScheduler (CogVideoX-2b's for any other source); its values
    never change memory."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    try:
        part = s.components()["scheduler"]
        raw = dict(common.local_part_config(part, CogVideoXDDIMScheduler.load_config) or {})
        if raw:
            cls = CogVideoXDPMScheduler if raw.get("_class_name") == DPM_SCHEDULER else CogVideoXDDIMScheduler
            return cls.from_config(raw)
    except Exception:  # unreadable: the plan needs no download
        pass
    known = _published(s.scheduler or s.pretrained) or PUBLISHED[COGVIDEOX_REPO]
    return CogVideoXDDIMScheduler(**known.scheduler)


# build, weight_problems, meta_part, resolved, plan_generator: what every diffusers backend shares
_shared = from_config.DiffusersBackend(
    settings, CogVideoXGenerator, meta_models, common.missing_weights, LORA_TARGETS,
    lambda s, transformer, vae: CogVideoXGenerator.from_components(transformer, vae, None, None,
                                                                   _published_scheduler(s), s))
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part
resolved = _shared.resolved


def plan_generator(cfg, training: bool):  # type: ignore[no-untyped-def]
    """The shared plan generator; for an image-to-video checkpoint, every prompt also gets stand-in image
    latents (a posterior of the VAE's shape, under the plan's 'prompts' phase), so that the plan counts
    the transformer's extra input channels."""
    vae, build_shared = _shared.plan_generator(cfg, training)
    if image_input(cfg) != "required":
        return vae, build_shared

    def build_with_images(meter, prompts: list[str]):  # type: ignore[no-untyped-def]
        gen = build_shared(meter, prompts)
        c, _, h, w = gen.latent_shape
        with meter.phase("prompts"):
            for prompt in dict.fromkeys(prompts):
                mean = torch.zeros(1, c, 1, h, w, dtype=gen.vae.dtype, device=gen.device)
                gen.image_latents[prompt] = (mean, torch.zeros_like(mean))
        return gen

    return vae, build_with_images
