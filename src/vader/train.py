"""VADER training: sample with the LoRA denoiser, decode chosen frames, score, step the LoRA.

Read top to bottom: setup, then `train_step` (one optimizer step over gradient-accumulation
micro-steps), then the loop with logging, checkpoints and validation.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from vader.checkpoint import (
    add_lora,
    find_resume_dir,
    load_lora,
    lora_config,
    prune_checkpoints,
    save_adapter,
)
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.frames import decode_selected, select_frames
from vader.models.presets import check_model_weights
from vader.rewards import check_reward_weights
from vader.run import Run, build_generator, make_accelerator, make_generator, make_reward, set_step_seed
from vader.sampling import backprop_cutoff
from vader.video import VideoGenerator


@dataclass
class StepResult:
    loss: float
    reward: float
    reward_std: float
    grad_norm: float
    cutoff: int


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
    """Optimizer steps: epochs over the prompts, capped by max_train_steps."""
    per_step = cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps
    per_epoch = max(1, math.ceil(num_prompts / per_step))
    steps = cfg.num_train_epochs * per_epoch
    return min(steps, cfg.max_train_steps) if cfg.max_train_steps else steps


def pick_prompts(prompts: list[str], cfg: VaderConfig, step: int, micro: int, rank: int, world: int) -> list[str]:
    """Deterministic epoch-wise shuffling: every prompt once per epoch, the same on resume."""
    out = []
    for j in range(cfg.train_batch_size):
        index = ((step * cfg.gradient_accumulation_steps + micro) * world + rank) * cfg.train_batch_size + j
        epoch, position = divmod(index, len(prompts))
        order = list(range(len(prompts)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        out.append(prompts[order[position]])
    return out


def train_step(gen: VideoGenerator, reward, optimizer, params, cfg: VaderConfig, accelerator: Accelerator,
               prompts: list[str], step: int) -> StepResult:
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = cfg.gradient_accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    rewards, losses = [], []
    for micro in range(accum):
        rng = set_step_seed(cfg.seed, step, micro, rank)
        batch = pick_prompts(prompts, cfg, step, micro, rank, world)
        cutoff = backprop_cutoff(cfg.backprop_mode, cfg.scheduler.num_sampling_steps, rng)
        frames = select_frames(cfg.decode_frame, gen.num_frames, rng)
        with accelerator.autocast():
            latents = gen.sample_latents(batch, make_generator(rng), cutoff=cutoff,
                                         grad_checkpoint=cfg.grad_checkpoint)
            video = decode_selected(gen.vae, latents.to(gen.dtype), gen.num_frames, frames, cfg.decode_strategy)
            out = reward(video, gen.reward_prompts(batch))
        accelerator.backward(out.loss.mean() / accum)
        rewards.append(out.reward.detach())
        losses.append(out.loss.detach())
    average_gradients(params, accelerator)
    grad_norm = _clip(params, cfg.max_grad_norm, accelerator)
    optimizer.step()
    reward_all = accelerator.gather(torch.cat(rewards).float())
    loss_all = accelerator.gather(torch.cat(losses).float())
    return StepResult(loss=loss_all.mean().item(), reward=reward_all.mean().item(),
                      reward_std=reward_all.std(unbiased=False).item(), grad_norm=grad_norm, cutoff=cutoff)


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce the LoRA gradients once per optimizer step (the denoiser is not DDP-wrapped: its
    forward runs many times per backward, which DDP's reducer does not allow)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def _clip(params: list[torch.nn.Parameter], max_norm: float, accelerator: Accelerator) -> float:
    if max_norm and max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    accelerator.unscale_gradients()  # fp16: log the true norm, not the loss-scaled one
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def train(cfg: VaderConfig) -> Path:
    # cheap checks first: nothing is loaded or created for a run that cannot start
    resume_dir = find_resume_dir(cfg.resume_from, Path(cfg.project_dir)) if cfg.resume_from else None
    check_reward_weights(cfg.reward_fn, cfg.hps_version, cfg.reward_sources)
    check_model_weights(cfg.model, cfg.vae, cfg.text_encoder)
    if resume_dir is not None and cfg.run_name is None:
        run_dir = resume_dir.parent.parent
        if resume_dir.parent.name == "checkpoints" and run_dir.parent.resolve() == Path(cfg.project_dir).resolve():
            cfg.run_name = run_dir.name  # continue in the resumed run's folder, metrics and curve included
    accelerator = make_accelerator(cfg)
    run = Run.create(cfg, accelerator, kind="train")
    gen = build_generator(cfg, run, accelerator.device)
    prompts = run.prompts
    reward = make_reward(cfg, gen, run, accelerator.device)

    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every process, whatever ran before
    lora = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    params = add_lora(gen.denoiser, lora)
    # eval mode as the original: no caption dropout while sampling (and so no LoRA dropout either)
    gen.denoiser.eval()
    # grad_checkpoint: each denoiser call with gradients (sampling.py) and, inside it, each block;
    # the VAE decode that the reward backpropagates through recomputes chunk by chunk
    gen.denoiser.gradient_checkpointing = cfg.grad_checkpoint
    gen.vae.enable_gradient_checkpointing(cfg.grad_checkpoint)
    if cfg.lora_ckpt_path:
        load_lora(gen.denoiser, cfg.lora_ckpt_path)
    optimizer = accelerator.prepare(make_optimizer(params, cfg))

    start = _resume(cfg, resume_dir, run, gen, optimizer, accelerator) if resume_dir else 0
    total = total_train_steps(cfg, len(prompts), accelerator.num_processes)
    run.log_start(total=total, trainable=sum(p.numel() for p in params), start=start)

    for step in range(start, total):
        t0 = time.perf_counter()
        result = train_step(gen, reward, optimizer, params, cfg, accelerator, prompts, step)
        done = step + 1
        run.log_step(done, {"loss": result.loss, "reward": result.reward, "reward_std": result.reward_std,
                            "grad_norm": result.grad_norm, "lr": cfg.lr, "backprop_cutoff": result.cutoff,
                            "step_seconds": time.perf_counter() - t0})
        if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < total:
            _save_checkpoint(cfg, run, gen, lora, optimizer, done, accelerator)
        if cfg.is_sample_preview and cfg.validation_steps and (done == 1 or done % cfg.validation_steps == 0):
            if done < total:
                run.validate(gen, reward, done)

    final = max(total, start)
    _check_ranks_agree(params, accelerator)
    _save_checkpoint(cfg, run, gen, lora, optimizer, final, accelerator)
    if accelerator.is_main_process:
        save_adapter(run.dir / "lora", gen.denoiser, lora, extra={"step": final, "config": cfg.to_dict()})
    if cfg.is_sample_preview:
        run.validate(gen, reward, final)
    run.finish()
    return run.dir


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


def _save_checkpoint(cfg, run: Run, gen, lora, optimizer, step: int, accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "optimizer": optimizer.state_dict(), **_layout(cfg, accelerator)}
        save_adapter(run.dir / "checkpoints" / f"checkpoint-{step:06d}", gen.denoiser, lora,
                     extra={"step": step, "run": run.dir.name}, training_state=state)
        prune_checkpoints(run.dir / "checkpoints", cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def _resume(cfg: VaderConfig, folder: Path, run: Run, gen, optimizer, accelerator: Accelerator) -> int:
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    saved = {k: state[k] for k in _layout(cfg, accelerator) if k in state}
    now = {k: v for k, v in _layout(cfg, accelerator).items() if k in saved}
    if saved != now:
        diff = ", ".join(f"{k}={saved[k]} (now {now[k]})" for k in saved if saved[k] != now[k])
        raise VaderError(f"resume_from={str(folder)!r} was trained with {diff}; resume with the same values, or "
                         "start a new run with lora_ckpt_path to only reuse its LoRA")
    load_lora(gen.denoiser, folder)
    optimizer.load_state_dict(state["optimizer"])
    run.keep_history_until(int(state["step"]))
    run.note(f"resumed from {folder} at step {state['step']}")
    return int(state["step"])


__all__ = ["train", "train_step", "total_train_steps", "pick_prompts"]
