"""Open-Sora v1.2 model stack: STDiT3 denoiser, VAE v1.2, T5 text encoder."""
