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
base and LoRA videos of each seed side by side); a table is printed. The folder is written as
project_dir/eval/.<name>.partial and renamed into place once eval.json and report.html are in it: an
error, Ctrl-C or SIGTERM removes it, and the partial folder of a killed eval (kill -9) is removed by the
next eval. A --run_name that already has a folder is refused (as `vader train` does).

Image-to-video: a prompts file of `prompt<TAB>image path` lines (vader.prompts) gives each prompt its first
frame, checked against the model before anything is created (vader.images); the table, eval.json
(`images`, and `image` per prompt) and the report's title say that the prompts had first frames.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
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
    lora_file,
    saved_lora_config,
    set_lora_dropout,
)
from vader.config import is_callable_spec, load_config
from vader.errors import ArgumentParser, VaderError
from vader.guards import guards
from vader.images import check_images
from vader.media import write_video
from vader.models.presets import torch_dtype
from vader.preflight import preflight
from vader.prompts import PromptList, read_prompt_file
from vader.report import eval_report, format_ci, format_number
from vader.rewards import build_reward, check_reward_weights, reward_names
from vader.rewards.callable import load_callable_reward
from vader.rewards.videoreward import set_video_fps
from vader.run import build_generator, load_prompts, make_accelerator, step_seed

MAX_EVAL_VIDEOS = 10_000  # prompts x seeds per model: beyond it an eval runs for days (and holds every video)
IGNORED_KEYS = ("lora_ckpt_path", "resume_from")  # config keys eval would ignore: the LoRA is --lora
PARTIAL_SUFFIX = ".partial"  # project_dir/eval/.<name>.partial: an eval being written
OWNER_FILE = ".owner"  # in a partial folder: "host pid start-time" of the eval writing it
SIDES = ("base", "lora")
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # a disk full, read-only, locked

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
    images: dict[str, str] = field(default_factory=dict)  # prompt -> its first-frame image (image-to-video)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


def _reward_label(reward_fn: str | dict[str, float]) -> str:
    return reward_fn if isinstance(reward_fn, str) else "mix(" + ",".join(f"{k}:{v:g}" for k, v in reward_fn.items()) + ")"


def parse_rewards(text: str) -> list[str]:
    if text.strip().startswith(("{", "[", "(")):
        raise VaderError(f"--rewards={text!r}: --rewards takes a comma-separated list of reward names (or "
                         "module:function), each scored on its own, e.g. --rewards colorfulness,hps; a weighted mix "
                         "such as {'colorfulness': 1.0, 'hps': 0.5} belongs in the config's reward_fn (evaluated "
                         "when --rewards is left out)")
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise VaderError(f"--rewards={text!r} names no reward; give a comma-separated list, e.g. colorfulness,hps")
    for name in names:
        module, colon, _ = name.partition(":")
        if colon and module.strip().strip("'\"") in reward_names():
            raise VaderError(f"--rewards={text!r}: {name!r} looks like a weight; --rewards takes a comma-separated "
                             "list of reward names (or module:function), each scored on its own; a weighted mix "
                             "belongs in the config's reward_fn, e.g. {'colorfulness': 1.0, 'hps': 0.5}")
        if name not in reward_names() and ":" not in name:
            raise VaderError(f"--rewards: {name!r} is not a reward; choose from: {', '.join(reward_names())} "
                             "(or module:function)")
    return list(dict.fromkeys(names))


def check_lora_path(lora: str | Path) -> Path:
    path = Path(lora)
    if path.name == "adapter_config.json" and path.is_file():
        raise VaderError(f"--lora={str(lora)!r} is the LoRA's settings file, not its weights: give the folder "
                         f"({str(path.parent)!r}) or its {ADAPTER_FILE}")
    file = lora_file(path)  # our adapter folder, a diffusers lora folder, or the file
    if not file.is_file():
        raise VaderError(f"--lora={str(lora)!r}: no such file (expected a LoRA folder holding {ADAPTER_FILE}, "
                         "the file itself, or an original peft_model_<step>.pt)")
    return path


def check_overrides(overrides: list[str]) -> None:
    """Config keys that name a LoRA (lora_ckpt_path, resume_from) would be silently ignored by eval:
    the LoRA it evaluates is --lora."""
    for token in overrides:
        if not token.startswith("-") and "=" not in token:
            continue  # a value
        key = token.lstrip("-").partition("=")[0].replace("-", "_")
        if key in IGNORED_KEYS:
            raise VaderError(f"--{key} is not used by vader eval (the LoRA it evaluates is --lora): give the LoRA "
                             "as --lora PATH, e.g. --lora <run>/lora or --lora <run>/checkpoints/checkpoint-<step>")


