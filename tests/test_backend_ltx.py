"""The LTX-Video backend (model.type 'ltx') against diffusers' LTXPipeline on tiny random components
saved in the published layout (tests/ltx_tiny.py), and the tool end to end on them: `vader config`,
`inspect`, `plan`, `train` (VADER and GRPO), `eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "LTXPipeline"):
    pytest.skip(f"diffusers {diffusers.__version__} has no LTXPipeline", allow_module_level=True)

from backend_tiny import NEGATIVE, PROMPTS, add_random_lora, load_pipeline  # noqa: E402
from ltx_tiny import FRAMES, SIZE, ltx_config_text, save_tiny_ltx  # noqa: E402

from vader.backends.base import FlowSampler, VideoBackend  # noqa: E402
from vader.backends.ltx import LTXGenerator, LTXSettings  # noqa: E402
from vader.cli import main  # noqa: E402
from vader.config import load_config  # noqa: E402
from vader.errors import VaderError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("ltx-*/vader_*.py"))
LATENTS = (8, 3, 2, 2)  # 64 x 64 x 17 frames through the 32x / 8x VAE
# Measured max |ours - LTXPipeline| on these components: 0.0 for the latents and the decoded video in every
# case below (the same fp32 operations in the same order).
TOL = 1e-6
VARIANTS = {"default": {}, "causal": dict(decoder_causal=True), "timestep": dict(timestep_conditioning=True)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx")
    return {name: save_tiny_ltx(root / f"tiny-{name}", **variant) for name, variant in VARIANTS.items()}


def settings(folder: Path, **overrides) -> LTXSettings:
    values = dict(pretrained=str(folder), dtype="fp32", vae_dtype="fp32", height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_steps=3, guidance_scale=3.0, negative_prompt=NEGATIVE,
                  max_sequence_length=16)
    return LTXSettings(**{**values, **overrides})


def run_pipeline(pipe, s: LTXSettings, prompts: list[str], seed: int, output_type: str = "latent") -> torch.Tensor:
    """LTXPipeline's latents (unpacked to [B, C, T, H, W]) or video ([B, 3, F, H, W] in [0, 1])."""
    negative = [s.negative_prompt] * len(prompts) if s.guidance_scale > 1 else None
    out = pipe(prompt=prompts, negative_prompt=negative, height=s.height, width=s.width, num_frames=s.num_frames,
               num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale,
               max_sequence_length=s.max_sequence_length, generator=torch.Generator().manual_seed(seed),
               decode_timestep=s.decode_timestep, decode_noise_scale=0.0, output_type=output_type).frames
    if output_type == "latent":
        return diffusers.LTXPipeline._unpack_latents(out, *LATENTS[1:])
    return out.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize(("variant", "overrides", "prompts"), [
    ("default", {}, PROMPTS),
    # short prompts and a longer text: padding, so the attention mask matters
    ("default", dict(guidance_scale=1.0, max_sequence_length=32), ["a cat", "sea"]),
    ("timestep", dict(decode_timestep=0.05, decode_noise_scale=0.0), ["a cat", "sea"]),
], ids=["cfg", "no-cfg-masked", "timestep-conditioned-vae"])
def test_latents_and_video_equal_the_pipeline(folders, variant, overrides, prompts):
    s = settings(folders[variant], **overrides)
    gen = LTXGenerator.build(s, "cpu")
    assert isinstance(gen, VideoBackend) and isinstance(gen, FlowSampler)
    latents = gen.sample_latents(prompts, torch.Generator().manual_seed(0))
    assert latents.grad_fn is None and latents.shape == (2, *gen.latent_shape) == (2, *LATENTS)
    pipe = load_pipeline(diffusers.LTXPipeline, folders[variant])
    reference = run_pipeline(pipe, s, prompts, seed=0)
    torch.testing.assert_close(latents, reference, atol=TOL, rtol=0)
    assert (run_pipeline(pipe, s, prompts, seed=1) - reference).abs().max() > 0.1  # another seed differs
    if "max_sequence_length" in overrides:
        assert not gen.masks["a cat"].all()  # padded: the mask is what the transformer must see

    video = gen.decode(latents)
    assert video.shape == (2, 3, FRAMES, SIZE, SIZE)
    torch.testing.assert_close((video + 1) / 2, run_pipeline(pipe, s, prompts, 0, "pt"), atol=TOL, rtol=0)
    torch.testing.assert_close(gen.generate(prompts, torch.Generator().manual_seed(0)), video, atol=0, rtol=0)


