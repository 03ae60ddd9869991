"""What every diffusers backend (Wan2.1, CogVideoX) must do, on tiny random components saved in the
diffusers layout (the sizes diffusers' own tests use): one test per behaviour, parametrized over the
backends. The numbers that differ (sizes, frames, measured bounds) live in `backend_tiny.backend_case`.
Parity with each backend's own diffusers pipeline (and what only one backend has) is tested in
test_backend_wan.py and test_backend_cogvideox.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from backend_tiny import NEGATIVE, PROMPTS, BackendCase, add_random_lora, backend_case

from vader.backends.common import missing_weights
from vader.errors import VaderError

BACKENDS = ["wan", "cogvideox"]


@pytest.fixture(scope="module", params=BACKENDS)
def case(request) -> BackendCase:
    return backend_case(request.param)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(case, variant) -> a tiny pipeline folder of that backend, saved once per module."""
    made: dict = {}

    def folder(case: BackendCase, variant: str = "default"):
        if (case.name, variant) not in made:
            made[case.name, variant] = case.save(tmp_path_factory.mktemp(case.name) / f"tiny-{variant}", variant)
        return made[case.name, variant]

    return folder


@pytest.fixture
def folder(case, folders):
    return folders(case)


def test_prompts_encoded_once_through_the_cache_then_encoder_released(case, folder):
    from vader.models.text import EmbeddingCache

    cache = EmbeddingCache()
    gen = case.generator.build(case.settings(folder), "cpu", prompts=PROMPTS, cache=cache)
    assert gen.text_encoder is None
    assert set(gen.embeddings) == {*PROMPTS, NEGATIVE}
    assert cache.misses == 3 and len(cache) == 3
    assert gen.embeddings[PROMPTS[0]].shape == (1, 16, 32)
    gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))  # cached prompts need no encoder
    with pytest.raises(RuntimeError, match="already released"):
        gen.sample_latents(["a prompt never encoded"], torch.Generator().manual_seed(0))


def test_gradients_only_through_steps_from_the_cutoff(case, folder):
    gen = case.generator.build(case.settings(folder), "cpu")
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    lora = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    assert lora and all("attn1" in n or "attn2" in n for n, p in gen.denoiser.named_parameters() if "lora_" in n)
    grad_modes: list[bool] = []
    gen.denoiser.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    k = case.passes_per_step  # Wan: cond and uncond apart; CogVideoX: one pass on [negative, prompt]

    plain = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=None)
    assert plain.grad_fn is None and grad_modes == [False] * (3 * k)  # 3 steps

    grads = {}
    for cutoff in (2, 0):
        grad_modes.clear()
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff)
        assert grad_modes == [False] * (k * cutoff) + [True] * (k * (3 - cutoff))
        torch.testing.assert_close(latents.detach(), plain, atol=0, rtol=0)  # the graph changes no value
        for p in lora:
            p.grad = None
        latents.square().mean().backward()
        grads[cutoff] = torch.cat([p.grad.flatten() for p in lora])
        assert grads[cutoff].abs().max() > 0
    assert (grads[0] - grads[2]).abs().max() > 1e-6  # earlier steps add their own contribution

    grad_modes.clear()
    checkpointed = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2, grad_checkpoint=True)
    for p in lora:
        p.grad = None
    checkpointed.square().mean().backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in lora]), grads[2])


PARTIAL_DECODES = ([("wan", f) for f in ([0], [1, 2, 3, 4], [2, 5], [8], [0, 4, 8])]  # 9 frames
                   + [("cogvideox", f) for f in ([0], [8], [3, 7], [9], [0, 16], [12])])  # 17 frames


@pytest.mark.parametrize(("case", "frames"), PARTIAL_DECODES, indirect=["case"],
                         ids=[f"{b}-{'-'.join(map(str, f))}" for b, f in PARTIAL_DECODES])
def test_partial_decode_equals_full_decode_and_passes_gradients(case, folder, frames):
    gen = case.generator.build(case.settings(folder), "cpu")
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
    if case.name == "wan":
        # output frame 0 comes from latent frame 0, frames 1-4 from latent 1, 5-8 from latent 2: the
        # causal VAE never decodes (and sends no gradient to) the latent frames after the last needed one
        last_latent = (max(frames) + 3) // 4
        assert part.grad[:, :, last_latent].abs().max() > 0
        assert not part.grad[:, :, last_latent + 1:].any()
    else:
        # CogVideoX decodes in chunks: latents 0-2 (frames 0-8), then latents 3-4 (frames 9-16)
        assert part.grad[:, :, :3].abs().max() > 0
        if max(frames) <= 8:  # only the first chunk was decoded
            assert not part.grad[:, :, 3:].any()
        else:
            assert part.grad[:, :, 3:].abs().max() > 0


