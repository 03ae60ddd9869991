"""The toy world's pretrained base model: shipped weights, their loaders, and what they generate.

Bounds below were measured on the shipped weights (see src/vader/assets/toyworld/README.md) and
leave a margin; the sampling tests use fixed seeds, so they are deterministic on one machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vader.toyworld import WEIGHTS, world

REPO = Path(__file__).resolve().parents[1]
TOY_INFER = REPO / "configs" / "toy" / "vader_inference.py"


def _train_base():
    spec = importlib.util.spec_from_file_location("train_base", REPO / "tools" / "toyworld" / "train_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cfg():
    from vader.config import load_config

    return load_config(TOY_INFER)


@pytest.fixture(scope="module")
def generator(cfg):
    from vader.backends.opensora import OpenSoraGenerator

    return OpenSoraGenerator.build(cfg, torch.device("cpu"))


# ---- loading -------------------------------------------------------------------------------


def test_shipped_weights_load_strictly_through_the_presets(cfg):
    from vader.models.loading import resolve_checkpoint, tensor_shapes
    from vader.models.presets import build_denoiser, build_text_encoder, build_vae

    text = build_text_encoder(cfg.text_encoder, torch.device("cpu"))
    denoiser = build_denoiser(cfg.model, text.output_dim, cfg.text_encoder.model_max_length, torch.float32,
                              torch.device("cpu"))
    vae = build_vae(cfg.vae, torch.float32, torch.device("cpu"))
    tb = _train_base()
    assert denoiser.config.to_dict() == tb.denoiser_architecture().to_dict()
    assert vae.config.spatial == {**tb.vae_architecture().spatial}
    for model, folder in ((denoiser, "denoiser"), (vae, "vae")):
        checkpoint = resolve_checkpoint(f"{WEIGHTS}/{folder}", folder)
        assert tensor_shapes(checkpoint.weights) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 on disk, cast as read
    # the base model's weights (the 10 MB, with the reward's classifier's 1 MB beside them); the
    # judge (0.9 MB) is an evaluation model like the classifier, outside this budget
    total = sum(f.stat().st_size for f in Path(WEIGHTS).rglob("*")
                if f.is_file() and f.parent.name not in ("classifier", "judge"))
    assert total < 9 * 2**20


def test_captions_fit_the_text_encoder_without_truncation(cfg):
    from vader.models.presets import build_text_encoder
    from vader.models.text import build_prompt

    text = build_text_encoder(cfg.text_encoder, torch.device("cpu"))
    texts = [build_prompt(c, aes=cfg.aes) for c in world.pretrain_captions() + world.heldout_captions()]
    ids = text.tokenizer(texts)["input_ids"]
    assert max(len(i) for i in ids) <= cfg.text_encoder.model_max_length
    assert text.tokenize(texts[:1])[0][0, len(ids[0]) - 1] == text.tokenizer.eos_token_id


# ---- VAE -----------------------------------------------------------------------------------


def test_vae_round_trip_of_world_clips_is_sharp(generator):
    attrs = world.all_attributes()[::40]
    x = world.render_batch(attrs, [123_456 + i for i in range(len(attrs))])
    with torch.no_grad():
        z = generator.vae.encode(x, torch.Generator().manual_seed(0))
        x_hat = generator.vae.decode(z, num_frames=world.NUM_FRAMES).clamp(-1, 1)
    assert z.shape[1:] == (4, 5, 8, 8)
    mse = (x_hat - x).pow(2).mean().item()
    assert mse < VAE_MSE_BOUND, mse


def test_vae_latents_are_unit_scale_for_the_denoiser(generator):
    pretrain, _ = world.split()
    # an odd stride: the background alternates fastest in split()'s order, so an even stride would take
    # dark backgrounds only, and the latents' per-channel mean carries the background (~0.4 here)
    attrs = pretrain[::11]
    assert {a.background for a in attrs} == set(world.BACKGROUNDS)
    with torch.no_grad():
        z = generator.vae.encode(world.render_batch(attrs, list(range(len(attrs)))), torch.Generator().manual_seed(0))
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    assert mean.abs().max() < 0.3, mean
    assert ((std - 1).abs() < 0.3).all(), std


# ---- the training objective matches the sampler ---------------------------------------------


class _OracleVelocity(torch.nn.Module):
    """The exact rectified-flow velocity towards one data point x0: v(x_t, t) = (x0 - x_t) / (t / T)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, **_):
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (self.x0 - x) / s