def test_bf16_latents_equal_the_bf16_pipeline(folders):
    """LTXPipeline keeps its latents in fp32 between steps, as vader does: with bf16 weights the latents are
    the same (measured 0.0; before the packed tokens were made contiguous: 0.029). The video differs only by
    the pipeline rounding its [0, 1] output to bf16 (half a bf16 step near 1: 2^-9)."""
    s = settings(folders["default"], dtype="bf16", vae_dtype="bf16")
    g = LTXGenerator.build(s, "cpu")
    latents = g.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    pipe = diffusers.LTXPipeline.from_pretrained(folders["default"], dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(latents, run_pipeline(pipe, s, PROMPTS, 0).float(), atol=0, rtol=0)
    pixels = run_pipeline(pipe, s, PROMPTS, 0, "pt").float()
    torch.testing.assert_close((g.decode(latents) + 1) / 2, pixels, atol=2.0**-9, rtol=0)


@pytest.fixture(scope="module")
def gen(folders) -> LTXGenerator:
    """The default tiny generator with a random LoRA (non-zero B)."""
    g = LTXGenerator.build(settings(folders["default"]), "cpu")
    add_random_lora(g.denoiser, g.lora_target_modules)
    return g


def lora_grad(g: LTXGenerator) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in g.denoiser.named_parameters() if "lora_" in n])


def test_gradients_only_through_steps_from_the_cutoff(gen):
    lora = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    assert lora and all("attn1" in n or "attn2" in n for n, p in gen.denoiser.named_parameters() if "lora_" in n)
    modes: list[bool] = []
    handle = gen.denoiser.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        plain = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
        assert plain.grad_fn is None and modes == [False] * 3  # one pass per step on [negative, prompt]
        grads = {}
        for cutoff in (2, 0):
            modes.clear()
            latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff)
            assert modes == [False] * cutoff + [True] * (3 - cutoff)
            torch.testing.assert_close(latents.detach(), plain, atol=0, rtol=0)
            for p in lora:
                p.grad = None
            latents.square().mean().backward()
            grads[cutoff] = lora_grad(gen)
            assert grads[cutoff].abs().max() > 0
        assert (grads[0] - grads[2]).abs().max() > 1e-6  # earlier steps add their own contribution
        checkpointed = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=2, grad_checkpoint=True)
        for p in lora:
            p.grad = None
        checkpointed.square().mean().backward()
        torch.testing.assert_close(lora_grad(gen), grads[2])
    finally:
        handle.remove()
        for p in lora:
            p.grad = None


def test_flow_steps_equal_the_sampler(gen):
    """flow_start + flow_velocity's Euler steps (vader's sign convention) give sample_latents' latents."""
    with torch.no_grad():
        state = gen.flow_start(PROMPTS, torch.Generator().manual_seed(0))
        z = state.noise
        for i in range(len(state.timesteps)):
            z = z + gen.flow_velocity(state, z, i) * (state.timesteps[i] - state.next_t(i))[:, None, None, None, None] \
                / state.num_timesteps
    torch.testing.assert_close(z, gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("variant", "frames"), [("default", [0]), ("default", [4, 16]), ("causal", [0]),
                                                 ("causal", [3, 8]), ("causal", [9])])
