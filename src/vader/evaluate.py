"""`vader eval`: the base model against a LoRA on the same prompts and seeds, with reward-hacking guards.

    vader eval configs/toy/vader_train.py --lora project_dir/<run>/lora --seeds 4
    vader eval configs/tiny/vader_train.py --lora run/lora --prompts heldout.txt --rewards colorfulness,brightness

Every prompt is generated with the same seeds twice: once with the LoRA bypassed (the base model) and
once with it on, from one generator. Each reward scores the decoded frames themselves (not the mp4s,
so H.264 cannot shift a score). Per reward: the mean of base and LoRA with 95% percentile-bootstrap
intervals, the LoRA-minus-base difference with its interval, and the paired win rate (how often the
LoRA's video beats the base video of the same prompt and seed). Guards (vader.guards) catch a reward
rising for the wrong reasons: diversity across seeds, motion, temporal consistency, for base and LoRA.

Output: project_dir/eval/<run_name or eval-<time>>/ with base/ and lora/ (mp4s with matching names,
p<prompt>-s<seed>.mp4), eval.json and report.html (one self-contained page: tables, plots, and the
base and LoRA videos of each seed side by side); a table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from vader.checkpoint import (
    ADAPTER_FILE,
    add_lora,
    load_lora,
    lora_config,
    lora_disabled,
    saved_lora_config,
    set_lora_dropout,
)
from vader.config import is_callable_spec, load_config
from vader.errors import ArgumentParser, VaderError
from vader.guards import guards
from vader.media import write_video
from vader.models.presets import torch_dtype
from vader.preflight import preflight
from vader.prompts import read_prompt_file
from vader.report import eval_report, format_ci, format_number
from vader.rewards import build_reward, check_reward_weights, reward_names
from vader.rewards.callable import load_callable_reward
from vader.run import build_generator, fresh_name, load_prompts, make_accelerator, step_seed

# ---- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its percentile-bootstrap interval (n resamples, fixed seed)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    mean = float(x.mean())
    # percentiles of identical floats can differ from their mean in the last bit: keep mean inside
    return mean, min(float(low), mean), max(float(high), mean)


def paired_win_rate(base, lora) -> float:
    """Fraction of pairs (same prompt and seed) where the LoRA scores higher; a tie counts half."""
    b, lo = np.asarray(base, dtype=np.float64).ravel(), np.asarray(lora, dtype=np.float64).ravel()
    if b.shape != lo.shape or b.size == 0:
        raise ValueError(f"paired_win_rate needs two equal, non-empty lists (got {b.size} and {lo.size})")
    return float(((lo > b) + 0.5 * (lo == b)).mean())


# ---- evaluation ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    folder: Path
    prompts: list[str]
    seeds: int
    rewards: dict[str, dict[str, Any]]  # name -> base/lora mean+CI, delta+CI, win_rate
    per_prompt: list[dict[str, Any]]
    guards: dict[str, dict[str, float]]  # 'base' / 'lora' -> guard -> value
    scores: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)  # name -> side -> [prompt][seed]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


def _reward_label(reward_fn: str | dict[str, float]) -> str:
    return reward_fn if isinstance(reward_fn, str) else "mix(" + ",".join(f"{k}:{v:g}" for k, v in reward_fn.items()) + ")"


def parse_rewards(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise VaderError(f"--rewards={text!r} names no reward; give a comma-separated list, e.g. colorfulness,hps")
    for name in names:
        if name not in reward_names() and ":" not in name:
            raise VaderError(f"--rewards: {name!r} is not a reward; choose from: {', '.join(reward_names())} "
                             "(or module:function)")
    return list(dict.fromkeys(names))


def check_lora_path(lora: str | Path) -> Path:
    path = Path(lora)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        raise VaderError(f"--lora={str(lora)!r}: no such file (expected a LoRA folder holding {ADAPTER_FILE}, "
                         "the file itself, or an original peft_model_<step>.pt)")
    return path


def _build_reward(cfg, name: str | dict[str, float], device: torch.device):
    if is_callable_spec(name):
        return load_callable_reward(name, key="--rewards")
    return build_reward(name, device=device, dtype=torch_dtype(cfg.dtype), hps_version=cfg.hps_version,
                        sources=cfg.reward_sources, resize=cfg.reward_resize)


def evaluate(cfg, lora_path: str | Path, prompts: list[str] | None = None,
             rewards: list[str | dict[str, float]] | None = None, seeds: int = 4,
             labels: dict[str, str] | None = None) -> EvalResult:
    """Generate every prompt × seed with the base model and with the LoRA, score, compare, save.

    Seed s of prompt batch b uses generator seed step_seed(cfg.seed, 'eval', s, b) for both models,
    so base and LoRA (and two evals of one config) start from the same noise."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise VaderError(f"--seeds={seeds!r} must be a whole number >= 1")
    lora_path = check_lora_path(lora_path)
    if prompts is None:
        prompts, labels = load_prompts(cfg)
    prompts = list(dict.fromkeys(prompts))  # a repeated prompt would only duplicate its rows
    if not prompts:
        raise VaderError("--prompts: no prompts to evaluate")
    labels = labels or {}
    reward_fns = list(rewards) if rewards else [cfg.reward_fn]
    preflight(cfg, "infer")
    for fn in reward_fns:
        if not is_callable_spec(fn):
            check_reward_weights(fn, hps_version=cfg.hps_version, sources=cfg.reward_sources)

    accelerator = make_accelerator(cfg)
    device = accelerator.device
    root = Path(cfg.project_dir) / "eval"
    folder = root / fresh_name(root, cfg.run_name or f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    made_root = not root.exists()
    folder.mkdir(parents=True)
    try:
        gen = build_generator(cfg, SimpleNamespace(prompts=prompts), device)  # type: ignore[arg-type]
        saved = saved_lora_config(lora_path)
        add_lora(gen.denoiser, saved or lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                                     targets=gen.lora_target_modules))
        load_lora(gen.denoiser, lora_path, key="--lora")
        gen.denoiser.eval()
        set_lora_dropout(gen.denoiser, False)

        reward_prompts = gen.reward_prompts(prompts)
        scorers = {}
        for fn in reward_fns:
            reward = _build_reward(cfg, fn, device)
            prepare = getattr(reward, "prepare", None)
            if prepare is not None:
                prepare(list(dict.fromkeys(reward_prompts)),
                        {gen.reward_prompts([p])[0]: lab for p, lab in labels.items()})
            scorers[_reward_label(fn)] = reward

        batch = max(1, cfg.val_batch_size)
        videos: dict[str, list[list[torch.Tensor]]] = {"base": [[] for _ in prompts], "lora": [[] for _ in prompts]}
        scores = {name: {"base": [[] for _ in prompts], "lora": [[] for _ in prompts]} for name in scorers}
        for side in ("base", "lora"):
            (folder / side).mkdir()
            context = lora_disabled(gen.denoiser) if side == "base" else contextlib.nullcontext()
            with context, torch.no_grad():
                for s in range(seeds):
                    for b, start in enumerate(range(0, len(prompts), batch)):
                        idx = list(range(start, min(start + batch, len(prompts))))
                        seed = step_seed(cfg.seed, "eval", s, b)
                        with accelerator.autocast():
                            out = gen.generate([prompts[i] for i in idx], torch.Generator().manual_seed(seed))
                            for name, reward in scorers.items():
                                values = reward(out, [reward_prompts[i] for i in idx]).reward.float().cpu()
                                for i, v in zip(idx, values.tolist()):
                                    scores[name][side][i].append(v)
                        out = out.float().cpu()
                        for i, video in zip(idx, out):
                            videos[side][i].append(video)
                            write_video(folder / side / f"p{i:04d}-s{s}.mp4", video, fps=cfg.save_fps,
                                        quality=cfg.video_quality)
        result = _summarise(folder, prompts, seeds, scores, videos)
        (folder / "eval.json").write_text(json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False))
        eval_report(result, videos, fps=cfg.save_fps, guard_drop=cfg.guard_drop)
    except BaseException:
        shutil.rmtree(folder if not made_root else root, ignore_errors=True)  # a failed eval leaves no half folder
        raise
    finally:
        accelerator.end_training()
    return result


