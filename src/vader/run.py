"""A run's folder, logs, trackers, RNG streams and validation videos.

    project_dir/<run_name>/
      config.json         the resolved, validated config
      metrics.jsonl       one JSON line per optimizer step (and per validation)
      reward_curve.png    reward per step
      report.html         one self-contained page: curves, guards, base-vs-LoRA videos
      checkpoints/        checkpoint-<step>/ (peft adapter + resume state)
      lora/               the final adapter
      samples/            step-<n>/<prompt-index>-<seed>.mp4
      logs/               tensorboard / wandb files
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from tqdm.auto import tqdm

from vader import backends
from vader.config import VaderConfig, is_callable_spec
from vader.errors import VaderError
from vader.guards import GUARD_NAMES, guard_drops, guard_warning, guards_of_rows
from vader.images import give_images
from vader.media import finite_number, plot_before_after, plot_reward_curve, write_video
from vader.models.presets import torch_dtype
from vader.models.text import EmbeddingCache
from vader.prompts import PromptList, read_prompt_file, read_prompt_lines
from vader.report import STOPPED_MARK, training_report
from vader.rewards import build_reward
from vader.rewards.callable import load_callable_reward
from vader.seeds import step_seed
from vader.weights import quiet_loading_bars


def make_accelerator(cfg: VaderConfig) -> Accelerator:
    """An Accelerator that needs no `accelerate config`: CPU when there is no GPU."""
    mixed = cfg.mixed_precision
    cuda = torch.cuda.is_available()
    if mixed in ("fp16", "fp8") and not cuda:
        raise VaderError(f"mixed_precision={mixed!r} needs a CUDA GPU; on CPU use 'bf16' or 'no'")
    if mixed == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise VaderError("mixed_precision='bf16' is not supported by this GPU; use 'fp16' (and dtype='fp16') or 'no'")
    if mixed == "fp8":
        raise VaderError("mixed_precision='fp8' is not supported in this version (it needs TransformerEngine/"
                         "torchao setup); use 'bf16'")
    # A process may train more than once (tests, notebooks): drop the previous run's precision
    # settings but keep the distributed state (process group) that PartialState holds.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed, cpu=not cuda, log_with=None)


def load_prompts(cfg: VaderConfig) -> PromptList:
    """Prompts (start_index:end_index), with the explicit labels (`prompt<TAB>label`, ActPred's target
    action) and first-frame images (`prompt<TAB>image path`) their lines give; images are not read here."""
    if cfg.prompt:
        found = read_prompt_lines(cfg.prompt)
    elif cfg.prompt_path:
        found = read_prompt_file(cfg.prompt_path)
    else:
        raise VaderError("no prompts: set prompt_path (a text file, one prompt per line) or prompt=[...]")
    prompts = found.prompts[cfg.start_index: cfg.end_index]
    if not prompts:
        raise VaderError(f"no prompts left after start_index={cfg.start_index}, end_index={cfg.end_index}")
    return found.subset(prompts)


def build_generator(cfg: VaderConfig, run: Run, device: torch.device):
    """The pipeline the config's backend builds, with every prompt encoded once (cached on disk under
    project_dir) and the text encoder released; an image-to-video generator is given the prompts'
    first-frame images (`run.found`, read from their files) before anything is sampled."""
    quiet_loading_bars()
    cache = EmbeddingCache(Path(cfg.project_dir) / ".cache" / "text")
    gen = backends.build_generator(cfg, device, prompts=run.prompts, cache=cache)
    found = getattr(run, "found", None)
    if found is not None:
        give_images(gen, cfg, found)
    return gen


def make_reward(cfg: VaderConfig, gen, run: Run, device: torch.device, reward_fn=None, key: str = "reward_fn"):
    """The frozen reward (cfg.reward_fn, or `reward_fn` such as the gold reward), with every prompt's
    text side (and ActPred's target action) prepared once."""
    reward_fn = cfg.reward_fn if reward_fn is None else reward_fn
    quiet_loading_bars()
    if is_callable_spec(reward_fn):  # module:function: GRPO's reward, or a gold reward
        reward = load_callable_reward(reward_fn, key=key)
    else:
        reward = build_reward(reward_fn, device=device, dtype=torch_dtype(cfg.dtype),
                              hps_version=cfg.hps_version, grad_checkpoint=cfg.reward_grad_checkpoint,
                              sources=cfg.reward_sources, resize=cfg.reward_resize,
                              video_fps=cfg.save_fps)  # a clip reward sampling in time (VideoReward: 2 fps)
    labels = {gen.reward_prompts([p])[0]: label for p, label in run.labels.items()}
    reward.prepare(list(dict.fromkeys(gen.reward_prompts(run.prompts))), labels)
    targets = getattr(reward, "targets", None)
    mapped = {p: t for p, t in (targets or {}).items() if p != t}  # a prompt that is its own target says nothing
    if mapped:
        run.note("reward targets: " + "; ".join(f"{p!r} -> {t!r}" for p, t in list(mapped.items())[:8]))
    return reward


@dataclass
class Run:
    cfg: VaderConfig
    accelerator: Accelerator
    dir: Path
    prompts: list[str]
    labels: dict[str, str]  # prompt -> explicit reward label (prompts file `prompt<TAB>label`)
    kind: str
    found: PromptList | None = None  # the prompts' source: their labels and first-frame images (vader.images)
    history: list[dict] = field(default_factory=list)
    bar: tqdm | None = None
    started: float = field(default_factory=time.perf_counter)
    created: bool = False  # this invocation made the folder (so a failed start may remove it)
    gold: object | None = None  # cfg.gold_reward built: scored at each validation, never trained on
    reference: dict | None = None  # the run's first validation (step, reward, guards): what later ones compare with
    previews: tuple[list, list] | None = None  # end-of-run (base, LoRA) rows for report.html
    training: bool = False  # log_start ran: a failure from here on writes the report of the steps logged
    trackers_closed: bool = False

    @classmethod
    def create(cls, cfg: VaderConfig, accelerator: Accelerator, kind: str) -> Run:
        name = [cfg.run_name or fresh_name(Path(cfg.project_dir), f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")]
        if accelerator.num_processes > 1:
            broadcast_object_list(name)  # all ranks write into the main process's folder
        folder = Path(cfg.project_dir) / name[0]
        found = load_prompts(cfg)
        run = cls(cfg, accelerator, folder, found.prompts, found.labels, kind, found=found)
        if accelerator.is_main_process:
            run.created = not folder.exists()
            with run.discard_on_failure():
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
                run._init_trackers()
        accelerator.wait_for_everyone()
        return run

    # ---- failed starts ----
    def has_output(self) -> bool:
        """Something worth keeping: a checkpoint, a LoRA, a video or a logged step."""
        d = self.dir
        if any((d / "checkpoints").glob("checkpoint-*")) or (d / "lora").is_dir():
            return True
        if any((d / "samples").rglob("*.mp4")):
            return True
        metrics = d / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0

    @contextlib.contextmanager
    def discard_on_failure(self) -> Iterator[None]:
        """The one failure path of a run (an error, Ctrl-C, SIGTERM through the CLI): the progress bar
        is closed first, so that the error line the CLI prints next stands on a line of its own; the
        trackers are flushed; then the run folder is removed if this invocation created it and it holds
        nothing of value (a resumed or pre-existing folder is never removed), or, once the training
        loop has begun, report.html and reward_curve.png are written for the steps logged, marked as
        stopped. The exception always goes on to the caller."""
        try:
            yield
        except BaseException as exc:
            self.close_bar()
            if self.accelerator.is_main_process and self.dir.is_dir():
                self._close_trackers()  # event files closed before their folder goes, flushed if it stays
                if self.created and not self.has_output():
                    shutil.rmtree(self.dir, ignore_errors=True)
                elif self.kind == "train" and self.training:
                    self._report_stopped(exc)
            raise

    def _report_stopped(self, exc: BaseException) -> None:
        """report.html and reward_curve.png of a run that stopped on `exc`, when it logged a step. Never
        raises: the error that stopped the run is the one the user must see."""
        metrics = self.dir / "metrics.jsonl"
        steps = [r["step"] for r in _read_rows(metrics) if "loss" in r and isinstance(r.get("step"), int)]
        if not steps:
            return
        reason = _stop_reason(exc)
        try:
            plot_reward_curve(metrics, self.dir / "reward_curve.png")  # every step skipped: the red crosses
            before, after = self.previews or ([], [])
            training_report(self.dir, before, after, fps=self.cfg.save_fps,
                            stopped=f"the run stopped after step {max(steps)}: {reason}")
        except Exception as report_exc:  # a second failure must not hide the first
            with contextlib.suppress(Exception):
                tqdm.write(f"[vader] could not write {self.dir / 'report.html'} ({type(report_exc).__name__}: "
                           f"{report_exc})", file=sys.stderr)

    def _close_trackers(self) -> None:
        if self.trackers_closed:
            return
        self.trackers_closed = True
        for tracker in list(self.accelerator.trackers):
            with contextlib.suppress(Exception):
                tracker.finish()

    # ---- trackers ----
    def _trackers(self) -> list[str]:
        cfg = self.cfg
        if cfg.debug or cfg.logger_type == "none" or (cfg.logger_type == "wandb" and not cfg.use_wandb):
            return []
        return [cfg.logger_type]

    def _init_trackers(self) -> None:
        trackers = self._trackers()
        if not trackers:
            return
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        acc = self.accelerator
        acc.project_configuration = ProjectConfiguration(project_dir=str(self.dir), logging_dir=str(logs))
        acc.log_with = _filter_trackers(trackers)
        kwargs = {"wandb": {"dir": str(logs), "name": self.dir.name, **({"entity": self.cfg.wandb_entity}
                                                                         if self.cfg.wandb_entity else {})}}
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) or v is None else v)
                for k, v in self.cfg.to_dict().items()}
        try:
            acc.init_trackers(self.cfg.wandb_project if trackers == ["wandb"] else "tb", config=flat,
                              init_kwargs=kwargs if trackers == ["wandb"] else {})
        except Exception as exc:  # e.g. wandb without an API key or network
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VaderError(f"logger_type={self.cfg.logger_type!r} could not start ({first}); run `wandb login`, "
                             "set WANDB_MODE=offline, or use --logger_type tensorboard / --debug True") from None

    # ---- logging ----
    def note(self, text: str) -> None:
        if self.accelerator.is_main_process and self.cfg.verbose:
            tqdm.write(f"[vader] {text}")

    def log_start(self, total: int, trainable: int, start: int = 0) -> None:
        self.note(f"run folder {self.dir} | {len(self.prompts)} prompts | {trainable:,} trainable LoRA parameters "
                  f"| {total} optimizer steps on {self.accelerator.num_processes} process(es)")
        self.training = True
        if self.accelerator.is_main_process and self.cfg.verbose:
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def keep_history_until(self, step: int, redo_end: bool = False) -> None:
        """On resume into the same folder: drop metrics logged after the checkpoint, keep the rest.

        `redo_end`: the checkpoint is the run's last step and its end-of-run validation runs again (it
        was interrupted): that step's validation, base-model and guard rows go too, so none is doubled."""
        path = self.dir / "metrics.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        rows, torn = [], 0
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:  # a kill while appending leaves a torn last line: drop it, keep the rest
                row = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
        rows = [r for r in rows if r.get("step", 0) <= step]
        if redo_end:
            rows = [r for r in rows if r.get("step") != step or "loss" in r or "config_change" in r]
        path.write_text("".join(_json_line(r) for r in rows))
        self.history = [r for r in rows if finite_number(r.get("reward"))]
        for r in rows:  # the first validation with guards stays the reference after a resume
            found = {g: r[f"guard_{g}"] for g in GUARD_NAMES if finite_number(r.get(f"guard_{g}"))}
            if finite_number(r.get("val_reward")) and found:
                self.reference = {"step": r["step"], "reward": r["val_reward"], "guards": found}
                break
        if torn:
            self.note(f"dropped {torn} unreadable line(s) of {path} (a write interrupted by a kill)")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, **metrics, "time": round(time.perf_counter() - self.started, 3)}
        if finite_number(row.get("reward")):
            self.history.append(row)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(_json_line(row))
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if finite_number(v)}, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', 0):.4f}", reward=f"{metrics.get('reward', 0):.4f}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def abort(self) -> None:
        """A run stopping early on purpose: flush what was logged (progress bar, trackers)."""
        self.close_bar()
        if self.accelerator.is_main_process:
            self._close_trackers()

    # ---- validation / inference videos ----
    def sample_videos(self, gen, reward, folder: Path, tag: str = "val",
                      previews: list | None = None) -> tuple[list[Path], float | None, float | None]:
        """num_val_runs × val_batch_size videos per process from fixed seeds, saved as mp4 (and scored).
        Returns (paths, mean reward or None, mean gold reward or None).

        Run r, process p, slot j uses prompt (r·P + p)·B + j (cycling through the prompt list), so
        every process makes different videos and the same seed makes the same ones. `previews`, when
        given, receives this process's (prompt, video, reward or None) for the before/after grid."""
        acc, cfg = self.accelerator, self.cfg
        gen.denoiser.eval()
        paths, scores, golds = [], [], []
        gold = self.gold if reward is not None else None  # inference scores nothing
        for run_index in range(cfg.num_val_runs):
            seed = step_seed(cfg.seed, tag, run_index, acc.process_index)
            first = (run_index * acc.num_processes + acc.process_index) * cfg.val_batch_size
            indices = [(first + j) % len(self.prompts) for j in range(cfg.val_batch_size)]
            prompts = [self.prompts[i] for i in indices]
            with acc.autocast():
                videos = gen.generate(prompts, torch.Generator().manual_seed(seed))
                if reward is not None:
                    with torch.no_grad():
                        scores.append(reward(videos, gen.reward_prompts(prompts)).reward.float())
                if gold is not None:
                    with torch.no_grad():
                        golds.append(gold(videos, gen.reward_prompts(prompts)).reward.float())
            if previews is not None:
                batch_scores = scores[-1].tolist() if reward is not None else [None] * len(prompts)
                previews.extend(zip(prompts, videos.cpu(), batch_scores))
            for j, video in enumerate(videos):
                name = f"run{run_index}-rank{acc.process_index}-{j}-prompt{indices[j]:04d}.mp4"
                paths.append(write_video(folder / name, video, fps=cfg.save_fps, quality=cfg.video_quality))
        mean = acc.gather(torch.cat(scores)).mean().item() if scores else None
        gold_mean = acc.gather(torch.cat(golds)).mean().item() if golds else None
        return paths, mean, gold_mean

    def validate(self, gen, reward, step: int, previews: list | None = None) -> list[Path]:
        rows: list = [] if previews is None else previews
        paths, mean, gold = self.sample_videos(gen, reward, self.dir / "samples" / f"step-{step:06d}", previews=rows)
        if mean is not None:
            self.log_validation(step, mean, paths, gold=gold, rows=rows)
        return paths

    def log_validation(self, step: int, reward: float, paths: list[Path], gold: float | None = None,
                       rows: list | None = None) -> None:
        """val_reward (and val_gold_reward) with the guards of this process's validation videos; one
        warning line when the reward rose since the run's first validation while a guard fell by more
        than guard_drop."""
        if not self.accelerator.is_main_process:
            return
        row: dict = {"step": step, "val_reward": reward}
        if gold is not None:
            row["val_gold_reward"] = gold
        found = guards_of_rows(rows or [])
        row.update({f"guard_{k}": v for k, v in found.items()})
        if found:
            ref = self.reference
            if ref is None:
                self.reference = {"step": step, "reward": reward, "guards": found}
            elif reward > ref["reward"]:
                fallen = guard_drops(ref["guards"], found, self.cfg.guard_drop)
                if fallen:
                    self._warn_guards(row, f"step {step}: the validation reward rose since step {ref['step']} "
                                      f"({ref['reward']:.4g} -> {reward:.4g})", fallen,
                                      self.dir / "samples" / f"step-{step:06d}")
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(_json_line({**row, "video_quality": self.cfg.video_quality, "videos": [str(p) for p in paths]}))
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and finite_number(v)}, step=step)
            _log_videos(self.accelerator, paths, step)

    def log_before_after(self, step: int, base_reward: float | None, before: list, after: list,
                         base_gold: float | None = None) -> None:
        """The base model's validation reward beside the LoRA's, and before_after.png (same prompts
        and seeds; this process's videos)."""
        if not self.accelerator.is_main_process:
            return
        self.previews = (before, after)
        if base_reward is not None:
            row = {"base_val_reward": base_reward, **({"base_val_gold_reward": base_gold} if base_gold is not None else {})}
            with open(self.dir / "metrics.jsonl", "a") as fh:
                fh.write(_json_line({"step": step, **row}))
            if self.accelerator.trackers:
                self.accelerator.log(row, step=step)
        self.log_gold_breakdown(step, before, after)
        if before and after:
            plot_before_after(before, after, self.dir / "before_after.png")
            lora = [s for _, _, s in after if s is not None]
            if base_reward is not None and lora:
                self.note(f"validation reward: base {base_reward:.4f} -> LoRA {sum(lora) / len(lora):.4f} "
                          f"(same prompts and seeds; grid in {self.dir / 'before_after.png'})")
                self.check_guards(step, base_reward, sum(lora) / len(lora), before, after)

    def log_gold_breakdown(self, step: int, before: list, after: list) -> None:
        """A gold reward that scores parts (the toy judge: each attribute it reads back) logs each part for
        the base model and the LoRA on the end-of-run videos (this process's; same prompts and seeds):
        gold_<part>_base and gold_<part> in metrics.jsonl, a table in report.html."""
        breakdown = getattr(self.gold, "breakdown", None)
        if breakdown is None or not before or not after:
            return
        with torch.no_grad():
            base, lora = (breakdown(torch.stack([v for _, v, _ in rows]), [p for p, _, _ in rows])
                          for rows in (before, after))
        parts = {**{f"gold_{k}_base": v for k, v in base.items()}, **{f"gold_{k}": v for k, v in lora.items()}}
        name = getattr(self.gold, "name", None)
        row = {"step": step, "gold_videos": len(after), **({"gold_name": name} if isinstance(name, str) else {}),
               **parts}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(_json_line(row))
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.trackers:
            accelerator.log(parts, step=step)
        self.note("gold reward by part, base -> LoRA: " + ", ".join(f"{k} {base[k]:.2f} -> {lora[k]:.2f}" for k in lora))

    def check_guards(self, step: int, base_reward: float, lora_reward: float, before: list, after: list) -> None:
        """Reward-hacking guards on the end-of-run videos (same prompts and seeds for base and LoRA):
        logged beside base_val_reward, and one warning line when the reward rose while a guard fell by
        more than guard_drop (frozen motion, flicker, every seed the same video)."""
        base, lora = guards_of_rows(before), guards_of_rows(after)
        if not base or not lora:
            return  # single-frame videos: no motion to guard
        row = {"step": step, **{f"guard_{k}_base": v for k, v in base.items()},
               **{f"guard_{k}": v for k, v in lora.items()}}
        fallen = guard_drops(base, lora, self.cfg.guard_drop)
        if fallen and lora_reward > base_reward:
            self._warn_guards(row, f"the reward rose (base {base_reward:.4g} -> LoRA {lora_reward:.4g})", fallen,
                              self.dir / "before_after.png")
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(_json_line(row))

    def _warn_guards(self, row: dict, rose: str, fallen: list[str], look_at: Path) -> None:
        """One warning line (stderr and `guard_warning` in the metrics row) for a reward that rose while
        guards fell."""
        message = guard_warning(rose, fallen, self.cfg.guard_drop, look_at)
        row["guard_warning"] = message
        tqdm.write(f"[vader] {message}", file=sys.stderr)

    def finish(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.close_bar()
            metrics = self.dir / "metrics.jsonl"
            if metrics.is_file() and self.history:
                plot_reward_curve(metrics, self.dir / "reward_curve.png")
            if self.kind == "train":
                before, after = self.previews or ([], [])
                training_report(self.dir, before, after, fps=self.cfg.save_fps)
            if metrics.is_file() and self.history:
                first, last = self.history[0], self.history[-1]
                skipped = nonfinite_steps(_read_rows(metrics))
                also = (f"; {skipped} step(s) skipped as non-finite (loss, reward or gradient; see "
                        "metrics.jsonl)" if skipped else "")
                self.note(f"reward {first['reward']:.4f} (step {first['step']}) -> {last['reward']:.4f} "
                          f"(step {last['step']}){also}; outputs in {self.dir} (open report.html)")
        acc.wait_for_everyone()
        self.trackers_closed = True
        acc.end_training()


def nonfinite_steps(rows: list[dict]) -> int:
    """Steps skipped as non-finite over the whole run (resumes included): the last step row's count."""
    counts = [r["nonfinite_steps"] for r in rows if "loss" in r and isinstance(r.get("nonfinite_steps"), int)]
    return counts[-1] if counts else 0


def is_stopped_report(run_dir: Path) -> bool:
    """Whether <run>/report.html is the report of a run that stopped before its end (see
    Run.discard_on_failure)."""
    try:
        return STOPPED_MARK in (Path(run_dir) / "report.html").read_text(errors="replace")
    except OSError:
        return False


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a torn or unreadable line (a kill while appending) is skipped."""
    rows: list[dict] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, VaderError):
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return "terminated (SIGTERM)" if exc.code == 143 else f"exited with status {exc.code}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def fresh_name(project_dir: Path, name: str) -> str:
    """A timestamp name not taken yet (two runs started within one second get -2, -3, ...)."""
    candidate, n = name, 1
    while (project_dir / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _json_line(row: dict) -> str:
    """One strict-JSON line: NaN and inf become null (json.dumps would write bare NaN tokens)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _filter_trackers(trackers: list[str]) -> list[str]:
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise VaderError("logger_type='wandb' needs wandb: `pip install 'vader[wandb]'`, or set "
                             "logger_type='tensorboard' (or use_wandb=False)") from None
        os.environ.setdefault("WANDB_SILENT", "true")
    return trackers


def _log_videos(accelerator: Accelerator, paths: list[Path], step: int) -> None:
    try:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
    except Exception:
        return
    import wandb

    tracker.log({"videos": [wandb.Video(str(p), format="mp4") for p in paths]}, step=step)
