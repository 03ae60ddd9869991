"""Open-Sora v1.2 as a backend: cached T5 prompt embeddings -> rectified-flow sampler -> VAE v1.2.

`OpenSoraGenerator` owns the three models (vader's own STDiT3, VideoVAE and T5 from vader.models) and
the size/sampler settings; training and inference use the same object, so what is trained is exactly
what is sampled. The module functions are the backend's answers to config validation, `vader inspect`,
`vader config`, the preflight and the plan (see `vader.backends.base.BackendModule`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vader.backends.base import FlowState, MetaModel
from vader.checkpoint import lora_on_meta
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.frames import decode_selected
from vader.memory import LiveBytes, materialise_generator_models
from vader.models.fp8 import quantize_linears
from vader.models.loading import build_on_meta, local_config
from vader.models.presets import (
    attention_backend,
    build_denoiser,
    build_text_encoder,
    build_vae,
    denoiser_config,
    denoiser_dtype,
    missing_model_weights,
    text_encoder_config,
    torch_dtype,
    vae_config,
)
from vader.models.stdit3 import STDiT3
from vader.models.text import build_prompt, strip_conditioning
from vader.models.vae import VideoVAE
from vader.sampling import TextCondition, conditioning, guided_velocity, make_timesteps, sample

LORA_TARGETS = ["qkv", "q_linear", "kv_linear"]  # the denoiser's attention projections, as the original
LOG_PROB_SAMPLING = True  # a rectified flow: GRPO's SDE sampling applies
# every knob of `vader plan --fit` (vader.plan.KNOBS): Open-Sora is vader's own stack
MEMORY_KNOBS = ("model.attention", "text_encoder.offload", "vae.micro_batch_size", "reward_grad_checkpoint",
                "grad_checkpoint", "use_AdamW8bit", "dtype", "decode_strategy", "decode_frame", "backprop_mode")
Settings = VaderConfig  # Open-Sora is configured by the whole config (sizes tables, T5 suffixes, ...)


@dataclass
class OpenSoraCondition:
    """Open-Sora's conditioning of one batch: the text (with the null caption for CFG) and the
    size/fps conditioning, plus the guidance scale."""
    text: TextCondition
    sizes: dict[str, Tensor]
    cfg_scale: float


@dataclass
class OpenSoraGenerator:
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object | None  # dropped after the prompts are encoded (T5-XXL is 4.7B parameters)
    cfg: VaderConfig
    device: torch.device
    dtype: torch.dtype
    embeddings: dict[str, tuple[Tensor, Tensor]]

    lora_target_modules = LORA_TARGETS
    lora_formats: tuple[str, ...] = ()  # no diffusers pipeline runs STDiT3: peft's adapter only

    @classmethod
    def build(cls, cfg: VaderConfig, device: torch.device | str, prompts: list[str] | None = None,
              cache=None) -> OpenSoraGenerator:
        """Text encoder first: with `prompts`, every prompt is encoded (through `cache`) and the text
        encoder is released before the denoiser and the VAE load, so T5-XXL never shares memory
        with them. Without `prompts` the encoder is kept for later `encode_prompts` calls."""
        device = torch.device(device)
        dtype = torch_dtype(cfg.dtype)
        if device.type == "cpu" and dtype == torch.float16:
            raise VaderError("dtype='fp16' needs a CUDA GPU (fp16 kernels are missing on CPU); use 'bf16' or 'fp32'")
        torch.manual_seed(cfg.seed)  # random-init (tiny) weights must be identical on every process
        # offload: T5-XXL's fp32 weights (18 GiB) would be the run's peak on a 24 GiB card; on the CPU
        # it costs seconds per prompt once, and only the embeddings move to the device
        text_device = torch.device("cpu") if cfg.text_encoder.offload else device
        text_encoder = build_text_encoder(cfg.text_encoder, text_device)
        caption_channels = text_encoder.output_dim
        gen = cls(None, None, text_encoder, cfg, device, dtype, {})  # type: ignore[arg-type]
        if prompts is not None:
            gen.encode_prompts(prompts, cache=cache)
            gen.release_text_encoder()
        gen.denoiser = build_denoiser(cfg.model, caption_channels, cfg.text_encoder.model_max_length,
                                      denoiser_dtype(cfg.dtype), device)
        gen.vae = build_vae(cfg.vae, dtype, device)
        return gen

    # ---- sizes ----
    @property
    def num_frames(self) -> int:
        return self.cfg.frames

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        height, width = self.cfg.height_width
        t, h, w = self.vae.get_latent_size(self.num_frames, height, width)
        return (4, t, h, w)

    # ---- text ----
    def t5_prompt(self, prompt: str) -> str:
        return build_prompt(prompt, aes=self.cfg.aes, flow=self.cfg.flow, camera_motion=self.cfg.camera_motion)

    def reward_prompts(self, prompts: list[str]) -> list[str]:
        """What reward models see: the cleaned prompt without Open-Sora's score suffixes."""
        return [strip_conditioning(self.t5_prompt(p)) for p in prompts]

    def encode_prompts(self, prompts: list[str], cache=None) -> None:
        """Encode every new prompt once (through the disk cache when given)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.embeddings]
        if not todo:
            return
        if self.text_encoder is None:
            raise RuntimeError("text encoder already released; encode all prompts before releasing it")
        texts = [self.t5_prompt(p) for p in todo]
        if cache is not None:
            y, mask = cache.get_or_encode(self.text_encoder, texts)
        else:
            y, mask = self.text_encoder.encode(texts)
        for i, p in enumerate(todo):
            self.embeddings[p] = (y[i: i + 1].to(self.device), mask[i: i + 1].to(self.device))

    def release_text_encoder(self) -> None:
        self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def text_condition(self, prompts: list[str]) -> TextCondition:
        self.encode_prompts(prompts)
        y = torch.cat([self.embeddings[p][0] for p in prompts])
        masks = [self.embeddings[p][1] for p in prompts]
        # no mask: every token attends (the plan's stand-ins, planned at model_max_length tokens)
        mask = None if any(m is None for m in masks) else torch.cat(masks)
        null = self.denoiser.y_embedder.y_embedding
        y_null = null[None, None].expand(len(prompts), 1, *null.shape).to(y.dtype)
        return TextCondition(y=y, mask=mask, y_null=y_null)

    def enable_gradient_checkpointing(self, enabled: bool) -> None:
        """Each STDiT3 block inside a denoiser call with gradients, and the VAE decode the reward
        backpropagates through, chunk by chunk (the sampler checkpoints whole calls per call)."""
        self.denoiser.gradient_checkpointing = enabled
        self.vae.enable_gradient_checkpointing(enabled)

    # ---- sampling ----
    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """Open-Sora's schedule (the resolution x length shift), size conditioning, text and noise."""
        n = len(prompts)
        height, width = self.cfg.height_width
        sched = self.cfg.scheduler
        sizes = conditioning(n, height, width, self.num_frames, self.cfg.fps, self.dtype, self.device)
        timesteps = make_timesteps(
            sched.num_sampling_steps, n, num_timesteps=sched.num_timesteps,
            use_timestep_transform=sched.use_timestep_transform,
            use_discrete_timesteps=sched.use_discrete_timesteps, transform_scale=sched.transform_scale,
            cond=sizes, num_frames=self.num_frames,
        )
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)
        condition = OpenSoraCondition(self.text_condition(prompts), sizes, sched.cfg_scale)
        return FlowState(z, timesteps, sched.num_timesteps, condition)

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        c: OpenSoraCondition = state.condition
        y = torch.cat([c.text.y, c.text.y_null], 0)
        return guided_velocity(self.denoiser, z, state.timesteps[i], y, c.text.mask, c.sizes, c.cfg_scale,
                               grad_checkpoint)

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, 4, T, H, W]; gradients only through steps >= cutoff (None: no gradients)."""
        state = self.flow_start(prompts, generator)
        c: OpenSoraCondition = state.condition
        return sample(self.denoiser, state.noise, c.text, c.sizes, state.timesteps, cfg_scale=c.cfg_scale,
                      num_timesteps=state.num_timesteps, cutoff=cutoff, grad_checkpoint=grad_checkpoint,
                      progress=progress)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *,
               grad_checkpoint: bool | None = None) -> Tensor:
        """frames None gives the whole video [B, 3, F, H, W] in [-1, 1] (fp32); else the chosen `frames`
        (indices as the config's decode_strategy means them) through `vader.frames.decode_selected`, in
        the VAE's dtype and unclamped (the rewards clamp), with gradients to `latents`. `grad_checkpoint`
        None leaves the VAE's checkpointing as it is set."""
        if grad_checkpoint is not None:
            self.vae.enable_gradient_checkpointing(grad_checkpoint)
        z = latents.to(self.dtype)
        if frames is None:
            return self.vae.decode(z, num_frames=self.num_frames).float().clamp(-1, 1)
        return decode_selected(self.vae, z, self.num_frames, frames, self.cfg.decode_strategy)

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator, progress: Callable | None = None) -> Tensor:
        """Whole videos [B, 3, F, H, W] in [-1, 1], no autograd anywhere."""
        return self.decode(self.sample_latents(prompts, generator, cutoff=None, progress=progress))