def check_video_count(prompts: int, seeds: int) -> None:
    """prompts x seeds videos per model, at most MAX_EVAL_VIDEOS: an absurd --seeds is refused, not run for days."""
    if prompts * seeds <= MAX_EVAL_VIDEOS:
        return
    hint = (f"e.g. --seeds {MAX_EVAL_VIDEOS // prompts}" if MAX_EVAL_VIDEOS // prompts >= 1
            else "a shorter prompts file")
    shown = str(seeds) if seeds < 10**15 else "10**15 or more"
    total = f"{prompts * seeds:,}" if seeds < 10**15 else "more than 10**15"
    raise VaderError(f"--seeds={shown} x {prompts} prompt(s) = {total} videos per model (each made twice: base and "
                     f"LoRA), more than the limit of {MAX_EVAL_VIDEOS:,}; use fewer seeds or prompts ({hint})")


def eval_root(cfg) -> Path:
    """project_dir/eval, checked: it must be (or become) a writable folder. Creates nothing."""
    root = Path(cfg.project_dir) / "eval"
    if os.path.lexists(root) and not root.is_dir():
        what = "a file" if root.is_file() else "a broken link" if root.is_symlink() else "not a folder"
        raise VaderError(f"project_dir={cfg.project_dir!r}: {root} is {what}, not a folder; vader eval writes its "
                         f"results in {root}/: move that away or choose another --project_dir")
    if root.is_dir() and not os.access(root, os.W_OK | os.X_OK):
        raise VaderError(f"project_dir={cfg.project_dir!r}: the folder {root} is not writable")
    return root


def _start_time(pid: int) -> str:
    """The process's start time (Linux /proc), so that a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def _owner_line() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}\n"


def partial_owner(partial: Path) -> str | None:
    """Who is writing `partial` now ('pid 123 on host'), or None when its eval is gone (a stale folder)."""
    try:
        host, pid_text, started = (partial / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):  # no owner line yet: only a folder made a moment ago may still be in use
        try:
            return "an eval that is starting" if time.time() - partial.stat().st_mtime < 60 else None
        except OSError:
            return None
    if host != socket.gethostname():
        return f"pid {pid} on {host}"  # another machine's process: it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return None
    if started != "-" and _start_time(pid) not in ("-", started):
        return None  # the pid now belongs to another process
    return f"pid {pid}"


def partial_path(root: Path, name: str) -> Path:
    return root / f".{name}{PARTIAL_SUFFIX}"


def remove_stale_partials(root: Path) -> list[Path]:
    """Remove the partial folders of evals that were killed (SIGKILL, power loss); returns them."""
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.glob(f".*{PARTIAL_SUFFIX}")):
        if path.is_dir() and not path.is_symlink() and partial_owner(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_run_name(cfg, root: Path) -> None:
    """With run_name set, the eval folder is root/run_name: a plain, unused name (as `vader train` refuses
    to mix two runs in one folder). Without it, a timestamped name is chosen later."""
    name = cfg.run_name
    if not name:
        return
    if "/" in name or os.sep in name or name.startswith(".") or "\0" in name:
        raise VaderError(f"run_name={name!r}: an eval's folder name must be a plain name (no '/', not starting "
                         "with '.', which marks partial folders), e.g. --run_name heldout-eval")
    final = root / name
    if os.path.lexists(final):
        raise VaderError(f"run_name={name!r}: {final} already exists (an earlier eval); choose another run_name or "
                         "delete that folder")
    partial = partial_path(root, name)
    owner = partial_owner(partial) if partial.is_dir() else None
    if owner is not None:
        raise VaderError(f"run_name={name!r}: another vader eval ({owner}) is writing {partial} now; wait for it or "
                         "choose another run_name")


def _fresh_eval_name(root: Path) -> str:
    stem = f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stem, 1
    while os.path.lexists(root / name) or os.path.lexists(partial_path(root, name)):
        n += 1
        name = f"{stem}-{n}"
    return name


def _make_partial(root: Path, run_name: str | None) -> Path:
    """Create (and own) root/.<name>.partial: run_name, or the first free timestamped name."""
    while True:
        name = run_name or _fresh_eval_name(root)
        partial = partial_path(root, name)
        try:
            partial.mkdir(parents=True)
            return partial
        except FileExistsError:  # another eval took the name a moment ago
            if run_name:
                raise VaderError(f"run_name={run_name!r}: another vader eval is writing {partial} now; wait for it "
                                 "or choose another run_name") from None


class Stopped(SystemExit):
    """SIGTERM/SIGHUP during an eval: raised in the main thread so that the partial folder is removed;
    exit status 128 + the signal number, as a shell reports for a killed command."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block's duration, SIGTERM and SIGHUP (unless ignored, as under nohup) raise Stopped (once: a
    second signal while the cleanup runs is ignored, so the cleanup finishes); the previous handlers are
    restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    raised = []

    def handler(signum, _frame):
        if not raised:
            raised.append(signum)
            raise Stopped(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _build_reward(cfg, name: str | dict[str, float], device: torch.device):
    if is_callable_spec(name):
        return load_callable_reward(name, key="--rewards")
    reward = build_reward(name, device=device, dtype=torch_dtype(cfg.dtype), hps_version=cfg.hps_version,
                          sources=cfg.reward_sources, resize=cfg.reward_resize)
    set_video_fps(reward, cfg.save_fps)  # VideoReward samples the decoded clip at 2 fps of the saved rate
    return reward


def _load_lora(gen, lora_path: Path, saved, cfg) -> None:
    config = saved or lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets=gen.lora_target_modules)
    try:
        add_lora(gen.denoiser, config)
    except ValueError as exc:  # peft: its target modules are not in this denoiser
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VaderError(f"--lora={str(lora_path)!r} does not fit this config's denoiser ({first}); evaluate it with "
                         "the config it was trained with") from None
    load_lora(gen.denoiser, lora_path, key="--lora")
    gen.denoiser.eval()
    set_lora_dropout(gen.denoiser, False)


