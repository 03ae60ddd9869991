"""Tiny random diffusers pipelines saved in the published layout, for the backend tests that run the
tool end to end (`vader train` / `vader infer` with model.type 'wan' or 'cogvideox').

The sizes are diffusers' own test sizes; Wan's VAE base_dim defaults to 16, not their 3: the
base_dim 3 decoder barely depends on its latents, so no reward could move. Each builder seeds torch itself, so
a folder holds the same weights whenever it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vader.models.text import tiny_t5_tokenizer

PROMPTS = ["a cat playing piano on a stage", "waves crashing on a rocky beach"]
NEGATIVE = "blurry, low quality"
TEXT_LENGTH = 16  # the tokenizer pads to it; CogVideoX's transformer needs max_text_seq_length equal to it


def save_tiny_wan(folder: str | Path, vae_base_dim: int = 16, shift: float = 3.0) -> Path:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer(64)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                             feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0)
    text_encoder = UMT5EncoderModel(text_config)  # before the transformer: the weights depend on the draw order
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.save_pretrained(folder)
    return Path(folder)


def tiny_cogvideox_pipeline(rotary: bool = False):
    """CogVideoX-2B style, or with `rotary` embeddings the 5B style, with CogVideoX-2b's published
    scheduler config."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(64)
    torch.manual_seed(0)
    # rotary (CogVideoX-5B style) splits the head dim 1/4 time, 3/8 + 3/8 space: it needs 16, not 8
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2 if rotary else 4, attention_head_dim=16 if rotary else 8, in_channels=4,
        out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    text_config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                           feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=T5EncoderModel(text_config), vae=vae,
                             transformer=transformer, scheduler=scheduler)


def save_tiny_cogvideox(folder: str | Path, rotary: bool = False) -> Path:
    tiny_cogvideox_pipeline(rotary).save_pretrained(folder)
    return Path(folder)


SAVERS = {"wan": save_tiny_wan, "cogvideox": save_tiny_cogvideox}

# per backend: the config keys of a tiny run on that folder (sizes the tiny components can make)
TINY_KEYS: dict[str, dict[str, Any]] = {
    # every frame scored: on this tiny Wan the 'fml' frames gave a validation gain (+0.005) as small
    # as its run-to-run spread over learning rates
    "wan": dict(image_size=(32, 32), num_frames=9, decode_frame="all",
                scheduler=dict(num_sampling_steps=3, cfg_scale=6.0, shift=3.0)),
    "cogvideox": dict(image_size=(16, 16), num_frames=17,
                      scheduler=dict(num_sampling_steps=3, cfg_scale=6.0)),
}


def tiny_config_text(backend: str, folder: str | Path, **keys: Any) -> str:
    """A config file (Python assignments) for a short CPU training run of `backend` on `folder`;
    `keys` override or add top-level keys."""
    values: dict[str, Any] = dict(
        model=dict(type=backend, from_pretrained=str(folder)),
        text_encoder=dict(model_max_length=TEXT_LENGTH),
        negative_prompt="blurry, low quality",
        prompt=list(PROMPTS),
        save_fps=8,
        is_vader_training=True,
        train_batch_size=2,
        val_batch_size=2,
        num_val_runs=1,
        seed=200,
        lr=0.03,
        reward_fn="brightness",
        gradient_accumulation_steps=1,
        lora_rank=4,
        lora_alpha=4.0,
        dtype="fp32",
        mixed_precision="no",
        logger_type="none",
        debug=True,
        validation_steps=0,
        checkpointing_steps=4,
        max_train_steps=8,
        backprop_mode="last",
        decode_frame="fml",
        is_sample_preview=True,
        grad_checkpoint=True,
    )
    values.update(TINY_KEYS[backend])
    values.update(keys)
    return "".join(f"{key} = {value!r}\n" for key, value in values.items())