def test_lora_saved_in_diffusers_format_loads_into_the_pipeline(case, folder, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    s = case.settings(folder)
    gen = case.generator.build(s, "cpu")
    config = add_random_lora(gen.denoiser, gen.lora_target_modules)
    ours = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))

    saved = gen.save_lora_diffusers(gen.denoiser, tmp_path / "lora", config=config)
    assert (saved / "pytorch_lora_weights.safetensors").is_file()
    pipe = case.pipeline(folder)
    base = case.run_pipeline(pipe, s, seed=0)
    pipe.load_lora_weights(saved)
    with_lora = case.run_pipeline(pipe, s, seed=0)
    assert (with_lora - base).abs().max() > 0.05  # the LoRA changes the output
    # Measured max |ours - pipeline with the loaded LoRA|: 0.0 (same weights, same operations).
    torch.testing.assert_close(with_lora, ours, atol=1e-6, rtol=0)

    # a bare peft state dict with its config writes the same file
    again = gen.save_lora_diffusers(get_peft_model_state_dict(gen.denoiser), tmp_path / "again", config=config)
    first, second = (load_file(f / "pytorch_lora_weights.safetensors") for f in (saved, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(k.startswith(case.lora_key_prefix) for k in first)
    inferred = gen.save_lora_diffusers(gen.denoiser, tmp_path / "inferred")  # the config peft recorded
    with safe_open(str(inferred / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        settings = json.loads(handle.metadata()["lora_adapter_metadata"])
        # the strength (alpha 8 / rank 4) is baked into B: metadata alpha = rank, no dropout
        assert settings["transformer.lora_alpha"] == 4 and settings["transformer.lora_dropout"] == 0.0
    with pytest.raises(ValueError, match="LoraConfig"):
        gen.save_lora_diffusers(get_peft_model_state_dict(gen.denoiser), tmp_path / "x")


def _absent(backend: str, tmp_path) -> tuple[dict, list[str]]:
    """Settings naming weights that are nowhere, and what the one-line error must say."""
    if backend == "wan":
        tokenizer = str(tmp_path / "no-such-folder")
        return (dict(pretrained="vader-test-absent/wan-main", vae="vader-test-absent/wan-vae", tokenizer=tokenizer),
                ["vader-test-absent/wan-main (text_encoder, transformer)", "vader-test-absent/wan-vae (vae)",
                 "hf download vader-test-absent/wan-main && hf download vader-test-absent/wan-vae",
                 f"tokenizer={tokenizer!r}"])
    return (dict(pretrained="vader-test-absent/cogvideox-main", text_encoder="vader-test-absent/t5"),
            ["vader-test-absent/cogvideox-main (tokenizer, transformer, vae, scheduler)",
             "vader-test-absent/t5 (text_encoder)",
             "hf download vader-test-absent/cogvideox-main && hf download vader-test-absent/t5"])


def test_missing_weights_offline_name_every_repo_in_one_line(case, tmp_path):
    values, needles = _absent(case.name, tmp_path)
    s = case.settings_class(**values)
    with pytest.raises(VaderError) as info:
        case.generator.build(s, "cpu")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert missing_weights(s) == message  # the same check, for a preflight before anything loads


def test_nothing_missing_for_a_complete_folder(case, folder):
    assert missing_weights(case.settings(folder)) is None


def test_folder_lacking_a_part_is_named(case, folder, tmp_path):
    import shutil

    copy = tmp_path / case.name
    shutil.copytree(folder, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(VaderError, match=r"^vae=.*lacks config.json or diffusion_pytorch_model.safetensors"):
        case.generator.build(case.settings(copy), "cpu")


BAD_SETTINGS = [
    ("wan", "num_frames", 10, "num_frames=10 must be 4k + 1"),
    ("wan", "height", 40, "height=40 must be a positive multiple of 16"),
    ("wan", "num_steps", 0, "num_steps=0 must be a positive integer"),
    ("wan", "shift", -1.0, "shift=-1.0 must be a positive number"),
    ("wan", "dtype", "fp64", "dtype='fp64' is not a dtype; expected one of fp32, bf16, fp16"),
    ("cogvideox", "num_frames", 13, "num_frames=13 must be 8k + 1"),
    ("cogvideox", "width", 100, "width=100 must be a positive multiple of 16"),
    ("cogvideox", "guidance_scale", float("nan"), "guidance_scale=nan must be a finite number"),
    ("cogvideox", "vae_dtype", "int8", "vae_dtype='int8' is not a dtype; expected one of fp32, bf16, fp16"),
]


@pytest.mark.parametrize(("case", "key", "value", "needle"), BAD_SETTINGS, indirect=["case"],
                         ids=[f"{b}-{k}-{v}" for b, k, v, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_errors(case, key, value, needle):
    with pytest.raises(VaderError, match=re.escape(needle)):
        case.generator.build(case.settings_class(**{key: value}), "cpu")


def test_registry(case):
    from vader.backends import backend_class, settings_class

    assert backend_class(case.name) is case.generator and settings_class(case.name) is case.settings_class


def test_registry_names_an_unknown_backend():
    from vader.backends import backend_class

    with pytest.raises(VaderError, match=r"'sora2' is not .*wan"):
        backend_class("sora2")


def test_bf16_weights_train_an_fp32_lora_and_stay_near_the_bf16_pipeline(case, folder):
    """The bf16 pipelines keep their latents in bf16 (Wan also guides in bf16); ours keeps the latents and
    the guidance in fp32. Measured max difference: Wan 0.065 (latents up to 4.6), CogVideoX 0.071 (latents
    up to 2.2); the bound is about twice that."""
    from peft import LoraConfig

    from vader.checkpoint import add_lora

    s = case.settings(folder, **case.bf16_overrides)
    gen = case.generator.build(s, "cpu")
    plain = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    reference = case.run_pipeline(case.pipeline_class.from_pretrained(folder, dtype=torch.bfloat16), s, seed=0)
    assert plain.dtype == torch.float32 and (plain - reference.float()).abs().max() < 0.15

    params = add_lora(gen.denoiser, LoraConfig(r=4, lora_alpha=8, target_modules=gen.lora_target_modules))
    assert all(p.dtype == torch.float32 for p in params)
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2)
    gen.decode(latents, case.bf16_frames).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0


def test_text_encoder_is_freed_before_the_transformer_loads(case, folder, monkeypatch):
    import gc

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, case.text_encoder_class) for o in gc.get_objects())

    before = alive()
    seen = []
    original = case.transformer_class.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(alive())
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(case.transformer_class, "from_pretrained", classmethod(spy))
    case.generator.build(case.settings(folder), "cpu", prompts=PROMPTS)
    assert seen == [before]
    case.generator.build(case.settings(folder), "cpu")  # without prompts the encoder is kept for later prompts
    assert seen == [before, before + 1]


def test_full_backprop_gradient_matches_finite_differences(case, folders):
    """The reward's gradient through every sampling step and the partial decode, against a central
    difference along a random LoRA direction. Measured at eps 3e-4: Wan 0.03% apart (the difference's
    O(eps^2) error: 0.17% at 1e-3, 13% at 1e-2), CogVideoX 0.003% (0.3% at 1e-3, 30% at 1e-2)."""
    from vader.rewards import build_reward

    gen = case.generator.build(case.settings(folders(case, case.gradient_variant)), "cpu")
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    reward = build_reward("brightness")

    def brightness(cutoff: int | None) -> torch.Tensor:
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff)
        return reward(gen.decode(latents, case.gradient_frames), PROMPTS).reward.mean()

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
    assert abs(analytic) > case.min_analytic
    assert abs(numeric - analytic) <= 0.01 * abs(analytic)


def test_from_components_samples_what_build_samples(case, folder):
    pipe = case.pipeline(folder)
    s = case.settings(folder)
    wrapped = case.from_components(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, s)
    steps: list[int] = []

    def progress(iterable):
        for i in iterable:
            steps.append(i)
            yield i

    latents = wrapped.sample_latents(PROMPTS, torch.Generator().manual_seed(0), progress=progress)
    assert steps == [0, 1, 2]
    built = case.generator.build(s, "cpu").sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, built, atol=0, rtol=0)


@pytest.mark.parametrize(("backend", "present", "absent"), [("wan", "AutoencoderKLWan", "WanNoSuchModel"),
                                                            ("cogvideox", "AutoencoderKLCogVideoX", "CogNoSuchModel")])
def test_a_diffusers_without_the_classes_is_named(backend, present, absent):
    pytest.importorskip("diffusers")
    from vader.backends.common import require_diffusers

    with pytest.raises(VaderError, match=rf"^model.type='{backend}' needs {absent} from diffusers, which diffusers "):
        require_diffusers(backend, present, absent)


def test_meta_models_describe_the_checkpoint_without_weights(case, folder):
    meta = case.module.meta_models(case.settings(folder))
    gen = case.generator.build(case.settings(folder), "cpu")
    for name, loaded in (("transformer", gen.denoiser), ("vae", gen.vae)):
        shapes = {k: tuple(v.shape) for k, v in meta[name].state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
        assert all(p.is_meta for p in meta[name].parameters())
    assert meta["text_encoder"].config.d_model == 32

    # not on this machine: the published architecture (Wan2.1-T2V-1.3B, CogVideoX-2b; parameter counts as published)
    full = case.module.meta_models(case.settings_class())
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in full.items()}
    assert round(counts["transformer"] / 1e9, 2) == case.published["transformer"]
    assert round(counts["vae"] / 1e6) == case.published["vae"]
    assert round(counts["text_encoder"] / 1e9, 2) == case.published["text_encoder"]
    suffixes = tuple(f".{name}" for name in case.generator.lora_target_modules)
    targets = [n for n, _ in full["transformer"].named_modules() if n.endswith(suffixes)]
    assert len(targets) == case.published_lora_targets

    absent = f"vader-test-absent/{case.name}"
    with pytest.raises(VaderError, match=rf"^transformer='{absent}': its transformer/config.json"):
        case.module.meta_models(case.settings_class(pretrained=absent))


FAKE_STEPS = [("wan", {}), ("cogvideox", {"use_dynamic_cfg": False}), ("cogvideox", {"use_dynamic_cfg": True})]


@pytest.mark.parametrize(("case", "extra"), FAKE_STEPS, indirect=["case"],
                         ids=["wan", "cogvideox-cfg", "cogvideox-dynamic-cfg"])
def test_training_step_runs_on_fake_tensors(case, folders, extra):
    """`vader plan` runs the step under FakeTensorMode on meta-built models: no value may be read."""
    from peft import LoraConfig, inject_adapter_in_model

    from vader.memory import fake_mode, materialise

    folder = folders(case, case.fake_variant)
    s = case.settings(folder, **case.bf16_overrides, **extra)
    models = case.module.meta_models(s)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=case.generator.lora_target_modules), models["transformer"])
    scheduler = case.scheduler(folder)
    with fake_mode():
        transformer = materialise(models["transformer"], torch.bfloat16, trainable="lora_")
        vae = materialise(models["vae"], case.fake_vae_dtype)
        gen = case.from_components(transformer, vae, None, None, scheduler, s)
        for prompt in (PROMPTS[0], NEGATIVE):
            gen.embeddings[prompt] = torch.zeros(1, 16, 32, dtype=torch.bfloat16)
        video = gen.decode(gen.sample_latents(PROMPTS[:1], torch.Generator().manual_seed(0), cutoff=2),
                           case.fake_frames)
        video.mean().backward()
        assert video.shape == (1, 3, 2, case.fake_side, case.fake_side)
        lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
        assert lora and all(p.requires_grad and p.grad is not None for p in lora)


