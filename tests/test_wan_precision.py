"""Wan under the training loop's bf16 autocast runs at the pipeline's precision: the transformer's modules
diffusers keeps in fp32 (`_keep_in_fp32_modules`: time embedding, norms, rope) run in fp32, and the VAE
decodes in its own fp32, as WanPipeline runs them without autocast. Tiny components (diffusers' own test
sizes), bf16 transformer weights with the fp32 modules `from_pretrained(torch_dtype=bf16)` keeps, fp32 VAE."""

from __future__ import annotations

import pytest
import torch
from backend_tiny import NEGATIVE, PROMPTS, save_tiny_wan

pytest.importorskip("diffusers")

SIZE = dict(height=32, width=32, num_frames=9, num_steps=3, guidance_scale=6.0, negative_prompt=NEGATIVE, shift=3.0,
            max_sequence_length=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan-precision") / "tiny")  # VAE base_dim 16


@pytest.fixture(scope="module")
def gen(folder):
    from vader.backends.wan import WanGenerator, WanSettings

    return WanGenerator.build(WanSettings(pretrained=str(folder), dtype="bf16", vae_dtype="fp32", **SIZE), "cpu")


@pytest.fixture(scope="module")
def pipe(folder):
    """WanPipeline as diffusers' Wan examples load it: transformer bf16 (its fp32 modules fp32), VAE fp32."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipeline(pipe, output_type: str) -> torch.Tensor:
    """The pipeline with no autocast: latents, or the video as [B, 3, F, H, W] in [-1, 1]."""
    out = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, height=32, width=32, num_frames=9, num_inference_steps=3,
               guidance_scale=6.0, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
               output_type=output_type).frames
    return out if output_type == "latent" else out.permute(0, 2, 1, 3, 4) * 2 - 1


def _record_dtypes(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, set], list]:
    seen: dict[str, set] = {name: set() for name in modules}
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: seen[name].add(out.dtype))
               for name, m in modules.items()]
    return seen, handles


def test_fp32_modules_are_the_ones_diffusers_keeps_in_fp32(gen):
    from vader.backends.common import keep_in_fp32_modules

    names = {n for n, m in gen.denoiser.named_modules() if any(m is k for k in keep_in_fp32_modules(gen.denoiser))}
    blocks = len(gen.denoiser.blocks)
    assert names == {"rope", "condition_embedder.time_embedder",
                     *(f"blocks.{i}.norm{k}" for i in range(blocks) for k in (1, 2, 3))}
    # as from_pretrained(torch_dtype=bf16) left them: those fp32, the attention bf16, the VAE fp32
    assert gen.denoiser.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert gen.denoiser.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and gen.dtype == torch.bfloat16
    assert gen.vae.dtype == torch.float32


def test_a_transformer_call_under_autocast_is_the_pipeline_transformers(gen, pipe):
    """Same bf16 inputs: ours under bf16 autocast equals the pipeline's transformer without autocast bit for
    bit (measured before the fix: 0.0078, the time embedding ran in bf16)."""
    x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    t = torch.tensor([900.0, 900.0])
    gen.encode_prompts(PROMPTS)
    text = torch.cat([gen.embeddings[p] for p in PROMPTS]).to(torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = gen.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        reference = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)


def test_decode_under_autocast_is_the_pipelines_fp32_decode(gen, pipe):
    """The pipeline's own latents decoded by ours under bf16 autocast equal its fp32 video (measured: 0.0;
    before the fix 0.031 with this VAE and 0.219 with diffusers' base_dim 3 VAE)."""
    latents = _run_pipeline(pipe, "latent")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        video = gen.decode(latents)
    torch.testing.assert_close(video, _run_pipeline(pipe, "pt"), atol=1e-6, rtol=0)


def test_bf16_autocast_samples_and_decodes_as_without_and_near_the_pipeline(gen, pipe):
    """Sampler + decode. Measured max |video difference|: ours under bf16 autocast vs ours without autocast
    0.0 (before the fix 0.050; 0.21 with the base_dim 3 VAE); vs WanPipeline 0.034 (before 0.056): the rest
    is the pipeline rounding its latents to bf16 after every step where ours keeps them in fp32
    (test_backends' bf16 test). The fp32 modules ran in fp32, the bf16 weights in bf16."""
    embedder = gen.denoiser.condition_embedder.time_embedder
    watched = {"time_embedder.linear_1": embedder.linear_1, "time_embedder": embedder,
               "norm1": gen.denoiser.blocks[0].norm1, "vae.decoder.conv_in": gen.vae.decoder.conv_in,
               "vae.decoder.conv_out": gen.vae.decoder.conv_out}
    seen, handles = _record_dtypes({**watched, "attn1.to_q": gen.denoiser.blocks[0].attn1.to_q})
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            video = gen.decode(gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0)))
            assert torch.is_autocast_enabled("cpu")  # the hooks left it as they found it
    finally:
        for h in handles:
            h.remove()
    assert {k: seen[k] for k in watched} == {k: {torch.float32} for k in watched}
    assert seen["attn1.to_q"] == {torch.bfloat16}  # autocast is left only where diffusers keeps fp32

    with torch.no_grad():
        plain = gen.decode(gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(video, plain, atol=0, rtol=0)
    reference = _run_pipeline(pipe, "pt")
    assert video.shape == reference.shape == (2, 3, 9, 32, 32)
    assert (video - reference).abs().max() < 0.045


def test_autocast_training_step_keeps_fp32_modules_through_checkpoint_recomputation(folder):
    """With gradients and activation checkpointing (the recomputation runs the hooks again): the time
    embedding is fp32 in every call, the LoRA gets finite gradients, and autocast is back on after."""
    from peft import LoraConfig

    from vader.backends.wan import WanGenerator, WanSettings
    from vader.checkpoint import add_lora

    gen = WanGenerator.build(WanSettings(pretrained=str(folder), dtype="bf16", vae_dtype="fp32", **SIZE), "cpu")
    params = add_lora(gen.denoiser, LoraConfig(r=4, lora_alpha=8, target_modules=gen.lora_target_modules))
    seen, handles = _record_dtypes({"time_embedder": gen.denoiser.condition_embedder.time_embedder})
    calls: list[bool] = []
    handles.append(gen.denoiser.condition_embedder.time_embedder.register_forward_pre_hook(  # after ours
        lambda *_: calls.append(torch.is_autocast_enabled("cpu"))))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=1, grad_checkpoint=True)
            video = gen.decode(latents, [0, 5])
            assert torch.is_autocast_enabled("cpu")
        video.mean().backward()
    finally:
        for h in handles:
            h.remove()
    assert seen == {"time_embedder": {torch.float32}} and not any(calls)
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert grads.numel() and torch.isfinite(grads).all() and grads.abs().max() > 0