def load_pipeline(pipeline_class, folder: str | Path):
    """diffusers' own pipeline from a saved tiny folder, the reference the backend tests compare with."""
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_lora(model: torch.nn.Module, targets: list[str], seed: int = 1):
    """LoRA with non-zero B (peft starts B at zero, which would change nothing)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
            p.requires_grad_(True)
    return config


# ---- one description per backend, for the tests shared by all of them (test_backends.py) ----------

WAN_SHIFT = 3.0


def run_pipeline(backend: str, pipe, s, seed: int, output_type: str = "latent") -> torch.Tensor:
    """diffusers' pipeline on PROMPTS with the settings `s`: latents or pixels, as [B, C, T, H, W]
    (pixels in [0, 1])."""
    negative = [s.negative_prompt] * len(PROMPTS) if s.guidance_scale > 1 else None
    extra = {"use_dynamic_cfg": s.use_dynamic_cfg} if backend == "cogvideox" else {}
    out = pipe(prompt=PROMPTS, negative_prompt=negative, height=s.height, width=s.width, num_frames=s.num_frames,
               num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, max_sequence_length=16,
               generator=torch.Generator().manual_seed(seed), output_type=output_type, **extra).frames
    if backend == "wan" and output_type == "latent":  # WanPipeline's latents are [B, C, T, H, W] already
        return out
    return out.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W] -> [B, C, T, H, W]


@dataclass(frozen=True)
class BackendCase:
    """What differs between the diffusers backends in the shared tests: classes, tiny sizes, and the
    numbers each was measured at."""

    name: str
    generator: type  # WanGenerator
    settings_class: type  # WanSettings
    module: Any  # vader.backends.wan
    pipeline_class: type  # WanPipeline
    text_encoder_class: type  # UMT5EncoderModel
    transformer_class: type  # WanTransformer3DModel
    defaults: dict[str, Any]  # the tiny settings (besides pretrained)
    variants: dict[str, dict[str, Any]]  # folder variant -> keyword arguments of its saver ("default" first)
    gradient_variant: str  # the folder whose decoder depends enough on its latents for finite differences
    fake_variant: str  # the folder the fake-tensor step reads its sizes from
    passes_per_step: int  # denoiser calls per sampling step with guidance (Wan: cond and uncond apart)
    lora_key_prefix: str  # of the diffusers-format LoRA keys
    bf16_overrides: dict[str, Any]
    bf16_frames: list[int]
    gradient_frames: list[int]  # decoded for the finite-difference check
    min_analytic: float  # the directional derivative is at least this (else the check says nothing)
    fake_vae_dtype: torch.dtype
    fake_frames: list[int]
    fake_side: int  # height = width of the fake-tensor video
    published: dict[str, float]  # parameter counts: transformer (1e9), vae (1e6), text_encoder (1e9)
    published_lora_targets: int
    run_steps: int  # the short training run: steps, learning rate, least gain of the held-out reward
    run_lr: float
    run_gain: float
    run_scores_frames: bool  # held-out reward on the 'fml' frames (else on the whole generated video)

    def settings(self, folder, **overrides):
        return self.settings_class(**{"pretrained": str(folder), **self.defaults, **overrides})

    def save(self, folder: str | Path, variant: str = "default") -> Path:
        return SAVERS[self.name](folder, **self.variants[variant])

    def pipeline(self, folder):
        return load_pipeline(self.pipeline_class, folder)

    def run_pipeline(self, pipe, s, seed: int, output_type: str = "latent") -> torch.Tensor:
        return run_pipeline(self.name, pipe, s, seed, output_type)

    def scheduler(self, folder):
        """The scheduler `from_components` takes besides the models: CogVideoX's from the folder, None for Wan."""
        if self.name == "wan":
            return None
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler")

    def from_components(self, transformer, vae, text_encoder, tokenizer, scheduler, s):
        """The generator around given models (the scheduler is CogVideoX's only)."""
        if self.name == "wan":
            return self.generator.from_components(transformer, vae, text_encoder, tokenizer, s)
        return self.generator.from_components(transformer, vae, text_encoder, tokenizer, scheduler, s)


def backend_case(name: str) -> BackendCase:
    """The case of backend `name`; skips the test when the installed diffusers lacks its pipeline."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    pipeline_name = {"wan": "WanPipeline", "cogvideox": "CogVideoXPipeline"}[name]
    if not hasattr(diffusers, pipeline_name):  # the declared floor (0.30) predates some backends
        pytest.skip(f"diffusers {diffusers.__version__} has no {pipeline_name}")
    if name == "wan":
        from diffusers import WanPipeline, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        import vader.backends.wan as module

        return BackendCase(
            name="wan", generator=module.WanGenerator, settings_class=module.WanSettings, module=module,
            pipeline_class=WanPipeline, text_encoder_class=UMT5EncoderModel, transformer_class=WanTransformer3DModel,
            defaults=dict(dtype="fp32", vae_dtype="fp32", height=32, width=32, num_frames=9, num_steps=3,
                          guidance_scale=6.0, negative_prompt=NEGATIVE, shift=WAN_SHIFT, max_sequence_length=16),
            # diffusers' own test sizes (VAE base_dim 3), and base_dim 16: the base_dim 3 decoder barely
            # depends on its latents (d mean / d latents is about 1e-4), too little for a finite difference
            variants={"default": dict(vae_base_dim=3, shift=WAN_SHIFT),
                      "wide-vae": dict(vae_base_dim=16, shift=WAN_SHIFT)},
            gradient_variant="wide-vae", fake_variant="default", passes_per_step=2,
            lora_key_prefix="transformer.blocks.", bf16_overrides=dict(dtype="bf16"), bf16_frames=[0, 5],
            gradient_frames=[0, 4, 8], min_analytic=1e-5, fake_vae_dtype=torch.float32, fake_frames=[0, 5],
            fake_side=32, published=dict(transformer=1.42, vae=127, text_encoder=5.68),
            published_lora_targets=30 * 2 * 4,  # 30 blocks, self- and cross-attention, q/k/v/out
            run_steps=20, run_lr=3e-2, run_gain=0.008, run_scores_frames=True,
        )
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    import vader.backends.cogvideox as module

    return BackendCase(
        name="cogvideox", generator=module.CogVideoXGenerator, settings_class=module.CogVideoXSettings, module=module,
        pipeline_class=CogVideoXPipeline, text_encoder_class=T5EncoderModel,
        transformer_class=CogVideoXTransformer3DModel,
        # 17 frames = 5 latent frames: the VAE decodes latents 0-2 (frames 0-8), then latents 3-4 (frames 9-16)
        defaults=dict(dtype="fp32", vae_dtype="fp32", height=16, width=16, num_frames=17, num_steps=3,
                      guidance_scale=6.0, negative_prompt=NEGATIVE, max_sequence_length=16),
        variants={"default": dict(rotary=False), "5b": dict(rotary=True)},  # 2B style; 5B style (rotary)
        gradient_variant="default", fake_variant="5b", passes_per_step=1,  # one pass on [negative, prompt]
        lora_key_prefix="transformer.transformer_blocks.", bf16_overrides=dict(dtype="bf16", vae_dtype="bf16"),
        bf16_frames=[0, 9], gradient_frames=[0, 9, 16], min_analytic=1e-4, fake_vae_dtype=torch.bfloat16,
        fake_frames=[0, 9], fake_side=16, published=dict(transformer=1.69, vae=216, text_encoder=4.76),
        published_lora_targets=30 * 4,
        run_steps=10, run_lr=1e-2, run_gain=0.025, run_scores_frames=False,
    )
