"""Wan2.1-T2V-14B and Wan2.2-T2V-A14B: the two experts sampled as WanPipeline samples them, the LoRA on the
low-noise expert (and loadable into WanPipeline's), the checkpoint layouts the backend refuses before any
weight loads, and the published 14B architectures described from the meta device (no weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from backend_tiny import NEGATIVE, PROMPTS, add_random_lora, save_tiny_wan, tiny_config_text

from vader.errors import VaderError

pytest.importorskip("diffusers")

SHIFT = 3.0
STEPS = 6  # with shift 3 the timesteps are 1000, 923, 819, 668, 432, 9: the first two are the high-noise expert's
HIGH_STEPS = 2
SIZE = dict(dtype="fp32", vae_dtype="fp32", height=32, width=32, num_frames=9, num_steps=STEPS, guidance_scale=6.0,
            negative_prompt=NEGATIVE, shift=SHIFT, max_sequence_length=16)
REPO = Path(__file__).resolve().parents[1]


def tiny_transformer(seed: int, **overrides):
    """diffusers' own Wan test transformer (backend_tiny's), drawn from its own seed."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                  text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanTransformer3DModel(**{**config, **overrides})


def save_two_experts(folder: Path, boundary_ratio: float = 0.875) -> Path:
    """A tiny Wan2.2-A14B layout: backend_tiny's tokenizer, UMT5 and VAE with two transformers of different
    seeds, `transformer` (high noise) and `transformer_2` (low noise), saved by WanPipeline itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    one = WanPipeline.from_pretrained(save_tiny_wan(folder.parent / f"{folder.name}-parts", vae_base_dim=16))
    pipe = WanPipeline(tokenizer=one.tokenizer, text_encoder=one.text_encoder, vae=one.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=tiny_transformer(1),
                       transformer_2=tiny_transformer(2), boundary_ratio=boundary_ratio)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return save_two_experts(tmp_path_factory.mktemp("wan-a14b") / "tiny-a14b")


@pytest.fixture(scope="module")
def one(two) -> Path:
    return two.parent / f"{two.name}-parts"  # the one-transformer folder the experts' parts came from


def settings(folder, **overrides):
    from vader.backends.wan import WanSettings

    return WanSettings(pretrained=str(folder), **{**SIZE, **overrides})


def build(folder, **overrides):
    from vader.backends.wan import WanGenerator

    return WanGenerator.build(settings(folder, **overrides), "cpu")


def pipeline_latents(pipe, guidance_2: float | None = None, seed: int = 0) -> torch.Tensor:
    return pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, height=32, width=32, num_frames=9,
                num_inference_steps=STEPS, guidance_scale=6.0, guidance_scale_2=guidance_2, max_sequence_length=16,
                generator=torch.Generator().manual_seed(seed), output_type="latent").frames


def load_pipeline(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_2", [None, 2.0], ids=["cfg_scale_2-None", "cfg_scale_2-2.0"])
def test_two_experts_sample_as_the_pipeline(two, guidance_2):
    """Measured max |ours - WanPipeline| (fp32): 0.0 with either guidance of the low-noise expert. Before
    the backend read model_index.json it sampled every step with `transformer/` alone: 2.77."""
    gen = build(two, guidance_scale_2=guidance_2)
    calls: dict[str, int] = {"transformer": 0, "transformer_2": 0}
    for name, model in (("transformer", gen.other_denoiser), ("transformer_2", gen.denoiser)):
        model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    latents = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    assert calls == {"transformer": 2 * HIGH_STEPS, "transformer_2": 2 * (STEPS - HIGH_STEPS)}  # cond + uncond
    reference = pipeline_latents(load_pipeline(two), guidance_2)
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=0)
    if guidance_2 is not None:  # the key changes what is sampled
        assert (pipeline_latents(load_pipeline(two), None) - reference).abs().max() > 0.05


def test_the_trained_expert_is_transformer_2_and_both_are_adopted(two):
    from safetensors.torch import load_file

    gen = build(two)
    assert gen.boundary_ratio == 0.875 and gen.denoisers == (gen.denoiser, gen.other_denoiser)
    for model, sub in ((gen.denoiser, "transformer_2"), (gen.other_denoiser, "transformer")):
        saved = load_file(str(two / sub / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(p.device == gen.device for p in model.parameters())
    one_gen = build(two.parent / f"{two.name}-parts")
    assert one_gen.denoisers == (one_gen.denoiser,) and one_gen.other_denoiser is None


def test_flow_steps_use_each_steps_expert(two):
    """flow_velocity (GRPO's sampler) steps through the same experts: its Euler steps equal sample_latents."""
    gen = build(two)
    state = gen.flow_start(PROMPTS, torch.Generator().manual_seed(0))
    z = state.noise
    for i in range(STEPS):
        z = z + gen.flow_velocity(state, z, i) * (state.timesteps[i] - state.next_t(i))[:, None, None, None, None] / 1000
    torch.testing.assert_close(z, gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0)), atol=1e-5, rtol=0)


