"""Wan2.1 and Wan2.2 text-to-video and image-to-video through diffusers' own classes, with VADER's backprop cutoff.

WanTransformer3DModel + AutoencoderKLWan + UMT5 (transformers), sampled with flow-matching Euler
(diffusers' FlowMatchEulerDiscreteScheduler with `shift`) and classifier-free guidance as WanPipeline
runs it: two transformer passes per step, `uncond + g * (cond - uncond)`. With fp32 weights the
latents equal `WanPipeline(..., scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
output_type="latent")`; with bf16 weights ours keep the latents and the guidance in fp32 where the
pipeline rounds them to bf16 after every step.

Checkpoints (SUPPORTED): Wan2.1-T2V-1.3B and Wan2.1-T2V-14B (one transformer), Wan2.2-T2V-A14B (two experts
of the 14B shape), Wan2.2-TI2V-5B (text, or text and a first frame), Wan2.1-I2V-14B-480P/720P and
Wan2.2-I2V-A14B (text and a first frame; the latter's layout, two experts without a CLIP encoder, is tested
on tiny models only: no shipped config). What a checkpoint is comes from its model_index.json (or, without
its files, the published repo's: PUBLISHED): `image_input(cfg)` says 'none', 'optional' (TI2V-5B: a prompts
file gives a first frame for every prompt or for none) or 'required' (I2V).

Two experts: a folder says so in its model_index.json (`transformer_2` and `boundary_ratio`, 0.875 for A14B)
and is sampled as WanPipeline (diffusers 0.42) samples it: a step whose timestep t >= boundary_ratio * 1000
runs the high-noise expert `transformer` with `guidance_scale`, a step below runs the low-noise expert
`transformer_2` with `guidance_scale_2` (config `scheduler.cfg_scale_2`; None: `guidance_scale`, as
WanPipeline); guidance is on for both experts when guidance_scale > 1 (WanPipeline's rule; a cfg_scale_2 > 1
with cfg_scale <= 1 is refused, the pipeline would ignore it).

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

First frames (`gen.set_images({prompt: PIL image})`, after build; the image-plumbing reads them from the
prompts file): each image is resized to height x width (no crop) by diffusers' VideoProcessor and
encoded once, as WanImageToVideoPipeline (diffusers 0.42) encodes it, with the VAE's latent mode:
- Wan2.1-I2V and Wan2.2-I2V-A14B (WanImageToVideoPipeline, transformer in_channels 36): the image followed by
  num_frames - 1 black frames through the VAE, and a mask (1 on the first latent frame), are 20 extra input
  channels every step; Wan2.1-I2V only: the image's CLIP ViT-H/14 tokens (CLIPImageProcessor, CLIPVisionModel
  hidden_states[-2], 257 x 1280) go through the image cross-attention (`encoder_hidden_states_image`; diffusers'
  attention splits them off a text of 512 tokens, so text_encoder.model_max_length must be 512). The CLIP
  encoder (fp32, as diffusers' Wan I2V example loads it) is loaded after the text encoder was released and
  before the transformer, and released when set_images has run (a second call for new prompts raises). The
  LoRA targets add the image cross-attention's add_k_proj / add_v_proj (Wan's k_img / v_img, which the
  field's Wan I2V LoRAs train).
  Decoded frame 0 is generated: it reconstructs the given frame closely, and is scored like any frame.
- Wan2.2-TI2V-5B (WanPipeline with expand_timesteps; the Wan2.2 VAE: z_dim 48, 16x spatial): a timestep per
  latent token (WanPipeline's expand_timesteps, also without an image); with an image, latent frame 0 is the
  image's latent at timestep 0 in every step and in the result (WanImageToVideoPipeline with
  expand_timesteps), so decoded frame 0 is the image's VAE reconstruction: no LoRA moves it and a reward on it
  has no gradient (the shipped config scores frame 1). Prompts with and without an image may share a batch.
Parity in fp32: the latents equal WanImageToVideoPipeline's (one image per call) bit for bit for one prompt,
within 4e-6 for two (batched here, one per call there); TI2V's decoded video equals the pipeline's. A prompt
without a first frame on an I2V checkpoint is a RuntimeError at sampling (the preflight refuses it earlier);
first frames on a text-to-video checkpoint are a VaderError. `vader plan` samples with stand-in first frames
of the right shapes (the extra channels and image tokens are in the planned step; the CLIP encoder is not:
it is gone before training). method='grpo' is text-to-video only (refused for I2V; TI2V without images runs).

Solver (`scheduler.solver`): 'differentiable' samples every step with the Euler step above. 'published'
samples the steps without gradients (all of validation / infer / eval, and training's steps before the
backprop cutoff) with UniPCMultistepScheduler as the published Wan diffusers repos ship it
(flow_prediction, use_flow_sigmas, flow_shift = shift, solver_order 2, bh2), on UniPC's schedule (its
integer timesteps and sigmas; two experts switch on those timesteps); the steps in the gradient window keep
the differentiable Euler step on the same sigmas. UniPC's multistep history stops at the window (its
corrector for the last UniPC step is not applied), and the Euler steps continue from UniPC's sigmas; a
window of the last step alone gives UniPC's latents (its last step is first order to sigma 0: Euler's).
Without gradients the latents equal WanPipeline(..., scheduler=UniPCMultistepScheduler(...)) (and
WanImageToVideoPipeline's). method='grpo' with solver='published' is refused (its SDE sampler is its own).

Refused in one line before any weight loads: a model_index.json naming another pipeline class (VACE,
Wan-Animate, video-to-video), a component the pipeline's sampling does not use, image_encoder without
image_processor (or the reverse), expand_timesteps with two experts or an image encoder, transformer_2
without boundary_ratio or the reverse; a transformer with pos_embed_seq_len (Wan2.1-FLF2V: first and last
frames), with CLIP image inputs (image_dim, added_kv_proj_dim) in a folder without an image encoder (or the
reverse), with in_channels != out_channels outside a WanImageToVideoPipeline (or in_channels == out_channels
inside one); two experts of different shapes; a VAE whose z_dim does not fit the transformer's channels.

Precision as the pipeline: the transformer's modules diffusers keeps in fp32 (`_keep_in_fp32_modules`:
time embedding, norms, rope) run in fp32 under the training loop's bf16 autocast, and the VAE decodes
(and encodes first frames) without autocast in its own dtype (fp32 by default), as WanPipeline runs them.

The sampler is a rectified flow, so the generator is also a `FlowSampler` (`flow_start`,
`flow_velocity`): GRPO samples it with an SDE and a log-probability per step.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vader.backends import common, from_config, wan_decode
from vader.backends.base import FlowState
from vader.errors import VaderError
from vader.sampling import cfg_combine, uncond_context
from vader.weights import is_repo_id, local_file, offline

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_14B_REPO = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN_A14B_REPO = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
WAN_TI2V_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN_I2V_480P_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
WAN_I2V_720P_REPO = "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"
WAN_I2V_A14B_REPO = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections of every block
# Wan2.1-I2V's image cross-attention adds its own key/value projections (Wan's k_img / v_img, which the
# community's Wan I2V LoRAs train and diffusers' Wan LoRA loader maps to add_k_proj / add_v_proj)
I2V_LORA_TARGETS = [*LORA_TARGETS, "add_k_proj", "add_v_proj"]
# The published architectures, for describing the model without its files: diffusers'
# convert_wan_to_diffusers.py "Wan-T2V-1.3B" (1.419B parameters) and "Wan-T2V-14B" (14.29B; Wan2.2-T2V-A14B's
# two experts have this shape too), "Wan-I2V-14B-480p"/"-720p" (16.4B: the 14B with the image
# cross-attention and 36 input channels), "Wan2.2-TI2V-5B" (5.0B); the VAE of the Wan2.1 checkpoints is
# AutoencoderKLWan's defaults (the Wan2.1 VAE, 127M), TI2V-5B's the Wan2.2 VAE (z_dim 48, 16x spatial); the
# text encoder is google/umt5-xxl's encoder (5.68B); Wan2.1-I2V's image encoder is CLIP ViT-H/14 (632M).
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
WAN_I2V_14B_TRANSFORMER = {**WAN_14B_TRANSFORMER, "image_dim": 1280, "added_kv_proj_dim": 5120, "in_channels": 36}
WAN_I2V_A14B_TRANSFORMER = {**WAN_14B_TRANSFORMER, "in_channels": 36}  # each expert: no CLIP image tokens
WAN_TI2V_5B_TRANSFORMER = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336,
    "freq_dim": 256, "in_channels": 48, "num_attention_heads": 24, "num_layers": 30, "out_channels": 48,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
}
WAN22_VAE = {  # convert_wan_to_diffusers.py's vae22_diffusers_config (less clip_output, which 0.42 no longer takes)
    "base_dim": 160, "z_dim": 48, "is_residual": True, "in_channels": 12, "out_channels": 12, "decoder_base_dim": 256,
    "scale_factor_temporal": 4, "scale_factor_spatial": 16, "patch_size": 2,
    "latents_mean": [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                     0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                     -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                     -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                     0.3573, -0.0548, -0.1681, -0.0667],
    "latents_std": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
}
CLIP_VIT_H_TOKENS, CLIP_VIT_H_WIDTH = 257, 1280  # (224 / 14)^2 patches + the class token; hidden_states[-2] width
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu"}
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's, which WanPipeline's boundary multiplies
TEXT_LENGTH_I2V = 512  # diffusers' Wan attention splits image tokens from text by a hardcoded text length of 512
SOLVERS = ("differentiable", "published")
IMAGE_PIPELINE = "WanImageToVideoPipeline"
# pipelines of other tasks, refused in one line each
OTHER_PIPELINES = {"WanVACEPipeline": "VACE (video editing / reference conditioning)",
                   "WanAnimatePipeline": "Wan-Animate (character animation from a pose video)",
                   "WanVideoToVideoPipeline": "video-to-video"}


@dataclass(frozen=True)
class WanLayout:
    """What a checkpoint's model_index.json says about its transformers (or the published one's, when its
    files are not on this machine): two experts when `boundary_ratio` is set; `expand_timesteps`: Wan2.2-TI2V-5B's
    per-token timesteps (a first frame optional); `image_to_video`: a WanImageToVideoPipeline folder (a first
    frame required), with `clip`: its CLIP image encoder (Wan2.1-I2V)."""

    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    image_to_video: bool = False
    clip: bool = False

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def image_input(self) -> str:
        """'none' (text-to-video), 'optional' (TI2V-5B) or 'required' (image-to-video)."""
        if self.expand_timesteps:
            return "optional"
        return "required" if self.image_to_video else "none"


@dataclass(frozen=True)
class Published:
    """A published repo's transformer config (each expert's, for two), layout and VAE config (only what
    differs from AutoencoderKLWan's defaults), known without its files."""

    transformer: dict[str, Any]
    layout: WanLayout
    vae: dict[str, Any] = field(default_factory=dict)


PUBLISHED = {
    WAN_REPO: Published(WAN_1_3B_TRANSFORMER, WanLayout()),
    WAN_14B_REPO: Published(WAN_14B_TRANSFORMER, WanLayout()),
    WAN_A14B_REPO: Published(WAN_14B_TRANSFORMER, WanLayout(boundary_ratio=0.875)),
    WAN_TI2V_REPO: Published(WAN_TI2V_5B_TRANSFORMER, WanLayout(expand_timesteps=True), WAN22_VAE),
    WAN_I2V_480P_REPO: Published(WAN_I2V_14B_TRANSFORMER, WanLayout(image_to_video=True, clip=True)),
    WAN_I2V_720P_REPO: Published(WAN_I2V_14B_TRANSFORMER, WanLayout(image_to_video=True, clip=True)),
    WAN_I2V_A14B_REPO: Published(WAN_I2V_A14B_TRANSFORMER, WanLayout(boundary_ratio=0.9, image_to_video=True)),
}
SUPPORTED = ("Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.2-T2V-A14B, Wan2.2-TI2V-5B (text, or text and a first frame), "
             "Wan2.1-I2V-14B-480P/720P and Wan2.2-I2V-A14B (text and a first frame)")
# model_index.json entries of a WanPipeline / WanImageToVideoPipeline; any other present entry is refused
INDEX_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "transformer_2", "vae", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "image_processor")
INDEX_SETTINGS = ("boundary_ratio", "expand_timesteps")