def test_partial_decode_equals_full_decode_and_passes_gradients(folders, variant, frames):
    g = LTXGenerator.build(settings(folders[variant]), "cpu")
    latents = g.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    full, part = latents.clone().requires_grad_(True), latents.clone().requires_grad_(True)
    video = g.decode(full)
    chosen = g.decode(part, frames, grad_checkpoint=True)
    # measured: 0.0 cut from the whole decode; up to 1.8e-6 for a causal prefix (the convolutions of a shorter
    # video sum in another order)
    torch.testing.assert_close(chosen, video[:, :, frames], atol=1e-5 if variant == "causal" else 0.0, rtol=0)
    weights = torch.randn(chosen.shape, generator=torch.Generator().manual_seed(3))
    (chosen * weights).sum().backward()
    (video[:, :, frames] * weights).sum().backward()
    torch.testing.assert_close(part.grad, full.grad, atol=1e-5, rtol=1e-4)
    last = -(-max(frames) // 8)  # frame 0 <- latent 0, frames 1-8 <- latent 1, 9-16 <- latent 2
    assert part.grad[:, :, last].abs().max() > 0
    if variant == "causal":  # only the latent prefix was decoded
        assert g.latent_frames_for(frames) == last + 1 and not part.grad[:, :, last + 1:].any()
    else:  # the non-causal decoder: a frame depends on later latent frames too, so a prefix would not be exact
        assert g.latent_frames_for(frames) is None
        if last < 2:
            assert part.grad[:, :, last + 1:].abs().max() > 0
        prefix = g.vae.decode(latents[:, :, :2].detach() * g.vae.latents_std.view(1, -1, 1, 1, 1)
                              + g.vae.latents_mean.view(1, -1, 1, 1, 1), return_dict=False)[0].clamp(-1, 1)
        assert (prefix[:, :, 0] - video[:, :, 0].detach()).abs().max() > 1e-4


def test_lora_saved_in_diffusers_format_loads_into_the_pipeline(gen, folders, tmp_path):
    from safetensors.torch import load_file

    ours = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    saved = gen.save_lora_diffusers(gen.denoiser, tmp_path / "lora")
    assert all(k.startswith("transformer.transformer_blocks.")
               for k in load_file(str(saved / "pytorch_lora_weights.safetensors")))
    pipe = load_pipeline(diffusers.LTXPipeline, folders["default"])
    base = run_pipeline(pipe, gen.settings, PROMPTS, 0)
    pipe.load_lora_weights(saved)
    with_lora = run_pipeline(pipe, gen.settings, PROMPTS, 0)
    assert (with_lora - base).abs().max() > 0.05
    torch.testing.assert_close(with_lora, ours, atol=1e-6, rtol=0)  # measured: 0.0


def test_prompts_encoded_once_through_the_cache_then_encoder_released(folders):
    from vader.models.text import EmbeddingCache

    cache = EmbeddingCache()
    g = LTXGenerator.build(settings(folders["default"]), "cpu", prompts=PROMPTS, cache=cache)
    assert g.text_encoder is None and set(g.embeddings) == set(g.masks) == {*PROMPTS, NEGATIVE}
    assert cache.misses == 3 and g.embeddings[PROMPTS[0]].shape == (1, 16, 32) and g.masks[NEGATIVE].shape == (1, 16)
    with pytest.raises(RuntimeError, match="already released"):
        g.sample_latents(["a prompt never encoded"], torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("overrides", "needle"), [
    (dict(num_frames=16), "num_frames=16 must be 8k + 1"),
    (dict(height=48), "height=48 must be a positive multiple of 32"),
    (dict(solver="unipc"), "scheduler.solver='unipc' is not valid; choose one of: differentiable, published"),
    (dict(decode_timestep=0.05, decode_noise_scale=None), "decode_noise_scale=0.05"),
])
def test_bad_settings_are_one_line_errors(overrides, needle):
    with pytest.raises(VaderError) as info:
        settings(Path("unused"), **overrides).validate()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_an_ltx_condition_pipeline_checkpoint_is_refused_before_loading(folders, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(folders["default"], tmp_path / "condition")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTXConditionPipeline"}))
    with pytest.raises(VaderError, match="_class_name='LTXConditionPipeline'; model.type='ltx' samples LTXPipeline"):
        LTXGenerator.build(settings(copy), "cpu")
    path = tmp_path / "ltx.py"
    path.write_text(ltx_config_text(copy, project_dir=str(tmp_path / "runs")))
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LTXConditionPipeline (0.9.5+, 13B) is not supported" in err


def test_missing_weights_offline_named_in_one_line(tmp_path):
    from vader.backends.common import missing_weights

    s = LTXSettings(pretrained="vader-test-absent/ltx")
    with pytest.raises(VaderError) as info:
        LTXGenerator.build(s, "cpu")
    message = str(info.value)
    assert "\n" not in message and "vader-test-absent/ltx (tokenizer, text_encoder, transformer, vae, scheduler)" \
        in message and "hf download vader-test-absent/ltx" in message
    assert missing_weights(s) == message


# ---- the tool ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_validate_and_inspect_the_published_model_offline(path, capsys):
    assert main(["config", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == {**out["model"], "type": "ltx", "from_pretrained": "Lightricks/LTX-Video"}
    assert out["resolved"]["latent_shape_CTHW"] == [128, (out["num_frames"] - 1) // 8 + 1, 480 // 32, 704 // 32]
    assert main(["inspect", str(path), "--part", "denoiser"]) == 0
    listing = capsys.readouterr().out
    total = int(listing.split("total: ")[1].split(" parameters")[0].replace(",", ""))
    assert 1.85e9 < total < 1.95e9 and "to_out.0" in listing  # LTX-Video 2B: 1.92B parameters


def test_inspect_keys_equal_the_saved_checkpoint(folders, tmp_path, capsys):
    from safetensors import safe_open

    path = tmp_path / "ltx.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(tmp_path / "runs")))
    for part, sub in (("denoiser", "transformer"), ("vae", "vae")):
        assert main(["inspect", str(path), "--part", part, "--keys"]) == 0
        listing = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
        with safe_open(str(next((folders["default"] / sub).glob("*.safetensors"))), "pt") as f:
            saved = {k: ",".join(str(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}
        assert listing == saved, part


def test_plan_of_the_shipped_config_runs_offline_and_is_within_10_percent_of_the_real_step(folders, tmp_path, capsys):
    """The shipped training config planned on the tiny folder (the published size takes ~30 s of fake
    tensors here: 14.48 GiB, see the README), then the plan against vader.train's real step."""
    from vader.plan import make_plan, measure_real_step

    shipped = REPO / "configs" / "ltx-video-2b" / "vader_train.py"
    tiny = ["--model.from_pretrained", str(folders["default"]), "--image_size", f"({SIZE}, {SIZE})",
            "--num_frames", str(FRAMES), "--text_encoder.model_max_length", "16", "--reward_fn", "brightness",
            "--scheduler.num_sampling_steps", "3"]
    assert main(["plan", str(shipped), *tiny]) == 0
    assert "peak" in capsys.readouterr().out
    path = tmp_path / "ltx.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(tmp_path / "runs")))
    cfg = load_config(path)
    planned, real = make_plan(cfg).train, measure_real_step(cfg)
    assert abs(planned.peak - real.peak) <= 0.10 * real.peak, (planned.peak, real.peak)


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """`vader train` for 2 steps on the tiny folder (checkpoint at 2)."""
    work = tmp_path_factory.mktemp("ltx-runs")
    path = work / "ltx.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(work / "runs"), run_name="full",
                                    max_train_steps=2, checkpointing_steps=2, is_sample_preview=False))
    assert main(["train", str(path)]) == 0
    return work, path, work / "runs" / "full"


def test_train_writes_a_lora_the_pipeline_loads(trained, folders):
    from safetensors.torch import load_file

    _, _, run = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    ours = load_file(str(run / "lora" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)  # trained (peft starts B at 0)
    pipe = load_pipeline(diffusers.LTXPipeline, folders["default"])
    pipe.load_lora_weights(run / "lora" / "diffusers")
    (adapter,) = pipe.get_active_adapters()
    loaded = dict(pipe.transformer.named_parameters())
    for key, value in ours.items():  # the pipeline holds exactly the trained tensors
        assert torch.equal(loaded[key.removeprefix("base_model.model.").replace(".weight", f".{adapter}.weight")],
                           value), key


def test_eval_compares_base_and_lora(trained, capsys):
    work, path, run = trained
    argv = ["eval", str(path), "--lora", str(run / "lora"), "--seeds", "1", "--rewards", "brightness",
            "--project_dir", str(work / "eval"), "--run_name", "ev"]
    assert main(argv) == 0
    data = json.loads((work / "eval" / "eval" / "ev" / "eval.json").read_text())
    assert data["rewards"]["brightness"]["n"] == 2 and "win rate" in capsys.readouterr().out


def test_grpo_trains_one_step(folders, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "grpo.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(tmp_path / "runs"), run_name="grpo",
                                    method="grpo", grpo={"group_size": 2}, max_train_steps=1, train_batch_size=1,
                                    checkpointing_steps=0, is_sample_preview=False))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "grpo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1] and all("clip_fraction" in r for r in rows if "loss" in r)
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "lora" / "adapter_model.safetensors")).values())


def test_image_to_video_equals_ltx_image_to_video_pipeline(folders):
    """set_images (first frames keyed by prompt): the latents and video of LTXImageToVideoPipeline."""
    from PIL import Image

    from vader.backends import backend_module

    assert backend_module("ltx").image_input(None) == "optional"  # the same checkpoint samples both
    rng = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(48, 40, 3, generator=rng) * 255).byte().numpy()) for _ in PROMPTS]
    s = settings(folders["default"])
    g = LTXGenerator.build(s, "cpu")
    g.set_images(dict(zip(PROMPTS, images, strict=True)))
    latents = g.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    video = g.decode(latents)
    pipe = diffusers.LTXImageToVideoPipeline(**load_pipeline(diffusers.LTXPipeline, folders["default"]).components)
    pipe.set_progress_bar_config(disable=True)
    common = dict(image=images, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_inference_steps=3, guidance_scale=3.0, max_sequence_length=16)
    reference = pipe(**common, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    # measured: 0.0 for the latents and the video
    torch.testing.assert_close(latents, diffusers.LTXPipeline._unpack_latents(reference, *LATENTS[1:]), atol=TOL, rtol=0)
    pixels = pipe(**common, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    torch.testing.assert_close((video + 1) / 2, pixels.permute(0, 2, 1, 3, 4), atol=TOL, rtol=0)
    with pytest.raises(VaderError, match="has no first-frame image but others in its batch do"):
        g.sample_latents([PROMPTS[0], "a prompt without an image"], torch.Generator().manual_seed(0))
    with pytest.raises(VaderError, match="method='grpo' with first-frame images"):
        g.flow_start(PROMPTS, torch.Generator().manual_seed(0))


def test_infer_with_first_frame_images_from_a_prompts_file(folders, tmp_path, monkeypatch):
    """prompt<TAB>image lines reach the generator (`set_images`) through `vader infer`."""
    from PIL import Image

    given: list[str] = []
    set_images = LTXGenerator.set_images
    monkeypatch.setattr(LTXGenerator, "set_images", lambda gen, images: (given.extend(images), set_images(gen, images)))

    lines = []
    for i, prompt in enumerate(PROMPTS):
        Image.new("RGB", (SIZE, SIZE), (200 * i, 40, 90)).save(tmp_path / f"first{i}.png")
        lines.append(f"{prompt}\tfirst{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    path = tmp_path / "infer.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(tmp_path / "runs"), run_name="i2v",
                                    is_vader_training=False, prompt=None, prompt_path=str(tmp_path / "prompts.txt")))
    assert main(["infer", str(path)]) == 0
    assert len(list((tmp_path / "runs").rglob("*.mp4"))) == 2 and sorted(given) == sorted(PROMPTS)


def test_settings_from_config_maps_every_key(folders, tmp_path):
    from vader.backends import settings_from_config

    path = tmp_path / "ltx.py"
    path.write_text(ltx_config_text(folders["default"], project_dir=str(tmp_path / "runs")))
    cfg = load_config(path, ["--image_size", "(96, 128)", "--num_frames", "25", "--scheduler.num_sampling_steps", "7",
                             "--scheduler.cfg_scale", "4.5", "--negative_prompt", "dull", "--dtype", "bf16",
                             "--text_encoder.model_max_length", "24", "--scheduler.solver", "published"])
    assert settings_from_config(cfg) == LTXSettings(
        pretrained=str(folders["default"]), dtype="bf16", vae_dtype="bf16", height=96, width=128, num_frames=25,
        num_steps=7, guidance_scale=4.5, negative_prompt="dull", max_sequence_length=24, solver="published")
    with pytest.raises(VaderError, match=r"num_frames=.*must be 8k \+ 1"):
        load_config(path, ["--num_frames", "13"])
