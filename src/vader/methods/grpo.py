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

A round (`grpo_step`): for each prompt, `group_size` SDE trajectories without gradients, recording every
latent and log-probability (optionally from one initial noise per group); rewards on the decoded videos
under no_grad; advantages against the group's mean over the round's std ('global', Flow-GRPO's recipes)
or the group's, clipped to +-adv_clip_max, groups of tied rewards dropped; then `inner_epochs` passes,
each split into `updates_per_round` optimizer updates of the PPO-clipped objective over the recorded
transitions (the first int(0.99 N) steps, as Flow-GRPO; or random ones), re-evaluating the LoRA
denoiser on the SAME recorded latents with the guidance's unconditional branch detached. Every step of
the trajectory is stochastic (no SDE/ODE mixing): simple, and every transition has a log-probability.

CFG-free training (Flow-GRPO's train.cfg=False with guidance_scale 1) is `scheduler.cfg_scale=1`: the
backends then sample and train on the conditional branch alone (Open-Sora runs both branches, but at
scale 1 the unconditional one has zero weight). grpo.ema keeps an EMA of the LoRA (`update.LoraEMA`)
that validation and the final LoRA use (vader.train).
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
from vader.sampling import uncond_detached
from vader.seeds import make_generator, pick_prompts, set_step_seed

METRICS = ("reward_queries", "clip_fraction", "ratio_max_dev", "approx_kl", "log_ratio_abs", "kl", "updates",
           "zero_std_groups")  # logged beside the loop's own
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
                         noise_level: float, same_noise_group: int | None = None) -> Trajectory:
    """The whole SDE trajectory for `prompts`, without gradients.

    Same schedule, conditioning, guidance and initial noise draw as the generator's `sample_latents`
    (`gen.flow_start`); the per-step noise comes from the same `generator`, so a step seed reproduces
    the trajectory exactly. `same_noise_group`: consecutive groups of that many samples start from their
    first sample's noise (the SDE's own noise still differs)."""
    state = gen.flow_start(prompts, generator)
    if same_noise_group:
        n = state.noise
        first = n.view(-1, same_noise_group, *n.shape[1:])[:, :1]
        state.noise = first.expand(-1, same_noise_group, *n.shape[1:]).reshape(n.shape).contiguous()
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


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, std: str = "group",
                     spread: Tensor | float | None = None) -> Tensor:
    """(r - group mean) / (std + eps) over consecutive groups of `group_size` (one prompt's samples); std
    is the population std (numpy's default, as Flow-GRPO's stat tracker) of the group ('group') or of
    every reward given ('global', Flow-GRPO's global_std recipes; `spread`: that std when the round's
    rewards are more than these, e.g. gathered from every process). A group of equal rewards gets
    exactly zero advantages."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    if std == "group":
        spread = groups.std(1, unbiased=False, keepdim=True)
    elif spread is None:
        spread = rewards.std(unbiased=False)
    advantages = (groups - mean) / (torch.as_tensor(spread, dtype=torch.float32) + eps)
    # equal rewards carry no signal; the mean's rounding would otherwise leave ~1e-4 advantages
    tied = (groups.max(1, keepdim=True).values == groups.min(1, keepdim=True).values)
    return torch.where(tied, torch.zeros_like(advantages), advantages).reshape(-1)


def informative(rewards: Tensor, group_size: int) -> Tensor:
    """[B] bool: the sample's group has rewards that differ (Flow-GRPO drops the others from training)."""
    groups = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1, group_size)
    differ = groups.max(1).values != groups.min(1).values
    return differ.repeat_interleave(group_size)


