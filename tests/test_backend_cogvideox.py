"""The CogVideoX backend on tiny random components (the sizes diffusers' own CogVideoX tests use),
saved in the diffusers layout and loaded back through `from_pretrained`, compared with diffusers'
CogVideoXPipeline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "CogVideoXPipeline"):  # the declared floor (0.30) predates some backends
    pytest.skip(f"diffusers {diffusers.__version__} has no CogVideoXPipeline", allow_module_level=True)

from backend_tiny import NEGATIVE, PROMPTS, add_random_lora, load_pipeline, save_tiny_cogvideox  # noqa: E402
from diffusers import (  # noqa: E402
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import T5EncoderModel  # noqa: E402

from vader.backends import VideoBackend, backend_class, settings_class  # noqa: E402
from vader.backends.cogvideox import CogVideoXGenerator, CogVideoXSettings, missing_weights  # noqa: E402
from vader.errors import VaderError  # noqa: E402
from vader.models.text import EmbeddingCache  # noqa: E402

FRAMES = 17  # 5 latent frames: the VAE decodes latents 0-2 (frames 0-8), then latents 3-4 (frames 9-16)
# Measured max |ours - pipeline| on these components: 0.0 for the latents and the decoded video, with
# and without rotary embeddings and dynamic guidance (the same fp32 operations in the same order).
TOL = 1e-6


@pytest.fixture(scope="module")
def cog_dirs(tmp_path_factory):
    """Two tiny pipelines in the published layout: 2B style, and 5B style (rotary embeddings)."""
    out = {}
    for name, rotary in (("2b", False), ("5b", True)):
        folder = tmp_path_factory.mktemp("cogvideox") / f"tiny-{name}"
        save_tiny_cogvideox(folder, rotary=rotary)
        out[name] = folder
    return out


@pytest.fixture
def cog_dir(cog_dirs):
    return cog_dirs["2b"]


def settings(folder, **overrides) -> CogVideoXSettings:
    values = dict(pretrained=str(folder), dtype="fp32", vae_dtype="fp32", height=16, width=16, num_frames=FRAMES,
                  num_steps=3, guidance_scale=6.0, negative_prompt=NEGATIVE, max_sequence_length=16)
    values.update(overrides)
    return CogVideoXSettings(**values)


def pipeline(folder) -> CogVideoXPipeline:
    return load_pipeline(CogVideoXPipeline, folder)


def run_pipeline(pipe: CogVideoXPipeline, s: CogVideoXSettings, seed: int, output_type: str = "latent"):
    negative = [s.negative_prompt] * len(PROMPTS) if s.guidance_scale > 1 else None
    out = pipe(prompt=PROMPTS, negative_prompt=negative, height=s.height, width=s.width, num_frames=s.num_frames,
               num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, use_dynamic_cfg=s.use_dynamic_cfg,
               max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type=output_type).frames
    return out.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W] -> [B, C, T, H, W] (pixels: [B, 3, F, H, W] in [0, 1])


@pytest.mark.parametrize(("variant", "guidance", "dynamic"), [
    ("2b", 6.0, False), ("2b", 1.0, False), ("5b", 6.0, True), ("5b", 6.0, False),
], ids=["2b-cfg-negative-prompt", "2b-no-cfg", "5b-rotary-dynamic-cfg", "5b-rotary"])
def test_latents_and_video_equal_the_pipeline(cog_dirs, variant, guidance, dynamic):
    s = settings(cog_dirs[variant], guidance_scale=guidance, use_dynamic_cfg=dynamic)
    gen = CogVideoXGenerator.build(s, "cpu")
    assert isinstance(gen, VideoBackend)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    assert latents.grad_fn is None and latents.shape == (2, *gen.latent_shape) == (2, 4, 5, 2, 2)
    pipe = pipeline(cog_dirs[variant])
    reference = run_pipeline(pipe, s, seed=0)
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    assert (run_pipeline(pipe, s, seed=1) - reference).abs().max() > 0.1  # another seed differs

    video = gen.decode(latents)
    assert video.shape == (2, 3, FRAMES, 16, 16)
    torch.testing.assert_close((video + 1) / 2, run_pipeline(pipe, s, seed=0, output_type="pt"), atol=TOL, rtol=0)
    torch.testing.assert_close(gen.generate(PROMPTS, torch.Generator().manual_seed(0)), video, atol=0, rtol=0)


def test_dynamic_guidance_changes_the_result(cog_dir):
    plain = CogVideoXGenerator.build(settings(cog_dir), "cpu")
    dynamic = CogVideoXGenerator.build(settings(cog_dir, use_dynamic_cfg=True), "cpu")
    a, b = (g.sample_latents(PROMPTS, torch.Generator().manual_seed(0)) for g in (plain, dynamic))
    assert (a - b).abs().max() > 1e-3


def test_prompts_encoded_once_through_the_cache_then_encoder_released(cog_dir):
    cache = EmbeddingCache()
    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu", prompts=PROMPTS, cache=cache)
    assert gen.text_encoder is None
    assert set(gen.embeddings) == {*PROMPTS, NEGATIVE}
    assert cache.misses == 3 and len(cache) == 3
    assert gen.embeddings[PROMPTS[0]].shape == (1, 16, 32)
    gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="already released"):
        gen.sample_latents(["a prompt never encoded"], torch.Generator().manual_seed(0))


def test_gradients_only_through_steps_from_the_cutoff(cog_dir):
    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu")
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    lora = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    assert lora
    grad_modes: list[bool] = []
    gen.denoiser.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))

    plain = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=None)
    assert plain.grad_fn is None and grad_modes == [False] * 3  # one pass per step on [negative, prompt]

    grads = {}
    for cutoff in (2, 0):
        grad_modes.clear()
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff)
        assert grad_modes == [False] * cutoff + [True] * (3 - cutoff)
        torch.testing.assert_close(latents.detach(), plain, atol=0, rtol=0)
        for p in lora:
            p.grad = None
        latents.square().mean().backward()
        grads[cutoff] = torch.cat([p.grad.flatten() for p in lora])
        assert grads[cutoff].abs().max() > 0
    assert (grads[0] - grads[2]).abs().max() > 1e-6

    checkpointed = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2, grad_checkpoint=True)
    for p in lora:
        p.grad = None
    checkpointed.square().mean().backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in lora]), grads[2])


@pytest.mark.parametrize("frames", [[0], [8], [3, 7], [9], [0, 16], [12]])
def test_partial_decode_equals_full_decode_and_passes_gradients(cog_dir, frames):
    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu")
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    full = latents.clone().requires_grad_(True)
    video = gen.decode(full)
    part = latents.clone().requires_grad_(True)
    chosen = gen.decode(part, frames)
    torch.testing.assert_close(chosen, video[:, :, frames], atol=1e-6, rtol=0)

    weights = torch.randn(chosen.shape, generator=torch.Generator().manual_seed(3))
    (chosen * weights).sum().backward()
    (video[:, :, frames] * weights).sum().backward()
    torch.testing.assert_close(part.grad, full.grad, atol=1e-5, rtol=1e-4)
    assert part.grad[:, :, :3].abs().max() > 0
    if max(frames) <= 8:  # only the first chunk (latents 0-2) was decoded
        assert not part.grad[:, :, 3:].any()
    else:
        assert part.grad[:, :, 3:].abs().max() > 0


def test_lora_saved_in_diffusers_format_loads_into_the_pipeline(cog_dir, tmp_path):
    s = settings(cog_dir)
    gen = CogVideoXGenerator.build(s, "cpu")
    config = add_random_lora(gen.denoiser, gen.lora_target_modules)
    ours = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))

    folder = gen.save_lora_diffusers(gen.denoiser, tmp_path / "lora", config=config)
    pipe = pipeline(cog_dir)
    base = run_pipeline(pipe, s, seed=0)
    pipe.load_lora_weights(folder)
    with_lora = run_pipeline(pipe, s, seed=0)
    assert (with_lora - base).abs().max() > 0.05  # the LoRA changes the output
    # Measured max |ours - pipeline with the loaded LoRA|: 0.0.
    torch.testing.assert_close(with_lora, ours, atol=TOL, rtol=0)

    again = gen.save_lora_diffusers(get_peft_model_state_dict(gen.denoiser), tmp_path / "again", config=config)
    first, second = (load_file(f / "pytorch_lora_weights.safetensors") for f in (folder, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(k.startswith("transformer.transformer_blocks.") for k in first)


def test_missing_weights_offline_name_every_repo_in_one_line(cog_dir):
    s = CogVideoXSettings(pretrained="vader-test-absent/cogvideox-main", text_encoder="vader-test-absent/t5")
    with pytest.raises(VaderError) as info:
        CogVideoXGenerator.build(s, "cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "vader-test-absent/cogvideox-main (tokenizer, transformer, vae, scheduler)" in message
    assert "vader-test-absent/t5 (text_encoder)" in message
    assert "hf download vader-test-absent/cogvideox-main && hf download vader-test-absent/t5" in message
    assert missing_weights(s) == message
    assert missing_weights(settings(cog_dir)) is None


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("num_frames", 13, "num_frames=13 must be 8k + 1"),
    ("width", 100, "width=100 must be a positive multiple of 16"),
    ("guidance_scale", float("nan"), "guidance_scale=nan must be a finite number"),
    ("vae_dtype", "int8", "vae_dtype='int8' is not a dtype; expected one of fp32, bf16, fp16"),
])
def test_bad_settings_are_one_line_errors(key, value, needle):
    with pytest.raises(VaderError, match=needle.replace("+", r"\+")):
        CogVideoXGenerator.build(CogVideoXSettings(**{key: value}), "cpu")


def test_sequence_length_must_match_the_transformer(cog_dir):
    with pytest.raises(VaderError,
                       match=r"max_sequence_length=32 must equal the transformer's max_text_seq_length \(16\)"):
        CogVideoXGenerator.build(settings(cog_dir, max_sequence_length=32), "cpu")


def test_registry():
    assert backend_class("cogvideox") is CogVideoXGenerator and settings_class("cogvideox") is CogVideoXSettings


def test_bf16_weights_train_an_fp32_lora_and_stay_near_the_bf16_pipeline(cog_dir):
    from vader.checkpoint import add_lora

    s = settings(cog_dir, dtype="bf16", vae_dtype="bf16")
    gen = CogVideoXGenerator.build(s, "cpu")
    plain = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    # The bf16 pipeline keeps its latents in bf16; ours keeps them and the guidance in fp32.
    # Measured max difference: 0.071 (latents up to 2.2); the bound is about twice that.
    reference = run_pipeline(CogVideoXPipeline.from_pretrained(cog_dir, dtype=torch.bfloat16), s, seed=0)
    assert plain.dtype == torch.float32 and (plain - reference.float()).abs().max() < 0.15

    params = add_lora(gen.denoiser, LoraConfig(r=4, lora_alpha=8, target_modules=gen.lora_target_modules))
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2)
    gen.decode(latents, [0, 9]).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0


def test_text_encoder_is_freed_before_the_transformer_loads(cog_dir, monkeypatch):
    import gc

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, T5EncoderModel) for o in gc.get_objects())

    before = alive()
    seen = []
    original = CogVideoXTransformer3DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(alive())
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "from_pretrained", classmethod(spy))
    CogVideoXGenerator.build(settings(cog_dir), "cpu", prompts=PROMPTS)
    assert seen == [before]


def test_full_backprop_gradient_matches_finite_differences(cog_dir):
    """The reward's gradient through every sampling step and the partial decode, against a central
    difference along a random LoRA direction. Measured: 0.003% apart at eps 3e-4 (the difference's
    O(eps^2) error: 0.3% at 1e-3, 30% at 1e-2)."""
    from vader.rewards import build_reward

    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu")
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    reward = build_reward("brightness")

    def brightness(cutoff: int | None) -> torch.Tensor:
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff)
        return reward(gen.decode(latents, [0, 9, 16]), PROMPTS).reward.mean()

    brightness(0).backward()
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction, strict=True)).item()
    eps = 3e-4
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
        plus = brightness(None).item()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
        minus = brightness(None).item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-4
    assert abs(numeric - analytic) <= 0.01 * abs(analytic)


def test_short_vader_run_raises_the_reward(cog_dir):
    """Ten steps of the training loop's recipe (backprop_mode 'last', decode_frame 'fml', LoRA,
    AdamW) on the backend surface alone. Measured brightness on a held-out seed: 0.526 -> 0.587."""
    import random

    from vader.checkpoint import add_lora
    from vader.frames import select_frames
    from vader.methods.vader import backprop_cutoff
    from vader.rewards import build_reward

    s = settings(cog_dir)
    gen = CogVideoXGenerator.build(s, "cpu")
    params = add_lora(gen.denoiser, LoraConfig(r=4, lora_alpha=4, target_modules=gen.lora_target_modules))
    reward = build_reward("brightness")
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    def held_out() -> float:
        video = gen.generate(PROMPTS, torch.Generator().manual_seed(100))
        return reward(video, PROMPTS).reward.mean().item()

    before = held_out()
    for step in range(10):
        rng = random.Random(step)
        cutoff = backprop_cutoff("last", s.num_steps, rng)
        frames = select_frames("fml", gen.num_frames, rng)
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(step), cutoff=cutoff)
        out = reward(gen.decode(latents, frames), PROMPTS)
        optimizer.zero_grad()
        out.loss.mean().backward()
        optimizer.step()
    assert held_out() - before > 0.025


def test_from_components_samples_what_build_samples(cog_dir):
    pipe = pipeline(cog_dir)
    s = settings(cog_dir)
    wrapped = CogVideoXGenerator.from_components(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                                 pipe.scheduler, s)
    steps: list[int] = []

    def progress(iterable):
        for i in iterable:
            steps.append(i)
            yield i

    latents = wrapped.sample_latents(PROMPTS, torch.Generator().manual_seed(0), progress=progress)
    assert steps == [0, 1, 2]
    built = CogVideoXGenerator.build(s, "cpu").sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, built, atol=0, rtol=0)


def test_meta_models_describe_the_checkpoint_without_weights(cog_dir):
    from vader.backends.cogvideox import meta_models

    meta = meta_models(settings(cog_dir))
    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu")
    for name, loaded in (("transformer", gen.denoiser), ("vae", gen.vae)):
        shapes = {k: tuple(v.shape) for k, v in meta[name].state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    assert meta["text_encoder"].config.d_model == 32

    # not on this machine: the published CogVideoX-2b architecture (parameter counts as published)
    full = meta_models(CogVideoXSettings())
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in full.items()}
    assert round(counts["transformer"] / 1e9, 2) == 1.69
    assert round(counts["vae"] / 1e6) == 216
    assert round(counts["text_encoder"] / 1e9, 2) == 4.76
    suffixes = tuple(f".{name}" for name in CogVideoXGenerator.lora_target_modules)
    assert len([n for n, _ in full["transformer"].named_modules() if n.endswith(suffixes)]) == 30 * 4


@pytest.mark.parametrize("dynamic", [False, True], ids=["cfg", "dynamic-cfg"])
def test_training_step_runs_on_fake_tensors(cog_dirs, dynamic):
    """`vader plan` runs the step under FakeTensorMode on meta-built models: no value may be read."""
    from vader.backends.cogvideox import meta_models
    from vader.memory import fake_mode, materialise

    s = settings(cog_dirs["5b"], dtype="bf16", vae_dtype="bf16", use_dynamic_cfg=dynamic)
    models = meta_models(s)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=CogVideoXGenerator.lora_target_modules),
                            models["transformer"])
    scheduler = CogVideoXDDIMScheduler.from_pretrained(cog_dirs["5b"], subfolder="scheduler")
    with fake_mode():
        transformer = materialise(models["transformer"], torch.bfloat16, trainable="lora_")
        vae = materialise(models["vae"], torch.bfloat16)
        gen = CogVideoXGenerator.from_components(transformer, vae, None, None, scheduler, s)
        for prompt in (PROMPTS[0], NEGATIVE):
            gen.embeddings[prompt] = torch.zeros(1, 16, 32, dtype=torch.bfloat16)
        video = gen.decode(gen.sample_latents(PROMPTS[:1], torch.Generator().manual_seed(0), cutoff=2), [0, 9])
        video.mean().backward()
        assert video.shape == (1, 3, 2, 16, 16)
        lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
        assert lora and all(p.requires_grad and p.grad is not None for p in lora)


def test_checkpointed_decode_equals_plain_decode(cog_dir):
    gen = CogVideoXGenerator.build(settings(cog_dir), "cpu")
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