def _with_prompts_of(cfg, found: PromptList):  # type: ignore[no-untyped-def]
    """The config as the preflight is to see it when eval's prompts come from their own file (--prompts):
    those prompts, and their first-frame images, are what is checked, not the config's."""
    if found.file is None:
        return cfg
    checked = copy.copy(cfg)
    checked.prompt, checked.prompt_path, checked.start_index, checked.end_index = None, found.file, None, None
    return checked


def evaluate(cfg, lora_path: str | Path, prompts: list[str] | PromptList | None = None,
             rewards: list[str | dict[str, float]] | None = None, seeds: int = 4,
             labels: dict[str, str] | None = None) -> EvalResult:
    """Generate every prompt × seed with the base model and with the LoRA, score, compare, save.

    `prompts`: a list, or a prompts file as `read_prompt_file` gives it (its labels and first-frame
    images with it); None: the config's. First-frame images are checked against the model (as the
    preflight checks the config's) before anything is created, and given to the generator.

    Seed s of prompt batch b uses generator seed step_seed(cfg.seed, 'eval', s, b) for both models,
    so base and LoRA (and two evals of one config) start from the same noise.

    The folder is written as project_dir/eval/.<name>.partial and renamed to <name> once eval.json and
    report.html are in it; an error, Ctrl-C or SIGTERM removes it (and what this eval created), and a
    partial folder left by a killed eval is removed by the next one."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise VaderError(f"--seeds={seeds!r} must be a whole number >= 1")
    lora_path = check_lora_path(lora_path)
    saved = saved_lora_config(lora_path, key="--lora")
    explicit = prompts is not None
    found = load_prompts(cfg) if prompts is None else prompts if isinstance(prompts, PromptList) else \
        PromptList(list(prompts), dict(labels or {}), {}, {p: i + 1 for i, p in enumerate(prompts)}, "--prompts")
    prompts = list(dict.fromkeys(found.prompts))  # a repeated prompt would only duplicate its rows
    if not prompts:
        raise VaderError("--prompts: no prompts to evaluate")
    found = found.subset(prompts)
    check_video_count(len(prompts), seeds)
    labels = {**found.labels, **(labels or {})}
    reward_fns = list(rewards) if rewards else [cfg.reward_fn]
    preflight(_with_prompts_of(cfg, found) if explicit else cfg, "infer")
    if explicit and found.file is None:  # a list: the preflight checked the config's prompts, these are generated
        check_images(cfg, found, "infer")
    for fn in reward_fns:
        if not is_callable_spec(fn):
            check_reward_weights(fn, hps_version=cfg.hps_version, sources=cfg.reward_sources)
    root = eval_root(cfg)
    check_run_name(cfg, root)

    accelerator = make_accelerator(cfg)
    device = accelerator.device
    project = Path(cfg.project_dir)
    made = project if not os.path.lexists(project) else root if not os.path.lexists(root) else None
    partial: Path | None = None
    final: Path | None = None
    try:
        with stop_on_signals():
            try:
                for stale in remove_stale_partials(root):
                    print(f"[vader] removed {stale}: the partial folder of an eval that was killed")
                scorers = {_reward_label(fn): _build_reward(cfg, fn, device) for fn in reward_fns}
                gen = build_generator(cfg, SimpleNamespace(prompts=prompts, found=found),  # type: ignore[arg-type]
                                      device)
                _load_lora(gen, lora_path, saved, cfg)
                reward_prompts = gen.reward_prompts(prompts)
                for reward in scorers.values():
                    prepare = getattr(reward, "prepare", None)
                    if prepare is not None:
                        prepare(list(dict.fromkeys(reward_prompts)),
                                {gen.reward_prompts([p])[0]: lab for p, lab in labels.items()})

                partial = _make_partial(root, cfg.run_name)
                final = root / partial.name[1:-len(PARTIAL_SUFFIX)]
                (partial / OWNER_FILE).write_text(_owner_line())
                for side in SIDES:
                    (partial / side).mkdir()
                videos, scores = _generate(cfg, gen, accelerator, scorers, prompts, reward_prompts, seeds, partial,
                                           lora_path)
                result = _summarise(final, prompts, seeds, scores, videos)
                result.images = {p: str(ref.path) for p, ref in found.images.items()}
                for entry in result.per_prompt:
                    if entry["prompt"] in result.images:
                        entry["image"] = result.images[entry["prompt"]]
                (partial / "eval.json").write_text(json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False))
                eval_report(result, videos, fps=cfg.save_fps, guard_drop=cfg.guard_drop, path=partial / "report.html",
                            title=eval_title(result))
                (partial / OWNER_FILE).unlink()
                if os.path.lexists(final):
                    raise VaderError(f"run_name={final.name!r}: {final} appeared while this eval ran (another eval "
                                     "of the same name?); choose another run_name")
                os.rename(partial, final)
                partial = None
            except BaseException as exc:
                # a failed or stopped eval leaves nothing: its partial folder, and what it created
                renamed = partial is not None and final is not None and not os.path.lexists(partial) \
                    and final.is_dir()  # stopped between the rename and `partial = None`: complete, kept
                if partial is not None and not renamed:
                    shutil.rmtree(partial, ignore_errors=True)
                if renamed:
                    pass
                elif made is project:
                    shutil.rmtree(project, ignore_errors=True)
                elif made is not None:
                    with contextlib.suppress(OSError):
                        made.rmdir()  # only if empty: another eval may be writing next to this one
                if (isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS
                        and str(exc.filename or "").startswith(str(project))):  # the disk, not a bug: one line
                    raise VaderError(f"project_dir={cfg.project_dir!r}: cannot write there ({exc.strerror}: "
                                     f"{exc.filename}); nothing was kept") from None
                raise
    finally:
        accelerator.end_training()
    return result


def _generate(cfg, gen, accelerator, scorers: dict, prompts: list[str], reward_prompts: list[str], seeds: int,
              folder: Path, lora_path: Path) -> tuple[dict, dict]:
    """Every prompt x seed, base then LoRA for each batch (same generator seed); videos checked finite and
    scored, mp4s written. A non-finite video or score stops the eval at the end of that seed's pass."""
    batch = max(1, cfg.val_batch_size)
    videos: dict[str, list[list[torch.Tensor]]] = {side: [[] for _ in prompts] for side in SIDES}
    scores = {name: {side: [[] for _ in prompts] for side in SIDES} for name in scorers}
    for s in range(seeds):
        bad_videos = {side: 0 for side in SIDES}
        bad_scores = {(name, side): 0 for name in scorers for side in SIDES}
        for b, start in enumerate(range(0, len(prompts), batch)):
            idx = list(range(start, min(start + batch, len(prompts))))
            seed = step_seed(cfg.seed, "eval", s, b)
            for side in SIDES:
                context = lora_disabled(gen.denoiser) if side == "base" else contextlib.nullcontext()
                with context, torch.no_grad(), accelerator.autocast():
                    out = gen.generate([prompts[i] for i in idx], torch.Generator().manual_seed(seed))
                    finite = torch.isfinite(out.detach().float()).flatten(1).all(dim=1).cpu()
                    bad_videos[side] += int((~finite).sum())
                    for name, reward in scorers.items():
                        batch_prompts = [reward_prompts[i] for i in idx]
                        found = {name: reward(out, batch_prompts).reward}
                        parts = getattr(reward, "parts", None)  # a reward made of parts (toy_judge's attributes)
                        if parts is not None:  # is compared part by part too, as <name>/<part>
                            found.update({f"{name}/{k}": v for k, v in parts(out, batch_prompts).items()})
                        for key, values in found.items():
                            rows = scores.setdefault(key, {sd: [[] for _ in prompts] for sd in SIDES})
                            for i, v, ok in zip(idx, values.float().cpu().tolist(), finite.tolist()):
                                rows[side][i].append(v)
                                bad = int(ok and not math.isfinite(v))
                                bad_scores[key, side] = bad_scores.get((key, side), 0) + bad
                out = out.float().cpu()
                for i, video, ok in zip(idx, out, finite.tolist()):
                    videos[side][i].append(video)
                    if ok:  # a NaN video is not worth an mp4: the eval stops below
                        write_video(folder / side / f"p{i:04d}-s{s}.mp4", video, fps=cfg.save_fps,
                                    quality=cfg.video_quality)
        _check_finite(bad_videos, bad_scores, len(prompts), s, lora_path)
    return videos, scores