@dataclass
class WanSettings:
    """Everything a Wan backend needs; each component is a hub id or a folder (the diffusers layout:
    `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` (and `transformer_2/` for two experts,
    `image_encoder/` + `image_processor/` for Wan2.1-I2V); or a folder holding that part alone). The size
    defaults are Wan2.1's 480p; the shipped configs set each checkpoint's own (TI2V-5B: 704x1280, 121 frames,
    shift 5)."""

    pretrained: str = WAN_REPO
    transformer: str | None = None  # None: `pretrained`
    transformer_2: str | None = None  # a two-expert checkpoint's low-noise expert; None: `pretrained`
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    dtype: str = "bf16"  # transformer and text encoder weights
    vae_dtype: str = "fp32"  # as diffusers' Wan examples load the VAE
    offload_vae_cache: bool = False  # the checkpointed decode keeps its kept feature caches in CPU memory
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_steps: int = 50
    guidance_scale: float = 5.0  # <= 1: no classifier-free guidance (one transformer pass per step)
    guidance_scale_2: float | None = None  # two experts: the low-noise expert's guidance; None: guidance_scale
    negative_prompt: str = ""  # WanPipeline's default; Wan's authors use a long list of defects
    shift: float = 3.0  # flow shift: 3.0 for 480p, 5.0 for 720p (Wan's recommendation); 12.0 for Wan2.2-A14B
    max_sequence_length: int = 512
    # steps without gradients: 'differentiable' (the flow Euler step) or 'published' (UniPC, as the Wan repos ship)
    solver: str = "differentiable"
    image_encoder: str | None = None  # Wan2.1-I2V's CLIP image encoder and its image_processor; None: `pretrained`

    def components(self) -> dict[str, common.Component]:
        """The parts to load: tokenizer, text encoder, transformer, VAE, for two experts transformer_2, and for
        Wan2.1-I2V the CLIP image encoder and its image processor."""
        layout = checkpoint_layout(self)
        extra: list[common.Component] = []
        if layout.two_experts:
            extra.append(common.Component("transformer_2", self.transformer_2 or self.pretrained, "transformer_2",
                                          "config.json", common.DIFFUSERS_WEIGHTS))
        if layout.clip:
            source = self.image_encoder or self.pretrained
            extra += [common.Component("image_encoder", source, "image_encoder", "config.json",
                                       common.TRANSFORMERS_WEIGHTS),
                      common.Component("image_processor", source, "image_processor", "preprocessor_config.json", ())]
        return common.pipeline_components(self, *extra)

    def validate(self, spatial_multiple: int = 16, temporal: int = 4) -> None:
        """One-line errors for sizes and numbers the pipeline cannot run (before anything loads)."""
        common.check_settings(self, spatial_multiple, "480 x 832")
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise VaderError(f"num_frames={self.num_frames!r} must be {temporal}k + 1 (the VAE keeps the first "
                             f"frame and packs {temporal} frames per latent frame), e.g. 33, 49 or 81")
        if self.solver not in SOLVERS:
            raise VaderError(f"scheduler.solver={self.solver!r} must be one of {', '.join(map(repr, SOLVERS))}")
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
    sample in full (another pipeline, an unknown component, half of a two-expert pair)."""
    where = f"pretrained={source!r}: its model_index.json"
    name = index.get("_class_name", "WanPipeline")
    if name in OTHER_PIPELINES:
        raise VaderError(f"{where} has _class_name={name!r} ({OTHER_PIPELINES[name]}); model.type='wan' samples "
                         f"WanPipeline and WanImageToVideoPipeline checkpoints only ({SUPPORTED})")
    if name not in ("WanPipeline", IMAGE_PIPELINE):
        raise VaderError(f"{where} has _class_name={name!r}; model.type='wan' samples WanPipeline and "
                         f"WanImageToVideoPipeline checkpoints only ({SUPPORTED})")
    image = name == IMAGE_PIPELINE
    known = INDEX_COMPONENTS + (IMAGE_COMPONENTS if image else ())
    for key, value in index.items():
        if key.startswith("_") or key in known or key in INDEX_SETTINGS or not _present(value):
            continue
        raise VaderError(f"{where} has {key}={value!r}, which {name} sampling here does not use (image_encoder / "
                         "image_processor belong to a WanImageToVideoPipeline folder); model.type='wan' understands "
                         f"{', '.join(known)}, boundary_ratio, expand_timesteps ({SUPPORTED})")
    expand = _present(index.get("expand_timesteps"))
    if expand and index["expand_timesteps"] is not True:
        raise VaderError(f"{where} has expand_timesteps={index['expand_timesteps']!r}; it must be true or false")
    clip = _present(index.get("image_encoder"))
    if clip != _present(index.get("image_processor")):
        raise VaderError(f"{where} names one of image_encoder and image_processor without the other; Wan2.1-I2V "
                         "needs both (the CLIP vision model and its CLIPImageProcessor)")
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
    if expand and (second or clip):
        raise VaderError(f"{where} has expand_timesteps=true with {'transformer_2' if second else 'image_encoder'}; "
                         "per-token timesteps are Wan2.2-TI2V-5B's, one transformer without an image encoder")
    return WanLayout(None if boundary is None else float(boundary), expand_timesteps=expand,
                     image_to_video=image and not expand, clip=clip)


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


def check_transformer_config(name: str, source: str, config: dict[str, Any], layout: WanLayout = WanLayout()) -> None:
    """One-line errors for a transformer config this layout cannot sample: image conditioning (CLIP image
    tokens, extra input channels) exactly where the checkpoint is image-to-video, no FLF2V."""
    where = f"{name}={source!r}: its config.json has"
    kind = config.get("_class_name", "WanTransformer3DModel")
    if kind != "WanTransformer3DModel":
        raise VaderError(f"{where} _class_name={kind!r}; model.type='wan' samples WanTransformer3DModel ({SUPPORTED})")
    if config.get("pos_embed_seq_len") is not None:
        raise VaderError(f"{where} pos_embed_seq_len={config['pos_embed_seq_len']!r} (Wan2.1-FLF2V: a first and a "
                         f"last frame); model.type='wan' conditions on a first frame only ({SUPPORTED})")
    image_dim, added = config.get("image_dim"), config.get("added_kv_proj_dim")
    if layout.clip and image_dim is None:
        raise VaderError(f"{where} image_dim=None but the checkpoint has a CLIP image_encoder; Wan2.1-I2V's "
                         "transformer takes its image tokens (image_dim 1280)")
    if not layout.clip and (image_dim is not None or added is not None):
        key, value = ("image_dim", image_dim) if image_dim is not None else ("added_kv_proj_dim", added)
        raise VaderError(f"{where} {key}={value!r} (CLIP image tokens: an image-to-video transformer) but the "
                         "checkpoint's model_index.json names no image_encoder; model.type='wan' samples it from a "
                         "WanImageToVideoPipeline folder with image_encoder and image_processor")
    if layout.image_to_video:
        if config.get("in_channels", 16) == config.get("out_channels", 16):
            raise VaderError(f"{where} in_channels={config.get('in_channels', 16)!r} = out_channels, a text-to-video "
                             "transformer, but the checkpoint is a WanImageToVideoPipeline, whose transformer takes "
                             "the mask and the image latents as extra channels (in_channels 36 for Wan2.1-I2V)")
        return  # in_channels = out_channels + the mask + the image latents: checked against the VAE
    if config.get("in_channels", 16) != config.get("out_channels", 16):
        raise VaderError(f"{where} in_channels={config.get('in_channels')!r} and out_channels="
                         f"{config.get('out_channels')!r} (an image-to-video transformer takes the image latents "
                         "and mask as extra channels) but the checkpoint is not a WanImageToVideoPipeline; "
                         "model.type='wan' needs in_channels == out_channels here")


def _same(a: object, b: object) -> bool:
    """Config values alike (a JSON list and a tuple of the same numbers are the same patch size)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def check_experts(configs: dict[str, dict[str, Any]], vae: dict[str, Any] | None, sources: dict[str, str],
                  layout: WanLayout = WanLayout()) -> None:
    """The transformers' configs (each alone, the two experts alike) and the VAE's latent width against
    them; `sources`: where each part comes from, for the message."""
    for name, config in configs.items():
        check_transformer_config(name, sources[name], config, layout)
    if "transformer" in configs and "transformer_2" in configs:
        for key in ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim"):
            a, b = configs["transformer"].get(key), configs["transformer_2"].get(key)
            if not _same(a, b):
                raise VaderError(f"transformer_2={sources['transformer_2']!r}: its config.json has {key}={b!r} but "
                                 f"transformer's has {key}={a!r}; the two experts must take the same latents and text")
    if vae is not None and configs:
        first = next(iter(configs.values()))
        channels, out = first.get("in_channels", 16), first.get("out_channels", 16)
        z_dim = vae.get("z_dim", 16)
        if layout.image_to_video:  # noise latents + mask (one channel per frame of a latent frame) + image latents
            wanted = 2 * z_dim + vae.get("scale_factor_temporal", 4)
            if channels != wanted or out != z_dim:
                raise VaderError(f"vae={sources['vae']!r}: its config.json has z_dim={z_dim!r} but the image-to-video "
                                 f"transformer takes in_channels={channels!r}, out_channels={out!r} (wanted {wanted} "
                                 f"and {z_dim}: latents, mask and image latents); use the checkpoint's own VAE")
        elif z_dim != channels:
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
                  {name: part.source for name, part in parts.items()}, checkpoint_layout(settings))


