"""The CogVideoX backend against diffusers' CogVideoXPipeline on tiny random components (the sizes
diffusers' own CogVideoX tests use), saved in the diffusers layout and loaded back through
`from_pretrained`, and what only CogVideoX has (dynamic guidance, the text length its transformer
fixes, a checkpointed VAE decoder). What every backend must do is tested in test_backends.py."""

from __future__ import annotations

import pytest
import torch
from backend_tiny import PROMPTS, backend_case

from vader.backends.base import VideoBackend
from vader.errors import VaderError

FRAMES = 17  # 5 latent frames: the VAE decodes latents 0-2 (frames 0-8), then latents 3-4 (frames 9-16)
# Measured max |ours - pipeline| on these components: 0.0 for the latents and the decoded video, with
# and without rotary embeddings and dynamic guidance (the same fp32 operations in the same order).
TOL = 1e-6


@pytest.fixture(scope="module")
def case():
    return backend_case("cogvideox")


@pytest.fixture(scope="module")
def cog_dirs(case, tmp_path_factory):
    """Two tiny pipelines in the published layout: 2B style, and 5B style (rotary embeddings)."""
    return {name: case.save(tmp_path_factory.mktemp("cogvideox") / f"tiny-{name}", variant)
            for name, variant in (("2b", "default"), ("5b", "5b"))}


@pytest.fixture
def cog_dir(cog_dirs):
    return cog_dirs["2b"]


@pytest.mark.parametrize(("variant", "guidance", "dynamic"), [
    ("2b", 6.0, False), ("2b", 1.0, False), ("5b", 6.0, True), ("5b", 6.0, False),
], ids=["2b-cfg-negative-prompt", "2b-no-cfg", "5b-rotary-dynamic-cfg", "5b-rotary"])
def test_latents_and_video_equal_the_pipeline(case, cog_dirs, variant, guidance, dynamic):
    s = case.settings(cog_dirs[variant], guidance_scale=guidance, use_dynamic_cfg=dynamic)
    gen = case.generator.build(s, "cpu")
    assert isinstance(gen, VideoBackend)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    assert latents.grad_fn is None and latents.shape == (2, *gen.latent_shape) == (2, 4, 5, 2, 2)
    pipe = case.pipeline(cog_dirs[variant])
    reference = case.run_pipeline(pipe, s, seed=0)
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    assert (case.run_pipeline(pipe, s, seed=1) - reference).abs().max() > 0.1  # another seed differs

    video = gen.decode(latents)
    assert video.shape == (2, 3, FRAMES, 16, 16)
    torch.testing.assert_close((video + 1) / 2, case.run_pipeline(pipe, s, seed=0, output_type="pt"), atol=TOL, rtol=0)
    torch.testing.assert_close(gen.generate(PROMPTS, torch.Generator().manual_seed(0)), video, atol=0, rtol=0)


def test_dynamic_guidance_changes_the_result(case, cog_dir):
    plain = case.generator.build(case.settings(cog_dir), "cpu")
    dynamic = case.generator.build(case.settings(cog_dir, use_dynamic_cfg=True), "cpu")
    a, b = (g.sample_latents(PROMPTS, torch.Generator().manual_seed(0)) for g in (plain, dynamic))
    assert (a - b).abs().max() > 1e-3


def test_sequence_length_must_match_the_transformer(case, cog_dir):
    with pytest.raises(VaderError,
                       match=r"max_sequence_length=32 must equal the transformer's max_text_seq_length \(16\)"):
        case.generator.build(case.settings(cog_dir, max_sequence_length=32), "cpu")


def test_checkpointed_decode_equals_plain_decode(case, cog_dir):
    gen = case.generator.build(case.settings(cog_dir), "cpu")
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    grads, videos = [], []
    for flag in (False, True):
        z = latents.clone().requires_grad_(True)
        video = gen.decode(z, [3, 12], grad_checkpoint=flag)
        assert gen.vae.is_gradient_checkpointing is flag
        video.square().sum().backward()
        videos.append(video.detach())
        grads.append(z.grad)
    torch.testing.assert_close(videos[1], videos[0], atol=0, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_published_solver_equals_the_pipeline_with_the_published_scheduler(case, cog_dirs, variant):
    """solver='published' without gradients: 2B keeps DDIM (the same latents); the 5B family (rotary)
    takes CogVideoXDPMScheduler's stochastic step, as CogVideoXPipeline runs it with that scheduler.
    Measured max |ours - pipeline|: 0.0 (4 steps: the first-order first and last steps, two second-order)."""
    from diffusers import CogVideoXDPMScheduler

    s = case.settings(cog_dirs[variant], solver="published", num_steps=4)
    gen = case.generator.build(s, "cpu")
    assert gen.published_dpm is (variant == "5b")
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    pipe = case.pipeline(cog_dirs[variant])
    if variant == "5b":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(latents, case.run_pipeline(pipe, s, seed=0), atol=TOL, rtol=0)