def _check_finite(bad_videos: dict[str, int], bad_scores: dict[tuple[str, str], int], n: int, seed: int,
                  lora_path: Path) -> None:
    """Non-finite videos or scores make a mean, interval and win rate meaningless: one clear error."""
    base, lora = bad_videos["base"], bad_videos["lora"]
    if base:
        raise VaderError(f"{base} of {n} base-model videos of seed {seed} are non-finite (NaN or inf) without the "
                         "LoRA: the base model itself fails in this setting (dtype/mixed_precision overflow?), so "
                         "nothing can be compared; eval stopped, no folder kept")
    if lora:
        raise VaderError(f"--lora={str(lora_path)!r} is broken: {lora} of {n} LoRA videos of seed {seed} are "
                         "non-finite (NaN or inf) while the base model's videos of the same prompts and seeds are "
                         "finite (its weights make the sampler overflow; a diverged training?); eval stopped, no "
                         "folder kept: evaluate an earlier checkpoint")
    for (name, side), count in bad_scores.items():
        if count:
            raise VaderError(f"reward {name!r} gave {count} non-finite score(s) (NaN or inf) for the {n} {side} "
                             f"videos of seed {seed}, whose frames are finite: the reward fails on these videos; "
                             "eval stopped, no folder kept")


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


def first_frames_note(result: EvalResult) -> str | None:
    """What an eval of image prompts says beside its numbers: the videos start from given images."""
    if not result.images:
        return None
    return (f"{len(result.images)} of {len(result.prompts)} prompt(s) with a first-frame image (image-to-video): "
            "frame 0 reproduces the image; the rewards score the whole videos, frame 0 included")