def unipc_scheduler(shift: float):  # type: ignore[no-untyped-def]
    """UniPCMultistepScheduler as the published Wan diffusers repos ship it (convert_wan_to_diffusers.py:
    flow_prediction, flow sigmas with `flow_shift`, its defaults otherwise: solver_order 2, bh2,
    lower_order_final, final sigma 0)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=NUM_TRAIN_TIMESTEPS, flow_shift=shift)


def flow_schedule(num_steps: int, shift: float, boundary_ratio: float | None, device: torch.device | str,
                  solver: str = "differentiable") -> tuple[Tensor, Tensor, list[bool]]:
    """(timesteps [N], sigmas [N + 1], first_expert [N]) of diffusers' FlowMatchEulerDiscreteScheduler with
    this shift and step count ('published': of UniPCMultistepScheduler with flow_shift = shift, its integer
    timesteps and its sigmas), as real tensors (also under `vader plan`'s fake ones). first_expert[i]: step i
    runs `transformer` (always, for one transformer), by WanPipeline's rule for two experts:
    t >= boundary_ratio * num_train_timesteps runs the high-noise `transformer`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with common.real_tensors():
        if solver == "published":
            sched = unipc_scheduler(shift)
        else:
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        sched.set_timesteps(num_steps, device=device)
        first = [boundary_ratio is None or bool(t >= boundary_ratio * NUM_TRAIN_TIMESTEPS) for t in sched.timesteps]
    return sched.timesteps, sched.sigmas.to(device), first


def high_noise_steps(settings: WanSettings, boundary_ratio: float | None) -> int:
    """How many of the first sampling steps the high-noise expert takes (0 for one transformer)."""
    if boundary_ratio is None:
        return 0
    return sum(flow_schedule(settings.num_steps, settings.shift, boundary_ratio, "cpu", settings.solver)[2])


def _published_repo(source: str) -> str:
    return source if source in PUBLISHED else WAN_REPO


def meta_models(settings: WanSettings | None = None) -> dict[str, nn.Module]:
    """Transformer(s), VAE and text encoder on the meta device (shapes, no memory, nothing downloaded):
    from the checkpoint's own configs when they are on this machine, else the published architecture of
    the repo named (PUBLISHED: the Wan2.1 T2V and I2V repos, Wan2.2-T2V-A14B, Wan2.2-TI2V-5B; Wan2.1-I2V's CLIP
    image encoder is not among the parts: it is released before training). A two-expert checkpoint gives
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
    vae_repo = _published_repo(parts["vae"].source)
    vae = dict(common.architecture_config(parts["vae"], AutoencoderKLWan.load_config,  # type: ignore[call-overload]
                                          vae_repo, dict(PUBLISHED[vae_repo].vae)))
    check_experts(configs, vae, {name: part.source for name, part in parts.items()}, checkpoint_layout(s))
    text = common.architecture_config(parts["text_encoder"], AutoConfig.from_pretrained,
                                      _published_repo(parts["text_encoder"].source), UMT5Config(**UMT5_XXL))
    with torch.device("meta"):
        models: dict[str, nn.Module] = {name: WanTransformer3DModel.from_config(c) for name, c in configs.items()}
        models["vae"] = AutoencoderKLWan.from_config(vae)
        models["text_encoder"] = UMT5EncoderModel(text)
    return models


@dataclass
class FirstFrame:
    """What `set_images` keeps of one prompt's first frame (deterministic, so computed once): Wan2.1-I2V's
    mask + image latents channels [1, 4 + z, T, h, w] (fp32) and CLIP tokens [1, 257, 1280] (transformer dtype);
    Wan2.2-TI2V's image latent [1, z, 1, h, w] (fp32)."""

    channels: Tensor | None = None
    tokens: Tensor | None = None
    latent: Tensor | None = None


@dataclass
class ImageCondition:
    """One batch's image conditioning as the transformer takes it: `channels` concatenated to the latents
    (I2V), `tokens` as encoder_hidden_states_image (Wan2.1-I2V), and for TI2V `latent` [B, z, 1, h, w] with
    `keep` [B, 1, T, h, w] (0 on the latent frame the image replaces, 1 elsewhere; rows without an image: 1)."""

    channels: Tensor | None = None
    tokens: Tensor | None = None
    latent: Tensor | None = None
    keep: Tensor | None = None

    def model_input(self, z: Tensor) -> Tensor:
        """The transformer's hidden_states (fp32) for latents `z`, as WanImageToVideoPipeline builds them."""
        if self.keep is not None:
            z = (1 - self.keep) * self.latent + self.keep * z
        if self.channels is not None:
            z = torch.cat([z, self.channels], dim=1)
        return z

    def final(self, z: Tensor) -> Tensor:
        """The sampled latents as the pipeline returns them (TI2V: the given frame's latent put back)."""
        return z if self.keep is None else (1 - self.keep) * self.latent + self.keep * z


@dataclass
class WanGenerator(common.PromptsAndVideos):
    """WanTransformer3DModel(s), AutoencoderKLWan and the UMT5 encoder with `WanSettings`. Two experts:
    `denoiser` is the low-noise `transformer_2` (the LoRA's), `other_denoiser` the high-noise `transformer`.
    Image-to-video: `set_images` before sampling (Wan2.1-I2V's CLIP `image_encoder` is released by it)."""

    other_denoiser: nn.Module | None = None  # the high-noise expert of a two-expert checkpoint; None: one transformer
    boundary_ratio: float | None = None  # its steps: timesteps >= boundary_ratio * 1000
    expand_timesteps: bool = False  # Wan2.2-TI2V-5B: a timestep per latent token (0 on a given first frame)
    image_to_video: bool = False  # WanImageToVideoPipeline: mask + image latents as extra input channels
    image_encoder: nn.Module | None = None  # Wan2.1-I2V's CLIPVisionModel, until `set_images` has run
    image_processor: Any = None  # its CLIPImageProcessor
    first_frames: dict[str, FirstFrame] = field(default_factory=dict)  # set_images' per prompt
    # where the checkpointed decode keeps its kept feature caches with settings.offload_vae_cache
    # (`vader plan` puts its own counter here)
    host_memory: Any = field(default_factory=wan_decode.HostMemory)

    lora_target_modules = LORA_TARGETS
    # beside diffusers' file, one under the original Wan names: ComfyUI's Wan LoRA loader maps those, not
    # diffusers' (its loader run on the diffusers file patched none of 32 keys; on this one, all, to 6e-8)
    lora_formats = ("diffusers", "comfyui")

    backend_name, settings_class, pipeline_class = "wan", WanSettings, "WanPipeline"
    model_classes = ("transformers.UMT5EncoderModel", "diffusers.WanTransformer3DModel", "diffusers.AutoencoderKLWan")
    diffusers_classes = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")

    @classmethod
    def from_components(cls, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer,
                        settings: WanSettings | None = None, device: torch.device | str = "cpu", *,
                        transformer_2: nn.Module | None = None, boundary_ratio: float | None = None,
                        expand_timesteps: bool = False, image_encoder: nn.Module | None = None,
                        image_processor: Any = None) -> WanGenerator:
        """Wrap models already in memory (their dtypes are kept; `settings.dtype` is not applied). Two experts:
        `transformer` (high noise), `transformer_2` (low noise, becomes `denoiser`) and `boundary_ratio`.
        `expand_timesteps`: Wan2.2-TI2V-5B; a transformer with in_channels != out_channels is image-to-video
        (with image_dim: give `image_encoder` and `image_processor`, WanImageToVideoPipeline's)."""
        settings = settings or WanSettings()
        settings.validate()
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("two experts need both transformer_2 and boundary_ratio (one transformer: neither)")
        device = torch.device(device)
        trained = transformer if transformer_2 is None else transformer_2
        i2v = trained.config.in_channels != trained.config.out_channels
        gen = cls(trained, vae, None, settings, device, trained.dtype,
                  other_denoiser=None if transformer_2 is None else transformer, boundary_ratio=boundary_ratio,
                  expand_timesteps=expand_timesteps, image_to_video=i2v, image_encoder=image_encoder,
                  image_processor=image_processor)
        gen._adopt_components(text_encoder, tokenizer)
        return gen

    @property
    def denoisers(self) -> tuple[nn.Module, ...]:
        """(the trained transformer, the other expert): both sharded, adopted and frozen alike."""
        return (self.denoiser,) if self.other_denoiser is None else (self.denoiser, self.other_denoiser)

    @property
    def layout(self) -> WanLayout:
        return WanLayout(self.boundary_ratio, self.expand_timesteps, self.image_to_video,
                         self.denoiser.config.get("image_dim") is not None)

    @property
    def image_input(self) -> str:
        """'none', 'optional' (TI2V-5B: a first frame for every prompt or none) or 'required' (I2V)."""
        return self.layout.image_input

    @classmethod
    def check_checkpoint(cls, settings: WanSettings) -> None:
        """The layout, the guidance keys and the transformer/VAE configs, before any weight loads; a hub repo's
        model_index.json and configs are fetched first (online), so that its experts are all named."""
        fetch_model_index(settings.pretrained)
        check_guidance(settings, checkpoint_layout(settings))
        check_part_configs(settings, download=True)

    def _load_denoisers(self, parts: dict[str, common.Component], transformer_class: type,
                        dtype: torch.dtype) -> None:
        """The transformer(s); for Wan2.1-I2V first the CLIP image encoder (fp32, as diffusers' Wan I2V example
        loads it) and its image processor: after the text encoder was released, before the transformer."""
        layout = checkpoint_layout(self.settings)
        self.expand_timesteps, self.image_to_video = layout.expand_timesteps, layout.image_to_video
        if layout.clip:
            from transformers import CLIPImageProcessor, CLIPVisionModel

            self.image_processor = common.load_part(parts["image_processor"], CLIPImageProcessor.from_pretrained)
            encoder = common.load_part(parts["image_encoder"], CLIPVisionModel.from_pretrained, dtype=torch.float32)
            self.image_encoder = encoder.to(self.device).eval().requires_grad_(False)  # type: ignore[attr-defined]
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
        layout = self.layout
        check_guidance(self.settings, layout)
        # in memory: the same checks as the configs on disk get before a load (from_components skips those)
        experts = {"transformer": self.denoiser} if self.other_denoiser is None else \
            {"transformer": self.other_denoiser, "transformer_2": self.denoiser}
        check_experts({name: dict(model.config) for name, model in experts.items()}, dict(self.vae.config),
                      {name: f"<{type(model).__name__} in memory>" for name, model in
                       (*experts.items(), ("vae", self.vae))}, layout)
        if self.denoiser.config.get("added_kv_proj_dim") is not None:
            self.lora_target_modules = I2V_LORA_TARGETS  # type: ignore[misc]
            if self.settings.max_sequence_length != TEXT_LENGTH_I2V:
                raise VaderError(f"max_sequence_length={self.settings.max_sequence_length!r} with an image-to-video "
                                 "transformer: diffusers' Wan attention separates the image tokens from "
                                 f"{TEXT_LENGTH_I2V} text tokens; set text_encoder.model_max_length={TEXT_LENGTH_I2V}")

    def save_lora_comfyui(self, lora: nn.Module | dict[str, Tensor], file: str | Path, config=None) -> Path:  # type: ignore[no-untyped-def]
        """One .safetensors for ComfyUI's LoraLoader (and the Wan-Video code): `diffusion_model.blocks.N.
        self_attn.q.lora_A.weight`..., the strength baked into B as in the diffusers file."""
        from vader.lora_formats import original_wan_keys

        return common.save_renamed_lora(lora, file, original_wan_keys, config)

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

    # ---- first frames ----
    def _latent_grid(self) -> tuple[int, int, int]:
        cfg = self.vae.config
        frames = (self.num_frames - 1) // cfg.scale_factor_temporal + 1
        return frames, self.settings.height // cfg.scale_factor_spatial, self.settings.width // cfg.scale_factor_spatial

    def _encode_video(self, video: Tensor) -> Tensor:
        """VAE latents (the distribution's mode, normalised as the transformer sees them) of pixels in [-1, 1]."""
        cfg = self.vae.config
        latent = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        mean = torch.tensor(cfg.latents_mean, device=latent.device).view(1, cfg.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=latent.device).view(1, cfg.z_dim, 1, 1, 1)
        return (latent - mean) * inv_std

    @torch.no_grad()
    def set_images(self, images: dict[str, Any]) -> None:
        """First frames, keyed by prompt: RGB PIL images of any size, resized to height x width without a crop
        by diffusers' VideoProcessor as the pipeline does (the preflight checks the aspect). Their image latents
        (and for Wan2.1-I2V their CLIP tokens) are computed here, once; then the CLIP image encoder is released
        (a later call for new prompts raises; prompts already given keep their first frame). Images on a
        text-to-video model: VaderError."""
        images = {prompt: image for prompt, image in images.items() if prompt not in self.first_frames}
        if not images:
            return
        if self.image_input == "none":
            raise VaderError(f"first frames given for {len(images)} prompt(s), but {self.settings.pretrained!r} is "
                             "a text-to-video Wan checkpoint (first frames: Wan2.2-TI2V-5B, Wan2.1-I2V-14B)")
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        needs_clip = self.layout.clip
        if needs_clip and self.image_encoder is None:
            raise RuntimeError("the CLIP image encoder was already released; give every first frame in one "
                               "set_images call")
        frames, height, width = self.num_frames, self.settings.height, self.settings.width
        t, h, w = self._latent_grid()
        temporal = self.vae.config.scale_factor_temporal
        with common.autocast_off(self.device):
            for prompt, image in images.items():
                pixels = processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
                first = FirstFrame()
                if needs_clip:
                    inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
                    hidden = self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
                    first.tokens = hidden.to(self.dtype)
                if self.expand_timesteps:
                    first.latent = self._encode_video(pixels.unsqueeze(2))
                else:  # the image, then black frames (WanImageToVideoPipeline.prepare_latents without last_image)
                    video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
                    mask = torch.zeros(1, temporal, t, h, w, device=self.device)
                    mask[:, :, 0] = 1  # the first latent frame holds the given frame (its 4 mask slots all 1)
                    first.channels = torch.cat([mask, self._encode_video(video)], dim=1)
                self.first_frames[prompt] = first
        self.release_image_encoder()

    def release_image_encoder(self) -> None:
        self.image_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stand_in_images(self, prompts: list[str]) -> None:
        """Zero first frames of the right shapes for `prompts` (`vader plan`: the extra channels and image
        tokens are in the planned step; no encoder runs)."""
        t, h, w = self._latent_grid()
        z = self.vae.config.z_dim
        for prompt in prompts:
            first = FirstFrame()
            if self.layout.clip:
                first.tokens = torch.zeros(1, CLIP_VIT_H_TOKENS, self.denoiser.config.image_dim, dtype=self.dtype,
                                           device=self.device)
            if self.expand_timesteps:
                first.latent = torch.zeros(1, z, 1, h, w, device=self.device)
            else:
                first.channels = torch.zeros(1, self.vae.config.scale_factor_temporal + z, t, h, w, device=self.device)
            self.first_frames[prompt] = first

    def image_condition(self, prompts: list[str]) -> ImageCondition | None:
        """The batch's image conditioning (None: text-to-video, or TI2V without first frames). A prompt without
        a first frame on an image-to-video checkpoint: RuntimeError (the preflight catches it earlier)."""
        if self.image_input == "none":
            return None
        missing = [p for p in prompts if p not in self.first_frames]
        if self.image_input == "required":
            if missing:
                raise RuntimeError(f"no first frame for prompt {missing[0]!r}: this image-to-video Wan checkpoint "
                                   "needs one for every prompt (set_images)")
            frames = [self.first_frames[p] for p in prompts]
            tokens = None if frames[0].tokens is None else torch.cat([f.tokens for f in frames])  # type: ignore[misc]
            return ImageCondition(channels=torch.cat([f.channels for f in frames]), tokens=tokens)  # type: ignore[misc]
        if len(missing) == len(prompts):
            return None
        t, h, w = self._latent_grid()
        z = self.vae.config.z_dim
        latent = torch.zeros(len(prompts), z, 1, h, w, device=self.device)
        keep = torch.ones(len(prompts), 1, t, h, w, device=self.device)
        for row, prompt in enumerate(prompts):
            if prompt in self.first_frames:
                latent[row] = self.first_frames[prompt].latent[0]  # type: ignore[index]
                keep[row, :, 0] = 0
        return ImageCondition(latent=latent, keep=keep)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents (an image-to-video transformer takes more channels: the mask and
        the image latents; it predicts these)."""
        cfg = self.vae.config
        t = (self.num_frames - 1) // cfg.scale_factor_temporal + 1
        return (self.denoiser.config.out_channels, t, self.settings.height // cfg.scale_factor_spatial,
                self.settings.width // cfg.scale_factor_spatial)

    # ---- sampling ----
    def schedule(self) -> tuple[Tensor, Tensor]:
        """(timesteps [N], sigmas [N + 1]) of `flow_schedule` with this run's shift, step count and solver, on
        the device, computed once per setting (with which steps belong to the high-noise expert: read here,
        where values can be read, not under `vader plan`'s fake tensors)."""
        s = self.settings
        key = (s.num_steps, s.shift, self.device, self.boundary_ratio, s.solver)
        if self._schedule is None or self._schedule[0] != key:
            self._schedule = (key, *flow_schedule(s.num_steps, s.shift, self.boundary_ratio, self.device, s.solver))
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
        expert's steps all come first and carry no LoRA, so their graph would reach no trained weight.
        solver='published': the steps before the cutoff (all, without one) are UniPC's, the others Euler
        steps on UniPC's sigmas. Prompts with a first frame (`set_images`) are conditioned on it."""
        n = len(prompts)
        cond, uncond = self._text(prompts)
        image = self.image_condition(prompts)
        timesteps, sigmas = self.schedule()
        common.set_checkpointing(self.denoiser, grad_checkpoint)
        z = self.initial_noise(n, generator)
        unipc = None
        if self.settings.solver == "published":
            with common.real_tensors():
                unipc = unipc_scheduler(self.settings.shift)
                unipc.set_timesteps(len(timesteps), device=self.device)
                unipc.set_begin_index(0)
        steps = range(len(timesteps))
        for i in progress(steps) if progress else steps:
            model, guidance = self.step_model(i)
            window = cutoff is not None and i >= cutoff
            with torch.set_grad_enabled(window and model is self.denoiser):
                v = self.velocity(z, timesteps[i].expand(n), cond, uncond, model, guidance, image)
                if unipc is not None and not window:
                    z = unipc.step(v, timesteps[i], z, return_dict=False)[0]
                else:
                    z = z + (sigmas[i + 1] - sigmas[i]) * v
        return z if image is None else image.final(z)

    def velocity(self, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None, model: nn.Module | None = None,
                 guidance: float | None = None, image: ImageCondition | None = None) -> Tensor:
        """The guided flow prediction in fp32 of `model` (default: the denoiser) with `guidance` (default:
        guidance_scale), conditioned on `image` (the batch's first frames) where given."""
        model = self.denoiser if model is None else model
        guidance = self.settings.guidance_scale if guidance is None else guidance
        x = (z if image is None else image.model_input(z)).to(self.dtype)
        if self.expand_timesteps:  # WanPipeline / WanImageToVideoPipeline with expand_timesteps: per token
            p = model.config.patch_size
            keep = torch.ones_like(z[:, :1]) if image is None or image.keep is None else image.keep
            t = (keep[:, 0, :, :: p[1], :: p[2]] * t.view(-1, 1, 1, 1)).flatten(1)
        extra = {} if image is None or image.tokens is None else {"encoder_hidden_states_image": image.tokens}
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False, **extra)[0].float()
        if uncond is None:
            return v
        with uncond_context():
            v_uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False,
                             **extra)[0].float()
        return cfg_combine(v_uncond, v, guidance)

    def flow_start(self, prompts: list[str], generator: torch.Generator) -> FlowState:
        """The noise (drawn as `sample_latents` draws it), the schedule as timesteps sigma * 1000 and the
        prompt embeddings; flow_velocity's steps then equal `sample_latents`' Euler steps. Text-to-video only
        (TI2V-5B without first frames included)."""
        if self.image_condition(prompts) is not None:
            raise VaderError("method='grpo' samples text-to-video only; these prompts have first frames "
                             "(image-to-video: use method='vader')")
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
        caches replayed (`wan_decode`): a late frame of 480x832x33 needs 26.6 GiB instead of 209 GiB;
        19.6 GiB with the kept caches in host memory (`settings.offload_vae_cache`), 11.1 GiB with that in bf16.

        No autocast inside: WanPipeline decodes in the VAE's own dtype (fp32 as Wan's examples load it);
        under the training loop's bf16 autocast the convolutions would run in bf16 (on the tiny test VAE
        the video moved by up to 0.18)."""
        common.check_frames(frames, self.num_frames)
        with common.autocast_off(self.device):
            host = self.host_memory if self.settings.offload_vae_cache else None
            chunks = wan_decode.decode_chunks(self.vae, latents.to(self.vae.dtype), grad_checkpoint=grad_checkpoint,
                                              host=host)
            video = common.decode_until(chunks, frames, self.num_frames)
        return video.float()

# ---- the backend's module functions (vader.backends.base.BackendModule) --------------------------------

Generator = WanGenerator
Settings = WanSettings
MEMORY_KNOBS = (*from_config.MEMORY_KNOBS, "vae.offload_cache", "vae.dtype")  # the causal decode's own two
LOG_PROB_SAMPLING = True  # flow-matching Euler: a rectified flow (FlowSampler)


def settings(cfg) -> WanSettings:  # type: ignore[no-untyped-def]
    return from_config.settings(cfg, WanSettings, shift=None if cfg.scheduler.shift is None
                                else float(cfg.scheduler.shift), guidance_scale_2=cfg.scheduler.cfg_scale_2,
                                solver=cfg.scheduler.solver, offload_vae_cache=cfg.vae.offload_cache)


def image_input(cfg) -> str:  # type: ignore[no-untyped-def]
    """'none' (text-to-video), 'optional' (Wan2.2-TI2V-5B: a first frame for every prompt or for none) or
    'required' (Wan2.1-I2V), from the checkpoint's model_index.json (or the published repo's)."""
    return checkpoint_layout(settings(cfg)).image_input


def first_frame_generated(cfg) -> bool:  # type: ignore[no-untyped-def]
    """Wan2.1-I2V (and the I2V-A14B layout) sample latent frame 0 with the image latents beside it as extra
    channels: frame 0 is generated. TI2V-5B keeps the image's latent as frame 0 (no gradient reaches it)."""
    return checkpoint_layout(settings(cfg)).image_input == "required"


