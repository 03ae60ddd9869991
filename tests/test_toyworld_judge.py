"""The toy world's independent judge (vader.toyworld.judge) and the two rewards around it: `toy_judge`
(the judge as a gold reward, never trained on) and `toy_frame` (the reward classifier on single frames,
the toy analogue of an image reward)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vader.config import load_config
from vader.errors import VaderError
from vader.rewards import build_reward, reward_spec
from vader.toyworld import world
from vader.toyworld.classifier import ToyClassifier
from vader.toyworld.judge import FOLDER, ToyJudge, judge_accuracy

TOY_TRAIN = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "toy" / "vader_train.py"


def fresh_clips(n: int, seed: int = 99_000_000):
    combos = world.all_attributes()
    attrs = [combos[(7 * i) % len(combos)] for i in range(n)]
    clips = torch.stack([world.render(a, seed + i) for i, a in enumerate(attrs)])
    return clips, [world.caption(a) for a in attrs]


def test_the_judge_is_another_model_than_the_rewards_classifier():
    judge = ToyJudge.from_pretrained()
    classifier = ToyClassifier.from_pretrained(FOLDER.replace("judge", "classifier"))
    def kernels(model: torch.nn.Module) -> set[tuple[int, ...]]:
        return {tuple(t.shape) for t in model.state_dict().values() if t.dim() > 1}

    assert not kernels(judge) & kernels(classifier)  # not one weight matrix or kernel of the same shape
    assert any(isinstance(m, torch.nn.Conv3d) for m in judge.modules())
    assert not any(isinstance(m, torch.nn.Conv3d) for m in classifier.modules())
    report = json.loads((__import__("pathlib").Path(FOLDER) / "training.json").read_text())
    clean, augmented = report["fresh_seed_accuracy"]["clean"], report["fresh_seed_accuracy"]["augmented"]
    assert min(clean[k] for k in world.ATTRIBUTES) > 0.9 and min(augmented[k] for k in world.ATTRIBUTES) > 0.8


def test_the_judge_reads_fresh_clips():
    clips, captions = fresh_clips(40)
    accuracy = judge_accuracy(ToyJudge.from_pretrained(), clips, captions)
    assert set(accuracy) == set(world.ATTRIBUTES)
    assert min(accuracy.values()) >= 0.85, accuracy
    # the same clips under the wrong captions: motion is read from the clip, not guessed
    reverse = {"left": "right", "right": "left", "up": "down", "down": "up"}
    moving = [i for i, c in enumerate(captions) if world.parse_caption(c).motion in reverse]
    wrong = [world.caption(dataclasses.replace(a, motion=reverse[a.motion]))
             for a in (world.parse_caption(captions[i]) for i in moving)]
    assert judge_accuracy(ToyJudge.from_pretrained(), clips[moving], wrong)["motion"] < 0.2


def test_toy_judge_is_a_gold_reward_without_gradient():
    spec = reward_spec("toy_judge")
    assert spec.differentiable is False and spec.needs_clip
    reward = build_reward("toy_judge")
    clips, captions = fresh_clips(8)
    out = reward(clips, captions)
    assert out.reward.shape == (8,) and float(out.reward.min()) >= 0 and float(out.reward.max()) <= 1
    assert float(out.reward.mean()) > 0.85
    parts = reward.breakdown(clips, captions)
    assert set(parts) == set(world.ATTRIBUTES)
    assert abs(sum(parts.values()) / len(parts) - float(out.reward.mean())) < 1e-6
    cfg = load_config(TOY_TRAIN, ["--gold_reward", "toy_judge"])
    assert cfg.gold_reward == "toy_judge"
    frames = clips.clone().requires_grad_(True)  # a VADER step: never a training reward
    with pytest.raises(VaderError, match="reward_fn='toy_judge' has no gradient"):
        reward(frames, captions)


def test_toy_frame_scores_frames_alone_and_cannot_see_motion():
    clips, captions = fresh_clips(4)
    frame = build_reward("toy_frame")
    clip_reward = build_reward("toy_alignment")
    backwards = clips.flip(2)  # the same frames, the motion reversed
    same = frame(clips, captions).reward
    torch.testing.assert_close(frame(backwards, captions).reward, same, atol=1e-5, rtol=1e-5)
    moving = [i for i, c in enumerate(captions) if "moving" in c]
    assert moving and bool((clip_reward(backwards[moving], [captions[i] for i in moving]).reward
                            < clip_reward(clips[moving], [captions[i] for i in moving]).reward).all())
    one = clips[:, :, 5:6].clone().requires_grad_(True)  # decode_frame='5': one frame
    frame(one, captions).loss.sum().backward()
    assert one.grad is not None and one.grad.abs().max() > 0


def test_report_shows_the_gold_parts_base_vs_lora(tmp_path):
    from vader.report import training_report

    row = {"step": 4, "gold_videos": 8, **{f"gold_{k}_base": 0.5 for k in world.ATTRIBUTES},
           **{f"gold_{k}": 0.75 for k in world.ATTRIBUTES}}
    for extra, heading in (({}, "Gold reward by part"),
                           ({"gold_name": "toy_judge"}, "the independent judge's accuracy per attribute")):
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "val_reward": 1.0}) + "\n"
                                                + json.dumps({**row, **extra}) + "\n")
        html = training_report(tmp_path).read_text()
        assert heading in html and "8 end-of-run videos" in html
        for k in world.ATTRIBUTES:
            assert f'<td class="t">{k}</td><td>0.500</td><td>0.750</td><td>+0.250</td>' in html


def test_the_judge_loads_strictly(tmp_path):
    ToyJudge.from_pretrained().save_pretrained(tmp_path / "ok")
    assert isinstance(ToyJudge.from_pretrained(tmp_path / "ok"), ToyJudge)
    with pytest.raises(VaderError, match="config.json is missing"):
        ToyJudge.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "hidden": 32}))
    with pytest.raises(VaderError, match="does not match its config.json") as info:
        ToyJudge.from_pretrained(tmp_path / "ok")
    assert "\n" not in str(info.value)
    with pytest.raises(VaderError, match="the toy_judge reward cannot read prompt 'a red fox'"):
        build_reward("toy_judge")(torch.zeros(1, 3, 3, 64, 64), ["a red fox"])


def test_gold_parts_are_logged_base_vs_lora(tmp_path):
    """Run.log_gold_breakdown on the end-of-run previews: one metrics row with each attribute's share,
    the report's table reads it."""
    from types import SimpleNamespace

    from vader.run import Run

    clips, captions = fresh_clips(4)
    after = [(c, v, None) for c, v in zip(captions, clips)]
    before = [(c, v.flip(1), None) for c, v in zip(captions, clips)]  # motion reversed, the rest unchanged
    notes: list[str] = []
    run = SimpleNamespace(gold=build_reward("toy_judge"), dir=tmp_path, note=notes.append)
    Run.log_gold_breakdown(run, 7, before, after)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 7 and row["gold_videos"] == 4 and row["gold_name"] == "toy_judge"
    assert row["gold_colour"] == row["gold_colour_base"] == 1.0
    moving = sum(world.parse_caption(c).motion != "still" for c in captions)
    assert row["gold_motion_base"] <= 1 - moving / 4 < row["gold_motion"] == 1.0
    assert "gold reward by part" in notes[0]


