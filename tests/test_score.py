"""`vader score`: videos written by media.write_video, scored end to end (colorfulness, tiny ActPred)."""

from __future__ import annotations

import pytest
import torch

from vader import rewards
from vader.errors import VaderError
from vader.media import write_video
from vader.rewards.builtin import Colorfulness
from vader.score import FRAME_CHUNK, format_table, match_prompts, score_main, score_rows, score_videos


def solid_video(rgb: tuple[float, float, float], frames: int = 4, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.tensor(rgb).view(3, 1, 1, 1).expand(3, frames, h, w).clone()


def stripes(frames: int = 4, h: int = 32, w: int = 48) -> torch.Tensor:
    video = solid_video((1.0, -1.0, -1.0), frames, h, w)
    video[:, :, :, w // 2:] = torch.tensor((-1.0, -1.0, 1.0)).view(3, 1, 1, 1)
    return video


@pytest.fixture
def videos(tmp_path):
    grey = write_video(tmp_path / "grey.mp4", solid_video((0.0, 0.0, 0.0)))
    vivid = write_video(tmp_path / "vivid.mp4", stripes())
    return grey, vivid


def test_score_videos_colorfulness(videos) -> None:
    grey, vivid = videos
    scores = score_videos(Colorfulness(), [grey, vivid], ["a prompt"])
    assert len(scores) == 2
    assert scores[0] < 0.02 < 0.5 < scores[1]


def test_long_videos_are_scored_in_chunks_with_the_same_mean(tmp_path) -> None:
    video = stripes(frames=FRAME_CHUNK + 5)
    video[:, FRAME_CHUNK:] = 0  # the last frames are grey
    path = write_video(tmp_path / "long.mp4", video)
    [row] = score_rows(Colorfulness(), [path], ["x"])
    from vader.media import read_video

    whole = Colorfulness()(read_video(path)[None], ["x"])
    assert row.reward == pytest.approx(whole.reward.item(), abs=1e-5)
    assert row.loss == pytest.approx(whole.loss.item(), abs=1e-5)


def test_score_main_prints_table(videos, capsys) -> None:
    grey, vivid = videos
    assert score_main(["--reward", "colorfulness", "--prompt", "a red and blue flag", "--device", "cpu",
                       str(grey), str(vivid)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["video", "prompt", "colorfulness", "loss"]
    assert str(grey) in out and str(vivid) in out and "a red and blue flag" in out
    assert lines[-1].startswith("mean of 2")


def test_prompts_file_one_per_video_or_one_for_all(videos, tmp_path, capsys) -> None:
    grey, vivid = videos
    one = tmp_path / "one.txt"
    one.write_text("the same prompt\n\n")
    assert score_main(["--reward", "colorfulness", "--prompts", str(one), str(grey), str(vivid)]) == 0
    assert capsys.readouterr().out.count("the same prompt") == 2
    two = tmp_path / "two.txt"
    two.write_text("first prompt\nsecond prompt\n")
    assert score_main(["--reward", "colorfulness", "--prompts", str(two), str(grey), str(vivid)]) == 0
    out = capsys.readouterr().out
    assert "first prompt" in out and "second prompt" in out


def test_prompt_count_mismatch(videos, tmp_path, capsys) -> None:
    grey, vivid = videos
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    assert score_main(["--reward", "colorfulness", "--prompts", str(three), str(grey), str(vivid)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vader: error: 3 prompts in") and "for 2 videos" in err and err.count("\n") == 1
    with pytest.raises(VaderError, match="3 prompts for 2 videos"):
        match_prompts(["a", "b", "c"], 2)
    assert match_prompts(["a"], 3) == ["a", "a", "a"]


def test_user_errors_exit_2(videos, tmp_path, capsys) -> None:
    grey, _ = videos
    assert score_main(["--reward", "colorfulness", "--prompt", "x", str(tmp_path / "nope.mp4")]) == 2
    assert "no such video" in capsys.readouterr().err
    assert score_main(["--reward", "colorfulness", "--prompts", str(tmp_path / "none.txt"), str(grey)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert score_main(["--help"]) == 0
    assert "--hps-version" in capsys.readouterr().out
    assert score_main(["--reward", "colorfulness"]) == 2  # no videos: argparse usage error
    capsys.readouterr()
    for sources, needle in (("{'nope': '/x'}", "--reward-sources: unknown reward source key(s) 'nope'; valid keys:"),
                            ("[1, 2]", "--reward-sources='[1, 2]' is not a dict of names to paths")):
        assert score_main(["--reward", "colorfulness", "--prompt", "x", "--reward-sources", sources, str(grey)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_score_actpred_tiny(videos, tmp_path, monkeypatch, capsys) -> None:
    """ActPred through the CLI path with a tiny VideoMAE saved to a folder (build_reward patched to it)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from vader.rewards.actpred import build_actpred

    labels = {0: "playing guitar", 1: "riding a bike", 2: "dancing"}
    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=16,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            id2label=labels, label2id={v: k for k, v in labels.items()})
    folder = tmp_path / "tiny_videomae"
    VideoMAEForVideoClassification(config).save_pretrained(folder)
    seen = {}

    def fake_build_reward(name, **kw):
        seen.update(name=name, **kw)
        return build_actpred(model=str(folder), **kw).eval()

    monkeypatch.setattr(rewards, "build_reward", fake_build_reward)
    monkeypatch.setattr(rewards, "check_reward_weights", lambda *a, **k: None)  # the tiny model is local
    grey, vivid = videos
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man playing guitar on stage\na kid on a street\triding a bike\n")
    assert score_main(["--reward", "actpred", "--prompts", str(prompts), "--dtype", "fp32", str(grey), str(vivid)]) == 0
    out = capsys.readouterr().out
    assert seen["name"] == "actpred" and seen["dtype"] == torch.float32 and seen["hps_version"] == "v2.1"
    assert seen["actpred_frames"] == "decoded"
    header = out.splitlines()[0].split()
    assert header == ["video", "prompt", "action", "actpred", "loss"]
    assert "playing guitar" in out and "riding a bike" in out
    rows = [line.split() for line in out.splitlines()[2:4]]
    for row in rows:
        reward, loss = float(row[-2]), float(row[-1])
        assert 0 < reward < 1 and loss == pytest.approx(-torch.log(torch.tensor(reward)).item(), rel=1e-3)
    # a prompt naming no action stops before any video is scored
    bad = tmp_path / "bad.txt"
    bad.write_text("a quiet lake\n")
    assert score_main(["--reward", "actpred", "--prompts", str(bad), str(grey)]) == 2
    err = capsys.readouterr().err
    assert "'a quiet lake'" in err and "<TAB>" in err


def test_format_table_alignment() -> None:
    from pathlib import Path

    from vader.score import VideoScore

    table = format_table([VideoScore(Path("a.mp4"), "p", 0.5, 0.5), VideoScore(Path("bb.mp4"), "q", 1e-5, 11.5)])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers, same width
    assert "1.000e-05" in table and lines[-1].startswith("mean of 2")


def test_weighted_reward_dict_like_training(videos, capsys) -> None:
    from vader.media import read_video
    from vader.rewards.builtin import Brightness

    grey, vivid = videos
    assert score_main(["--reward", "{'colorfulness': 1.0, 'brightness': 0.5}", "--prompt", "x", "--device", "cpu",
                       str(grey), str(vivid)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["video", "prompt", "reward", "loss"]
    for path, line in zip((grey, vivid), lines[2:4]):
        frames = read_video(path)[None]
        expected = Colorfulness()(frames, ["x"]).reward.item() + 0.5 * Brightness()(frames, ["x"]).reward.item()
        assert float(line.split()[-2]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("reward", "message"), [
    ("colourfulness", "reward_fn='colourfulness' is not valid; choose one of: 'colorfulness'"),
    ("{'colorfulness': 1.0, 'hsp': 0.5}", "reward_fn='hsp' is not valid; choose one of:"),
    ("{'colorfulness': 'a lot'}", "reward_fn['colorfulness']='a lot' must be a number (the weight)"),
    ("{'colorfulness': float('inf')}", "is not a valid dict"),
    ("{'colorfulness': 1e999}", "reward_fn['colorfulness']=inf is not a finite number"),
    ("{}", "reward_fn={} must be a reward name or a dict {name: weight}"),
    ("{'colorfulness': 1.0", "is not a valid dict"),
])
def test_bad_reward_is_one_line_exit_2(videos, capsys, reward: str, message: str) -> None:
    grey, _ = videos
    assert score_main(["--reward", reward, "--prompt", "x", str(grey)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vader: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("content", "message"), [
    (b"a caf\xe9 at night\n", "is not UTF-8 text (bad byte at line 1)"),
    (b"", "is empty: it needs one prompt per line"),
    (b"\n  \n\t\n", "is empty: it needs one prompt per line"),
])
def test_bad_prompts_file_is_one_line_exit_2(videos, tmp_path, capsys, content: bytes, message: str) -> None:
    grey, _ = videos
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    assert score_main(["--reward", "colorfulness", "--prompts", str(prompts), str(grey)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vader: error: --prompts={str(prompts)!r} ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_weighted_mix_of_image_rewards_is_chunked_like_its_parts(tmp_path) -> None:
    from vader.media import read_video
    from vader.score import _is_per_frame

    mix = rewards.build_reward({"colorfulness": 1.0, "brightness": 0.5})
    assert _is_per_frame(mix) and _is_per_frame(Colorfulness())
    video = stripes(frames=FRAME_CHUNK + 5)
    video[:, FRAME_CHUNK:] = 0.5
    path = write_video(tmp_path / "long.mp4", video, quality="lossless")
    [row] = score_rows(mix, [path], ["x"])
    whole = mix(read_video(path)[None], ["x"])
    assert row.reward == pytest.approx(whole.reward.item(), abs=1e-6)