def lora_targets(cfg) -> list[str]:  # type: ignore[no-untyped-def]
    """The LoRA's target module names for this config's checkpoint: Wan2.1-I2V adds its image cross-attention's
    add_k_proj / add_v_proj to LORA_TARGETS (what the generator's `lora_target_modules` says once built)."""
    return I2V_LORA_TARGETS if checkpoint_layout(settings(cfg)).clip else LORA_TARGETS


def check_config(cfg) -> None:  # type: ignore[no-untyped-def]
    """The diffusers backends' rules, then what the checkpoint's files on this machine say (its layout, its
    transformer and VAE configs) and what a two-expert or image-to-video checkpoint cannot run."""
    from_config.check_config(cfg, WAN_REPO, (480, 832), ("scheduler.shift", "scheduler.cfg_scale_2"), settings)
    s = settings(cfg)
    layout = checkpoint_layout(s)
    check_guidance(s, layout)
    check_part_configs(s)
    if layout.two_experts and cfg.method == "grpo":
        raise VaderError(f"method='grpo' with the two-expert model.from_pretrained={s.pretrained!r}: GRPO trains on "
                         "every sampled step and the LoRA is on the low-noise expert only (the high-noise expert's "
                         "steps have nothing to train); use method='vader', or a one-transformer Wan checkpoint")
    if layout.image_input == "required" and cfg.method == "grpo":
        raise VaderError(f"method='grpo' with the image-to-video model.from_pretrained={s.pretrained!r}: GRPO's SDE "
                         "sampler here is text-to-video only; use method='vader'")
    if s.solver == "published" and cfg.method == "grpo":
        raise VaderError("scheduler.solver='published' with method='grpo': GRPO samples every step with its own SDE "
                         "and log-probability, so there is no step to give to UniPC; use solver='differentiable'")
    if _image_attention(s) and s.max_sequence_length != TEXT_LENGTH_I2V:
        raise VaderError(f"text_encoder.model_max_length={s.max_sequence_length!r} with the image-to-video "
                         f"model.from_pretrained={s.pretrained!r}: diffusers' Wan attention separates the image "
                         f"tokens from {TEXT_LENGTH_I2V} text tokens; set it to {TEXT_LENGTH_I2V}")


