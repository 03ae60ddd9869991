"""GRPO on a rectified-flow sampler (Flow-GRPO), beside VADER's reward backpropagation.

VADER needs a differentiable reward; GRPO only needs scores, so it also trains on rewards without
gradients (a VLM judge, an OCR check, a lookup) given as `module:function` (`load_callable_reward`).

Conventions (vader's, see `vader.sampling.sample`): sigma = t / 1000, z_t = (1 - sigma) x0 + sigma eps,
the model velocity v ~ x0 - eps, and the ODE (Euler) step from t to t_next < t is
z_next = z + v * dt with dt = (t - t_next) / 1000 > 0. Flow-GRPO (SD3's convention) writes u = eps - x0 = -v
and a negative step; substituting u = -v and its step = -dt into its SDE gives, per sampling step,

    s_t   = noise_level * sqrt(sigma / (1 - sigma))          (sigma in the denominator replaced by
                                                               sigma_next on the first step, sigma = 1:
                                                               Flow-GRPO's sigma_max = sigmas[1])
    mean  = z * (1 - s_t^2 dt / (2 sigma)) + v * (1 + s_t^2 (1 - sigma) / (2 sigma)) * dt
    std   = s_t * sqrt(dt)
    z_next ~ N(mean, std^2)

With noise_level = 0 this is exactly the ODE step; the extra drift keeps the SDE's marginals those of
the ODE. The log-probability of a transition is averaged (not summed) over the latent dimensions, as
Flow-GRPO does: its clip_range default (1e-4) is calibrated for that scale.

A step (`grpo_step`): for each prompt, `group_size` SDE trajectories without gradients, recording every
latent and log-probability; rewards on the decoded videos under no_grad; advantages normalised within
each prompt's group and clipped to +-adv_clip_max; then `inner_epochs` optimizer updates of the
PPO-clipped objective over the recorded transitions (all steps, or a random `train_steps_fraction` of
them), re-evaluating the LoRA denoiser on the SAME recorded latents. Every step of the trajectory is
stochastic (no SDE/ODE mixing): simple, and every transition has a log-probability to train on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from vader.backends import BACKENDS, backend_module
from vader.backends.base import FlowSampler, FlowState
from vader.checkpoint import lora_disabled, set_lora_dropout
from vader.config import VaderConfig
from vader.errors import VaderError
from vader.frames import select_frames
from vader.memory import LiveBytes
from vader.methods.base import PlannedStep
from vader.methods.grpo_settings import GRPOSettings
from vader.methods.update import StepResult, any_process, apply_update, average_gradients, clip_gradients
from vader.rewards.base import RewardOutput
from vader.seeds import make_generator, pick_prompts, set_step_seed

METRICS = ("reward_queries", "clip_fraction", "ratio_max_dev", "kl")  # logged beside the loop's own
DIFFERENTIABLE_REWARD = False  # scores only: a 'module:function' reward trains it
# `vader plan --fit` knobs with no effect here: recorded steps train one at a time (no backprop cutoff),
# and the reward runs under no_grad (nothing for its checkpointing to save)
IGNORED_KNOBS = ("backprop_mode", "reward_grad_checkpoint")

# t within this of num_timesteps counts as sigma = 1: the timestep shift maps 1000 to 1000 only up to rounding
_SIGMA_ONE_TOL = 1e-4


# ---------------------------------------------------------------- the SDE step


def sde_step(v: Tensor, z: Tensor, t: Tensor, t_next: Tensor, noise_level: float,
             generator: torch.Generator | None = None, prev: Tensor | None = None,
             num_timesteps: float = 1000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step from t to t_next (< t) (formulas in the module docstring).

    v: the guided velocity at (z, t) in vader's convention (x0 - eps). t, t_next: [B] timesteps.
    prev: the next latent whose log-probability to compute (the ratio's); None draws one with `generator`.
    Returns (z_next, log_prob [B] averaged over the latent dims, mean, std [B, 1, ...]), all fp32.
    """
    v, z = v.float(), z.float()
    shape = (-1,) + (1,) * (z.ndim - 1)
    sigma = (t.float() / num_timesteps).view(shape)
    sigma_next = (t_next.float() / num_timesteps).view(shape)
    dt = sigma - sigma_next
    # at sigma = 1 the variance sigma / (1 - sigma) is infinite: Flow-GRPO uses its second sigma there
    sigma_den = torch.where(sigma >= 1 - _SIGMA_ONE_TOL, sigma_next, sigma)
    std_t = noise_level * torch.sqrt(sigma / (1 - sigma_den))
    mean = z * (1 - std_t**2 * dt / (2 * sigma)) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * torch.sqrt(dt)
    if prev is None:
        device = generator.device if generator is not None else z.device
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=device).to(z.device)
        prev = mean + std * noise
    prev = prev.detach().float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std


