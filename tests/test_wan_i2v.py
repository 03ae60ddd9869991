"""Wan image-to-video and the published solver, at generator level on tiny random checkpoints (fp32):
Wan2.1-I2V against diffusers' WanImageToVideoPipeline, Wan2.2-TI2V-5B with and without first frames against
WanImageToVideoPipeline(expand_timesteps=True) / WanPipeline, scheduler.solver='published' against the
pipelines with UniPCMultistepScheduler, the gradient window, the config-level rules and the published
TI2V-5B / I2V-14B architectures described without files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from backend_tiny import NEGATIVE, PROMPTS, add_random_lora, tiny_config_text
from wan_i2v_tiny import (
    I2V_TEXT_LENGTH,
    image_pipeline,
    save_tiny_wan_i2v,
    save_tiny_wan_i2v_a14b,
    save_tiny_wan_ti2v,
    tiny_images,
)

from vader.errors import VaderError

pytest.importorskip("diffusers")

STEPS = 3
# Measured max |ours - pipeline| on these components: 0.0 for one prompt (the same fp32 operations), up to
# 3.9e-6 for two (ours runs both prompts in one batch, the pipeline one image, so one prompt, per call).
TOL = 2e-5
SHIFT = {"i2v": 3.0, "ti2v": 5.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan-i2v")
    return {"i2v": save_tiny_wan_i2v(root / "i2v"), "ti2v": save_tiny_wan_ti2v(root / "ti2v"),
            "t2v": root / "i2v-text"}  # the text parts' folder is a whole tiny Wan2.1-T2V checkpoint


@pytest.fixture(scope="module")
def images():
    return dict(zip(PROMPTS, tiny_images()))


def settings(folder: Path, kind: str, **overrides):
    from vader.backends.wan import WanSettings

    values = dict(pretrained=str(folder), dtype="fp32", vae_dtype="fp32", height=32, width=32, num_frames=9,
                  num_steps=STEPS, guidance_scale=6.0, negative_prompt=NEGATIVE, shift=SHIFT.get(kind, 3.0),
                  max_sequence_length=I2V_TEXT_LENGTH if kind == "i2v" else 16)
    return WanSettings(**{**values, **overrides})


def build(folders, kind: str, **overrides):
    from vader.backends.wan import WanGenerator

    return WanGenerator.build(settings(folders[kind], kind, **overrides), "cpu")


def pipeline_call(pipe, kind: str, solver: str, **kwargs) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vader.backends.wan import unipc_scheduler

    shift = SHIFT.get(kind, 3.0)
    pipe.scheduler = unipc_scheduler(shift) if solver == "published" else FlowMatchEulerDiscreteScheduler(shift=shift)
    return pipe(negative_prompt=NEGATIVE, height=32, width=32, num_frames=9, num_inference_steps=STEPS,
                guidance_scale=6.0, max_sequence_length=I2V_TEXT_LENGTH if kind == "i2v" else 16, **kwargs).frames


def per_prompt_reference(folder: Path, kind: str, solver: str, images, noise: torch.Tensor) -> torch.Tensor:
    """The image pipeline once per prompt (it takes one image per call) from our noise rows."""
    pipe = image_pipeline(folder, expand_timesteps=kind == "ti2v")
    return torch.cat([pipeline_call(pipe, kind, solver, image=images[p], prompt=p, latents=noise[i:i + 1],
                                    output_type="latent") for i, p in enumerate(PROMPTS)])


@pytest.mark.parametrize("solver", ["differentiable", "published"])
@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_first_frame_latents_equal_the_image_pipeline(folders, images, kind, solver):
    gen = build(folders, kind, solver=solver)
    assert gen.image_input == {"i2v": "required", "ti2v": "optional"}[kind]
    assert (gen.image_encoder is not None) == (kind == "i2v")
    gen.set_images(images)
    assert gen.image_encoder is None  # the CLIP encoder is released once the first frames are encoded
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    noise = gen.initial_noise(2, torch.Generator().manual_seed(0))
    reference = per_prompt_reference(folders[kind], kind, solver, images, noise)
    assert latents.shape == reference.shape == (2, *gen.latent_shape)
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    other = per_prompt_reference(folders[kind], kind, solver, dict(zip(PROMPTS, tiny_images(seed=1))), noise)
    assert (other - reference).abs().max() > 0.01  # the first frame matters
    if kind == "ti2v":  # latent frame 0 is the image's latent, as the pipeline returns it
        for row, prompt in enumerate(PROMPTS):
            assert torch.equal(latents[row, :, :1], gen.first_frames[prompt].latent[0])


def test_one_prompt_and_its_decoded_video_equal_the_pipeline_exactly(folders, images):
    """TI2V with a first frame, batch of one: latents and video bit for bit (decoded frame 0 is the image's
    VAE reconstruction)."""
    gen = build(folders, "ti2v")
    gen.set_images({PROMPTS[0]: images[PROMPTS[0]]})
    latents = gen.sample_latents(PROMPTS[:1], torch.Generator().manual_seed(0))
    pipe = image_pipeline(folders["ti2v"], expand_timesteps=True)
    call = dict(image=images[PROMPTS[0]], prompt=PROMPTS[0])
    reference = pipeline_call(pipe, "ti2v", "differentiable", output_type="latent",
                              generator=torch.Generator().manual_seed(0), **call)
    torch.testing.assert_close(latents, reference, atol=0, rtol=0)
    pixels = pipeline_call(pipe, "ti2v", "differentiable", output_type="pt", generator=torch.Generator().manual_seed(0),
                           **call).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W] in [0, 1] -> [B, 3, F, H, W]
    torch.testing.assert_close((gen.decode(latents) + 1) / 2, pixels, atol=1e-6, rtol=0)


def test_ti2v_without_first_frames_is_wanpipeline_and_mixed_batches_condition_per_prompt(folders, images):
    from diffusers import WanPipeline

    gen = build(folders, "ti2v")
    pipe = WanPipeline.from_pretrained(folders["ti2v"])
    pipe.set_progress_bar_config(disable=True)
    text_only = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    reference = pipeline_call(pipe, "ti2v", "differentiable", prompt=PROMPTS, output_type="latent",
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(text_only, reference, atol=0, rtol=0)
    gen.set_images({PROMPTS[0]: images[PROMPTS[0]]})
    mixed = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    noise = gen.initial_noise(2, torch.Generator().manual_seed(0))
    first = pipeline_call(image_pipeline(folders["ti2v"], True), "ti2v", "differentiable", image=images[PROMPTS[0]],
                          prompt=PROMPTS[0], latents=noise[:1], output_type="latent")
    second = pipeline_call(pipe, "ti2v", "differentiable", prompt=PROMPTS[1:], latents=noise[1:], output_type="latent")
    torch.testing.assert_close(mixed, torch.cat([first, second]), atol=TOL, rtol=0)


@pytest.mark.parametrize("solver", ["differentiable", "published"])
def test_two_expert_i2v_without_clip_equals_the_pipeline(folders, images, tmp_path, solver):
    """The Wan2.2-I2V-A14B layout (WanImageToVideoPipeline, two experts, no image encoder): 6 steps, the first
    (t >= 900) the high-noise expert's; one prompt, bit for bit, with either solver."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    from vader.backends.wan import WanGenerator, unipc_scheduler

    folder = save_tiny_wan_i2v_a14b(tmp_path / "a14b", folders["i2v"])
    gen = WanGenerator.build(settings(folder, "a14b", num_steps=6, solver=solver), "cpu")
    assert (gen.image_input, gen.boundary_ratio, gen.image_encoder) == ("required", 0.9, None)
    gen.set_images(images)
    latents = gen.sample_latents(PROMPTS[:1], torch.Generator().manual_seed(0))
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = unipc_scheduler(3.0) if solver == "published" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference = pipe(image=images[PROMPTS[0]], prompt=PROMPTS[0], negative_prompt=NEGATIVE, height=32, width=32,
                     num_frames=9, num_inference_steps=6, guidance_scale=6.0, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="latent").frames
    torch.testing.assert_close(latents, reference, atol=0, rtol=0)