def test_rectified_flow_loss_is_zero_for_the_velocity_the_sampler_integrates():
    from vader.sampling import TextCondition, conditioning, make_timesteps, sample

    tb = _train_base()
    x0 = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = conditioning(2, 64, 64, 17, 24, torch.float32, torch.device("cpu"))
    oracle = _OracleVelocity(x0)
    y, mask = torch.zeros(2, 1, 3, 8), torch.ones(2, 3)
    loss = tb.rf_loss(oracle, x0, y, mask, cond, 17, torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    # and vader's Euler sampler, driven by the same velocity, lands on x0 from pure noise
    timesteps = make_timesteps(8, 2, cond=cond, num_frames=17)
    z = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    text = TextCondition(y=y, mask=mask, y_null=y)
    out = sample(lambda x, t, **kw: _OracleVelocity(torch.cat([x0, x0]))(x, t), z, text, cond, timesteps,
                 cfg_scale=1.0)
    assert torch.allclose(out, x0, atol=1e-4)
    # a wrong objective is not zero for that velocity
    assert tb.rf_loss(_OracleVelocity(-x0), x0, y, mask, cond, 17, torch.Generator().manual_seed(1)) > 0.1


def test_training_timesteps_use_the_samplers_shift():
    tb = _train_base()
    cond = conditioning_64()
    t = tb.rf_timesteps(8000, cond, 17, torch.Generator().manual_seed(0))
    ratio = (64 * 64 / 512**2) ** 0.5 * 5**0.5  # resolution x latent length, as make_timesteps
    median = ratio * 0.5 / (1 + (ratio - 1) * 0.5) * 1000  # the logit-normal median 0.5, shifted: ~218
    assert abs(t.median().item() - median) < 15
    assert 0 < t.min() and t.max() < 1000


def conditioning_64():
    from vader.sampling import conditioning

    return conditioning(8000, 64, 64, 17, 24, torch.float32, torch.device("cpu"))


# ---- samples -------------------------------------------------------------------------------


def _sample(generator, prompts: list[str], seed: int) -> torch.Tensor:
    tb = _train_base()
    generator.encode_prompts(prompts)
    return tb.sample_videos(generator, prompts, seed)


@pytest.mark.xfail(strict=True, reason="the shipped base follows the background word on 63% of the pretraining "
                   "prompts (chance 50%; 4 of these 8); see the model card")
def test_samples_have_the_captions_background(generator):
    tb = _train_base()
    pre = world.pretrain_captions()
    prompts = [c for c in pre if "dark" in c][::24] + [c for c in pre if "light" in c][::24]
    videos = _sample(generator, prompts, seed=1000)
    got = tb.background_of(videos)
    wanted = [world.parse_caption(p).background for p in prompts]
    assert sum(a == b for a, b in zip(got, wanted)) >= len(prompts) - 1, (got, wanted)
    assert videos.std(dim=(2, 3, 4)).mean() < 0.6  # plain backgrounds, not noise (noise in [-1, 1]: ~0.58+)


def test_base_samples_beat_chance_on_the_toy_classifier(generator):
    classifier_dir = Path(WEIGHTS) / "classifier"
    if not (classifier_dir / "model.safetensors").is_file():
        pytest.skip("the toy classifier's weights are not shipped")
    from vader.toyworld.classifier import ToyClassifier

    tb = _train_base()
    prompts = world.pretrain_captions()[::8]  # 24 prompts
    videos = _sample(generator, prompts, seed=1000)
    acc = tb.accuracy(ToyClassifier.from_pretrained(classifier_dir).eval().predict(videos), prompts)
    # Model card, 192 pretraining prompts: size 97%, colour 70%, shape 69% (chance 1/2, 1/4, 1/3); on these
    # 24 prompts (measured: size 100%, colour 83%, shape 58%) each is asserted above chance by a margin:
    # a denoiser that ignored its caption would sit at chance. Motion (33% vs 20% on 192 prompts, 21%
    # on these 24) is left to the card.
    assert acc["size"] >= 1 / 2 + 2 * CHANCE_MARGIN, acc
    assert acc["colour"] >= 1 / 4 + 2 * CHANCE_MARGIN, acc
    assert acc["shape"] >= 1 / 3 + CHANCE_MARGIN, acc


VAE_MSE_BOUND = 0.008  # measured 0.0022 on these clips (PSNR 32.6 dB); the previous 8x VAE: 0.025
CHANCE_MARGIN = 0.1  # shape: 58% measured against 43% asserted, 3 of the 24 prompts to spare
