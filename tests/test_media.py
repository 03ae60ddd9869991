"""Videos to mp4 and back, atomic writes, and the reward-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vader.errors import VaderError
from vader.media import (
    VIDEO_QUALITIES,
    plot_reward_curve,
    read_metrics,
    read_video,
    reward_curve_points,
    to_uint8,
    write_video,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def smooth_video(t: int = 6, h: int = 32, w: int = 48) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1]: slow gradients, and each channel different, so codec error stays small."""
    tt = torch.linspace(0, 1, t).view(t, 1, 1)
    yy = torch.linspace(-1, 1, h).view(1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, w)
    r = 0.8 * xx.expand(t, h, w)
    g = 0.8 * yy.expand(t, h, w)
    b = (0.6 * (tt - 0.5) * 2 + 0.2 * xx * yy).expand(t, h, w)
    return torch.stack([r, g, b]).clamp(-1, 1)


def test_to_uint8_maps_the_range_and_layout() -> None:
    video = torch.zeros(3, 2, 4, 5)
    video[0] = -1
    video[1] = 1
    video[2, 1] = 5  # clamped
    out = to_uint8(video)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 0).all() and (out[..., 1] == 255).all()
    assert (out[0, ..., 2] == 128).all() and (out[1, ..., 2] == 255).all()


def test_round_trip_keeps_shape_and_values(tmp_path: Path) -> None:
    video = smooth_video()
    path = write_video(tmp_path / "clip.mp4", video, fps=8)
    assert path == tmp_path / "clip.mp4" and path.stat().st_size > 0
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == torch.float32
    assert back.min() >= -1 and back.max() <= 1
    assert (back - video).abs().mean() < 0.1
    # per channel and per frame too: a channel swap or a frame shuffle would fail here
    for c in range(3):
        assert (back[c] - video[c]).abs().mean() < 0.1
    for t in range(video.shape[1]):
        assert (back[:, t] - video[:, t]).abs().mean() < 0.1


def test_round_trip_would_catch_a_mismatch(tmp_path: Path) -> None:
    video = smooth_video()
    back = read_video(write_video(tmp_path / "clip.mp4", video))
    assert (back - video.flip(0)).abs().mean() > 0.2  # swapping R and B is far beyond codec error


def test_frame_rate_is_written(tmp_path: Path) -> None:
    import av

    path = write_video(tmp_path / "clip.mp4", smooth_video(t=4), fps=12)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 12


@pytest.mark.parametrize(("h", "w"), [(15, 17), (16, 17), (15, 16)])
def test_odd_sizes_are_padded_to_even(tmp_path: Path, h: int, w: int) -> None:
    video = smooth_video(t=3, h=h, w=w)
    back = read_video(write_video(tmp_path / "odd.mp4", video))
    assert back.shape == (3, 3, h + h % 2, w + w % 2)
    assert (back[:, :, :h, :w] - video).abs().mean() < 0.1
    if h % 2:  # the padding repeats the edge row, not black
        assert (back[:, :, h, :w] - video[:, :, h - 1]).abs().mean() < 0.15


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "clip.mp4"
    write_video(out, smooth_video(t=3))
    first = out.read_bytes()
    write_video(out, -smooth_video(t=5))
    assert [p.name for p in out.parent.iterdir()] == ["clip.mp4"]  # no temp file left behind
    assert out.read_bytes() != first
    assert read_video(out).shape[1] == 5


def test_reward_curve_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": 0.1 * s + 0.01 * (s % 3), "loss": -0.1 * s} for s in range(1, 13)]
    rows.insert(3, {"step": 3, "val_reward": 0.5})  # rows without 'reward' are skipped
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = plot_reward_curve(metrics, tmp_path / "reward_curve.png")
    assert out == tmp_path / "reward_curve.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (600, 350)  # figsize (6, 3.5) at 100 dpi


