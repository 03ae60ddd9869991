"""Tiny random diffusers pipelines saved in the published layout, for the backend tests that run the
tool end to end (`vader train` / `vader infer` with model.type 'wan' or 'cogvideox').

The sizes are diffusers' own test sizes; Wan's VAE base_dim defaults to 16, not their 3: the
base_dim 3 decoder barely depends on its latents, so no reward could move. Each builder seeds torch itself, so
a folder holds the same weights whenever it is made.
"""

from __future__ import annotations

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
