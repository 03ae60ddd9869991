"""GRPO as Flow-GRPO runs it (vader.methods.grpo): the round's std, tied groups dropped, a round split
into several optimizer updates (so the clip acts), the unconditional branch without gradient, the KL
in Flow-GRPO's units, one initial noise per group. On the tiny preset (see conftest.FAST)."""

from __future__ import annotations

import math

import pytest
import torch

from vader.config import load_config
from vader.errors import VaderError
from vader.methods.grpo import (
    GRPOSettings,
    group_advantages,
    grpo_loss,
    grpo_step,
    informative,
    sample_with_logprobs,
)
from vader.rewards.base import RewardOutput
from vader.sampling import cfg_combine, uncond_detached


def test_global_std_is_the_rounds_and_tied_groups_are_marked():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    spread = rewards.std(unbiased=False)
    adv = group_advantages(rewards, 4, std="global")
    torch.testing.assert_close(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (spread + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))
    # with group size 4 a group's own std bounds |A| by sqrt(3): the round's does not
    assert group_advantages(rewards, 4).abs().max() <= math.sqrt(3) + 1e-6
    assert group_advantages(torch.tensor([0.0, 0.0, 0.0, 9.0, 1.0, 1.0, 1.0, 1.1]), 4, std="global").abs().max() > 1
    # a spread given (the gathered rounds') is used as is
    torch.testing.assert_close(group_advantages(rewards, 4, std="global", spread=2.0)[:4],
                               torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (2.0 + 1e-4))
    assert informative(rewards, 4).tolist() == [True] * 4 + [False] * 4


def test_a_tied_group_adds_nothing_and_the_others_keep_their_scale(trainer):
    """The first prompt's samples all score the same, the second's differ. Dropping the tied group, each
    step's loss averages over the second group's 4 samples instead of all 8 (whose other 4 have zero
    advantage): the same direction, twice the gradient."""
    g = 4

    def reward(video, prompts):
        values = [0.5 if k < g else float(k % g) for k in range(len(prompts))]
        return RewardOutput(reward=torch.tensor(values), loss=-torch.tensor(values))

    results = {}
    for drop in (True, False):
        t = trainer("--train_batch_size", "2")
        results[drop] = grpo_step(t.gen, reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0,
                                  GRPOSettings(group_size=g, drop_zero_std=drop, updates_per_round=1, std="group"))
    assert not results[True].skipped and results[True].grad_norm > 0
    assert results[True].grad_norm == pytest.approx(2 * results[False].grad_norm, rel=1e-4)


def test_a_round_of_two_micro_batches_is_two_updates_and_the_second_is_clipped(trainer):
    t = trainer("--gradient_accumulation_steps", "2")
    before = [p.detach().clone() for p in t.params]
    result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, GRPOSettings())
    assert result.updates == 2 and not result.skipped
    # the second update's samples were drawn by the policy before the first: off-policy, so the ratio
    # leaves 1 and the clip (1e-4) acts on them; the first half of the ratios is exactly 1
    assert result.ratio_max_dev > 1e-4 and 0 < result.clip_fraction <= 0.5 and result.approx_kl > 0
    assert not all(torch.equal(a, p) for a, p in zip(before, t.params))
    one = trainer("--gradient_accumulation_steps", "2")
    single = grpo_step(one.gen, one.reward, one.optimizer, one.params, one.cfg, one.accelerator, one.run.prompts, 0,
                       GRPOSettings(updates_per_round=1))
    assert single.updates == 1 and single.ratio_max_dev == 0.0 and single.clip_fraction == 0.0


def test_updates_that_do_not_divide_the_round_are_refused_when_the_config_is_read(tiny_cfg):
    with pytest.raises(VaderError, match=r"grpo.updates_per_round=3 does not divide the round's 2 micro-batches"):
        tiny_cfg("--method", "grpo", "--gradient_accumulation_steps", "2", "--grpo", "{'updates_per_round': 3}")


def test_the_unconditional_branch_gets_no_gradient_when_detached(trainer):
    a, b = torch.ones(3, requires_grad=True), torch.full((3,), 2.0, requires_grad=True)
    with uncond_detached():
        cfg_combine(a, b, 4.0).sum().backward()
    assert a.grad is None and torch.equal(b.grad, torch.full((3,), 4.0))
    cfg_combine(a, b, 4.0).sum().backward()  # outside: uncond + 4 (cond - uncond) -> d/d uncond = -3
    assert torch.equal(a.grad, torch.full((3,), -3.0))

    t = trainer()
    prompts = [p for p in t.run.prompts[:2] for _ in range(2)]
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), 0.7)
    with torch.no_grad():  # a LoRA away from zero, so that both branches carry a gradient
        for p in t.params:
            p.add_(0.05 * torch.randn_like(p))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = {}
    for uncond in ("detached", "trained"):
        t.optimizer.zero_grad(set_to_none=True)
        grpo_loss(t.gen, traj, adv, 1, GRPOSettings(uncond=uncond)).loss.backward()
        grads[uncond] = torch.cat([p.grad.flatten() for p in t.params])
    cosine = torch.nn.functional.cosine_similarity(grads["detached"], grads["trained"], dim=0)
    assert cosine < 0.999 and grads["detached"].norm() > 0  # the unconditional branch's share is gone


def test_kl_in_flow_grpo_units_is_the_gaussian_kl_times_dt(trainer):
    t = trainer()
    prompts = [p for p in t.run.prompts[:2] for _ in range(2)]
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), 0.7)
        for p in t.params:
            p.add_(0.05 * torch.randn_like(p))
    adv = torch.zeros(len(prompts))
    i = 1
    flow = grpo_loss(t.gen, traj, adv, i, GRPOSettings(kl_beta=1.0)).kl
    gauss = grpo_loss(t.gen, traj, adv, i, GRPOSettings(kl_beta=1.0, kl_units="gaussian")).kl
    dt = float((traj.timesteps[i][0] - traj.next_t(i)[0]) / traj.num_timesteps)
    assert gauss > flow > 0 and float(flow) == pytest.approx(float(gauss) * dt, rel=1e-5)


def test_same_noise_starts_a_group_from_one_latent(trainer):
    t = trainer()
    prompts = [p for p in t.run.prompts[:2] for _ in range(3)]
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), 0.7, same_noise_group=3)
    z0 = traj.latents[0]
    assert torch.equal(z0[0], z0[1]) and torch.equal(z0[0], z0[2]) and torch.equal(z0[3], z0[5])
    assert not torch.equal(z0[0], z0[3])
    assert not torch.equal(traj.final[0], traj.final[1])  # the SDE's noise still differs within a group


def test_the_config_takes_the_new_keys(tiny_cfg):
    cfg = tiny_cfg("--method", "grpo", "--grpo", "{'std': 'group', 'train_steps': 'per_sample', "
                   "'uncond': 'trained', 'kl_units': 'gaussian', 'same_noise': True, 'drop_zero_std': False}")
    s = GRPOSettings.from_config(cfg)
    assert (s.std, s.train_steps, s.uncond, s.kl_units, s.same_noise, s.drop_zero_std) == (
        "group", "per_sample", "trained", "gaussian", True, False)
    assert load_config  # the same loader as `vader train`
