"""CogVideoX image-to-video (CogVideoX-5B-I2V's CogVideoXImageToVideoPipeline) and the published DPM
solver, against diffusers' pipelines on tiny random components in fp32 (cogvideox_i2v_tiny.py), and the
published 5B / 5B-I2V architectures on the meta device."""

from __future__ import annotations

import pytest
import torch
from backend_tiny import NEGATIVE, PROMPTS, load_pipeline
from cogvideox_i2v_tiny import FRAMES, SIZE, random_images, save_tiny_i2v

from vader.errors import VaderError

pytest.importorskip("diffusers")
cog = pytest.importorskip("vader.backends.cogvideox")
# Measured max |ours - pipeline| on these components: 0.0 (the same fp32 operations and random draws in
# the same order), for DDIM and for the published DPM solver.
TOL = 1e-6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_i2v(tmp_path_factory.mktemp("cogvideox-i2v") / "tiny-i2v")


def _settings(folder, **overrides):
    values = dict(pretrained=str(folder), dtype="fp32", vae_dtype="fp32", height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_steps=3, guidance_scale=6.0, negative_prompt=NEGATIVE,
                  max_sequence_length=16)
    return cog.CogVideoXSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def gen(folder):
    g = cog.CogVideoXGenerator.build(_settings(folder), "cpu")
    g.set_images(dict(zip(PROMPTS, random_images(2), strict=True)))
    return g


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(__import__("diffusers").CogVideoXImageToVideoPipeline, folder)


def _pipeline_latents(pipe, seed: int, images=None) -> torch.Tensor:
    out = pipe(prompt=PROMPTS, image=images or random_images(2), negative_prompt=[NEGATIVE] * 2, height=SIZE,
               width=SIZE, num_frames=FRAMES, num_inference_steps=3, guidance_scale=6.0, max_sequence_length=16,
               generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    return out.permute(0, 2, 1, 3, 4)


def test_image_to_video_latents_equal_the_pipeline(gen, pipe):
    assert gen.takes_images and gen.latent_shape == (4, 3, 2, 2)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    assert latents.grad_fn is None and latents.shape == (2, 4, 3, 2, 2)
    torch.testing.assert_close(latents, _pipeline_latents(pipe, 0), atol=TOL, rtol=0)
    # the image conditions the video: other images, other latents (same seed)
    other = _pipeline_latents(pipe, 0, random_images(2, seed=5))
    assert (other - latents).abs().max() > 1e-3


def test_published_dpm_solver_equals_the_pipeline_with_its_dpm_scheduler(folder, gen, pipe):
    from diffusers import CogVideoXDPMScheduler

    dpm = cog.CogVideoXGenerator.build(_settings(folder, solver="published"), "cpu")
    dpm.image_latents = gen.image_latents
    assert dpm.published_dpm  # the 5B family (rotary embeddings) samples with DPM
    latents = dpm.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    ddim_scheduler = pipe.scheduler
    pipe.scheduler = CogVideoXDPMScheduler.from_config(ddim_scheduler.config)
    try:
        reference = _pipeline_latents(pipe, 0)
    finally:
        pipe.scheduler = ddim_scheduler
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    assert (latents - gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))).abs().max() > 1e-3


def test_gradients_only_through_the_window_and_dpm_only_before_it(folder, gen):
    s = _settings(folder, solver="published")
    dpm = cog.CogVideoXGenerator.build(s, "cpu")
    dpm.image_latents = gen.image_latents
    grad_enabled = []
    hook = dpm.denoiser.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        x = dpm.denoiser.patch_embed.proj.weight
        x.requires_grad_(True)  # a trainable parameter (the LoRA in a run)
        latents = dpm.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2)
        latents.square().mean().backward()
    finally:
        hook.remove()
        x.requires_grad_(False)
    assert grad_enabled == [False, False, True]
    assert x.grad is not None and x.grad.abs().max() > 0
    # the window's step is DDIM after the DPM steps: the DPM state is dropped at the switch
    assert [s.dpm is not None for s in dpm.schedule()] == [True] * 3


