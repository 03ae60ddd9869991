"""Videos to mp4 and back, atomic writes, and the reward-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vader.media import plot_reward_curve, read_video, to_uint8, write_video

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