def clipped_objective(log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor,
                      clip_range: float, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic loss max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(logp - logp_old), averaged over
    the batch, or summed with `weights` [B] (the samples trained on this step, over their count);
    returns (loss, ratio)."""
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    return (per_sample.mean() if weights is None else (per_sample * weights).sum()), ratio


@dataclass
class LossParts:
    loss: Tensor  # what is backpropagated: policy + kl_beta * kl
    policy: Tensor
    kl: Tensor
    ratio: Tensor  # [B], detached


def grpo_loss(gen, traj: Trajectory, advantages: Tensor, i: int, settings: GRPOSettings,
              grad_checkpoint: bool = False, weights: Tensor | None = None) -> LossParts:
    """The clipped objective on recorded transition i (z_i -> z_{i+1}), with gradients to the LoRA
    (`grad_checkpoint`: recompute the denoiser call in the backward, as VADER's sampler does). `weights`
    [B]: each sample's share of the loss (0 for a sample not trained on step i); None: the batch mean.
    With uncond='detached' the guidance's unconditional branch gives no gradient, as in Flow-GRPO.

    The KL term compares the transition's mean with the base model's (LoRA disabled), averaged over the
    latent dims: ||mean - mean_ref||^2 / (2 s_t^2) with kl_units='flow_grpo' (Flow-GRPO's: s_t the SDE's
    noise scale, without dt, so its beta values carry over), or / (2 s_t^2 dt) with 'gaussian' (the KL of
    the two transition Gaussians; 1/dt = 4-40x larger over a 12-step schedule).
    """
    t, t_next = traj.timesteps[i], traj.next_t(i)
    z, prev = traj.latents[i], traj.latents[i + 1]
    with uncond_detached(settings.uncond == "detached"):
        v = gen.flow_velocity(traj.state, z, i, grad_checkpoint)
    _, log_prob, mean, std = sde_step(v, z, t, t_next, settings.noise_level, prev=prev,
                                      num_timesteps=traj.num_timesteps)
    w = None if weights is None else weights.to(log_prob.device)
    policy, ratio = clipped_objective(log_prob, traj.log_probs[:, i], advantages.to(log_prob.device),
                                      settings.clip_range, w)
    kl = torch.zeros((), device=policy.device)
    if settings.kl_beta > 0:
        with torch.no_grad(), lora_disabled(gen.denoiser):
            v_ref = gen.flow_velocity(traj.state, z, i)
        _, _, mean_ref, _ = sde_step(v_ref, z, t, t_next, settings.noise_level, prev=prev,
                                     num_timesteps=traj.num_timesteps)
        variance = std**2  # s_t^2 dt
        if settings.kl_units == "flow_grpo":
            dt = ((t - t_next).float() / traj.num_timesteps).view((-1,) + (1,) * (mean.ndim - 1))
            variance = variance / dt  # s_t^2
        per_sample = ((mean - mean_ref) ** 2 / (2 * variance)).mean(dim=tuple(range(1, mean.ndim)))
        kl = per_sample.mean() if w is None else (per_sample * w).sum()
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
    clip_fraction: float = 0.0  # share of the round's trained ratios outside [1 - clip_range, 1 + clip_range]
    ratio_max_dev: float = 0.0  # max |ratio - 1| over the round
    approx_kl: float = 0.0  # 0.5 mean (log ratio)^2 over the round (Flow-GRPO's approx_kl): how off-policy
    log_ratio_abs: float = 0.0  # mean |log ratio| over the round's trained transitions
    kl: float = 0.0  # mean KL to the base model (0 when kl_beta is 0)
    updates: int = 0  # optimizer updates made in the round
    zero_std_groups: float = 0.0  # share of this process's groups whose rewards are all equal (Flow-GRPO's zero_std_ratio)


@dataclass
class _Batch:
    traj: Trajectory
    advantages: Tensor  # [B]
    weights: Tensor  # [B, N]: each sample's share of a step's loss; 0 where not trained (or its group dropped)

    def steps(self) -> list[int]:
        return [i for i in range(self.weights.shape[1]) if bool(self.weights[:, i].any())]


def train_mask(num_steps: int, batch: int, settings: GRPOSettings, rng: random.Random) -> Tensor:
    """[B, N] bool: the sampling steps each sample is trained on. K = int(fraction x N): the first K
    ('first', Flow-GRPO: with 0.99 all but the last; from train_steps_start, the window start..K-1), one
    random K for the round ('random') or a random K per sample ('per_sample', DanceGRPO)."""
    settings.check_steps(num_steps)
    k = settings.trained_steps(num_steps)
    mask = torch.zeros(batch, num_steps, dtype=torch.bool)
    if settings.train_steps == "first":
        mask[:, settings.train_steps_start:settings.last_step(num_steps)] = True
    elif settings.train_steps == "random":
        mask[:, sorted(rng.sample(range(num_steps), k))] = True
    else:
        for row in mask:
            row[sorted(rng.sample(range(num_steps), k))] = True
    return mask


def grpo_step(gen, reward, optimizer, params, cfg, accelerator: Accelerator, prompts: list[str], step: int,
              settings: GRPOSettings | None = None) -> GRPOStepResult:
    """One GRPO round: sample group_size videos per prompt of each micro-step (prompts and seeds as
    `vader.methods.vader.micro_step` picks them) and score them; advantages against the group's mean over
    the round's std (or the group's); then `inner_epochs` passes over the round, each split into
    `updates` optimizer updates of the PPO-clipped objective (the micro-batches in consecutive shares):
    from the second update on the policy has moved, the ratio departs from 1 and the clip acts.

    LoRA dropout stays off while sampling and training: the ratio compares one deterministic policy.
    A non-finite reward, loss or gradient skips the update as VADER's step does; so does a round with no
    signal (every group tied, or every advantage zero) when kl_beta is 0.
    """
    settings = settings or GRPOSettings.from_config(cfg)
    optimizer.zero_grad(set_to_none=True)
    set_lora_dropout(gen.denoiser, False)
    rank, world = accelerator.process_index, accelerator.num_processes
    g = settings.group_size
    sampled: list[tuple[Trajectory, Tensor, random.Random]] = []
    for micro in range(cfg.gradient_accumulation_steps):
        rng = set_step_seed(cfg.seed, step, micro, rank)
        picked = pick_prompts(prompts, cfg, step, micro, rank, world)
        group = [p for p in picked for _ in range(g)]
        vae = gen.vae if cfg.decode_strategy == "latent" else None
        frames = select_frames(cfg.decode_frame, gen.num_frames, rng, cfg.decode_strategy, vae)
        generator = make_generator(rng)
        with accelerator.autocast(), torch.no_grad():
            traj = sample_with_logprobs(gen, group, generator, settings.noise_level, g if settings.same_noise else None)
            video = gen.decode(traj.final, frames)
            scores = _scores(reward, video, gen.reward_prompts(group))
            del video  # the updates need the trajectory and the scores, not the pixels
        sampled.append((traj, scores, rng))
    local = torch.cat([scores for _, scores, _ in sampled])
    reward_all = accelerator.gather(local.to(accelerator.device))
    queries = local.numel()
    stats = dict(reward=reward_all.mean().item(), reward_std=reward_all.std(unbiased=False).item(),
                 cutoff=None, reward_queries=queries)
    if any_process(not bool(torch.isfinite(reward_all).all()), accelerator):
        return GRPOStepResult(loss=math.nan, grad_norm=math.nan, skipped=True, nonfinite=True, **stats)
    spread = reward_all.float().std(unbiased=False).cpu()  # the round's, over every process (global_std)
    batches = []
    tied = torch.cat([~informative(scores, g) for _, scores, _ in sampled]).float().mean().item()
    stats["zero_std_groups"] = tied
    for traj, scores, rng in sampled:
        advantages = group_advantages(scores, g, std=settings.std, spread=spread)
        advantages = advantages.clamp(-settings.adv_clip_max, settings.adv_clip_max)
        keep = informative(scores, g) if settings.drop_zero_std else torch.ones(scores.numel(), dtype=torch.bool)
        mask = train_mask(len(traj.timesteps), scores.numel(), settings, rng) & keep[:, None]
        # a step's loss averages over the samples kept (Flow-GRPO filters the tied groups out first)
        weights = mask.float() / max(1, int(keep.sum()))
        batches.append(_Batch(traj, advantages.to(gen.device), weights))
    no_signal = all(not b.steps() or bool((b.advantages == 0).all()) for b in batches) and settings.kl_beta == 0
    if not any_process(not no_signal, accelerator):
        return GRPOStepResult(loss=0.0, grad_norm=0.0, skipped=True, **stats)

    updates = settings.updates(len(batches))
    share = len(batches) // updates
    k = settings.trained_steps(len(sampled[0][0].timesteps))
    skipped = nonfinite = False
    loss_mean = grad_norm = math.nan
    losses, kls, ratios, log_ratios = [], [], [], []
    made = 0
    for _ in range(settings.inner_epochs):
        for u in range(updates):
            optimizer.zero_grad(set_to_none=True)
            update_losses = []
            for b in batches[u * share:(u + 1) * share]:
                for i in b.steps():
                    with accelerator.autocast():
                        parts = grpo_loss(gen, b.traj, b.advantages, i, settings, cfg.grad_checkpoint, b.weights[:, i])
                    accelerator.backward(parts.loss / (k * share))
                    update_losses.append(parts.loss.detach().float())
                    kls.append(parts.kl.detach().float())
                    trained = b.weights[:, i] > 0
                    ratios.append(parts.ratio[trained.to(parts.ratio.device)].float())
                    log_ratios.append(ratios[-1].log())
            average_gradients(params, accelerator)
            grad_norm = clip_gradients(params, cfg.max_grad_norm, accelerator)
            local_loss = torch.stack(update_losses).sum() / k if update_losses else torch.zeros(())
            loss_all = accelerator.gather(local_loss.reshape(1).to(accelerator.device))
            loss_mean = loss_all.mean().item()
            losses.append(loss_mean)
            skipped, nonfinite = apply_update(optimizer, params, cfg.lr, accelerator, step,
                                               bool(torch.isfinite(loss_all).all()), grad_norm)
            made += not (skipped or nonfinite)
            if nonfinite or skipped:
                break
        if nonfinite or skipped:
            break
    optimizer.zero_grad(set_to_none=True)
    ratio = torch.cat(ratios) if ratios else torch.ones(1)
    log_ratio = torch.cat(log_ratios) if log_ratios else torch.zeros(1)
    return GRPOStepResult(loss=losses[-1] if losses else loss_mean, grad_norm=grad_norm, skipped=skipped,
                          nonfinite=nonfinite,
                          clip_fraction=((ratio - 1).abs() > settings.clip_range).float().mean().item(),
                          ratio_max_dev=(ratio - 1).abs().max().item(),
                          approx_kl=0.5 * log_ratio.square().mean().item(),
                          log_ratio_abs=log_ratio.abs().mean().item(),
                          kl=torch.stack(kls).mean().item() if kls else 0.0, updates=made, **stats)


def check_config(cfg: VaderConfig) -> None:
    """The grpo keys, and a backend whose sampler has a log-probability (a rectified flow)."""
    module = backend_module(cfg.backend)
    if not module.LOG_PROB_SAMPLING:
        able = [name for name in BACKENDS if backend_module(name).LOG_PROB_SAMPLING]
        raise VaderError(f"method='grpo' needs a sampler with a log-probability (a rectified flow: "
                         f"{', '.join(able)}); model.type={cfg.model.type!r} samples with DDIM: use method='vader'")
    settings = GRPOSettings.from_config(cfg)  # one line naming the bad grpo.* key
    settings.updates(cfg.gradient_accumulation_steps)
    settings.check_steps(cfg.scheduler.num_sampling_steps)


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
    # per sample, the union of the samples' steps is (nearly) every step: each runs on the whole batch
    trained = num_steps if settings.train_steps == "per_sample" else settings.trained_steps(num_steps)
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
           "grpo_step", "group_advantages", "informative", "plan_step", "sample_with_logprobs", "sde_step", "step",
           "train_mask"]