# ---------------------------------------------------------------- sampling


@dataclass
class Trajectory:
    """One batch of SDE samples: everything the clipped objective re-evaluates."""

    state: FlowState  # the noise z_0, the schedule and the backend's conditioning
    latents: list[Tensor]  # z_0 (noise, t = num_timesteps) ... z_N (final), each [B, C, T, H, W] fp32
    log_probs: Tensor  # [B, N]: log p(z_{i+1} | z_i) under the policy that sampled

    @property
    def final(self) -> Tensor:
        return self.latents[-1]

    @property
    def timesteps(self) -> list[Tensor]:
        return self.state.timesteps

    @property
    def num_timesteps(self) -> float:
        return self.state.num_timesteps

    def next_t(self, i: int) -> Tensor:
        return self.state.next_t(i)


def sample_with_logprobs(gen: FlowSampler, prompts: list[str], generator: torch.Generator,
                         noise_level: float) -> Trajectory:
    """The whole SDE trajectory for `prompts`, without gradients.

    Same schedule, conditioning, guidance and initial noise draw as the generator's `sample_latents`
    (`gen.flow_start`); the per-step noise comes from the same `generator`, so a step seed reproduces
    the trajectory exactly."""
    state = gen.flow_start(prompts, generator)
    traj = Trajectory(state, [state.noise], torch.empty(0))
    z = state.noise
    log_probs = []
    with torch.no_grad():
        for i in range(len(state.timesteps)):
            v = gen.flow_velocity(state, z, i)
            z, log_prob, _, _ = sde_step(v, z, state.timesteps[i], state.next_t(i), noise_level, generator,
                                         num_timesteps=state.num_timesteps)
            traj.latents.append(z)
            log_probs.append(log_prob)
    traj.log_probs = torch.stack(log_probs, 1)
    return traj