def test_gradients_only_through_the_trained_experts_steps(two):
    """The high-noise steps run without a graph even inside the backprop window: they precede every
    low-noise step and carry no LoRA, so a window from step 0 gives the gradient of one from the first
    low-noise step, bit for bit."""
    gen = build(two)
    add_random_lora(gen.denoiser, gen.lora_target_modules)
    params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    modes: dict[str, list[bool]] = {"transformer": [], "transformer_2": []}
    for name, model in (("transformer", gen.other_denoiser), ("transformer_2", gen.denoiser)):
        model.register_forward_hook(lambda *_, name=name: modes[name].append(torch.is_grad_enabled()))
    grads = []
    for cutoff in (0, HIGH_STEPS):
        for p in params:
            p.grad = None
        gen.decode(gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0), cutoff=cutoff), [0, 4]).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert modes["transformer"] == [False] * (4 * HIGH_STEPS) and all(modes["transformer_2"])
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])


# ---- the LoRA ---------------------------------------------------------------------------------------------


def test_lora_file_loads_into_the_pipelines_low_noise_expert(two, tmp_path):
    """Measured max |ours with the LoRA - WanPipeline with load_lora_weights(load_into_transformer_2=True)|:
    0.0; loaded into the high-noise expert instead (the default) it differs by far more."""
    gen = build(two)
    config = add_random_lora(gen.denoiser, gen.lora_target_modules)
    ours = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))
    saved = gen.save_lora_diffusers(gen.denoiser, tmp_path / "lora", config=config)

    pipe = load_pipeline(two)
    base = pipeline_latents(pipe)
    pipe.load_lora_weights(saved, load_into_transformer_2=True)
    with_lora = pipeline_latents(pipe)
    assert (with_lora - base).abs().max() > 0.05  # the LoRA changes the output
    torch.testing.assert_close(with_lora, ours, atol=1e-4, rtol=0)

    wrong = load_pipeline(two)
    wrong.load_lora_weights(saved)  # diffusers' default: into `transformer`, the high-noise expert
    assert (pipeline_latents(wrong) - ours).abs().max() > 0.05


# ---- memory plan and training step ------------------------------------------------------------------------


def test_plan_of_two_experts_is_within_10_percent_of_the_real_step(two, tmp_path):
    """`vader plan` builds both experts (the LoRA on transformer_2) on fake tensors; vader.train's real step
    on the tiny folder: the peaks agree as the one-transformer backends' do (test_plan)."""
    from vader.config import load_config
    from vader.plan import make_plan, measure_real_step

    path = tmp_path / "a14b.py"
    path.write_text(tiny_config_text("wan", two, project_dir=str(tmp_path / "runs"),
                                     scheduler=dict(num_sampling_steps=STEPS, cfg_scale=6.0, shift=SHIFT)))
    cfg = load_config(path)
    planned = make_plan(cfg).train
    real = measure_real_step(cfg)
    assert abs(planned.peak - real.peak) <= 0.10 * real.peak, (planned.peak, real.peak)


# ---- what the backend refuses, before any weight loads --------------------------------------------------


def _weightless_copy(folder: Path, dest: Path) -> Path:
    """The folder's configs without any weights: a refusal must come before the missing weights are noticed."""
    shutil.copytree(folder, dest)
    for weights in dest.rglob("*.safetensors"):
        weights.unlink()
    return dest


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _i2v_transformer(folder: Path) -> None:
    # diffusers' WanImageToVideoPipeline test transformer: image cross-attention and 36 input channels
    tiny_transformer(3, image_dim=4, added_kv_proj_dim=24, in_channels=36).save_pretrained(folder / "transformer")


