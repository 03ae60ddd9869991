"""Writing videos (PyAV, H.264 mp4), reading them back, and the reward-curve plot."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

from vader.errors import VaderError

# name -> (codec, pixel format, x264 options). 'standard' is what vader always wrote: small files that
# play everywhere, but 4:2:0 chroma and crf 18 lose colour detail (scores of the files drift from the
# in-memory reward). 'high' keeps full chroma at a near-transparent crf; 'lossless' stores the RGB
# frames exactly (read_video returns the same uint8 values), at many times the size.
VIDEO_QUALITIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "standard": ("libx264", "yuv420p", {"crf": "18", "preset": "fast"}),
    "high": ("libx264", "yuv444p", {"crf": "10", "preset": "fast"}),
    "lossless": ("libx264rgb", "rgb24", {"crf": "0", "preset": "fast"}),
}


def to_uint8(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, video: Tensor, fps: int = 24, quality: str = "standard") -> Path:
    """Save one video [3, T, H, W] in [-1, 1] as mp4 (written to a temp name, then renamed).

    quality: 'standard' (H.264 yuv420p crf 18), 'high' (H.264 yuv444p crf 10) or 'lossless'
    (H.264 RGB crf 0: `read_video` gives back exactly the uint8 frames). The same frames always
    give the same decoded frames (one encoder thread, colour conversion done before the encoder).
    """
    if quality not in VIDEO_QUALITIES:
        raise VaderError(f"video_quality={quality!r} must be one of {', '.join(VIDEO_QUALITIES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)
    if VIDEO_QUALITIES[quality][1] == "yuv420p":
        # 4:2:0 needs even sizes; pad by one pixel rather than resample
        h, w = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
        if (h, w) != frames.shape[1:3]:
            pad = ((0, 0), (0, h - frames.shape[1]), (0, w - frames.shape[2]), (0, 0))
            frames = np.pad(frames, pad, mode="edge")
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    try:
        _encode(tmp, frames, fps, quality)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def _encode(path: Path, frames: np.ndarray, fps: int, quality: str) -> None:
    codec, pix_fmt, options = VIDEO_QUALITIES[quality]
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # x264's frame/slice threads make the bitstream depend on scheduling; one thread does not
        stream.codec_context.thread_count = 1
        stream.options = {**options, "threads": "1"}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pix_fmt != "rgb24":
                # converting here, not inside the encoder's own scaler, made repeated encodes of the
                # same frames decode identically (issue 7 A: the implicit conversion did not)
                vf = vf.reformat(format=pix_fmt)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> Tensor:
    """An mp4 as [3, T, H, W] in [-1, 1] (float32)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short by a kill is skipped; a broken line
    elsewhere is a VaderError naming the file and the line."""
    lines = Path(metrics_path).read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:  # torn by an interrupted append: everything before it is whole
                break
            raise VaderError(f"{metrics_path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def finite_number(value: object) -> bool:
    """A real int/float that is not NaN or inf (metrics rows hold null for skipped values)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reward_curve_points(metrics_path: str | Path) -> tuple[list[int], list[float], list[int]]:
    """(steps, rewards) of the training rows with a finite reward, and the steps whose reward is
    null or not finite (updates skipped by the non-finite guard)."""
    rows = [r for r in read_metrics(metrics_path) if "reward" in r and "step" in r]
    good = [r for r in rows if finite_number(r["reward"])]
    return ([r["step"] for r in good], [float(r["reward"]) for r in good],
            [r["step"] for r in rows if not finite_number(r["reward"])])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: runs write PNGs on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Reward per optimizer step (and its moving average) from the run's metrics.jsonl.

    Steps whose reward is null or not finite (skipped updates) are marked with red crosses on the
    bottom edge and counted in the legend, so a gap in the curve is never silent."""
    plt = pyplot()

    steps, rewards, bad_steps = reward_curve_points(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, rewards, marker="o", ms=3, lw=1, label="reward")
    if len(rewards) >= 5:
        k = max(2, len(rewards) // 10)
        smooth = np.convolve(rewards, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
    if bad_steps:
        # axes-fraction y: the crosses sit on the bottom edge whatever the reward scale
        ax.plot(bad_steps, [0.0] * len(bad_steps), "x", color="red", ms=7, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"{len(bad_steps)} non-finite (skipped)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_before_after(before: list[tuple[str, Tensor, float | None]], after: list[tuple[str, Tensor, float | None]],
                      out_path: str | Path, max_rows: int = 8) -> Path:
    """A grid PNG: one row per prompt, the first/middle/last frame of the base model's video, then of
    the LoRA's, from the same seed. `before`/`after` hold (prompt, video [3, T, H, W] in [-1, 1],
    reward or None) in the same order."""
    import textwrap

    plt = pyplot()

    rows = list(zip(before, after))[:max_rows]
    if not rows:
        raise ValueError("plot_before_after needs at least one (before, after) pair")
    num_frames = rows[0][0][1].shape[1]
    picks = sorted({0, num_frames // 2, num_frames - 1})
    strips = []
    for (_, base, _), (_, lora, _) in rows:
        halves = []
        for video in (base, lora):
            frames = to_uint8(video)[picks]
            line = np.full((frames.shape[1], 2, 3), 255, np.uint8)  # a thin white line between frames
            halves.append(np.concatenate([part for f in frames for part in (f, line)][:-1], axis=1))
        gap = np.full((halves[0].shape[0], max(4, halves[0].shape[1] // 20), 3), 255, np.uint8)
        strips.append(np.concatenate([halves[0], gap, halves[1]], axis=1))
    height, width = strips[0].shape[:2]
    inch = 7.5 / width  # every strip 7.5 inches wide, whatever the video size
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, len(rows) * (height * inch + 0.45) + 0.3), dpi=110,
                             squeeze=False)
    for ax, strip, ((prompt, _, base_score), (_, _, lora_score)) in zip(axes[:, 0], strips, rows):
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        scores = "" if base_score is None or lora_score is None else f"   reward {base_score:.3f} → {lora_score:.3f}"
        ax.set_title(textwrap.shorten(prompt, 80) + scores, fontsize=8, loc="left")
    frames = "/".join(str(f) for f in picks)
    fig.suptitle(f"base (left) vs LoRA (right), same seed; frames {frames}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