Generator = OpenSoraGenerator


# ---- the backend's module functions ------------------------------------------------------------------


def check_config(cfg: VaderConfig) -> None:
    """Settings of the diffusers backends that Open-Sora cannot honour are refused rather than ignored
    (its sizes are checked by the config's own size rules: Open-Sora's tables)."""
    for key, value, unset in (("negative_prompt", cfg.negative_prompt, None),
                              ("scheduler.shift", cfg.scheduler.shift, None),
                              ("scheduler.cfg_scale_2", cfg.scheduler.cfg_scale_2, None),
                              ("scheduler.use_dynamic_cfg", cfg.scheduler.use_dynamic_cfg, False),
                              ("vae.dtype", cfg.vae.dtype, None), ("vae.offload_cache", cfg.vae.offload_cache, False)):
        if value != unset:
            raise VaderError(f"{key}={value!r} is for the diffusers backends; model.type={cfg.model.type!r} "
                             f"(Open-Sora) needs {key}={unset!r}")


def settings(cfg: VaderConfig) -> VaderConfig:
    return cfg


def image_input(cfg: VaderConfig) -> str:
    """Open-Sora v1.2 is text-to-video here: a prompts file may give no first-frame images."""
    return "none"


def build(cfg: VaderConfig, device: torch.device | str, prompts: list[str] | None = None,
          cache=None) -> OpenSoraGenerator:
    return OpenSoraGenerator.build(cfg, device, prompts=prompts, cache=cache)