def test_short_vader_run_raises_the_reward(case, folders):
    """A few steps of the training loop's recipe (backprop_mode 'last', decode_frame 'fml', LoRA, AdamW)
    on the backend surface alone, scored on a held-out seed. Measured brightness: Wan (20 steps, the
    'fml' frames; with the base_dim 3 VAE brightness barely depends on the latents) 0.446 -> 0.469,
    CogVideoX (10 steps, the whole video) 0.526 -> 0.587."""
    import random

    from peft import LoraConfig

    from vader.checkpoint import add_lora
    from vader.frames import select_frames
    from vader.methods.vader import backprop_cutoff
    from vader.rewards import build_reward

    s = case.settings(folders(case, case.gradient_variant))
    gen = case.generator.build(s, "cpu")
    params = add_lora(gen.denoiser, LoraConfig(r=4, lora_alpha=4, target_modules=gen.lora_target_modules))
    reward = build_reward("brightness")
    optimizer = torch.optim.AdamW(params, lr=case.run_lr)
    frames = select_frames("fml", gen.num_frames, random.Random(0))

    @torch.no_grad()
    def held_out() -> float:
        if case.run_scores_frames:
            video = gen.decode(gen.sample_latents(PROMPTS, torch.Generator().manual_seed(100)), frames)
        else:
            video = gen.generate(PROMPTS, torch.Generator().manual_seed(100))
        return reward(video, PROMPTS).reward.mean().item()

    before = held_out()
    for step in range(case.run_steps):
        rng = random.Random(step)
        cutoff = backprop_cutoff("last", s.num_steps, rng)
        latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(step), cutoff=cutoff)
        out = reward(gen.decode(latents, select_frames("fml", gen.num_frames, rng)), PROMPTS)
        optimizer.zero_grad()
        out.loss.mean().backward()
        optimizer.step()
    assert held_out() - before > case.run_gain