def test_published_solver_equals_wanpipeline_with_unipc(folders):
    """Text-to-video, solver='published', no gradients: WanPipeline with the published UniPCMultistepScheduler."""
    from diffusers import WanPipeline

    gen = build(folders, "t2v", solver="published")
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    pipe = WanPipeline.from_pretrained(folders["t2v"])
    pipe.set_progress_bar_config(disable=True)
    reference = pipeline_call(pipe, "t2v", "published", prompt=PROMPTS, output_type="latent",
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, reference, atol=1e-6, rtol=0)
    euler = pipeline_call(pipe, "t2v", "differentiable", prompt=PROMPTS, output_type="latent",
                          generator=torch.Generator().manual_seed(0))
    assert (euler - reference).abs().max() > 0.01  # the solvers differ


@pytest.mark.parametrize("solver", ["differentiable", "published"])
def test_gradients_reach_the_image_attention_lora_from_the_window_only(folders, images, solver):
    """I2V, a window of the last two steps: the LoRA (the image cross-attention's add_k_proj / add_v_proj too)
    gets a gradient; the step before runs without a graph (UniPC's with 'published'), and a window past the
    last step gives latents without one. With 'published' the window's Euler steps continue from UniPC's
    sigmas, so the latents differ a little from UniPC's all the way (a window of the last step alone would
    not differ: UniPC's last step, first order to sigma 0, is the Euler step)."""
    from vader.backends.wan import I2V_LORA_TARGETS

    gen = build(folders, "i2v", solver=solver)
    assert gen.lora_target_modules == I2V_LORA_TARGETS
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    gen.set_images(images)
    modes: list[bool] = []
    gen.denoiser.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=STEPS - 2)
    assert modes == [False] * (2 * (STEPS - 2)) + [True] * 4
    latents.square().mean().backward()
    grads = {n: p.grad for n, p in gen.denoiser.named_parameters() if "lora_" in n}
    for target in ("add_k_proj", "add_v_proj", "to_q"):
        assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if f".{target}." in n), target
    none = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=STEPS)
    assert none.grad_fn is None
    difference = (latents.detach() - none).abs().max()
    assert (difference == 0) if solver == "differentiable" else (0 < difference < 0.5), difference
    last = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=STEPS - 1)
    torch.testing.assert_close(last.detach(), none, atol=1e-5, rtol=0)