def test_a_prompt_without_its_image_is_a_runtime_error(gen):
    with pytest.raises(RuntimeError, match=r"no image for prompt 'a dog'.*image-to-video"):
        gen.sample_latents(["a dog"], torch.Generator().manual_seed(0))


def test_image_input_is_decided_before_weights_load(folder, cog_t2v_folder):
    assert cog.checkpoint_pipeline(_settings(folder)) == cog.I2V_PIPELINE
    assert cog.checkpoint_pipeline(_settings(cog_t2v_folder)) == cog.T2V_PIPELINE
    for repo, expected in (("THUDM/CogVideoX-5b-I2V", cog.I2V_PIPELINE), ("THUDM/CogVideoX-5b", cog.T2V_PIPELINE),
                           ("THUDM/CogVideoX-2b", cog.T2V_PIPELINE)):
        assert cog.checkpoint_pipeline(cog.CogVideoXSettings(pretrained=repo)) == expected
    t2v = cog.CogVideoXGenerator.build(_settings(cog_t2v_folder, height=16, width=16, num_frames=17), "cpu")
    with pytest.raises(VaderError, match="is text-to-video"):
        t2v.set_images({PROMPTS[0]: random_images(1)[0]})


def test_the_i2v_size_is_its_learned_embedding_size(folder):
    with pytest.raises(VaderError, match=r"learned positional embeddings.*image_size=\(16, 16\)"):
        cog.CogVideoXGenerator.build(_settings(folder, height=32, width=32), "cpu")


@pytest.mark.parametrize(("repo", "in_channels", "buffers"), [
    ("THUDM/CogVideoX-5b", 16, 0), ("THUDM/CogVideoX-5b-I2V", 32, 54_607_872),
])
def test_published_5b_architectures_on_meta(repo, in_channels, buffers, monkeypatch):
    """5.57B parameters (the I2V patch embedding's 16 extra input channels add 197K), and the I2V's learned
    positional embedding, a persistent buffer of (226 + 13 x 30 x 45) x 3072 saved with the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = cog.meta_models(cog.CogVideoXSettings(pretrained=repo))
    transformer = models["transformer"]
    assert transformer.config.in_channels == in_channels and transformer.config.ofs_embed_dim is None
    count = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert count == pytest.approx(5.57, abs=0.005)
    assert sum(b.numel() for b in transformer.buffers()) == buffers
    assert models["vae"].config.scaling_factor == 0.7


@pytest.fixture(scope="module")
def cog_t2v_folder(tmp_path_factory):
    from backend_tiny import save_tiny_cogvideox

    return save_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox-t2v") / "tiny-2b")


def test_configs_map_solver_and_image_input(monkeypatch):
    from vader.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path, solver, images in (("configs/cogvideox-5b/vader_train.py", "differentiable", "none"),
                                 ("configs/cogvideox-5b/vader_inference.py", "published", "none"),
                                 ("configs/cogvideox-5b-i2v/vader_inference.py", "published", "required"),
                                 ("configs/cogvideox-2b/vader_train.py", "differentiable", "none")):
        cfg = load_config(path, [])
        assert cog.settings(cfg).solver == solver and cog.image_input(cfg) == images


def test_plan_gives_i2v_prompts_stand_in_image_latents(monkeypatch):
    from vader.config import load_config
    from vader.memory import LiveBytes, fake_mode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("configs/cogvideox-5b-i2v/vader_inference.py", [])
    _, build = cog.plan_generator(cfg, False)
    meter = LiveBytes()
    with fake_mode(), meter:
        gen = build(meter, ["a video"])
        condition = gen.image_condition(["a video"], torch.Generator().manual_seed(0))
    assert gen.takes_images and gen.latent_shape == (16, 13, 60, 90)
    assert condition.shape == (1, 13, 16, 60, 90)  # concatenated to the noisy latents: 32 channels in
