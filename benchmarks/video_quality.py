"""How far scores of saved mp4s lie from the in-memory reward, for each `video_quality`.

Training logs the reward of the decoded frames in memory; `vader score` reads the saved mp4s back.
The difference is the codec's. Videos: the tiny preset's generator output (random weights, as the
tiny validation videos before training) and a synthetic colourful clip (moving colour bars).

    python benchmarks/video_quality.py [--videos N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_preset_videos(n: int) -> tuple[torch.Tensor, list[str]]:
    from vader.backends.opensora import OpenSoraGenerator
    from vader.config import load_config
    from vader.prompts import read_prompt_file

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "tiny" / "vader_inference.py", ["--verbose", "0"])
    prompts = read_prompt_file(REPO / "configs" / "tiny" / "prompts.txt").prompts
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    gen = OpenSoraGenerator.build(cfg, torch.device("cpu"), prompts)
    with torch.no_grad():
        videos = gen.generate(prompts, torch.Generator().manual_seed(cfg.seed))
    return videos.float(), prompts


def colour_bars(frames: int = 17, h: int = 64, w: int = 64) -> torch.Tensor:
    """[1, 3, T, H, W]: saturated vertical bars moving one pixel per frame, plus a fine stripe texture."""
    x = torch.arange(w).view(1, 1, w).float()
    t = torch.arange(frames).view(frames, 1, 1).float()
    hue = ((x + t) / w * 6) % 6
    r = (hue < 1) | (hue >= 5)
    g = (hue >= 1) & (hue < 3)
    b = (hue >= 3) & (hue < 5)
    rgb = torch.stack([r, g, b]).float().expand(3, frames, h, w).clone()
    rgb[:, :, ::2] *= 0.8  # 1-pixel horizontal stripes: chroma detail 4:2:0 cannot keep
    return (rgb * 2 - 1)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4, help="tiny-preset videos to generate")
    args = parser.parse_args()

    from vader.media import VIDEO_QUALITIES, read_video, write_video
    from vader.rewards.builtin import Brightness, Colorfulness

    start = time.perf_counter()
    tiny, prompts = tiny_preset_videos(args.videos)
    sets = {"tiny preset (random weights)": tiny, "colour bars": colour_bars()}
    print(f"generated {tiny.shape[0]} tiny-preset videos {tuple(tiny.shape[1:])} in "
          f"{time.perf_counter() - start:.1f} s")
    rewards = {"colorfulness": Colorfulness(), "brightness": Brightness()}
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, videos in sets.items():
            print(f"\n{set_name}: {videos.shape[0]} video(s) of {videos.shape[2]} frames {videos.shape[3]}x{videos.shape[4]}")
            print(f"{'quality':<9} {'bytes/video':>11} {'max |px err|':>12}  " +
                  "  ".join(f"{n + ' memory -> file (diff)':>40}" for n in rewards))
            for quality in VIDEO_QUALITIES:
                size, max_err = 0, 0.0
                cells = []
                back = []
                for i, video in enumerate(videos):
                    path = write_video(Path(tmp) / f"{quality}-{i}.mp4", video, fps=8, quality=quality)
                    size += path.stat().st_size
                    decoded = read_video(path)[:, :, : video.shape[2], : video.shape[3]]
                    max_err = max(max_err, (decoded - video.clamp(-1, 1)).abs().max().item() * 127.5)
                    back.append(decoded)
                decoded = torch.stack(back)
                for reward in rewards.values():
                    mem = reward(videos, [""] * len(videos)).reward.mean().item()
                    file = reward(decoded, [""] * len(videos)).reward.mean().item()
                    cells.append(f"{mem:.4f} -> {file:.4f} ({100 * (file - mem) / mem:+6.2f}%)")
                print(f"{quality:<9} {size // len(videos):>11} {max_err:>10.1f}/255  " +
                      "  ".join(f"{c:>40}" for c in cells))


if __name__ == "__main__":
    main()