# ---------------------------------------------------------------- advantages and the objective


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` (one prompt's samples);
    std is the population std, as Flow-GRPO's per-prompt stat tracker (numpy's default). A group of
    equal rewards gets exactly zero advantages."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, unbiased=False, keepdim=True)
    advantages = (groups - mean) / (std + eps)
    # equal rewards carry no signal; the mean's rounding would otherwise leave ~1e-4 advantages
    tied = (groups.max(1, keepdim=True).values == groups.min(1, keepdim=True).values)
    return torch.where(tied, torch.zeros_like(advantages), advantages).reshape(-1)


def clipped_objective(log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor,
                      clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic loss mean(max(-A r, -A clip(r, 1 - c, 1 + c))), r = exp(logp - logp_old);
    returns (loss, ratio)."""
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


@dataclass
class LossParts:
    loss: Tensor  # what is backpropagated: policy + kl_beta * kl
    policy: Tensor
    kl: Tensor
    ratio: Tensor  # [B], detached


def grpo_loss(gen, traj: Trajectory, advantages: Tensor, i: int, settings: GRPOSettings,
              grad_checkpoint: bool = False) -> LossParts:
    """The clipped objective on recorded transition i (z_i -> z_{i+1}), with gradients to the LoRA
    (`grad_checkpoint`: recompute the denoiser call in the backward, as VADER's sampler does).

    The KL term is that of the two transition Gaussians (same std, the base model's mean with the LoRA
    disabled), averaged over the latent dims: ||mean - mean_ref||^2 / (2 std^2), std the transition's
    std. Flow-GRPO divides by its s_t^2 instead (without dt); per-dim Gaussian KL is the honest reading.
    """
    t, t_next = traj.timesteps[i], traj.next_t(i)
    z, prev = traj.latents[i], traj.latents[i + 1]
    v = gen.flow_velocity(traj.state, z, i, grad_checkpoint)
    _, log_prob, mean, std = sde_step(v, z, t, t_next, settings.noise_level, prev=prev,
                                      num_timesteps=traj.num_timesteps)
    policy, ratio = clipped_objective(log_prob, traj.log_probs[:, i], advantages.to(log_prob.device),
                                      settings.clip_range)
    kl = torch.zeros((), device=policy.device)
    if settings.kl_beta > 0:
        with torch.no_grad(), lora_disabled(gen.denoiser):
            v_ref = gen.flow_velocity(traj.state, z, i)
        _, _, mean_ref, _ = sde_step(v_ref, z, t, t_next, settings.noise_level, prev=prev,
                                     num_timesteps=traj.num_timesteps)
        kl = ((mean - mean_ref) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim))).mean()
    return LossParts(policy + settings.kl_beta * kl, policy, kl, ratio.detach())


def _scores(reward, video: Tensor, prompts: list[str]) -> Tensor:
    with torch.no_grad():
        out = reward(video, prompts)
    value = out.reward if isinstance(out, RewardOutput) else out
    return torch.as_tensor(value).detach().float().reshape(-1)


# ---------------------------------------------------------------- one optimizer step


@dataclass
class GRPOStepResult(StepResult):
    reward_queries: int = 0  # videos scored by this step on this process
    clip_fraction: float = 0.0  # share of ratios outside [1 - clip_range, 1 + clip_range] (last inner epoch)
    ratio_max_dev: float = 0.0  # max |ratio - 1| over the last inner epoch
    kl: float = 0.0  # mean KL to the base model (0 when kl_beta is 0)


@dataclass
class _Batch:
    traj: Trajectory
    advantages: Tensor
    train_steps: list[int]


def grpo_step(gen, reward, optimizer, params, cfg, accelerator: Accelerator, prompts: list[str], step: int,
              settings: GRPOSettings | None = None) -> GRPOStepResult:
    """One GRPO step: sample group_size videos per prompt of each micro-step (prompts and seeds as
    `vader.methods.vader.micro_step` picks them), score them, then `inner_epochs` clipped-objective updates.

    LoRA dropout stays off while sampling and training: the ratio compares one deterministic policy
    (with dropout, logp_old would come from another sub-network and the first ratio would not be 1).
    A non-finite reward, loss or gradient skips the update as VADER's step does; so does a batch
    whose advantages are all zero with kl_beta 0 (no gradient: only AdamW's weight decay would move).
    """
    settings = settings or GRPOSettings.from_config(cfg)
    optimizer.zero_grad(set_to_none=True)
    set_lora_dropout(gen.denoiser, False)
    rank, world = accelerator.process_index, accelerator.num_processes
    g = settings.group_size
    batches: list[_Batch] = []
    rewards: list[Tensor] = []
    for micro in range(cfg.gradient_accumulation_steps):
        rng = set_step_seed(cfg.seed, step, micro, rank)
        picked = pick_prompts(prompts, cfg, step, micro, rank, world)
        group = [p for p in picked for _ in range(g)]
        vae = gen.vae if cfg.decode_strategy == "latent" else None
        frames = select_frames(cfg.decode_frame, gen.num_frames, rng, cfg.decode_strategy, vae)
        generator = make_generator(rng)
        with accelerator.autocast(), torch.no_grad():
            traj = sample_with_logprobs(gen, group, generator, settings.noise_level)
            video = gen.decode(traj.final, frames)
            scores = _scores(reward, video, gen.reward_prompts(group))
            del video  # the updates need the trajectory and the scores, not the pixels
        train_steps = _train_steps(len(traj.timesteps), settings.train_steps_fraction, rng)
        advantages = group_advantages(scores, g).clamp(-settings.adv_clip_max, settings.adv_clip_max)
        batches.append(_Batch(traj, advantages.to(gen.device), train_steps))
        rewards.append(scores)
    local = torch.cat(rewards)
    reward_all = accelerator.gather(local.to(accelerator.device))
    queries = local.numel()
    stats = dict(reward=reward_all.mean().item(), reward_std=reward_all.std(unbiased=False).item(),
                 cutoff=None, reward_queries=queries)
    if any_process(not bool(torch.isfinite(reward_all).all()), accelerator):
        return GRPOStepResult(loss=math.nan, grad_norm=math.nan, skipped=True, nonfinite=True, **stats)
    no_signal = all(bool((b.advantages == 0).all()) for b in batches) and settings.kl_beta == 0
    if not any_process(not no_signal, accelerator):
        return GRPOStepResult(loss=0.0, grad_norm=0.0, skipped=True, **stats)

    skipped = nonfinite = False
    loss_mean = grad_norm = math.nan
    for _ in range(settings.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        losses, kls, ratios = [], [], []
        for b in batches:
            scale = 1.0 / (len(b.train_steps) * cfg.gradient_accumulation_steps)
            for i in b.train_steps:
                with accelerator.autocast():
                    parts = grpo_loss(gen, b.traj, b.advantages, i, settings, cfg.grad_checkpoint)
                accelerator.backward(parts.loss * scale)
                losses.append(parts.loss.detach().float())
                kls.append(parts.kl.detach().float())
                ratios.append(parts.ratio)
        average_gradients(params, accelerator)
        grad_norm = clip_gradients(params, cfg.max_grad_norm, accelerator)
        loss_all = accelerator.gather(torch.stack(losses).mean().reshape(1).to(accelerator.device))
        loss_mean = loss_all.mean().item()
        skipped, nonfinite = apply_update(optimizer, params, cfg.lr, accelerator, step,
                                           bool(torch.isfinite(loss_all).all()), grad_norm)
        ratio = torch.cat(ratios)
        if nonfinite or skipped:
            break
    optimizer.zero_grad(set_to_none=True)
    return GRPOStepResult(loss=loss_mean, grad_norm=grad_norm, skipped=skipped, nonfinite=nonfinite,
                          clip_fraction=((ratio - 1).abs() > settings.clip_range).float().mean().item(),
                          ratio_max_dev=(ratio - 1).abs().max().item(), kl=torch.stack(kls).mean().item(),
                          **stats)


def _train_steps(num_steps: int, fraction: float, rng: random.Random) -> list[int]:
    """The sampling steps trained on: all, or a random subset (at least one) from the step's RNG."""
    count = max(1, round(fraction * num_steps))
    if count >= num_steps:
        return list(range(num_steps))
    return sorted(rng.sample(range(num_steps), count))


def check_config(cfg: VaderConfig) -> None:
    """The grpo keys, and a backend whose sampler has a log-probability (a rectified flow)."""
    module = backend_module(cfg.backend)
    if not module.LOG_PROB_SAMPLING:
        able = [name for name in BACKENDS if backend_module(name).LOG_PROB_SAMPLING]
        raise VaderError(f"method='grpo' needs a sampler with a log-probability (a rectified flow: "
                         f"{', '.join(able)}); model.type={cfg.model.type!r} samples with DDIM: use method='vader'")
    GRPOSettings.from_config(cfg)  # one line naming the bad grpo.* key


def plan_step(gen: FlowSampler, reward, cfg: VaderConfig, prompts: list[str], frames: list[int],  # type: ignore[no-untyped-def]
              meter: LiveBytes, all_steps: bool) -> PlannedStep:
    """grpo_step: train_batch_size x group_size SDE trajectories without gradients (every step's latents
    kept), the decode and reward without gradients, then one recorded transition's clipped loss with
    gradients (the others have the same shapes and are freed in between). `all_steps` is moot: one SDE
    step is run and the trajectory filled with latents of its shape."""
    settings = GRPOSettings.from_config(cfg)
    group = [p for p in prompts for _ in range(settings.group_size)]
    n = len(group)
    num_steps = cfg.scheduler.num_sampling_steps
    trained = len(_train_steps(num_steps, settings.train_steps_fraction, random.Random(0)))
    set_lora_dropout(gen.denoiser, False)  # grpo_step samples and trains without LoRA dropout
    with meter.phase("sampling_nograd"), torch.no_grad():
        state = gen.flow_start(group, torch.Generator().manual_seed(0))
        traj = Trajectory(state, [state.noise], torch.empty(0))
        v = gen.flow_velocity(state, state.noise, 0)
        z, _, _, _ = sde_step(v, state.noise, state.timesteps[0], state.next_t(0), settings.noise_level,
                              num_timesteps=state.num_timesteps)
        del v
        traj.latents += [z] + [torch.empty_like(z) for _ in range(num_steps - 1)]
        traj.log_probs = torch.empty(n, num_steps)
    with meter.phase("decode"), torch.no_grad():
        video = gen.decode(traj.final, frames)
    with meter.phase("reward"), torch.no_grad():
        reward(video, gen.reward_prompts(group))
    del video
    with meter.phase("sampling"):
        parts = grpo_loss(gen, traj, torch.ones(n), 0, settings, cfg.grad_checkpoint)
    per_update = trained * settings.inner_epochs
    # the sampled steps, plus the base model's velocity per update when there is a KL term
    nograd = num_steps + (per_update if settings.kl_beta > 0 else 0)
    how = (f"GRPO: {settings.group_size} samples per prompt, {trained} of {num_steps} recorded steps trained one "
           f"at a time x {settings.inner_epochs} inner epoch(s)")
    note = (f"method='grpo': {cfg.train_batch_size} prompt(s) x group_size trajectories sampled without "
            "gradients, then one recorded step at a time with gradients")
    return PlannedStep(parts.loss / trained, None, {"sampling_nograd": nograd, "sampling": per_update,
                                                    "backward": per_update}, how, [note], (traj, parts))


step = grpo_step  # the MethodModule entry point

__all__ = ["GRPOSettings", "GRPOStepResult", "Trajectory", "check_config", "clipped_objective", "grpo_loss",
           "grpo_step", "group_advantages", "plan_step", "sample_with_logprobs", "sde_step", "step"]