def _summarise(folder: Path, prompts: list[str], seeds: int, scores: dict, videos: dict) -> EvalResult:
    summary: dict[str, dict[str, Any]] = {}
    for name, sides in scores.items():
        base = np.array(sides["base"], dtype=np.float64)  # [P, S]
        lora = np.array(sides["lora"], dtype=np.float64)
        row: dict[str, Any] = {}
        for label, values in (("base", base), ("lora", lora), ("delta", lora - base)):
            mean, low, high = bootstrap_ci(values)
            row[label] = {"mean": mean, "ci95": [low, high]}
        row["win_rate"] = paired_win_rate(base, lora)
        row["n"] = int(base.size)
        summary[name] = row
    per_prompt = []
    for i, prompt in enumerate(prompts):
        entry: dict[str, Any] = {"index": i, "prompt": prompt,
                                 "videos": {side: [f"{side}/p{i:04d}-s{s}.mp4" for s in range(seeds)]
                                            for side in ("base", "lora")}}
        for name, sides in scores.items():
            entry[name] = {"base": float(np.mean(sides["base"][i])), "lora": float(np.mean(sides["lora"][i])),
                           "win_rate": paired_win_rate(sides["base"][i], sides["lora"][i])}
        per_prompt.append(entry)
    guard = {side: guards([torch.stack(v) for v in videos[side]]) for side in ("base", "lora")}
    return EvalResult(folder, prompts, seeds, summary, per_prompt, guard, scores)


