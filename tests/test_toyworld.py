"""The toy world: captions match their clips, the shipped classifier loads strictly and judges fresh
clips as accurately as stated, and the toy rewards score, differentiate and train."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from vader import rewards
from vader.errors import VaderError
from vader.rewards.toy import DEFAULT_FOLDER, ToyAlignment, ToySize
from vader.toyworld import WEIGHTS, world
from vader.toyworld.classifier import HEADS, ToyClassifier, ToyClassifierConfig, frame_indices

REPO = Path(__file__).resolve().parents[1]

# Measured on fresh seeds by tools/toyworld/train_classifier.py (see assets/toyworld/classifier/training.json);
# the tests below assert these minus a margin, on their own fresh seeds.
# (1440 clips each: 240 combinations x 2 seeds x the 3 clip decodings.)
CLEAN_ACCURACY = {"shape": 1.0, "colour": 1.0, "size": 1.0, "motion": 1.0, "background": 1.0}
AUGMENTED_ACCURACY = {"shape": 0.998, "colour": 1.0, "size": 1.0, "motion": 1.0, "background": 1.0}
AREA_MAE_PERCENT = {"clean": 0.215, "augmented": 0.254}  # percent points of the frame
MARGIN = 0.03


def _trainer():
    """tools/toyworld/train_classifier.py as a module (its render-with-radius and augmentations)."""
    spec = importlib.util.spec_from_file_location("train_classifier", REPO / "tools" / "toyworld" / "train_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coverage(clip: torch.Tensor, a: world.Attributes) -> torch.Tensor:
    """[T, H, W] fraction of each pixel covered by the object, read back from the pixels."""
    unit = clip / 2 + 0.5
    fg = torch.tensor(world.RGB[a.colour]).view(3, 1, 1, 1)
    bg = torch.tensor(world.BACKGROUND_RGB[a.background]).view(3, 1, 1, 1)
    return ((unit - bg) * (fg - bg)).sum(0) / ((fg - bg) ** 2).sum()


# -- the world -------------------------------------------------------------------------------------


def test_every_caption_parses_back_to_its_attributes():
    combos = world.all_attributes()
    assert len(combos) == 240
    for a in combos:
        assert world.parse_caption(world.caption(a)) == a
        assert world.parse_caption(world.caption(a) + ", aesthetic score: 6.5.") == a


@pytest.mark.parametrize("motion", world.MOTIONS)
def test_object_moves_the_way_its_caption_says(motion):
    a = world.Attributes("circle", "red", "small", motion, "dark")
    for seed in range(3):
        cov = coverage(world.render(a, seed), a)
        grid = (torch.arange(world.RESOLUTION) + 0.5) / world.RESOLUTION
        mass = cov.sum(dim=(1, 2))
        cx = (cov.sum(1) * grid).sum(-1) / mass
        cy = (cov.sum(2) * grid).sum(-1) / mass
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        want = world.DIRECTION[motion]
        for moved, sign in ((dx, want[0]), (dy, want[1])):
            assert (moved > 0.2 if sign > 0 else moved < -0.2 if sign < 0 else abs(moved) < 0.01), (motion, dx, dy)


@pytest.mark.parametrize("colour", world.COLOURS)
@pytest.mark.parametrize("background", world.BACKGROUNDS)
def test_object_pixels_have_the_captions_colour(colour, background):
    a = world.Attributes("square", colour, "large", "still", background)
    clip = world.render(a, 0) / 2 + 0.5
    cov = coverage(world.render(a, 0), a)
    inside = cov > 0.99
    assert inside.sum() > 100
    pixels = clip.permute(1, 2, 3, 0)[inside]  # [N, 3]
    torch.testing.assert_close(pixels.mean(0), torch.tensor(world.RGB[colour]), atol=0.01, rtol=0)
    outside = clip.permute(1, 2, 3, 0)[cov < 0.01]
    torch.testing.assert_close(outside.mean(0), torch.tensor(world.BACKGROUND_RGB[background]), atol=0.01, rtol=0)


def test_heldout_and_pretraining_are_disjoint_and_pretraining_has_every_value():
    pretrain, heldout = world.split()
    assert set(pretrain).isdisjoint(heldout) and len(pretrain) + len(heldout) == 240
    assert heldout
    for key, values in world.ATTRIBUTES.items():
        assert {getattr(a, key) for a in pretrain} == set(values)
    assert set(world.heldout_captions()).isdisjoint(world.pretrain_captions())


# -- the shipped classifier -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> ToyClassifier:
    return ToyClassifier.from_pretrained(DEFAULT_FOLDER)


def test_shipped_classifier_is_the_package_folder_and_small():
    folder = Path(DEFAULT_FOLDER)
    assert folder.parent == Path(WEIGHTS)
    assert (folder / "model.safetensors").stat().st_size <= 1_000_000
    assert json.loads((folder / "config.json").read_text())["classes"] == {k: list(v) for k, v in
                                                                             world.ATTRIBUTES.items()}


def test_classifier_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(DEFAULT_FOLDER, tmp_path / "ok")
    ToyClassifier.from_pretrained(tmp_path / "ok")

    shutil.copytree(DEFAULT_FOLDER, tmp_path / "missing")
    state = load_file(str(tmp_path / "missing" / "model.safetensors"))
    del state["heads.motion.weight"]
    save_file(state, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(VaderError, match=r"1 missing \(heads.motion.weight\)") as info:
        ToyClassifier.from_pretrained(tmp_path / "missing")
    assert "\n" not in str(info.value)

    shutil.copytree(DEFAULT_FOLDER, tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    config["hidden"] += 8
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VaderError, match="mismatched"):
        ToyClassifier.from_pretrained(tmp_path / "wide")

    (tmp_path / "empty").mkdir()
    with pytest.raises(VaderError, match="config.json is missing"):
        ToyClassifier.from_pretrained(tmp_path / "empty")


def _fresh_clips(seed: int, augmented: bool, mode: str):
    """Every combination once, on seeds the classifier never trained on, radius jittered as in training."""
    trainer = _trainer()
    rng = random.Random(seed)
    combos = world.all_attributes()
    rendered = [trainer.render(a, 20_000_000 + seed * 1000 + i, world.RADIUS[a.size] * rng.uniform(0.8, 1.2))
                for i, a in enumerate(combos)]
    clips = torch.stack([c for c, _ in rendered])[:, :, frame_indices(mode)]
    if augmented:
        clips = trainer.augment(clips, torch.Generator().manual_seed(seed), p=1.0)
    return combos, clips, torch.tensor([area for _, area in rendered])


@pytest.mark.parametrize("augmented", [False, True], ids=["clean", "augmented"])
@pytest.mark.parametrize("mode", ["fml", "alt", "all"])
def test_shipped_classifier_accuracy_on_fresh_seeds(classifier, augmented, mode):
    combos, clips, areas = _fresh_clips(seed=7, augmented=augmented, mode=mode)
    with torch.no_grad():
        logits, area = classifier(clips)
    stated = AUGMENTED_ACCURACY if augmented else CLEAN_ACCURACY
    for key in HEADS:
        truth = torch.tensor([world.labels(a)[key] for a in combos])
        accuracy = float((logits[key].argmax(-1) == truth).float().mean())
        assert accuracy >= stated[key] - MARGIN, (key, accuracy)
    assert float((area - areas).abs().mean()) <= 2 * AREA_MAE_PERCENT["augmented" if augmented else "clean"]


# -- the rewards ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alignment() -> ToyAlignment:
    reward = rewards.build_reward("toy_alignment")
    assert isinstance(reward, ToyAlignment)
    return reward


def test_toy_rewards_are_registered_and_their_weights_ship():
    assert {"toy_alignment", "toy_size"} <= set(rewards.reward_names())
    rewards.check_reward_weights({"toy_alignment": 1.0, "toy_size": 0.1})  # offline: the package has them
    assert rewards.required_weights("toy_size") == [(DEFAULT_FOLDER, None)]


def test_toy_alignment_prefers_a_clips_own_caption(alignment):
    pretrain, heldout = world.split()
    rng = random.Random(3)
    own, wrong = [], []
    for a in rng.sample(pretrain, 6) + rng.sample(heldout, 6):
        clip = world.render(a, 123)[:, frame_indices("fml")][None]
        other = world.Attributes(a.shape, a.colour, a.size, "still" if a.motion != "still" else "left", a.background)
        other_colour = world.COLOURS[(world.COLOURS.index(a.colour) + 1) % 4]
        for mismatch in (other, world.Attributes(a.shape, other_colour, a.size, a.motion, a.background)):
            own.append(float(alignment(clip, [world.caption(a)]).reward))
            wrong.append(float(alignment(clip, [world.caption(mismatch)]).reward))
    assert all(o > w + 1.0 for o, w in zip(own, wrong)), list(zip(own, wrong))
    assert all(-1.0 < o <= 0 for o in own)


def test_toy_alignment_predicts_the_caption_of_a_rendered_clip(alignment):
    combos = world.split()[1][:8]
    clips = world.render_batch(combos, list(range(8)))[:, :, frame_indices("all")]
    assert alignment.predict(clips) == [world.caption(a) for a in combos]


def test_toy_alignment_reward_is_mean_log_probability_and_loss_its_negative(alignment):
    a = world.Attributes("triangle", "blue", "large", "up", "light")
    clip = world.render(a, 5)[:, frame_indices("alt")][None]
    out = alignment(clip, [world.caption(a)])
    logits, _ = alignment.model(clip)
    expected = sum(logits[k].log_softmax(-1)[0, world.labels(a)[k]] for k in HEADS) / len(HEADS)
    torch.testing.assert_close(out.reward[0], expected)
    torch.testing.assert_close(out.loss, -out.reward)


@pytest.mark.parametrize("name", ["toy_alignment", "toy_size"])
def test_toy_reward_gradients_reach_the_frames(name):
    reward = rewards.build_reward(name)
    a = world.Attributes("circle", "green", "small", "right", "dark")
    frames = world.render_batch([a, a], [1, 2])[:, :, frame_indices("fml")].requires_grad_(True)
    reward(frames * 0.9, [world.caption(a)] * 2).loss.sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_toy_size_is_bigger_for_a_bigger_object():
    reward = rewards.build_reward("toy_size")
    assert isinstance(reward, ToySize)
    for shape in world.SHAPES:
        small, large = (world.Attributes(shape, "yellow", size, "down", "dark") for size in ("small", "large"))
        clips = world.render_batch([small, large], [9, 9])[:, :, frame_indices("fml")]
        out = reward(clips, ["", ""])
        assert float(out.reward[1]) > float(out.reward[0]) + 4  # percent of the frame
        torch.testing.assert_close(out.loss, -out.reward)
    one = reward(clips[:, :, :1], ["", ""])  # a single decoded frame is judged as a still clip
    assert float(one.reward[1]) > float(one.reward[0])


def test_unknown_prompt_is_one_line_error_in_prepare(alignment):
    prompts = [world.caption(world.all_attributes()[0]), "a quiet lake at dawn"]
    with pytest.raises(VaderError, match="a quiet lake at dawn") as info:
        alignment.prepare(prompts)
    assert "\n" not in str(info.value)
    alignment.prepare([world.caption(world.all_attributes()[1]) + " aesthetic score: 6.5."])  # the suffix is ignored


def test_explicit_label_gives_a_free_form_prompt_its_toy_caption(alignment):
    a = world.Attributes("triangle", "yellow", "small", "left", "light")
    alignment.prepare(["a little yellow pyramid sliding west"], {"a little yellow pyramid sliding west": world.caption(a)})
    assert alignment.target("a little yellow pyramid sliding west") == a
    with pytest.raises(VaderError, match="label 'playing guitar' of prompt 'a quiet lake at dawn': it must name"):
        alignment.prepare(["a quiet lake at dawn"], {"a quiet lake at dawn": "playing guitar"})


def test_single_frame_decoding_is_rejected_for_toy_alignment(alignment, tiny_cfg):
    with pytest.raises(VaderError, match="decode_frame='-1'") as info:
        rewards.check_decode_frame("toy_alignment", "-1")
    assert "\n" not in str(info.value)
    with pytest.raises(VaderError, match="decode_frame"):
        rewards.check_decode_frame({"toy_alignment": 1.0, "colorfulness": 1.0}, "3")
    for mode in ("fml", "alt", "all"):
        rewards.check_decode_frame("toy_alignment", mode)
    rewards.check_decode_frame("toy_size", "-1")
    a = world.all_attributes()[0]
    with pytest.raises(VaderError, match="one frame"):
        alignment(world.render(a, 0)[:, :1][None], [world.caption(a)])


def test_reward_source_key_overrides_the_classifier_folder(tmp_path):
    shutil.copytree(DEFAULT_FOLDER, tmp_path / "cls")
    assert rewards.required_weights("toy_alignment", sources={"toy_classifier": str(tmp_path / "cls")}) == [
        (str(tmp_path / "cls"), None)]
    model = ToyClassifier(ToyClassifierConfig(hidden=16))
    model.save_pretrained(tmp_path / "other")
    reward = rewards.build_reward("toy_size", sources={"toy_classifier": str(tmp_path / "other")})
    assert reward.model.config.hidden == 16
    with pytest.raises(VaderError, match="toy_classifier"):
        rewards.check_reward_weights("toy_size", sources={"toy_classifier": str(tmp_path / "nowhere")})


def test_tiny_preset_trains_with_toy_alignment(tiny_cfg):
    from vader.train import train

    prompts = world.heldout_captions()[:2]
    cfg = tiny_cfg("--reward_fn", "toy_alignment", "--prompt", repr(prompts), "--max_train_steps", "2",
                   "--decode_frame", "fml")
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["grad_norm"] > 0 and not row["skipped"]
        assert math.isfinite(row["loss"]) and row["reward"] <= 0  # a mean log-probability
        assert row["loss"] == pytest.approx(-row["reward"], rel=1e-4)


def test_vader_score_reads_mp4_clips_with_toy_alignment(alignment, tmp_path):
    """Through the real file path: H.264 + yuv420 encoding is a perturbation the judge must survive."""
    from vader.media import write_video
    from vader.score import score_rows

    combos = world.split()[1][10:13]
    paths = [write_video(tmp_path / f"{i}.mp4", world.render(a, 900 + i), fps=8) for i, a in enumerate(combos)]
    own = score_rows(alignment, paths, [world.caption(a) for a in combos])
    shifted = [world.caption(a) for a in combos[1:] + combos[:1]]
    wrong = score_rows(alignment, paths, shifted)
    assert all(o.reward > -0.1 for o in own), [o.reward for o in own]
    assert all(o.reward > w.reward + 1.0 for o, w in zip(own, wrong))