def weight_problems(cfg: VaderConfig) -> tuple[list[str], list]:
    return [], missing_model_weights(cfg.model, cfg.vae, cfg.text_encoder)


def _source(name: str | None) -> tuple[str, dict]:
    if not name:
        return "random init (from_pretrained=None)", {}
    published = local_config(name)
    note = "its config.json read" if published else "config.json not on this machine: preset architecture"
    return f"{name} ({note})", published


def _run_dtype(cfg: VaderConfig) -> torch.dtype:
    return torch_dtype(cfg.dtype if cfg.dtype != "fp8" else "bf16")  # fp8: bf16 except the denoiser's Linears


def _denoiser(cfg: VaderConfig) -> MetaModel:
    t5 = text_encoder_config(cfg.text_encoder)
    source, published = _source(cfg.model.from_pretrained)
    config = denoiser_config(cfg.model, t5.d_model, cfg.text_encoder.model_max_length, published)
    line = (f"hidden_size {config.hidden_size}, depth {config.depth} spatial + {config.depth} temporal, "
            f"{config.num_heads} heads, mlp_ratio {config.mlp_ratio}, patch {list(config.patch_size)}, "
            f"in/out channels {config.in_channels}/{config.out_channels}, captions "
            f"{config.caption_channels} x {config.model_max_length}, qk_norm {config.qk_norm}")
    model = build_on_meta(lambda: STDiT3(config))
    if cfg.dtype == "fp8":  # as build_denoiser does: Linear weights stored in float8 e4m3
        quantize_linears(model)
        line += "; Linear weights in float8 e4m3 with per-channel scales (dtype='fp8')"
    return MetaModel("denoiser", cfg.model.type, source, line, model, _run_dtype(cfg))


def _vae(cfg: VaderConfig) -> MetaModel:
    source, published = _source(cfg.vae.from_pretrained)
    config = vae_config(cfg.vae, published)
    spatial, temporal = config.spatial, config.temporal
    line = (f"spatial AutoencoderKL channels {spatial['block_out_channels']}, layers_per_block "
            f"{spatial['layers_per_block']} (its weights are in the VAE checkpoint); temporal filters "
            f"{temporal.filters}, multipliers {list(temporal.channel_multipliers)}, {temporal.num_res_blocks} res "
            f"blocks, {temporal.time_downsample_factor}x in time; chunks of {config.micro_frame_size} frames, "
            f"spatial micro-batch {config.micro_batch_size}")
    model = build_on_meta(lambda: VideoVAE(config))
    return MetaModel("vae", cfg.vae.type, source, line, model, _run_dtype(cfg))


