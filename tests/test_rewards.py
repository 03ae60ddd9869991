"""Rewards: the registry's records and what is derived from them, the weight-free built-ins, batching and
frame averaging, mixes, offline checks."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from vader import rewards
from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES
from vader.rewards import REWARDS, Reward, RewardOutput, RewardSpec, WeightedReward, build_reward
from vader.rewards.base import RESIZE_MODES
from vader.rewards.builtin import Brightness, Colorfulness
from vader.rewards.callable import CallableReward
from vader.rewards.hub import WeightSource, validate_sources

H, W = 8, 12


def solid(rgb: tuple[float, float, float], batch: int = 1, frames: int = 1) -> torch.Tensor:
    """A video [B, 3, K, H, W] of one colour given in [-1, 1]."""
    return torch.tensor(rgb).view(1, 3, 1, 1, 1).expand(batch, 3, frames, H, W).clone()


def noise(batch: int = 1, frames: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, H, W, generator=g) * 2 - 1


def halves(left: tuple[float, float, float], right: tuple[float, float, float]) -> torch.Tensor:
    video = solid(left)
    video[..., W // 2 :] = torch.tensor(right).view(1, 3, 1, 1, 1)
    return video


def score(name: str, frames: torch.Tensor) -> RewardOutput:
    return build_reward(name)(frames, ["a prompt"] * frames.shape[0])


# ---------------------------------------------------------------------------------------------
# colorfulness


@pytest.mark.parametrize("level", [-1.0, -0.3, 0.0, 0.5, 1.0])
def test_colorfulness_of_grey_is_about_zero(level: float) -> None:
    out = score("colorfulness", solid((level, level, level)))
    assert out.reward.shape == (1,)
    assert 0 <= out.reward.item() < 0.01


def test_colorfulness_grows_with_saturation() -> None:
    grey = score("colorfulness", solid((0.0, 0.0, 0.0))).reward
    pale = score("colorfulness", halves((0.2, 0.0, 0.0), (0.0, 0.0, 0.2))).reward
    vivid = score("colorfulness", halves((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0))).reward
    assert grey < pale < vivid
    assert vivid.item() > 0.5


def test_colorfulness_of_a_solid_colour_is_its_mean_term() -> None:
    # pure red in [0, 1]: rg = 1, yb = 0.5, no spread -> 0.3 * sqrt(1 + 0.25)
    out = score("colorfulness", solid((1.0, -1.0, -1.0)))
    assert out.reward.item() == pytest.approx(0.3 * 1.25**0.5, abs=2e-3)
    torch.testing.assert_close(out.loss, -out.reward)


def test_colorfulness_gradient_is_finite_even_for_grey() -> None:
    for video in (solid((0.1, 0.1, 0.1)), noise()):
        video.requires_grad_(True)
        score("colorfulness", video).loss.sum().backward()
        assert torch.isfinite(video.grad).all()
    assert video.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# brightness


@pytest.mark.parametrize(
    ("rgb", "luma"),
    [((1.0, 1.0, 1.0), 1.0), ((-1.0, -1.0, -1.0), 0.0), ((1.0, -1.0, -1.0), 0.299),
     ((-1.0, 1.0, -1.0), 0.587), ((-1.0, -1.0, 1.0), 0.114), ((0.0, 0.0, 0.0), 0.5)],
)
def test_brightness_is_rec601_luma(rgb: tuple[float, float, float], luma: float) -> None:
    out = score("brightness", solid(rgb))
    assert out.reward.item() == pytest.approx(luma, abs=1e-6)
    assert out.loss.item() == pytest.approx(1 - luma, abs=1e-6)


def test_brightness_is_the_mean_over_pixels() -> None:
    assert score("brightness", halves((1.0, 1.0, 1.0), (-1.0, -1.0, -1.0))).reward.item() == pytest.approx(0.5)
    video = noise(seed=3)
    unit = (video + 1) / 2
    expected = (0.299 * unit[:, 0] + 0.587 * unit[:, 1] + 0.114 * unit[:, 2]).mean()
    assert score("brightness", video).reward.item() == pytest.approx(expected.item(), abs=1e-6)


def test_pixels_are_clamped_to_the_valid_range() -> None:
    assert score("brightness", solid((3.0, 3.0, 3.0))).reward.item() == pytest.approx(1.0)
    assert score("brightness", solid((-5.0, -5.0, -5.0))).reward.item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# the interface: gradients, batches, frames


@pytest.mark.parametrize("name", ["colorfulness", "brightness"])
def test_gradient_reaches_the_frames(name: str) -> None:
    video = (noise(batch=2, frames=3) * 0.9).requires_grad_(True)
    score(name, video).loss.sum().backward()
    assert video.grad is not None and torch.isfinite(video.grad).all()
    assert (video.grad.abs().sum(dim=(1, 3, 4)) > 0).all()  # every sample and frame gets a gradient


def test_brightness_gradient_direction() -> None:
    video = (noise() * 0.5).requires_grad_(True)
    score("brightness", video).loss.sum().backward()
    assert (video.grad < 0).all()  # lowering the loss means brightening every pixel


@pytest.mark.parametrize("name", ["colorfulness", "brightness"])
def test_batch_gives_per_sample_rewards(name: str) -> None:
    video = noise(batch=3, frames=2, seed=1)
    video[1] *= 0.2  # make the samples differ clearly
    batched = score(name, video)
    assert batched.reward.shape == batched.loss.shape == (3,)
    single = [score(name, video[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.reward, torch.cat([s.reward for s in single]))
    torch.testing.assert_close(batched.loss, torch.cat([s.loss for s in single]))
    assert len(set(batched.reward.tolist())) == 3


@pytest.mark.parametrize("name", ["colorfulness", "brightness"])
def test_frames_are_averaged(name: str) -> None:
    video = torch.cat([solid((1.0, -1.0, -1.0)), halves((0.0, 0.0, 0.0), (-1.0, 1.0, 1.0)), noise(seed=2)], dim=2)
    whole = score(name, video)
    per_frame = torch.stack([score(name, video[:, :, k : k + 1]).reward for k in range(3)])
    torch.testing.assert_close(whole.reward, per_frame.mean(0))
    assert per_frame.std() > 0.01  # the frames really differ


def test_colorfulness_is_per_frame_not_over_the_whole_clip() -> None:
    # a red frame then a blue frame: each frame alone has no spread; the clip as one image would
    video = torch.cat([solid((1.0, -1.0, -1.0)), solid((-1.0, -1.0, 1.0))], dim=2)
    per_frame = torch.stack([score("colorfulness", video[:, :, k : k + 1]).reward for k in range(2)]).mean(0)
    torch.testing.assert_close(score("colorfulness", video).reward, per_frame)


# ---------------------------------------------------------------------------------------------
# build_reward


def test_build_single_reward_types() -> None:
    assert isinstance(build_reward("colorfulness"), Colorfulness)
    assert isinstance(build_reward("brightness"), Brightness)
    assert isinstance(build_reward({"brightness": 1.0}), Brightness)


def test_weighted_mix_is_the_weighted_sum() -> None:
    video = noise(batch=2, frames=2, seed=4)
    prompts = ["a", "b"]
    mix = build_reward({"colorfulness": 1.0, "brightness": 0.5})
    assert isinstance(mix, WeightedReward)
    out = mix(video, prompts)
    c, b = Colorfulness()(video, prompts), Brightness()(video, prompts)
    torch.testing.assert_close(out.reward, c.reward + 0.5 * b.reward)
    torch.testing.assert_close(out.loss, c.loss + 0.5 * b.loss)


def test_single_reward_with_a_weight_is_scaled() -> None:
    video = noise(seed=5)
    out = build_reward({"brightness": 2.0})(video, ["a"])
    torch.testing.assert_close(out.reward, 2 * Brightness()(video, ["a"]).reward)


@pytest.mark.parametrize("name", ["hps", "aesthetic", "aesthetic_hps", "pick_score", "actpred"])
def test_model_rewards_offline_without_weights_name_the_repo(name: str) -> None:
    assert name in rewards.reward_names()
    with pytest.raises(VaderError) as info:
        rewards.check_reward_weights(name)
    assert "download" in str(info.value) and "/" in str(info.value)  # a hub repo id and the fix


class _Learned(Reward):
    """A reward with parameters, to show that build_reward freezes whatever it builds."""

    name = "learned"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.head = nn.Linear(3, 1)
        self.scale = scale
        self.train()

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        reward = self.scale * self.head(images.mean(dim=(2, 3))).squeeze(1)
        return RewardOutput(reward=reward, loss=-reward)


@pytest.mark.parametrize("spec", ["learned", {"learned": 1.0, "brightness": 0.5}, {"learned": 3.0}])
def test_built_rewards_are_frozen_and_in_eval_mode(monkeypatch: pytest.MonkeyPatch, spec) -> None:
    monkeypatch.setitem(rewards.REWARDS, "learned", RewardSpec("learned", "a test reward with parameters",
                                                               lambda scale=1.0, **_: _Learned(scale), None))
    reward = build_reward(spec, scale=2.0)
    params = list(reward.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for m in reward.modules())
    video = noise().requires_grad_(True)
    reward(video, ["a"]).loss.sum().backward()
    assert video.grad is not None and all(p.grad is None for p in params)  # input grads only
    learned = next(m for m in reward.modules() if isinstance(m, _Learned))
    assert learned.scale == 2.0  # options reach the factory


@pytest.mark.parametrize("name", ["colorfulness", "brightness"])
def test_builtin_rewards_are_in_eval_mode(name: str) -> None:
    reward = build_reward(name)
    assert not reward.training
    assert not any(p.requires_grad for p in reward.parameters())


# ---------------------------------------------------------------------------------------------
# the registry: one record per reward, every table read off the records


@pytest.mark.parametrize("name", rewards.reward_names())
def test_every_record_is_complete(name: str) -> None:
    spec = REWARDS[name]
    assert spec.name == name and ":" not in name  # 'module:function' means a Python callable, never a name
    assert spec.doc and "\n" not in spec.doc
    assert callable(spec.build) and callable(spec.skeleton) and callable(spec.weights)
    assert spec.needs_clip is None or (isinstance(spec.needs_clip, str) and spec.needs_clip)
    assert spec.resize in (None, *RESIZE_MODES)
    assert isinstance(spec.differentiable, bool)
    assert all(rewards.SOURCE_KEYS[key] == doc for key, doc in spec.source_keys.items())
    assert rewards.reward_spec(name) is spec


def test_derived_tables_agree_with_the_records() -> None:
    assert rewards.reward_names() == tuple(REWARDS) == tuple(n for n, _ in rewards.describe_rewards())
    needs_clip = [n for n, spec in REWARDS.items() if spec.needs_clip]
    assert needs_clip == ["actpred", "toy_alignment", "toy_judge", "videoreward", "videoreward_vq", "videoreward_mq",
                          "videoreward_ta", "xclip"]  # the clip readers today
    for name, spec in REWARDS.items():
        for one_frame in ("-1", "3"):
            if spec.needs_clip:
                with pytest.raises(VaderError, match=re.escape(f"reward_fn '{name}' {spec.needs_clip}, but "
                                                               f"decode_frame='{one_frame}' decodes one frame")):
                    rewards.check_decode_frame(name, one_frame)
            else:
                rewards.check_decode_frame(name, one_frame)
        for clip in CLIP_DECODE_FRAMES:
            rewards.check_decode_frame(name, clip)
        assert rewards.is_differentiable(name) is spec.differentiable
        weights = list(spec.weights(validate_sources(None), hps_version="v2.1"))
        assert all(isinstance(w, WeightSource) and w.key in spec.source_keys for w in weights)
        assert rewards.reward_sources(name) == [(name, w) for w in weights]
        assert rewards.required_weights(name) == [w.pair for w in weights]
    with pytest.raises(VaderError, match="'actpred' classifies a clip"):  # registry order decides the first
        rewards.check_decode_frame(dict.fromkeys(reversed(REWARDS), 1.0), "-1")
    assert rewards.is_differentiable({n: 1.0 for n, spec in REWARDS.items() if spec.differentiable})
    assert not rewards.is_differentiable({"toy_alignment": 1.0, "toy_judge": 1.0})  # the judge measures only
    assert rewards.is_differentiable("my_rewards:score") is CallableReward.differentiable is False
    assert rewards.required_weights("colorfulness") == rewards.required_weights("brightness") == []
    assert set(rewards.SOURCE_KEYS) == {key for spec in REWARDS.values() for key in spec.source_keys}
    with pytest.raises(VaderError, match="unknown reward 'clipscore'; available: colorfulness, brightness"):
        rewards.reward_spec("clipscore")


class _Foo(Reward):
    """A stand-in for a new reward: what a new file would hold."""

    name = "foo"
    differentiable = False

    def __init__(self, resize: str):
        super().__init__()
        self.resize = resize

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        reward = images.mean(dim=(1, 2, 3))
        return RewardOutput(reward=reward, loss=-reward)


def test_one_record_is_all_a_new_reward_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering one record makes every derived table see the reward: names, build, skeleton (plan),
    weights, the clip rule, differentiability."""
    from vader.rewards import reward_skeleton

    weights = WeightSource("foo", "foo model", repo="someone/foo", filename="foo.pt")
    spec = RewardSpec("foo", "a test reward", lambda resize, **_: _Foo(resize), lambda resize, **_: _Foo(resize),
                      lambda sources, **_: [weights], needs_clip="counts frames", resize="crop",
                      differentiable=False)
    monkeypatch.setitem(REWARDS, "foo", spec)
    assert "foo" in rewards.reward_names()
    assert build_reward("foo").resize == "crop" and build_reward("foo", resize="squash").resize == "squash"
    assert isinstance(build_reward({"foo": 1.0, "brightness": 1.0}).parts["foo"], _Foo)
    assert reward_skeleton("foo", dtype=torch.float32).resize == "crop"
    assert rewards.reward_sources({"brightness": 1.0, "foo": 2.0}) == [("foo", weights)]
    with pytest.raises(VaderError, match="reward_fn 'foo' counts frames, but decode_frame='-1' decodes one frame"):
        rewards.check_decode_frame("foo", "-1")
    assert not rewards.is_differentiable({"foo": 1.0, "brightness": 1.0})
    monkeypatch.setitem(REWARDS, "foo", RewardSpec("foo", "no skeleton", spec.build, None))
    with pytest.raises(VaderError, match="no weightless skeleton for 'foo'; skeletons exist for: colorfulness"):
        reward_skeleton("foo", dtype=torch.float32)
