"""`vader score`: a reward's verdict on existing videos (e.g. before/after LoRA samples).

    vader score --reward hps --prompt "a cat surfing a wave" out/*.mp4
    vader score --reward actpred --prompts prompts.txt a.mp4 b.mp4
    vader score --reward "{'hps': 1.0, 'aesthetic': 0.5}" --prompt "a cat surfing a wave" out/*.mp4

A prompts file holds one prompt per line (the i-th for the i-th video) or a single prompt for all
videos; a line may give an explicit action label for ActPred after a TAB (`prompt<TAB>label`). An
image-to-video prompts file (`prompt<TAB>image path[<TAB>label]`) reads too: its images are not needed to
score videos and are not opened.
Image rewards (aesthetic, hps, pick_score, colorfulness, ...) score every frame and average; ActPred
classifies the whole clip.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vader import rewards
from vader.config import validate_reward
from vader.dtypes import TORCH_NAMES, parse_dtype
from vader.errors import ArgumentParser, VaderError
from vader.media import read_video
from vader.prompts import read_prompt_file, read_prompt_lines
from vader.rewards.base import Reward, WeightedReward
from vader.rewards.videoreward import set_video_fps

FRAME_CHUNK = 16  # frames per call for per-frame rewards (bounds memory on long videos)


@dataclass
class VideoScore:
    video: Path
    prompt: str
    reward: float
    loss: float
    target: str | None = None  # ActPred: the action rewarded


def _is_per_frame(reward) -> bool:
    """A reward that scores frames independently (the Reward base forward) may see a video in chunks."""
    if isinstance(reward, WeightedReward):  # a mix is per frame when every part is
        return all(_is_per_frame(part) for part in reward.parts.values())
    return type(reward).forward is Reward.forward


def video_fps(path: Path) -> float | None:
    """An mp4's frame rate (its stream's average rate), or None when the file does not say."""
    import av

    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except Exception:  # unreadable here: _read says why
        return None
    return float(rate) if rate else None


def _read(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise VaderError(f"no such video: {str(path)!r}")
    try:
        video = read_video(path)
    except Exception as exc:  # av raises its own error types for unreadable files
        raise VaderError(f"could not read video {str(path)!r} ({type(exc).__name__}: {exc})") from exc
    if video.shape[1] == 0:
        raise VaderError(f"video {str(path)!r} has no frames")
    return video


@torch.no_grad()
def score_video(reward, video: torch.Tensor, prompt: str, device=None) -> tuple[float, float]:
    """(reward, loss) of one video [3, T, H, W] in [-1, 1]."""
    device = torch.device(device) if device is not None else _device_of(reward)
    frames = video.unsqueeze(0)
    if _is_per_frame(reward) and frames.shape[2] > FRAME_CHUNK:
        total_r = total_l = 0.0
        for start in range(0, frames.shape[2], FRAME_CHUNK):
            chunk = frames[:, :, start:start + FRAME_CHUNK].to(device)
            out = reward(chunk, [prompt])
            total_r += out.reward.float().item() * chunk.shape[2]
            total_l += out.loss.float().item() * chunk.shape[2]
        return total_r / frames.shape[2], total_l / frames.shape[2]
    out = reward(frames.to(device), [prompt])
    return out.reward.float().item(), out.loss.float().item()


def _device_of(reward) -> torch.device:
    for p in reward.parameters():
        return p.device
    for b in reward.buffers():
        return b.device
    return torch.device("cpu")


def score_rows(reward, videos: list[Path], prompts: list[str], labels: dict[str, str] | None = None,
               device=None) -> list[VideoScore]:
    """Every video scored with its prompt (`prompts` has one per video, or one for all)."""
    videos = [Path(v) for v in videos]
    prompts = match_prompts(prompts, len(videos))
    prepare = getattr(reward, "prepare", None)
    if prepare is not None:
        prepare(list(dict.fromkeys(prompts)), labels or None)
    target_of = getattr(reward, "target_label", None)
    rows = []
    for video_path, prompt in zip(videos, prompts):
        set_video_fps(reward, video_fps(video_path))  # VideoReward samples the clip at 2 fps of its own rate
        r, loss = score_video(reward, _read(video_path), prompt, device)
        rows.append(VideoScore(video_path, prompt, r, loss, target_of(prompt) if target_of else None))
    return rows


def score_videos(reward, videos: list[Path], prompts: list[str]) -> list[float]:
    """The reward of each video (image rewards: mean over its frames; ActPred: the whole clip)."""
    return [row.reward for row in score_rows(reward, videos, prompts)]


def match_prompts(prompts: list[str], num_videos: int, source: str = "prompts") -> list[str]:
    """One prompt per video: i-th for i-th, or a single prompt repeated. VaderError otherwise."""
    if num_videos == 0:
        raise VaderError("no videos to score")
    if len(prompts) == 1:
        return list(prompts) * num_videos
    if len(prompts) != num_videos:
        raise VaderError(
            f"{len(prompts)} {source} for {num_videos} videos: give one prompt per video "
            "(the i-th line for the i-th video) or a single prompt for all"
        )
    return list(prompts)


def parse_reward(text: str) -> str | dict[str, float]:
    """`--reward`: a reward name or a weighted mix written as a dict, exactly as the config's
    reward_fn accepts it (validated by the config's own check, so the errors are the same)."""
    value: object = text.strip()
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise VaderError(f"reward_fn={text!r} is not a valid dict; write it as "
                             "\"{'hps': 1.0, 'aesthetic': 0.5}\"") from None
    validate_reward(value)
    return value  # type: ignore[return-value]


def _reward_label(reward_fn: str | dict[str, float]) -> str:
    return reward_fn if isinstance(reward_fn, str) else "reward"


def _fmt(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.3e}" if x != 0 and abs(x) < 1e-3 else f"{x:.4f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[VideoScore], reward_name: str = "reward", prompt_width: int = 48) -> str:
    """A plain-text table: video, prompt, [action,] reward, loss; then the mean."""
    with_target = any(r.target is not None for r in rows)
    header = ["video", "prompt", *(["action"] if with_target else []), reward_name, "loss"]
    body = [[str(r.video), _clip(r.prompt, prompt_width), *([r.target or ""] if with_target else []),
             _fmt(r.reward), _fmt(r.loss)] for r in rows]
    if rows:
        mean_r = sum(r.reward for r in rows) / len(rows)
        mean_l = sum(r.loss for r in rows) / len(rows)
        body.append([f"mean of {len(rows)}", "", *([""] if with_target else []), _fmt(mean_r), _fmt(mean_l)])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    numeric = {len(header) - 2, len(header) - 1}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in body[:-1]] if rows else []
    if rows:
        out += ["  ".join("-" * w for w in widths), line(body[-1])]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="vader score",
        description="Score existing videos with a reward model: prints video, prompt, reward and loss, and the mean. "
                    "Image rewards average over all frames; actpred classifies the whole clip.",
        epilog="Prompts file: one prompt per line (i-th for the i-th video) or one line for all videos; "
               "for actpred a line may end with a TAB and the action label (prompt<TAB>label).",
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (mp4 or anything PyAV reads)")
    p.add_argument("--reward", required=True, metavar="NAME",
                   help="reward name, e.g. aesthetic, hps, pick_score, actpred, colorfulness, or a weighted mix "
                        "as training's reward_fn takes it: \"{'hps': 1.0, 'aesthetic': 0.5}\"")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="one prompt for every video")
    src.add_argument("--prompts", metavar="FILE", help="prompts file (one per video, or one for all)")
    p.add_argument("--label", metavar="ACTION", help="actpred: the action to reward for every video (overrides the prompt)")
    p.add_argument("--hps-version", default="v2.1", choices=["v2.0", "v2.1"], help="HPS weights (default v2.1)")
    p.add_argument("--actpred-frames", default="decoded", choices=["decoded", "resample"],
                   help="actpred: classify the video's frames as they are (default, the original's) or resampled "
                        "to the classifier's own length (16)")
    p.add_argument("--reward-sources", default=None, metavar="DICT",
                   help="local folders or hub ids of the reward models, as the config's reward_sources: "
                        "\"{'videoreward': '/models/VideoReward', 'videoreward_base': '/models/Qwen2-VL-2B-Instruct'}\"")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(TORCH_NAMES), help="reward model dtype (default fp32)")
    return p


