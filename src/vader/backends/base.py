"""The backend seam: what a video-model backend module offers (`BackendModule`), what its generator
offers the training loop (`VideoBackend`), and what a rectified-flow generator adds so that
policy-gradient methods can sample with a log-probability (`FlowSampler`).

Protocols only (no implementation inheritance): a backend satisfies them by having the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class MetaModel:
    """One part of a backend's stack built on the meta device, and what to say about where it came from."""

    part: str  # denoiser | vae | text_encoder
    title: str  # e.g. "STDiT3-XL/2"
    source: str  # hub id / folder, and whether its config.json was read
    settings: str  # the architecture in one line
    model: nn.Module
    dtype: torch.dtype  # the dtype its weights are loaded in for a run


@runtime_checkable
class VideoBackend(Protocol):
    """What the training loop, validation and inference use of a text-to-video model (and, with
    `set_images`, of an image-to-video one)."""

    denoiser: nn.Module  # where the LoRA goes
    vae: nn.Module
    device: torch.device
    dtype: torch.dtype
    lora_target_modules: list[str]
    # what the final LoRA is saved as beside peft's adapter: "diffusers" means the generator also has
    # save_lora_diffusers(lora, folder, config) -> Path (a file `pipe.load_lora_weights` reads); "comfyui":
    # save_lora_comfyui(lora, file, config) -> Path (one file under the names ComfyUI's loader maps)
    lora_formats: tuple[str, ...]

    @property
    def num_frames(self) -> int: ...

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents."""
        ...

    def encode_prompts(self, prompts: list[str], cache=None) -> None:  # type: ignore[no-untyped-def]
        """Encode every new prompt once (cached per prompt)."""
        ...

    def release_text_encoder(self) -> None: ...

    def reward_prompts(self, prompts: list[str]) -> list[str]: ...

    def enable_gradient_checkpointing(self, enabled: bool) -> None:
        """Switch the models' own activation checkpointing for training (where they keep it as state)."""
        ...

    def sample_latents(self, prompts: list[str], generator: torch.Generator, *, cutoff: int | None = None,
                       grad_checkpoint: bool = False, progress: Callable | None = None) -> Tensor:
        """Latents [B, C, T, H, W]; gradients only through sampling steps >= cutoff (None: none)."""
        ...

    def decode(self, latents: Tensor, frames: list[int] | None = None, *, grad_checkpoint: bool = False) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1]: all output frames, or only `frames`, decoding only what they
        need; `grad_checkpoint`: the VAE's own activation checkpointing where it has one."""
        ...

    def generate(self, prompts: list[str], generator: torch.Generator, progress: Callable | None = None) -> Tensor:
        ...

    # Optional, image-to-video generators only (their module's image_input(cfg) is "optional" or
    # "required"; a text-to-video generator does not have it):
    #
    #     def set_images(self, images: dict[str, PIL.Image.Image]) -> None:
    #
    # the first-frame images keyed by prompt text, RGB as read from the files a prompts file names
    # (checked against the video's shape by vader.images). The generator resizes and encodes them as its
    # pipeline does and caches them; every later sample_latents/generate/flow_start of a prompt with an
    # image is conditioned on it. vader calls it once, right after the generator is built (training
    # setup, validation, infer, run, eval), and only when the prompts give images; with "optional", a
    # prompt missing from `images` is sampled text-to-video.


@dataclass
class FlowState:
    """One batch's rectified-flow sampling problem, enough to re-evaluate any of its steps: the initial
    noise, the descending timesteps (in units of `num_timesteps`; sigma = t / num_timesteps) and the
    backend's own conditioning (text embeddings, size conditioning, guidance)."""

    noise: Tensor
    timesteps: list[Tensor]  # one [B] fp32 tensor per sampling step
    num_timesteps: float
    condition: Any

    def next_t(self, i: int) -> Tensor:
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else torch.zeros_like(self.timesteps[i])


@runtime_checkable
class FlowSampler(Protocol):
    """A generator whose sampler is a rectified flow, z_next = z + v (t - t_next) / num_timesteps with the
    guided velocity v ~ x0 - eps: what GRPO's SDE sampling and its log-probabilities are built on."""

    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """The initial noise (drawn from `generator` as `sample_latents` draws it), schedule and conditioning."""
        ...

    def flow_velocity(self, state: FlowState, z: Tensor, i: int, grad_checkpoint: bool = False) -> Tensor:
        """The guided velocity at step i for latents `z` (fp32), with the graph when grad is enabled."""
        ...


class BackendModule(Protocol):
    """What a backend module (`vader.backends.<name>`) defines. `cfg` is a `VaderConfig`."""

    Generator: type  # builds a VideoBackend
    Settings: type  # what Generator.build takes
    LORA_TARGETS: list[str]
    LOG_PROB_SAMPLING: bool  # its generator is a FlowSampler (GRPO can train it)
    MEMORY_KNOBS: tuple[str, ...]  # the `vader plan --fit` knobs (config keys) it honours

    def check_config(self, cfg) -> None:  # type: ignore[no-untyped-def]
        """One-line VaderError for keys this backend cannot honour; fills the backend's defaults in place.
        Runs during config validation, before anything loads."""
        ...

    def settings(self, cfg) -> object:  # type: ignore[no-untyped-def]
        ...

    def build(self, cfg, device: torch.device | str, prompts: list[str] | None = None,  # type: ignore[no-untyped-def]
              cache=None) -> VideoBackend:
        ...

    def weight_problems(self, cfg) -> tuple[list[str], list]:  # type: ignore[no-untyped-def]
        """(whole one-line problems, `vader.weights`-style missing records to merge with the rewards')."""
        ...

    def meta_part(self, cfg, part: str) -> MetaModel:  # type: ignore[no-untyped-def]
        """`part` (denoiser | vae | text_encoder) on the meta device: no memory, nothing downloaded."""
        ...

    def resolved(self, cfg) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """The geometry `vader config` shows: frames, height_width, latent_shape_CTHW (and notes)."""
        ...

    def plan_generator(self, cfg, training: bool) -> tuple[nn.Module, Callable]:  # type: ignore[no-untyped-def]
        """For `vader plan`: the VAE on meta, and `build(meter, prompts)` which, inside the plan's fake
        mode, gives the models storage under the meter's phases (denoiser, lora, vae, prompts) and returns
        the generator with stand-in embeddings for `prompts`; with `training`, the LoRA is on. An
        image-to-video backend also plans stand-in first-frame images: the plan reads no image file."""
        ...

    def image_input(self, cfg) -> str:  # type: ignore[no-untyped-def]
        """What the config's model takes besides text: "none" (text-to-video: a prompts file may give no
        images), "optional" (a first frame for every prompt or for none: Wan2.2-TI2V-5B) or "required"
        (every prompt needs one: Wan2.1-I2V, CogVideoX-5B-I2V); for "optional" and "required" the
        generator has `set_images` (see VideoBackend). vader.images checks a prompts file against it in
        the preflight; a module without it counts as "none"."""
        ...

    def first_frame_generated(self, cfg) -> bool:  # type: ignore[no-untyped-def]
        """With first frames: True when the video's frame 0 is sampled, conditioned on the image (the image
        latents are extra channels: Wan2.1-I2V, CogVideoX-5B-I2V), so a reward on frame 0 trains the model;
        False (or absent) when frame 0 is the image's own latent (Wan2.2-TI2V, LTX-Video), where training on
        frame 0 alone is refused: no gradient reaches it."""
        ...


__all__ = ["BackendModule", "FlowSampler", "FlowState", "MetaModel", "VideoBackend"]