REFUSALS = [
    ("i2v-pipeline-t2v-transformer", "one",
     lambda f: _edit_json(f / "model_index.json", _class_name="WanImageToVideoPipeline"),
     r"^transformer='.*': its config.json has in_channels=16 = out_channels, a text-to-video transformer, but the "
     r"checkpoint is a WanImageToVideoPipeline"),
    ("vace-pipeline", "one", lambda f: _edit_json(f / "model_index.json", _class_name="WanVACEPipeline"),
     r"model_index.json has _class_name='WanVACEPipeline' \(VACE"),
    ("animate-pipeline", "one", lambda f: _edit_json(f / "model_index.json", _class_name="WanAnimatePipeline"),
     r"model_index.json has _class_name='WanAnimatePipeline' \(Wan-Animate"),
    ("t2v-pipeline-image-encoder", "one", lambda f: _edit_json(f / "model_index.json",
                                                               image_encoder=["transformers", "CLIPVisionModel"],
                                                               image_processor=["transformers", "CLIPImageProcessor"]),
     r"model_index.json has image_encoder=\['transformers', 'CLIPVisionModel'\], which WanPipeline sampling"),
    ("ti2v-two-experts", "two", lambda f: _edit_json(f / "model_index.json", expand_timesteps=True),
     r"model_index.json has expand_timesteps=true with transformer_2; per-token timesteps are Wan2.2-TI2V-5B's"),
    ("flf2v-transformer", "one",
     lambda f: tiny_transformer(3, image_dim=4, pos_embed_seq_len=2 * 17).save_pretrained(f / "transformer"),
     r"^transformer='.*': its config.json has pos_embed_seq_len=34 \(Wan2.1-FLF2V"),
    ("transformer_2-without-boundary", "two", lambda f: _edit_json(f / "model_index.json", boundary_ratio=None),
     r"model_index.json has transformer_2 but boundary_ratio=None"),
    ("boundary-without-transformer_2", "one", lambda f: _edit_json(f / "model_index.json", boundary_ratio=0.875),
     r"model_index.json has boundary_ratio=0.875 but no transformer_2"),
    ("boundary-out-of-range", "two", lambda f: _edit_json(f / "model_index.json", boundary_ratio=1.5),
     r"model_index.json has boundary_ratio=1.5; it must be a number in \(0, 1\)"),
    ("image-conditioned-transformer", "one", _i2v_transformer,
     r"^transformer='.*': its config.json has image_dim=4 \(CLIP image tokens: an image-to-video transformer\) "
     r"but the checkpoint's model_index.json names no image_encoder"),
    ("in-channels-not-out-channels", "one",
     lambda f: tiny_transformer(3, in_channels=20).save_pretrained(f / "transformer"),
     r"in_channels=20 and out_channels=16 .*needs in_channels == out_channels"),
    ("experts-of-different-shapes", "two",
     lambda f: tiny_transformer(3, text_dim=24).save_pretrained(f / "transformer_2"),
     r"^transformer_2='.*': its config.json has text_dim=24 but transformer's has text_dim=32"),
    ("vae-of-another-width", "one",
     lambda f: tiny_transformer(3, in_channels=8, out_channels=8).save_pretrained(f / "transformer"),
     r"^vae='.*': its config.json has z_dim=16 but the transformer takes in_channels=8"),
]