def test_i2v_lora_file_loads_into_the_image_pipeline(folders, images, tmp_path):
    """The diffusers-format LoRA (with add_k_proj / add_v_proj) loads into WanImageToVideoPipeline: one prompt,
    bit for bit."""
    gen = build(folders, "i2v")
    config = add_random_lora(gen.denoiser, gen.lora_target_modules)
    gen.set_images(images)
    ours = gen.sample_latents(PROMPTS[:1], torch.Generator().manual_seed(0))
    saved = gen.save_lora_diffusers(gen.denoiser, tmp_path / "lora", config=config)
    pipe = image_pipeline(folders["i2v"])
    call = dict(image=images[PROMPTS[0]], prompt=PROMPTS[0], output_type="latent")
    base = pipeline_call(pipe, "i2v", "differentiable", generator=torch.Generator().manual_seed(0), **call)
    pipe.load_lora_weights(saved)
    assert any("add_k_proj.lora_A" in name for name, _ in pipe.transformer.named_parameters())
    with_lora = pipeline_call(pipe, "i2v", "differentiable", generator=torch.Generator().manual_seed(0), **call)
    assert (with_lora - base).abs().max() > 0.05
    torch.testing.assert_close(ours, with_lora, atol=1e-6, rtol=0)


def test_ti2v_frame_0_carries_no_gradient(folders, images):
    gen = build(folders, "ti2v")
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    gen.set_images(images)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=STEPS - 1)
    params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    first = torch.autograd.grad(latents[:, :, 0].sum(), params, allow_unused=True, retain_graph=True)
    rest = torch.autograd.grad(latents[:, :, 1:].sum(), params, allow_unused=True)
    assert all(g is None or not g.any() for g in first) and any(g is not None and g.any() for g in rest)


