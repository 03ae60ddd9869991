"""The text-to-video pipeline: cached prompt embeddings -> rectified-flow sampler -> VAE.

`VideoGenerator` owns the three models and the size/sampler settings; training and inference use
the same object, so what is trained is exactly what is sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vader.checkpoint import LORA_TARGETS
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.frames import decode_selected
from vader.models.presets import build_denoiser, build_text_encoder, build_vae, denoiser_dtype, torch_dtype
from vader.models.text import build_prompt, strip_conditioning
from vader.sampling import TextCondition, conditioning, make_timesteps, sample


@dataclass
class VideoGenerator:
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object | None  # dropped after the prompts are encoded (T5-XXL is 4.7B parameters)
    cfg: VaderConfig
    device: torch.device
    dtype: torch.dtype
    embeddings: dict[str, tuple[Tensor, Tensor]]

    lora_target_modules = LORA_TARGETS  # the same attribute as the diffusers backends'

    @classmethod
    def build(cls, cfg: VaderConfig, device: torch.device, prompts: list[str] | None = None,
              cache=None) -> VideoGenerator:
        """Text encoder first: with `prompts`, every prompt is encoded (through `cache`) and the text
        encoder is released before the denoiser and the VAE load, so T5-XXL never shares memory
        with them. Without `prompts` the encoder is kept for later `encode_prompts` calls."""
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
        mask = torch.cat([self.embeddings[p][1] for p in prompts])
        null = self.denoiser.y_embedder.y_embedding
        y_null = null[None, None].expand(len(prompts), 1, *null.shape).to(y.dtype)
        return TextCondition(y=y, mask=mask, y_null=y_null)

    # ---- sampling ----
    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, 4, T, H, W]; gradients only through steps >= cutoff (None: no gradients)."""
        n = len(prompts)
        height, width = self.cfg.height_width
        sched = self.cfg.scheduler
        cond = conditioning(n, height, width, self.num_frames, self.cfg.fps, self.dtype, self.device)
        timesteps = make_timesteps(
            sched.num_sampling_steps, n, num_timesteps=sched.num_timesteps,
            use_timestep_transform=sched.use_timestep_transform,
            use_discrete_timesteps=sched.use_discrete_timesteps, transform_scale=sched.transform_scale,
            cond=cond, num_frames=self.num_frames,
        )
        z = torch.randn((n, *self.latent_shape), generator=generator, dtype=torch.float32).to(self.device)
        return sample(self.denoiser, z, self.text_condition(prompts), cond, timesteps, cfg_scale=sched.cfg_scale,
                      num_timesteps=sched.num_timesteps, cutoff=cutoff, grad_checkpoint=grad_checkpoint,
                      progress=progress)

    # ---- decoding ----
    def decode(self, latents: Tensor, frames: list[int] | None = None, *,
               grad_checkpoint: bool | None = None) -> Tensor:
        """The backends' `decode`: frames None gives the whole video [B, 3, F, H, W] in [-1, 1] (fp32);
        else the chosen `frames` (indices as the config's decode_strategy means them) through
        `vader.frames.decode_selected`, in the VAE's dtype and unclamped (the rewards clamp), with
        gradients to `latents`. `grad_checkpoint` None leaves the VAE's checkpointing as it is set."""
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