def test_reward_curve_with_few_points(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "reward": 0.3}) + "\n")
    out = plot_reward_curve(metrics, tmp_path / "curve.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def noisy_video(t: int = 5, h: int = 21, w: int = 30, seed: int = 0) -> torch.Tensor:
    """Per-pixel noise in every channel: the hardest case for a lossy codec (and odd sizes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 2 - 1


def as_saved(video: torch.Tensor) -> torch.Tensor:
    """What a perfect codec would give back: the video rounded to uint8, in [-1, 1]."""
    return torch.from_numpy(to_uint8(video)).permute(3, 0, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("video", [noisy_video(), smooth_video(t=4, h=15, w=17)], ids=["noise", "smooth-odd"])
def test_lossless_round_trip_is_exact(tmp_path: Path, video: torch.Tensor) -> None:
    back = read_video(write_video(tmp_path / "clip.mp4", video, quality="lossless"))
    assert back.shape == video.shape  # no padding: RGB needs no even size
    assert torch.equal(back, as_saved(video))


def test_high_quality_is_closer_than_standard(tmp_path: Path) -> None:
    video = noisy_video(h=32, w=48)
    errors = {}
    for quality in ("standard", "high"):
        back = read_video(write_video(tmp_path / f"{quality}.mp4", video, quality=quality))
        errors[quality] = (back[:, :, :32, :48] - as_saved(video)).abs().mean().item()
    assert errors["high"] < errors["standard"] / 3, errors
    assert errors["high"] > 0  # still a lossy codec: the lossless test is the one that must be exact


@pytest.mark.parametrize("quality", sorted(VIDEO_QUALITIES))
def test_same_frames_decode_to_identical_frames(tmp_path: Path, quality: str) -> None:
    video = noisy_video(t=6, h=32, w=48, seed=3)
    first = read_video(write_video(tmp_path / "a.mp4", video, quality=quality))
    for i in range(2):
        again = read_video(write_video(tmp_path / f"b{i}.mp4", video.clone(), quality=quality))
        assert torch.equal(first, again)


def test_unknown_video_quality_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(VaderError, match=r"video_quality='best' must be one of standard, high, lossless$"):
        write_video(tmp_path / "x.mp4", smooth_video(t=2), quality="best")
    assert not list(tmp_path.iterdir())


def _write_rows(path: Path, rows: list, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_reward_curve_marks_null_and_nan_rewards(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": 0.3 + 0.01 * s} for s in range(1, 9)]
    rows[2]["reward"] = None  # a skipped non-finite step, as train writes it
    rows[5]["reward"] = float("nan")  # json.dumps writes a bare NaN token (older runs)
    _write_rows(metrics, rows)
    steps, rewards, skipped = reward_curve_points(metrics)
    assert skipped == [3, 6]
    assert steps == [1, 2, 4, 5, 7, 8] and all(np.isfinite(rewards))
    out = plot_reward_curve(metrics, tmp_path / "curve.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_reward_curve_with_only_skipped_steps(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    _write_rows(metrics, [{"step": 1, "reward": None}, {"step": 2, "reward": None}])
    assert reward_curve_points(metrics) == ([], [], [1, 2])
    assert plot_reward_curve(metrics, tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)


def test_torn_last_metrics_line_is_skipped(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": 0.1 * s} for s in range(1, 4)]
    _write_rows(metrics, rows, tail='{"step": 4, "rew')  # killed in the middle of an append
    assert read_metrics(metrics) == rows
    assert reward_curve_points(metrics)[0] == [1, 2, 3]
    assert plot_reward_curve(metrics, tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)


def test_broken_metrics_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "rew\n{"step": 3, "reward": 0.3}\n')
    with pytest.raises(VaderError, match="line 2 is not JSON"):
        read_metrics(metrics)


def test_video_qualities_are_the_config_choices() -> None:
    from vader.config import VIDEO_QUALITIES as CONFIG_CHOICES

    assert tuple(VIDEO_QUALITIES) == tuple(CONFIG_CHOICES)