def _finite(obj: Any) -> Any:
    """Strict JSON: NaN/inf (e.g. a reward that returned NaN) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_result(result: EvalResult) -> str:
    header = ["reward", "base [95% CI]", "lora [95% CI]", "lora-base [95% CI]", "win rate"]
    rows = []
    for name, r in result.rewards.items():
        cells = [format_ci(r[k]) for k in ("base", "lora", "delta")]
        rows.append([name, *cells, f"{r['win_rate']:.3f}"])
    for g in result.guards["base"]:
        rows.append([f"guard: {g}", format_number(result.guards["base"][g]), format_number(result.guards["lora"][g]),
                     "", ""])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    n = len(result.prompts)
    return "\n".join([f"{n} prompt(s) x {result.seeds} seed(s), same seeds for base and LoRA",
                      line(header), "  ".join("-" * w for w in widths), *map(line, rows),
                      f"videos, eval.json and report.html in {result.folder}"])


# ---- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a config override such as --seed 7 must not be taken for --seeds
    p = ArgumentParser(
        prog="vader eval", allow_abbrev=False,
        description="Compare the base model and a LoRA on the same prompts and seeds: per reward the mean "
                    "with 95%% bootstrap intervals and the paired win rate, per-prompt rows, and guards "
                    "(diversity across seeds, motion, temporal consistency). Any config key can follow "
                    "as an override (--num_frames 17, --scheduler.num_sampling_steps 10).",
    )
    p.add_argument("config", help="the training config the LoRA was made with")
    p.add_argument("--lora", required=True, metavar="PATH", help="LoRA folder (e.g. <run>/lora) or adapter file")
    p.add_argument("--prompts", metavar="FILE", help="prompts file, one per line (default: the config's prompts)")
    p.add_argument("--rewards", metavar="A,B", help="rewards to score with (default: the config's reward_fn)")
    p.add_argument("--seeds", default="4", metavar="N", help="seeds per prompt (default 4)")
    return p


def _seeds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise VaderError(f"--seeds={text!r} must be a whole number >= 1")
    return value


def run_eval(argv: list[str]) -> EvalResult:
    args, overrides = _parser().parse_known_args(argv)
    seeds = _seeds(args.seeds)
    check_lora_path(args.lora)
    rewards = parse_rewards(args.rewards) if args.rewards is not None else None
    prompts = labels = None
    if args.prompts is not None:
        prompts, labels = read_prompt_file(args.prompts, key="--prompts")
    cfg = load_config(args.config, overrides)
    result = evaluate(cfg, args.lora, prompts=prompts, rewards=rewards, seeds=seeds, labels=labels)
    print(format_result(result))
    return result


def eval_main(argv: list[str]) -> int:
    """`vader eval ...` (argv: the arguments after `eval`). Exit status: 0, or 2 on a user error."""
    try:
        run_eval(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); argparse has printed why
        return int(exc.code or 0)
    except VaderError as exc:
        print("vader: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    return 0


__all__ = ["EvalResult", "bootstrap_ci", "eval_main", "evaluate", "format_result", "paired_win_rate", "run_eval"]