def test_missing_first_frames_and_released_encoder_are_one_line_errors(folders, images):
    gen = build(folders, "i2v")
    with pytest.raises(RuntimeError, match=r"no first frame for prompt 'a cat playing piano on a stage'"):
        gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    gen.set_images({PROMPTS[1]: images[PROMPTS[1]]})
    with pytest.raises(RuntimeError, match="the CLIP image encoder was already released"):
        gen.set_images({PROMPTS[0]: images[PROMPTS[0]]})
    with pytest.raises(VaderError, match="grpo"):
        gen.flow_start(PROMPTS[1:], torch.Generator().manual_seed(0))
    t2v = build(folders, "t2v")
    assert t2v.image_input == "none"
    with pytest.raises(VaderError, match="is a text-to-video Wan checkpoint"):
        t2v.set_images(images)


def test_config_rules(folders, tmp_path):
    from vader.backends import wan
    from vader.config import load_config

    def config(kind: str, **keys):
        path = tmp_path / f"{kind}.py"
        length = I2V_TEXT_LENGTH if kind == "i2v" else 16
        keys = {"text_encoder": dict(model_max_length=length), **keys}
        path.write_text(tiny_config_text("wan", folders[kind], project_dir=str(tmp_path / "runs"), **keys))
        return load_config(path)

    assert [wan.image_input(config(k)) for k in ("t2v", "ti2v", "i2v")] == ["none", "optional", "required"]
    assert wan.lora_targets(config("i2v")) == wan.I2V_LORA_TARGETS and wan.lora_targets(config("ti2v")) == \
        wan.LORA_TARGETS
    with pytest.raises(VaderError, match=r"^method='grpo' with the image-to-video model.from_pretrained="):
        config("i2v", method="grpo", reward_fn="brightness")
    scheduler = dict(num_sampling_steps=3, cfg_scale=6.0, shift=3.0, solver="published")
    assert config("t2v", scheduler=scheduler).scheduler.solver == "published"
    with pytest.raises(VaderError, match=r"^scheduler.solver='published' with method='grpo'"):
        config("t2v", scheduler=scheduler, method="grpo", reward_fn="brightness")
    with pytest.raises(VaderError, match=r"^text_encoder.model_max_length=16 with the image-to-video"):
        config("i2v", text_encoder=dict(model_max_length=16))


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


def test_published_ti2v_and_i2v_architectures_without_files(no_hub):
    """Meta-device parts of the published repos: TI2V-5B 5.00B parameters with the Wan2.2 VAE (z_dim 48, 16x),
    I2V-14B 16.39B with 36 input channels; I2V's missing weights name the image encoder."""
    from vader.backends.common import missing_weights
    from vader.backends.wan import (
        WAN_I2V_480P_REPO,
        WAN_TI2V_REPO,
        WanSettings,
        checkpoint_layout,
        meta_models,
    )

    ti2v = meta_models(WanSettings(pretrained=WAN_TI2V_REPO))
    assert round(sum(p.numel() for p in ti2v["transformer"].parameters()) / 1e9, 2) == 5.00
    assert (ti2v["vae"].config.z_dim, ti2v["vae"].config.scale_factor_spatial) == (48, 16)
    i2v_settings = WanSettings(pretrained=WAN_I2V_480P_REPO)
    assert checkpoint_layout(i2v_settings).image_input == "required"
    i2v = meta_models(i2v_settings)
    assert round(sum(p.numel() for p in i2v["transformer"].parameters()) / 1e9, 2) == 16.39
    assert i2v["transformer"].config.in_channels == 36
    assert f"{WAN_I2V_480P_REPO} (tokenizer, text_encoder, transformer, vae, image_encoder, image_processor)" in \
        missing_weights(i2v_settings)