def _text_encoder(cfg: VaderConfig) -> MetaModel:
    from transformers import T5EncoderModel

    config = text_encoder_config(cfg.text_encoder)
    source, _ = _source(cfg.text_encoder.from_pretrained)
    line = (f"T5 encoder: d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads x "
            f"{config.d_kv}, {config.feed_forward_proj} d_ff {config.d_ff}, vocab {config.vocab_size}; "
            f"{cfg.text_encoder.model_max_length} tokens per prompt, encoded once and cached")
    model = build_on_meta(lambda: T5EncoderModel(config))
    # Always fp32 as in Open-Sora; used once per prompt, then dropped.
    return MetaModel("text_encoder", cfg.text_encoder.type, source, line, model, torch.float32)


_PARTS: dict[str, Callable[[VaderConfig], MetaModel]] = {
    "denoiser": _denoiser, "vae": _vae, "text_encoder": _text_encoder,
}


def meta_part(cfg: VaderConfig, part: str) -> MetaModel:
    """The preset architecture, or the checkpoint's config.json when it is on this machine."""
    return _PARTS[part](cfg)


class _Scalar:
    """Stands for a [n] size tensor where STDiT3 reads `t.reshape(-1)[0].item()` (data-dependent under
    FakeTensorMode): the plan knows the pixel size."""
    def __init__(self, value: float) -> None:
        self.value = value

    def reshape(self, *_: object) -> _Scalar:
        return self

    def __getitem__(self, _: object) -> _Scalar:
        return self

    def item(self) -> float:
        return self.value


def plan_generator(cfg: VaderConfig, training: bool) -> tuple[torch.nn.Module, Callable]:
    """For `vader plan`: the VAE on meta (its geometry picks frames) and `build(meter, prompts)`, which,
    inside the plan's fake mode, gives the generator's weights storage under the meter's phases (LoRA in
    fp32 when training) and stands in the prompts' embeddings at model_max_length tokens, unmasked."""
    denoiser, vae = _denoiser(cfg).model, _vae(cfg).model
    if training:  # as train.setup: after the fp8 quantisation the meta build did
        lora_on_meta(denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, LORA_TARGETS)
    caption_channels = text_encoder_config(cfg.text_encoder).d_model

    def build(meter: LiveBytes, prompts: list[str]) -> OpenSoraGenerator:
        dtype = torch_dtype(cfg.dtype)
        materialise_generator_models(meter, denoiser, vae, dtype, dtype)
        denoiser.set_attention_backend(attention_backend(cfg.model))
        height, width = cfg.height_width
        original = denoiser._pos_embed
        denoiser._pos_embed = (  # type: ignore[method-assign]
            lambda nh, nw, _h, _w, like: original(nh, nw, _Scalar(float(height)), _Scalar(float(width)), like))
        gen = OpenSoraGenerator(denoiser, vae, None, cfg, torch.device("cpu"), dtype, {})
        with meter.phase("prompts"):
            # every prompt's embedding stays on the device (OpenSoraGenerator.embeddings); fp32 as T5 gives them
            y = torch.empty(max(cfg.train_batch_size, cfg.val_batch_size), 1, cfg.text_encoder.model_max_length,
                            caption_channels)
        for i, prompt in enumerate(dict.fromkeys(prompts)):
            gen.embeddings[prompt] = (y[i: i + 1], None)
        return gen

    return vae, build


def resolved(cfg: VaderConfig) -> dict[str, Any]:
    """Frames, sizes and latent shape from the VAE config, which owns the latent geometry."""
    vae = vae_config(cfg.vae, _source(cfg.vae.from_pretrained)[1])
    frames = cfg.frames
    height, width = cfg.height_width
    latent_t, latent_h, latent_w = vae.latent_size(frames, height, width)
    factor = vae.spatial_factor
    out: dict[str, Any] = {
        "frames": frames,
        "height_width": [height, width],
        "video_frames_height_width": [frames, latent_h * factor, latent_w * factor],
        "latent_shape_CTHW": [vae.temporal.embed_dim, latent_t, latent_h, latent_w],
    }
    if (latent_h * factor, latent_w * factor) != (height, width):
        out["note"] = (f"{height}x{width} (Open-Sora's {cfg.resolution} {cfg.aspect_ratio}) is made as "
                       f"{latent_h * factor}x{latent_w * factor}: the VAE works in multiples of {factor}, as in "
                       "Open-Sora")
    return out


__all__ = ["LORA_TARGETS", "OpenSoraGenerator", "OpenSoraCondition", "build", "check_config", "meta_part",
           "resolved", "settings", "weight_problems"]
