"""The training loop, for every backend and method: setup, then the loop (one `method.step` per optimizer
step, with logging, checkpoints and validation), then the final LoRA, the base-vs-LoRA videos and resume.

Read top to bottom. What one step does lives in the method (`vader.methods.vader`, `vader.methods.grpo`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from vader.backends.base import VideoBackend
from vader.checkpoint import (
    add_lora,
    clean_partial_writes,
    config_differences,
    describe_differences,
    find_resume_dir,
    find_resume_run,
    latest_checkpoint,
    load_lora,
    load_training_state,
    lora_config,
    lora_disabled,
    prune_checkpoints,
    read_run_config,
    save_adapter,
)
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.methods import method_module
from vader.methods.base import MethodModule
from vader.methods.grpo_settings import GRPOSettings
from vader.methods.update import LoraEMA, StepResult
from vader.preflight import preflight
from vader.run import Run, build_generator, is_stopped_report, load_prompts, make_accelerator, make_reward
from vader.sharding import shard

# settings dicts a resume compares by the values they resolve to (None == the defaults)
SETTINGS_DEFAULTS = {"grpo": asdict(GRPOSettings())}
DIFFUSERS_LORA = Path("lora") / "diffusers"  # in the run folder: the final LoRA in diffusers' format (backends)
COMFYUI_LORA = Path("lora") / "comfyui"  # in the run folder: the final LoRA under ComfyUI's names (Wan)


def make_optimizer(params: list[torch.nn.Parameter], cfg: VaderConfig) -> torch.optim.Optimizer:
    if not cfg.use_AdamW8bit:
        return torch.optim.AdamW(params, lr=cfg.lr)
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr)
    except Exception as exc:  # missing package or no usable kernels on this machine
        raise VaderError(f"use_AdamW8bit=True needs bitsandbytes with working kernels ({type(exc).__name__}: "
                         f"{exc}); install it with `pip install 'vader[bnb]'` or set use_AdamW8bit=False") from None


def total_train_steps(cfg: VaderConfig, num_prompts: int, num_processes: int) -> int:
    """Optimizer steps: max_train_steps when set (as the original, whatever the prompts and processes),
    else num_train_epochs passes over the prompts."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    per_step = cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps
    return cfg.num_train_epochs * max(1, math.ceil(num_prompts / per_step))


@dataclass
class Trainer:
    """Everything a training run holds once set up (train() and tests build it with `setup`)."""

    cfg: VaderConfig
    accelerator: Accelerator
    run: Run
    gen: VideoBackend
    reward: object
    lora: object
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    method: MethodModule
    ema: LoraEMA | None = None  # grpo.ema: the LoRA average that validation and the final LoRA use

    def step(self, step: int) -> StepResult:
        return self.method.step(self.gen, self.reward, self.optimizer, self.params, self.cfg, self.accelerator,
                                self.run.prompts, step)


def setup(cfg: VaderConfig, accelerator: Accelerator, run: Run) -> Trainer:
    gen = build_generator(cfg, run, accelerator.device)  # image-to-video: given the prompts' first frames
    reward = make_reward(cfg, gen, run, accelerator.device)
    if cfg.gold_reward is not None and cfg.is_sample_preview:
        run.gold = make_reward(cfg, gen, run, accelerator.device, reward_fn=cfg.gold_reward, key="gold_reward")
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every process, whatever ran before
    lora = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets=gen.lora_target_modules)
    params = add_lora(gen.denoiser, lora)
    # The denoiser stays in eval mode as in the original (no caption dropout); train_step switches the
    # LoRA dropout on, as peft left it in the original.
    gen.denoiser.eval()
    gen.enable_gradient_checkpointing(cfg.grad_checkpoint)
    if cfg.lora_ckpt_path:
        load_lora(gen.denoiser, cfg.lora_ckpt_path)
    if cfg.sharding == "fsdp":  # after the LoRA is in place: it stays whole (FSDP's ignored_params)
        units = shard(gen, params, accelerator.num_processes, accelerator.device)
        run.note(f"sharding='fsdp': the frozen denoiser split over {accelerator.num_processes} process(es) in "
                 f"{units} FSDP unit(s)" if units else "sharding='fsdp' on one process: nothing to split")
    optimizer = accelerator.prepare(make_optimizer(params, cfg))
    ema = _make_ema(cfg, params, optimizer)
    return Trainer(cfg, accelerator, run, gen, reward, lora, params, optimizer, method_module(cfg.method), ema)