def test_vader_eval_compares_the_judges_attributes_one_by_one(tmp_path):
    """`vader eval --rewards toy_judge`: the reward and each attribute as toy_judge/<attribute>."""
    import contextlib
    from types import SimpleNamespace

    from vader.evaluate import _generate, _summarise

    clips, captions = fresh_clips(2)

    class Generator:
        denoiser = torch.nn.Linear(1, 1)  # no LoRA layers: "base" and "lora" give the same clips

        def generate(self, prompts, generator):
            return clips[[captions.index(p) for p in prompts]]

    for side in ("base", "lora"):
        (tmp_path / side).mkdir()
    cfg = SimpleNamespace(val_batch_size=2, seed=0, save_fps=8, video_quality="standard")
    scorers = {"toy_judge": build_reward("toy_judge")}
    videos, scores = _generate(cfg, Generator(), SimpleNamespace(autocast=contextlib.nullcontext), scorers,
                               captions, captions, 1, tmp_path, tmp_path)
    assert list(scores) == ["toy_judge", *(f"toy_judge/{k}" for k in world.ATTRIBUTES)]
    result = _summarise(tmp_path, captions, 1, scores, videos)
    parts = [result.rewards[f"toy_judge/{k}"]["lora"]["mean"] for k in world.ATTRIBUTES]
    assert result.rewards["toy_judge"]["lora"]["mean"] == pytest.approx(sum(parts) / len(parts))
