"""Wan's causal VAE decode, one latent frame at a time (AutoencoderKLWan._decode, unrolled so that
decoding can stop after the last chunk a chosen frame needs)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def decode_chunks(vae: nn.Module, latents: Tensor) -> Iterator[Tensor]:
    """Decoded chunks [B, 3, f, H, W] in [-1, 1], in order: the first latent frame alone (one output
    frame), then one latent frame (4 output frames) per chunk, each with the feature cache of the
    chunks before it. Gradients flow back to `latents`."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    cfg = vae.config
    z = latents.to(vae.dtype)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    z = z / inv_std + mean  # WanPipeline's own expression, so the full decode matches it bit for bit
    # AutoencoderKLWan._decode, one latent frame per call; its cache lives on the module
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i: i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                              first_chunk=i == 0)
            if cfg.patch_size is not None:
                out = unpatchify(out, patch_size=cfg.patch_size)
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()
