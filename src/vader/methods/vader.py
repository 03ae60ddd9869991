"""VADER: sample with the LoRA denoiser, decode the chosen frames, score them with a differentiable reward
and backpropagate the reward through the decode and the sampling steps from the backprop cutoff on.

`step` is one optimizer step over gradient_accumulation_steps micro-steps; `micro_step` is one batch.
"""

from __future__ import annotations

import random

import torch
from accelerate import Accelerator

from vader.backends.base import VideoBackend
from vader.checkpoint import set_lora_dropout
from vader.config import SPECIFIC_CUTOFF, VaderConfig
from vader.frames import select_frames
from vader.memory import LiveBytes, PlannedSteps
from vader.methods.base import PlannedStep
from vader.methods.update import StepResult, apply_update, average_gradients, clip_gradients
from vader.seeds import make_generator, pick_prompts, set_step_seed, step_seed

METRICS: tuple[str, ...] = ()
DIFFERENTIABLE_REWARD = True
IGNORED_KNOBS: tuple[str, ...] = ()  # every `vader plan --fit` knob changes this step's memory


def check_config(cfg: VaderConfig) -> None:
    """Nothing beyond the config's own rules: every backend samples with a backprop cutoff."""


def backprop_cutoff(mode: str | int | None, num_steps: int, rng: random.Random) -> int | None:
    """First 0-based step that keeps gradients; None means no step does (inference)."""
    if mode is None:
        return None
    if isinstance(mode, int):
        return num_steps - mode  # DRaFT-K: the last K steps
    if mode == "last":
        return num_steps - 1
    if mode == "rand":
        return rng.randint(0, num_steps - 1)
    if mode == "specific":
        return SPECIFIC_CUTOFF
    raise ValueError(f"unknown backprop_mode {mode!r}")


def draw_cutoff(cfg: VaderConfig, rng: random.Random, step: int, micro: int, world: int) -> int | None:
    """This micro-step's cutoff from the process's own stream; under sharding on several processes, one
    draw per micro-step for all of them: sharded weights are gathered for the backward of every denoiser
    call together on all processes, so they must all keep the same steps' graphs."""
    cutoff = backprop_cutoff(cfg.backprop_mode, cfg.scheduler.num_sampling_steps, rng)  # consumed either way
    if cfg.sharding == "fsdp" and world > 1 and cfg.backprop_mode == "rand":
        shared = random.Random(step_seed(cfg.seed, "cutoff", step, micro))
        cutoff = backprop_cutoff(cfg.backprop_mode, cfg.scheduler.num_sampling_steps, shared)
    return cutoff


def worst_cutoff(cfg: VaderConfig) -> int:
    """The backprop cutoff that keeps the most steps' graphs: what `vader plan` plans for every mode."""
    steps = cfg.scheduler.num_sampling_steps
    mode = cfg.backprop_mode
    if isinstance(mode, int):
        return steps - mode
    return {"last": steps - 1, "rand": 0, "specific": SPECIFIC_CUTOFF}[mode]


def micro_step(gen: VideoBackend, reward, cfg: VaderConfig, accelerator: Accelerator,  # type: ignore[no-untyped-def]
               prompts: list[str], step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """One micro-step: sample, decode the chosen frames, score, backpropagate loss / accumulation
    steps (gradients add up in .grad). Returns the detached per-sample loss and reward and the cutoff."""
    rank, world = accelerator.process_index, accelerator.num_processes
    rng = set_step_seed(cfg.seed, step, micro, rank)
    batch = pick_prompts(prompts, cfg, step, micro, rank, world)
    cutoff = draw_cutoff(cfg, rng, step, micro, world)
    # gen.num_frames: the frames the model produces (a backend's own count); only Open-Sora's
    # 'latent' strategy reads its VAE's geometry
    vae = gen.vae if cfg.decode_strategy == "latent" else None
    frames = select_frames(cfg.decode_frame, gen.num_frames, rng, cfg.decode_strategy, vae)
    with accelerator.autocast():
        latents = gen.sample_latents(batch, make_generator(rng), cutoff=cutoff, grad_checkpoint=cfg.grad_checkpoint)
        video = gen.decode(latents, frames, grad_checkpoint=cfg.grad_checkpoint)
        out = reward(video, gen.reward_prompts(batch))
    accelerator.backward(out.loss.mean() / cfg.gradient_accumulation_steps)
    return out.loss.detach(), out.reward.detach(), cutoff


def train_step(gen: VideoBackend, reward, optimizer, params, cfg: VaderConfig,  # type: ignore[no-untyped-def]
               accelerator: Accelerator, prompts: list[str], step: int) -> StepResult:
    """One optimizer step over gradient_accumulation_steps micro-steps. A non-finite loss, reward or
    gradient on any process skips the update on every process (grads dropped, no optimizer step)."""
    optimizer.zero_grad(set_to_none=True)
    set_lora_dropout(gen.denoiser, True)  # validation turns it off; training samples with it on
    rewards, losses = [], []
    cutoff = None
    for micro in range(cfg.gradient_accumulation_steps):
        loss, rew, cutoff = micro_step(gen, reward, cfg, accelerator, prompts, step, micro)
        losses.append(loss)
        rewards.append(rew)
    average_gradients(params, accelerator)
    grad_norm = clip_gradients(params, cfg.max_grad_norm, accelerator)
    reward_all = accelerator.gather(torch.cat(rewards).float())
    loss_all = accelerator.gather(torch.cat(losses).float())
    values_finite = bool(torch.isfinite(loss_all).all() and torch.isfinite(reward_all).all())
    skipped, nonfinite = apply_update(optimizer, params, cfg.lr, accelerator, step, values_finite, grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_all.mean().item(), reward=reward_all.mean().item(),
                      reward_std=reward_all.std(unbiased=False).item(), grad_norm=grad_norm, cutoff=cutoff,
                      skipped=skipped, nonfinite=nonfinite)


def plan_step(gen: VideoBackend, reward, cfg: VaderConfig, prompts: list[str], frames: list[int],  # type: ignore[no-untyped-def]
              meter: LiveBytes, all_steps: bool) -> PlannedStep:
    """micro_step's forward at its worst cutoff (the most steps with gradients)."""
    cutoff = worst_cutoff(cfg)
    steps = PlannedSteps(meter, cutoff, all_steps)
    with meter.phase("sampling"):  # the noise and the CFG text batch live through the window's steps
        latents = gen.sample_latents(prompts, torch.Generator().manual_seed(0), cutoff=cutoff,
                                     grad_checkpoint=cfg.grad_checkpoint, progress=steps)
    with meter.phase("decode"):
        video = gen.decode(latents, frames, grad_checkpoint=cfg.grad_checkpoint)
    with meter.phase("reward"):
        out = reward(video, gen.reward_prompts(prompts))
    total = cfg.scheduler.num_sampling_steps
    notes = ["backprop_mode='rand' planned at its worst draw (every step keeps gradients)"] \
        if cfg.backprop_mode == "rand" else []
    return PlannedStep(out.loss.mean() / cfg.gradient_accumulation_steps, cutoff,
                       {"sampling_nograd": steps.nograd_scale},
                       f"{total - cutoff} of {total} sampling steps with gradients", notes, (latents, video, out))


step = train_step  # the MethodModule entry point

__all__ = ["backprop_cutoff", "check_config", "draw_cutoff", "micro_step", "plan_step", "step", "train_step", "worst_cutoff"]