def _make_ema(cfg: VaderConfig, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> LoraEMA | None:
    """grpo.ema (absent for method='vader', whose config refuses grpo keys): updated after every optimizer
    update, in the middle of a GRPO round too, as Flow-GRPO's."""
    settings = GRPOSettings.from_config(cfg)
    if not settings.ema:
        return None
    ema = LoraEMA(params, settings.ema_decay, settings.ema_interval)
    ema.attach(optimizer)
    return ema


def _evaluated(t: Trainer) -> contextlib.AbstractContextManager:
    """The LoRA that validation and the final LoRA use: the EMA when grpo.ema is on, else the trained one."""
    return t.ema.applied() if t.ema is not None else contextlib.nullcontext()


def train(cfg: VaderConfig) -> Path:
    preflight(cfg, "train")
    accelerator = make_accelerator(cfg)
    resume_dir, changes = _resolve_resume(cfg, accelerator)
    run = Run.create(cfg, accelerator, kind="train")
    with run.discard_on_failure():
        return _train(cfg, accelerator, run, resume_dir, changes)


def _train(cfg: VaderConfig, accelerator: Accelerator, run: Run, resume_dir: Path | None,
           changes: dict[str, tuple]) -> Path:
    t = setup(cfg, accelerator, run)
    start, nonfinite_total, in_a_row = 0, 0, 0
    total = total_train_steps(cfg, len(run.prompts), accelerator.num_processes)
    if resume_dir is not None:
        start, nonfinite_total, in_a_row = _resume(cfg, resume_dir, t, changes, total)
    run.log_start(total=total, trainable=sum(p.numel() for p in t.params), start=start)

    for step in range(start, total):
        t0 = time.perf_counter()
        result = t.step(step)
        done = step + 1
        nonfinite_total += result.nonfinite
        in_a_row = in_a_row + 1 if result.nonfinite else 0
        run.log_step(done, {"loss": result.loss, "reward": result.reward, "reward_std": result.reward_std,
                            "grad_norm": result.grad_norm, "lr": cfg.lr, "backprop_cutoff": result.cutoff,
                            "step_seconds": time.perf_counter() - t0, "skipped": result.skipped,
                            "nonfinite_steps": nonfinite_total,
                            **{k: getattr(result, k) for k in t.method.METRICS}})
        if result.nonfinite:
            run.note(f"step {done}: non-finite loss/reward/gradient (loss {result.loss}, reward {result.reward}, "
                     f"grad norm {result.grad_norm}); update skipped ({in_a_row} in a row)")
        if in_a_row >= cfg.max_nonfinite_steps:
            run.abort()
            raise VaderError(f"max_nonfinite_steps={cfg.max_nonfinite_steps} reached: steps {done - in_a_row + 1}"
                             f"..{done} had a non-finite loss, reward or gradient and were skipped (the LoRA was "
                             f"not updated by them); lower lr (now {cfg.lr}) and restart, or resume a checkpoint from "
                             "before the divergence with --resume_from <its folder> --allow_config_change True; "
                             f"see {run.dir / 'metrics.jsonl'}")
        counters = {"nonfinite_steps": nonfinite_total, "nonfinite_in_a_row": in_a_row}
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < total:
            _save_checkpoint(t, done, counters)
        if cfg.is_sample_preview and cfg.validation_steps and (done == 1 or done % cfg.validation_steps == 0):
            if done < total:
                with _evaluated(t):
                    run.validate(t.gen, t.reward, done)

    final = max(total, start)
    _check_ranks_agree(t.params, accelerator)
    _save_checkpoint(t, final, {"nonfinite_steps": nonfinite_total, "nonfinite_in_a_row": in_a_row})
    # the final LoRA (every format) and its validation: the EMA's when grpo.ema, said in lora/state.json
    weights = t.ema.describe() if t.ema is not None else "the trained LoRA"
    with _evaluated(t):
        if accelerator.is_main_process:
            save_adapter(run.dir / "lora", t.gen.denoiser, t.lora,
                         extra={"step": final, "weights": weights, "config": cfg.to_dict()})
            if "diffusers" in t.gen.lora_formats:  # for diffusers: `pipe.load_lora_weights(run / "lora" / "diffusers")`
                t.gen.save_lora_diffusers(t.gen.denoiser, run.dir / DIFFUSERS_LORA, config=t.lora)
            if "comfyui" in t.gen.lora_formats:  # one file to copy into ComfyUI/models/loras
                t.gen.save_lora_comfyui(t.gen.denoiser, run.dir / COMFYUI_LORA / f"{run.dir.name}.safetensors",
                                        config=t.lora)
        after: list = []
        if cfg.is_sample_preview:
            run.validate(t.gen, t.reward, final, previews=after)
    if cfg.is_sample_preview:
        before: list = []
        with lora_disabled(t.gen.denoiser):  # the base model, same prompts and seeds
            _, base_reward, base_gold = run.sample_videos(t.gen, t.reward, run.dir / "samples" / "base",
                                                          previews=before)
        run.log_before_after(final, base_reward, before, after, base_gold=base_gold)
    run.finish()
    return run.dir


def _resolve_resume(cfg: VaderConfig, accelerator: Accelerator) -> tuple[Path | None, dict[str, tuple]]:
    """The checkpoint to resume from (None for a fresh run) and the result-changing config differences
    (refused unless allow_config_change). Cleans interrupted writes out of the run folder first."""
    project = Path(cfg.project_dir)
    current = cfg.to_dict()
    run_dir = project / cfg.run_name if cfg.run_name else None
    if cfg.resume_from == "latest":
        run_dir = find_resume_run(project, cfg.run_name, current, SETTINGS_DEFAULTS)
    elif cfg.resume_from:
        folder = Path(cfg.resume_from)
        if folder.parent.name == "checkpoints":
            _clean(folder.parent.parent, accelerator)  # a kill mid-overwrite may have moved it aside
    if run_dir is not None:
        _clean(run_dir, accelerator)
    if not cfg.resume_from:
        if run_dir is not None and (latest_checkpoint(run_dir) is not None or _logged_steps(run_dir)):
            raise VaderError(f"run_name={cfg.run_name!r} already holds a training run ({run_dir}); continue it with "
                             "resume_from='latest', or choose another run_name (a new run there would mix two "
                             "runs in one metrics file)")
        return None, {}
    resume_dir = find_resume_dir(cfg.resume_from, project, cfg.run_name, current, SETTINGS_DEFAULTS)
    source_run = resume_dir.parent.parent
    if cfg.run_name is None and resume_dir.parent.name == "checkpoints" and source_run.parent.resolve() == project.resolve():
        cfg.run_name = source_run.name  # continue in the resumed run's folder, metrics and curve included
    saved = read_run_config(source_run) if resume_dir.parent.name == "checkpoints" else None
    changes = config_differences(saved, current, SETTINGS_DEFAULTS) if saved is not None else {}
    if changes and not cfg.allow_config_change:
        raise VaderError(f"resume_from={cfg.resume_from!r}: the config differs from the run's "
                         f"({describe_differences(changes)}); resume with the same values, set "
                         "allow_config_change=True to change them (logged in the run folder), or start a new run "
                         "with lora_ckpt_path to only reuse the LoRA")
    _refuse_finished(cfg, accelerator, resume_dir)
    if changes and accelerator.is_main_process and cfg.run_name is not None:
        old = project / cfg.run_name / "config.json"
        if old.is_file():  # Run.create overwrites config.json: keep the one the earlier steps ran with
            step = _checkpoint_step(resume_dir) or 0
            old.replace(old.with_name(f"config-{step:06d}.json"))
    return resume_dir, changes


def _checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder's name ends with (checkpoint-000012 -> 12), or None."""
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _finished_step(run_dir: Path) -> int | None:
    """The step a run finished at: its final LoRA (lora/state.json) is at its latest checkpoint's step and
    report.html is the end-of-run one (not a stopped run's); None when the run did not finish (killed or
    failed during its end-of-run validation, or earlier)."""
    latest = latest_checkpoint(run_dir)
    if latest is None or not (run_dir / "report.html").is_file() or is_stopped_report(run_dir):
        return None
    try:
        final = json.loads((run_dir / "lora" / "state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return final if isinstance(final, int) and final == _checkpoint_step(latest) else None


def _refuse_finished(cfg: VaderConfig, accelerator: Accelerator, resume_dir: Path) -> None:
    """Resuming a finished run into its own folder would redo its end-of-run validation and append its
    rows again: refused (nothing written). A run stopped during that validation resumes and redoes it."""
    if resume_dir.parent.name != "checkpoints" or cfg.run_name is None:
        return
    run_dir = resume_dir.parent.parent
    if (Path(cfg.project_dir) / cfg.run_name).resolve() != run_dir.resolve():
        return  # continuing into another folder: this one is not written
    done = _finished_step(run_dir)
    if done is None or _checkpoint_step(resume_dir) != done:
        return
    total = total_train_steps(cfg, len(load_prompts(cfg).prompts), accelerator.num_processes)
    if done < total:
        return
    knob, now = ("max_train_steps", cfg.max_train_steps) if cfg.max_train_steps else \
        ("num_train_epochs", cfg.num_train_epochs)
    where = f"step {done} of {total}" if done == total else f"step {done}, beyond the {total} steps asked"
    raise VaderError(f"run {run_dir.name!r} ({run_dir}) already finished at {where}; raise {knob} (now {now}) "
                     "to continue it, or start a new run_name")


def _logged_steps(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text(errors="replace")


def _clean(run_dir: Path, accelerator: Accelerator) -> None:
    if accelerator.is_main_process and run_dir.is_dir():
        clean_partial_writes(run_dir)
    accelerator.wait_for_everyone()


def _check_ranks_agree(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Only the main process saves the LoRA: make sure every process trained the same one."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().abs().sum() for p in params]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-6):
        raise RuntimeError(f"LoRA weights differ between processes (checksums {sums.tolist()}): a bug, please report")


def _layout(cfg: VaderConfig, accelerator: Accelerator) -> dict[str, int]:
    """What decides each step's prompts and noise: a resume must see the same values."""
    return {"seed": cfg.seed, "num_processes": accelerator.num_processes, "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps}


def _save_checkpoint(t: Trainer, step: int, counters: dict[str, int]) -> None:
    accelerator = t.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "optimizer": t.optimizer.state_dict(), **_layout(t.cfg, accelerator), **counters}
        if t.ema is not None:  # the checkpoint's LoRA stays the trained one: resuming continues from it
            state["ema"] = t.ema.state_dict()
        save_adapter(t.run.dir / "checkpoints" / f"checkpoint-{step:06d}", t.gen.denoiser, t.lora,
                     extra={"step": step, "run": t.run.dir.name}, training_state=state)
        prune_checkpoints(t.run.dir / "checkpoints", t.cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def _resume(cfg: VaderConfig, folder: Path, t: Trainer, changes: dict[str, tuple],
            total: int | None = None) -> tuple[int, int, int]:
    """Load a checkpoint; returns (step, non-finite steps so far, of which in a row at the end). A
    checkpoint at the last step (`total`) resumes the end-of-run validation: its rows are redone."""
    state = load_training_state(folder)
    saved = {k: state[k] for k in _layout(cfg, t.accelerator) if k in state}
    now = {k: v for k, v in _layout(cfg, t.accelerator).items() if k in saved}
    if saved != now:  # not waived by allow_config_change: the prompt and noise streams would change
        diff = ", ".join(f"{k}={saved[k]} (now {now[k]})" for k in saved if saved[k] != now[k])
        raise VaderError(f"resume_from={str(folder)!r} was trained with {diff}; resume with the same values, or "
                         "start a new run with lora_ckpt_path to only reuse its LoRA")
    load_lora(t.gen.denoiser, folder, key="resume_from")
    try:
        t.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise VaderError(f"resume_from={str(folder)!r}: its optimizer state does not fit this run ({exc}); was it "
                         "saved with another use_AdamW8bit or LoRA layout?") from None
    for group in t.optimizer.param_groups:  # the saved state carries the old lr; cfg.lr is the one to use
        group["lr"] = cfg.lr
    if t.ema is not None and "ema" in state:
        t.ema.load_state_dict(state["ema"])
    elif t.ema is not None:  # grpo.ema switched on at this resume (allow_config_change): averaged from here
        t.run.note(f"grpo.ema: {folder} holds no EMA; it starts from the resumed LoRA")
    step = int(state["step"])
    run = t.run
    run.keep_history_until(step, redo_end=total is not None and step >= total)
    if changes and t.accelerator.is_main_process:
        row = {"step": step, "resumed_from": str(folder), "changes": {k: [a, b] for k, (a, b) in changes.items()}}
        with open(run.dir / "config_changes.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        with open(run.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "config_change": describe_differences(changes)}) + "\n")
        run.note(f"config changed at step {step}: {describe_differences(changes)}")
    run.note(f"resumed from {folder} at step {step}")
    return step, int(state.get("nonfinite_steps", 0)), int(state.get("nonfinite_in_a_row", 0))


__all__ = ["train", "setup", "total_train_steps", "Trainer"]