def _image_attention(s: WanSettings) -> bool:
    """Whether the transformer (its config on this machine, else the published repo's) has the image
    cross-attention's own key/value projections (added_kv_proj_dim: Wan2.1-I2V)."""
    from diffusers import WanTransformer3DModel

    part = s.components()["transformer"]
    config = _part_config(part, WanTransformer3DModel.load_config, download=False)
    if config is None:
        config = PUBLISHED[part.source].transformer if part.source in PUBLISHED else {}
    return config.get("added_kv_proj_dim") is not None


def _wrap(s: WanSettings, denoiser: nn.Module, vae: nn.Module, other: nn.Module | None = None) -> WanGenerator:
    """The generator around meta/fake-built models (`vader plan`): `denoiser` is the trained transformer."""
    layout = checkpoint_layout(s)
    if other is None:
        return WanGenerator.from_components(denoiser, vae, None, None, s, expand_timesteps=layout.expand_timesteps)
    return WanGenerator.from_components(other, vae, None, None, s, transformer_2=denoiser,
                                        boundary_ratio=layout.boundary_ratio, expand_timesteps=layout.expand_timesteps)


# build, weight_problems, meta_part, resolved: what every diffusers backend shares
_shared = from_config.DiffusersBackend(settings, WanGenerator, meta_models, common.missing_weights, LORA_TARGETS, _wrap)
_shared_i2v = from_config.DiffusersBackend(settings, WanGenerator, meta_models, common.missing_weights,
                                           I2V_LORA_TARGETS, _wrap)