def parse_sources(text: str | None) -> dict[str, str]:
    """`--reward-sources`: a dict literal of source keys to paths or hub ids, checked as reward_sources is."""
    if text is None:
        return {}
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise VaderError(f"--reward-sources={text!r} is not a dict of names to paths; write it as "
                         "\"{'videoreward': '/models/VideoReward'}\" (keys: " + ", ".join(rewards.SOURCE_KEYS) + ")")
    try:
        return rewards.validate_sources(value)
    except VaderError as exc:
        raise VaderError(f"--reward-sources: {exc}") from None


def _prompts_from(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    if args.prompts is not None:  # an image-to-video prompts file's images are not needed to score videos
        found = read_prompt_file(args.prompts, key="--prompts")
        prompts, labels = found.prompts, found.labels
    elif args.prompt is not None:
        found = read_prompt_lines([args.prompt])
        prompts, labels = found.prompts or [""], found.labels
    else:
        prompts, labels = [""], {}
    if args.label:
        labels = {p: args.label for p in prompts}
    return prompts, labels


def run_score(args: argparse.Namespace) -> list[VideoScore]:
    """Build the reward, score the videos and print the table (raises VaderError on user mistakes)."""
    reward_fn = parse_reward(args.reward)
    sources = parse_sources(args.reward_sources)
    prompts, labels = _prompts_from(args)
    prompts = match_prompts(prompts, len(args.videos), "prompts in " + repr(args.prompts) if args.prompts else "prompts")
    missing = [v for v in args.videos if not Path(v).is_file()]
    if missing:
        raise VaderError(f"no such video: {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype("--dtype", args.dtype)
    # every missing model named at once
    rewards.check_reward_weights(reward_fn, hps_version=args.hps_version, sources=sources)
    reward = rewards.build_reward(reward_fn, device=device, dtype=dtype, hps_version=args.hps_version,
                                  actpred_frames=args.actpred_frames, sources=sources)
    reward = reward.to(device)
    rows = score_rows(reward, [Path(v) for v in args.videos], prompts, labels, device)
    print(format_table(rows, reward_name=_reward_label(reward_fn)))
    return rows


def score_main(argv: list[str]) -> int:
    """`vader score ...` (argv: the arguments after `score`). Exit status: 0, or 2 on a user error."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except VaderError as exc:  # a usage mistake
        print(f"vader: error: {exc}", file=sys.stderr)
        return 2
    try:
        run_score(args)
    except VaderError as exc:
        print(f"vader: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["VideoScore", "format_table", "match_prompts", "parse_reward", "run_score", "score_main", "score_rows", "score_video",
           "score_videos"]
