"""Writing videos (PyAV, H.264 mp4), reading them back, and the reward-curve plot."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor


def to_uint8(video: Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, video: Tensor, fps: int = 24) -> Path:
    """Save one video [3, T, H, W] in [-1, 1] as mp4 (written to a temp name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)
    # yuv420p needs even sizes; pad by one pixel rather than resample
    h, w = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    if (h, w) != frames.shape[1:3]:
        frames = np.pad(frames, ((0, 0), (0, h - frames.shape[1]), (0, w - frames.shape[2]), (0, 0)), mode="edge")
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    try:
        _encode(tmp, frames, fps)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def _encode(path: Path, frames: np.ndarray, fps: int) -> None:
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> Tensor:
    """An mp4 as [3, T, H, W] in [-1, 1] (float32)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1


def plot_reward_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Reward per optimizer step (and its moving average) from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward" in r]
    steps = [r["step"] for r in rows]
    rewards = [r["reward"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, rewards, marker="o", ms=3, lw=1, label="reward")
    if len(rewards) >= 5:
        k = max(2, len(rewards) // 10)
        smooth = np.convolve(rewards, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
