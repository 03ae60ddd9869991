"""The Wan2.1 backend against diffusers' WanPipeline on tiny random components (the sizes diffusers' own
Wan tests use), saved in the diffusers layout and loaded back through `from_pretrained`. What every
backend must do is tested in test_backends.py."""

from __future__ import annotations

import pytest
import torch
from backend_tiny import PROMPTS, backend_case

from vader.backends.base import VideoBackend

# Measured max |ours - pipeline| on these components: 0.0 for the latents and the decoded video (the
# same fp32 operations in the same order); the bound leaves room for a different BLAS thread split.
TOL = 1e-6


@pytest.fixture(scope="module")
def case():
    return backend_case("wan")


@pytest.fixture(scope="module")
def wan_dir(case, tmp_path_factory):
    """diffusers' own test sizes (VAE base_dim 3)."""
    return case.save(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["cfg-negative-prompt", "no-cfg"])
def test_latents_and_video_equal_the_pipeline(case, wan_dir, guidance):
    s = case.settings(wan_dir, guidance_scale=guidance)
    gen = case.generator.build(s, "cpu")
    assert isinstance(gen, VideoBackend)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    assert latents.grad_fn is None and latents.shape == (2, *gen.latent_shape) == (2, 16, 3, 4, 4)
    pipe = case.pipeline(wan_dir)
    reference = case.run_pipeline(pipe, s, seed=0)
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    other = case.run_pipeline(pipe, s, seed=1)
    assert (other - reference).abs().max() > 0.1  # the comparison can fail: another seed differs

    video = gen.decode(latents)
    pixels = case.run_pipeline(pipe, s, seed=0, output_type="pt")  # [B, 3, F, H, W] in [0, 1]
    assert video.shape == (2, 3, 9, 32, 32)
    torch.testing.assert_close((video + 1) / 2, pixels, atol=TOL, rtol=0)
    torch.testing.assert_close(gen.generate(PROMPTS, torch.Generator().manual_seed(0)), video, atol=0, rtol=0)