def eval_title(result: EvalResult) -> str:
    """The report page's title: says when the prompts had first-frame images."""
    note = first_frames_note(result)
    return "vader eval: base vs LoRA" + (f" — {note}" if note else "")


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
    note = first_frames_note(result)
    return "\n".join([f"{n} prompt(s) x {result.seeds} seed(s), same seeds for base and LoRA",
                      *([note] if note else []), line(header), "  ".join("-" * w for w in widths), *map(line, rows),
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
    p.add_argument("--prompts", metavar="FILE", help="prompts file, one per line, prompt<TAB>image path for an "
                                                     "image-to-video model (default: the config's prompts)")
    p.add_argument("--rewards", metavar="A,B", help="rewards to score with (default: the config's reward_fn)")
    p.add_argument("--seeds", default="4", metavar="N", help="seeds per prompt (default 4)")
    return p


def _seeds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise VaderError(f"--seeds={shown!r} must be a whole number >= 1")
    return value


def run_eval(argv: list[str]) -> EvalResult:
    args, overrides = _parser().parse_known_args(argv)
    check_overrides(overrides)
    seeds = _seeds(args.seeds)
    check_lora_path(args.lora)
    rewards = parse_rewards(args.rewards) if args.rewards is not None else None
    prompts = read_prompt_file(args.prompts, key="--prompts") if args.prompts is not None else None
    cfg = load_config(args.config, overrides)
    result = evaluate(cfg, args.lora, prompts=prompts, rewards=rewards, seeds=seeds)
    print(format_result(result))
    return result


def eval_main(argv: list[str]) -> int:
    """`vader eval ...` (argv: the arguments after `eval`). Exit status: 0, or 2 on a user error."""
    try:
        run_eval(argv)
    except Stopped as exc:  # SIGTERM/SIGHUP: the partial folder is gone
        print(f"vader: eval stopped by {exc.signal_name}; its partial folder was removed", file=sys.stderr)
        return int(exc.code)  # type: ignore[arg-type]
    except SystemExit as exc:  # --help (0)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except VaderError as exc:
        print("vader: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    return 0


__all__ = ["EvalResult", "bootstrap_ci", "eval_main", "evaluate", "format_result", "paired_win_rate", "run_eval"]