build, weight_problems, meta_part = _shared.build, _shared.weight_problems, _shared.meta_part


def plan_generator(cfg, training: bool):  # type: ignore[no-untyped-def]
    """The shared plan build (LoRA on the image cross-attention's add_k_proj/add_v_proj too for Wan2.1-I2V),
    and for a checkpoint that takes first frames, a stand-in first frame for every prompt: the planned step
    then carries the image latents' channels and the CLIP tokens."""
    layout = checkpoint_layout(settings(cfg))
    vae, build_models = (_shared_i2v if layout.clip else _shared).plan_generator(cfg, training)
    if layout.image_input == "none":
        return vae, build_models

    def build_with_images(meter, prompts: list[str]):  # type: ignore[no-untyped-def]
        gen = build_models(meter, prompts)
        with meter.phase("prompts"):
            gen.stand_in_images(list(prompts))
        return gen

    return vae, build_with_images


def resolved(cfg) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The shared geometry, for two experts which sampling steps each one takes, and what a first frame does."""
    out = _shared.resolved(cfg)
    s = settings(cfg)
    layout = checkpoint_layout(s)
    notes = []
    boundary = layout.boundary_ratio
    if boundary is not None:
        high = high_noise_steps(s, boundary)
        notes.append(f"two experts: transformer (high noise, frozen, no gradients) samples the first {high} of "
                     f"{s.num_steps} steps (t >= {boundary * NUM_TRAIN_TIMESTEPS:g}), transformer_2 (the LoRA) the "
                     f"last {s.num_steps - high}; a backprop window starting before step {high} (0-based) starts "
                     "there")
    if layout.image_input == "required":
        notes.append("image-to-video: every prompt needs a first frame; the mask and its VAE latents are extra "
                     "input channels (and CLIP image tokens, Wan2.1-I2V); decoded frame 0 is generated (it "
                     "reconstructs the given frame)")
    elif layout.image_input == "optional":
        notes.append("TI2V: first frames optional (all prompts or none); with one, latent frame 0 is the image's "
                     "latent at timestep 0, so decoded frame 0 is its VAE reconstruction and carries no gradient")
    if s.solver == "published":
        notes.append("solver 'published': steps without gradients are UniPC's (flow_shift = shift), the backprop "
                     "window's are Euler steps on UniPC's sigmas")
    if notes:
        out["note"] = "; ".join(notes)
    return out