@pytest.mark.parametrize(("source", "edit", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_layouts_the_backend_cannot_sample_are_refused_before_the_weights(one, two, tmp_path, source, edit, message):
    folder = _weightless_copy({"one": one, "two": two}[source], tmp_path / "ckpt")
    edit(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()  # an edit may have saved some: none may load
    with pytest.raises(VaderError, match=message) as info:
        build(folder)
    assert "\n" not in str(info.value)
    # the same line from config validation (`vader config`, `vader train`) while nothing is loaded
    from vader.config import load_config

    path = tmp_path / "cfg.py"
    path.write_text(tiny_config_text("wan", folder, project_dir=str(tmp_path / "runs")))
    with pytest.raises(VaderError, match=message):
        load_config(path)


def test_keys_a_two_expert_model_does_not_take_are_refused(one, two, tmp_path):
    from vader.config import load_config

    def config(folder, **keys) -> Path:
        path = tmp_path / "cfg.py"
        path.write_text(tiny_config_text("wan", folder, project_dir=str(tmp_path / "runs"), **keys))
        return path

    scheduler = dict(num_sampling_steps=3, cfg_scale=6.0, shift=SHIFT, cfg_scale_2=3.0)
    with pytest.raises(VaderError, match=r"^scheduler.cfg_scale_2=3.0 \(guidance_scale_2\) is the guidance of Wan2.2's "
                                         r"low-noise expert; pretrained='.*' has one transformer"):
        load_config(config(one, scheduler=scheduler))
    with pytest.raises(VaderError, match=r"scheduler.cfg_scale_2=3.0 \(guidance_scale_2\) is the guidance"):
        build(one, guidance_scale_2=3.0)
    assert load_config(config(two, scheduler=scheduler)).scheduler.cfg_scale_2 == 3.0
    with pytest.raises(VaderError, match=r"scheduler.cfg_scale_2=3.0 with scheduler.cfg_scale=1.0: WanPipeline guides"):
        load_config(config(two, scheduler={**scheduler, "cfg_scale": 1.0}))
    with pytest.raises(VaderError, match=r"^method='grpo' with the two-expert model.from_pretrained="):
        load_config(config(two, method="grpo", reward_fn="brightness"))
    with pytest.raises(VaderError, match=r"^scheduler.cfg_scale_2=3.0 is Wan2.2's guidance of its low-noise expert; "
                                         r"model.type='cogvideox' needs scheduler.cfg_scale_2=None"):
        load_config(config(tmp_path / "cog", model=dict(type="cogvideox", from_pretrained=str(tmp_path / "cog")),
                           image_size=(16, 16), num_frames=17, scheduler=dict(cfg_scale_2=3.0)))


# ---- the published architectures, without files ---------------------------------------------------------


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty HF cache, and any attempt to read weights or reach the hub fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


# diffusers' scripts/convert_wan_to_diffusers.py, "Wan-T2V-14B" and "Wan2.2-T2V-A14B" (the same config)
CONVERT_SCRIPT_14B = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824,
    "freq_dim": 256, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096,
}


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.2-t2v-a14b"])
def test_inspect_keys_of_the_shipped_14b_configs_are_diffusers_own_at_the_published_sizes(no_hub, name):
    """`vader inspect <config> --keys` offline lists exactly the state dict of diffusers' classes built at
    the published sizes on the meta device (the 14B transformer: 14.29B parameters, 320 LoRA targets)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from vader.config import load_config
    from vader.inspection import inspect, key_listing

    with torch.device("meta"):
        expected = {"denoiser": WanTransformer3DModel.from_config(CONVERT_SCRIPT_14B), "vae": AutoencoderKLWan(),
                    "text_encoder": UMT5EncoderModel(UMT5Config(
                        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu"))}
    assert round(sum(p.numel() for p in expected["denoiser"].parameters()) / 1e9, 2) == 14.29
    for kind in ("train", "inference"):
        cfg = load_config(REPO / "configs" / name / f"vader_{kind}.py")
        for part, model in expected.items():
            assert inspect(cfg, part, keys=True) == key_listing(model), (kind, part)
    text = inspect(cfg, "denoiser")
    assert "320 modules" in text and ("transformer_2" in text) == (name == "wan2.2-t2v-a14b")


def test_a14b_without_files_is_two_experts_and_its_missing_weights_name_transformer_2(no_hub):
    from vader.backends.common import missing_weights
    from vader.backends.wan import WAN_14B_REPO, WAN_A14B_REPO, WanSettings, checkpoint_layout, meta_models

    a14b = WanSettings(pretrained=WAN_A14B_REPO)
    assert checkpoint_layout(a14b).boundary_ratio == 0.875
    models = meta_models(a14b)
    assert set(models) == {"transformer", "transformer_2", "vae", "text_encoder"}
    assert models["transformer"].config.num_layers == models["transformer_2"].config.num_layers == 40
    assert f"{WAN_A14B_REPO} (tokenizer, text_encoder, transformer, vae, transformer_2)" in missing_weights(a14b)
    assert set(meta_models(WanSettings(pretrained=WAN_14B_REPO))) == {"transformer", "vae", "text_encoder"}
    assert f"{WAN_14B_REPO} (tokenizer, text_encoder, transformer, vae)" in missing_weights(
        WanSettings(pretrained=WAN_14B_REPO))


def test_a_local_two_expert_folder_is_described_from_its_own_configs(two, tmp_path):
    """On this machine: both experts' own (tiny) configs; a folder lacking transformer_2's weights names it."""
    from vader.backends.wan import meta_models

    models = meta_models(settings(two))
    assert models["transformer_2"].config.num_layers == 2 and set(models) >= {"transformer", "transformer_2"}
    copy = tmp_path / "a14b"
    shutil.copytree(two, copy)
    (copy / "transformer_2" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(VaderError, match=r"^transformer_2=.*lacks config.json or diffusion_pytorch_model.safetensors"):
        build(copy)
