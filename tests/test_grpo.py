"""GRPO (vader.methods.grpo): the SDE step's density and sign convention, group advantages, the clipped
objective, and grpo_step on the tiny preset (32x32, 4 sampling steps; see conftest.FAST)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.distributions import Normal

from vader.errors import VaderError
from vader.methods.grpo import (
    GRPOSettings,
    clipped_objective,
    group_advantages,
    grpo_loss,
    grpo_step,
    sample_with_logprobs,
    sde_step,
    train_mask,
)
from vader.rewards.base import RewardOutput
from vader.rewards.callable import load_callable_reward
from vader.seeds import pick_prompts


def _latents(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 2, 3, 3, generator=g), torch.randn(batch, 4, 2, 3, 3, generator=g)


# ---------------------------------------------------------------- the SDE step


def test_sde_step_log_prob_is_the_gaussian_density_of_prev():
    v, z = _latents(0)
    prev = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    t, t_next = torch.tensor([600.0, 300.0]), torch.tensor([450.0, 100.0])
    _, log_prob, mean, std = sde_step(v, z, t, t_next, 0.7, prev=prev)
    direct = Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(log_prob, direct, rtol=1e-6, atol=1e-6)
    # the std: noise_level * sqrt(sigma / (1 - sigma)) * sqrt(dt), per sample
    sigma, dt = torch.tensor([0.6, 0.3]), torch.tensor([0.15, 0.2])
    torch.testing.assert_close(std.flatten(), 0.7 * torch.sqrt(sigma / (1 - sigma)) * dt.sqrt())


def test_sde_mean_is_flow_grpo_in_vader_sign_convention():
    """Flow-GRPO's SD3 formula with its velocity u = eps - x0 = -v and its negative step gives our mean;
    with noise_level 0 the mean is (to rounding) vader's ODE step z + v * (t - t_next) / 1000."""
    v, z = _latents(2)
    t, t_next = torch.tensor([700.0, 250.0]), torch.tensor([500.0, 50.0])
    sigma, sigma_prev = (t / 1000).view(-1, 1, 1, 1, 1), (t_next / 1000).view(-1, 1, 1, 1, 1)
    u, step = -v, sigma_prev - sigma
    s = 0.5 * torch.sqrt(sigma / (1 - sigma))
    flow_grpo = z * (1 + s**2 / (2 * sigma) * step) + u * (1 + s**2 * (1 - sigma) / (2 * sigma)) * step
    _, _, mean, _ = sde_step(v, z, t, t_next, 0.5, prev=z)
    torch.testing.assert_close(mean, flow_grpo)
    _, _, ode_mean, _ = sde_step(v, z, t, t_next, 0.0, prev=z)
    torch.testing.assert_close(ode_mean, z + v * ((t - t_next) / 1000).view(-1, 1, 1, 1, 1))


def test_sde_first_step_from_pure_noise_has_a_finite_std_and_draws_from_the_generator():
    v, z = _latents(3)
    t, t_next = torch.tensor([1000.0, 1000.0]), torch.tensor([700.0, 700.0])
    z_next, log_prob, mean, std = sde_step(v, z, t, t_next, 0.7, generator=torch.Generator().manual_seed(5))
    # sigma = 1: the variance's denominator uses sigma_next, as Flow-GRPO's sigma_max = sigmas[1]
    torch.testing.assert_close(std.flatten(), torch.full((2,), 0.7 * math.sqrt(1 / 0.3) * math.sqrt(0.3)))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z_next, mean + std * noise)
    assert torch.isfinite(log_prob).all()


# ---------------------------------------------------------------- advantages and the objective


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(1.25)  # population std of 1..4
    torch.testing.assert_close(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))
    # equal rewards whose mean rounds (0.1 * 3 / 3 != 0.1) still give exactly zero
    assert torch.equal(group_advantages([0.1, 0.1, 0.1], 3), torch.zeros(3))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_clipped_objective_stops_the_gradient_outside_the_clip_range():
    logp_old = torch.zeros(3)
    logp = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, ratio = clipped_objective(logp, logp_old, adv, clip_range=0.2)
    loss.backward()
    # ratio e^0.5 > 1.2 with A > 0 and e^-0.5 < 0.8 with A < 0: clipped, pessimistic, no gradient
    torch.testing.assert_close(loss.detach(), torch.tensor((-1.0 - 1.2 + 0.8) / 3))
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0 / 3, 0.0, 0.0]))
    torch.testing.assert_close(ratio.detach(), logp.detach().exp())


def test_trained_steps_are_flow_grpos_first_k_and_the_rest_from_the_step_rng():
    default = train_mask(12, 3, GRPOSettings(), random.Random(0))
    # int(0.99 * 12) = 11: every step but the last, for every sample (Flow-GRPO's first K)
    assert default[:, :11].all() and not default[:, 11].any()
    assert train_mask(8, 2, GRPOSettings(train_steps_fraction=1.0), random.Random(0)).all()
    rand = train_mask(8, 3, GRPOSettings(train_steps_fraction=0.5, train_steps="random"), random.Random(0))
    assert (rand.sum(1) == 4).all() and (rand == rand[0]).all()  # one subset for the round
    assert torch.equal(rand, train_mask(8, 3, GRPOSettings(train_steps_fraction=0.5, train_steps="random"),
                                        random.Random(0)))
    per = train_mask(8, 6, GRPOSettings(train_steps_fraction=0.5, train_steps="per_sample"), random.Random(0))
    assert (per.sum(1) == 4).all() and not (per == per[0]).all()  # DanceGRPO: a subset per sample
    assert train_mask(8, 1, GRPOSettings(train_steps_fraction=0.01), random.Random(0)).sum() == 1


@pytest.mark.parametrize("key, value", [("group_size", 1), ("noise_level", 0.0), ("clip_range", -1.0),
                                        ("kl_beta", -0.1), ("train_steps_fraction", 1.5), ("inner_epochs", 0),
                                        ("group_size", 2.5), ("noise_level", float("nan")), ("std", "batch"),
                                        ("train_steps", "last"), ("uncond", "free"), ("kl_units", "nats"),
                                        ("updates_per_round", 0), ("drop_zero_std", 1), ("ema", 1),
                                        ("ema_decay", 1.0), ("ema_interval", 0), ("train_steps_start", -1)])
def test_settings_errors_name_the_key_and_value(key, value):
    with pytest.raises(VaderError) as info:
        GRPOSettings(**{key: value})
    assert f"grpo.{key}={value!r}" in str(info.value) and "\n" not in str(info.value)


def test_settings_from_config_rejects_unknown_keys():
    class Cfg:
        grpo = {"group_size": 8, "noise": 0.5}

    with pytest.raises(VaderError, match="unknown key 'noise'; valid keys: group_size"):
        GRPOSettings.from_config(Cfg())
    Cfg.grpo = {"group_size": 8}
    assert GRPOSettings.from_config(Cfg()) == GRPOSettings(group_size=8)
    assert GRPOSettings.from_config(object()) == GRPOSettings()


# ---------------------------------------------------------------- on the tiny preset


def _prompts(t, group: int) -> list[str]:
    return [p for p in t.run.prompts[:2] for _ in range(group)]


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_first_inner_update_has_ratio_exactly_one(trainer, grad_checkpoint):
    t = trainer("--grad_checkpoint", str(grad_checkpoint))
    settings = GRPOSettings(updates_per_round=1)
    prompts = _prompts(t, settings.group_size)
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), settings.noise_level)
    assert len(traj.latents) == t.cfg.scheduler.num_sampling_steps + 1
    assert traj.log_probs.shape == (len(prompts), t.cfg.scheduler.num_sampling_steps)
    adv = group_advantages(torch.arange(len(prompts), dtype=torch.float32), settings.group_size)
    t.optimizer.zero_grad()
    for i in range(len(traj.timesteps)):
        parts = grpo_loss(t.gen, traj, adv, i, settings, grad_checkpoint)
        assert torch.equal(parts.ratio, torch.ones(len(prompts))), i  # bitwise: same LoRA, same latents
        parts.loss.backward()
    t.optimizer.step()
    moved = torch.stack([grpo_loss(t.gen, traj, adv, i, settings).ratio for i in range(len(traj.timesteps))])
    assert (moved - 1).abs().max() > 1e-3  # the check above could fail: an update does change the ratio
    # grpo_step reports the first (only) inner epoch's ratios: exactly 1 as well
    result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, settings)
    assert result.ratio_max_dev == 0.0 and result.clip_fraction == 0.0 and not result.skipped


def test_constant_reward_leaves_the_lora_unchanged(trainer):
    t = trainer()
    settings = GRPOSettings()
    prompts = _prompts(t, settings.group_size)
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), settings.noise_level)
    zero = group_advantages(torch.full((len(prompts),), 0.3), settings.group_size)
    t.optimizer.zero_grad(set_to_none=True)
    for i in range(len(traj.timesteps)):
        grpo_loss(t.gen, traj, zero, i, settings).loss.backward()
    grads = [p.grad for p in t.params if p.grad is not None]
    assert grads and all(not g.any() for g in grads)  # zero advantages: exactly zero policy gradient

    def constant(video, prompts):
        return RewardOutput(reward=torch.full((video.shape[0],), 0.3), loss=torch.zeros(video.shape[0]))

    before = [p.detach().clone() for p in t.params]
    result = grpo_step(t.gen, constant, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, settings)
    assert all(torch.equal(a, p) for a, p in zip(before, t.params))
    assert result.skipped and not result.nonfinite and result.grad_norm == 0.0 and result.reward == pytest.approx(0.3)
    # a reward that varies does move it (the test above can fail)
    grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, settings)
    assert not all(torch.equal(a, p) for a, p in zip(before, t.params))


def test_a_group_is_one_prompts_samples(trainer):
    """Advantages compare the samples of ONE prompt: the reward sees each picked prompt group_size times in
    a row, and a reward that depends on the prompt only (different per prompt, equal within a prompt's
    samples) gives zero advantages everywhere, so the step is skipped and the LoRA stays as it was. Groups
    that mixed prompts would turn the prompts' difference into a gradient."""
    t = trainer("--train_batch_size", "2")
    settings = GRPOSettings(group_size=3)
    seen: list[list[str]] = []
    by_prompt: dict[str, float] = {}

    def per_prompt(video, prompts):
        seen.append(list(prompts))
        values = [by_prompt.setdefault(p, 0.1 + 0.7 * len(by_prompt)) for p in prompts]
        return RewardOutput(reward=torch.tensor(values), loss=-torch.tensor(values))

    before = [p.detach().clone() for p in t.params]
    result = grpo_step(t.gen, per_prompt, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, settings)
    picked = t.gen.reward_prompts(pick_prompts(t.run.prompts, t.cfg, 0, 0, 0, 1))
    assert seen == [[p for p in picked for _ in range(3)]]
    assert len(set(picked)) == 2 and len(by_prompt) == 2  # two prompts, two different rewards
    assert result.skipped and result.grad_norm == 0.0
    assert all(torch.equal(a, p) for a, p in zip(before, t.params))


def test_grpo_step_depends_only_on_seed_step_and_lora(trainer):
    """What makes a resume exact: the same step on the same LoRA samples and updates identically,
    whatever ran before in the process; another step index draws other prompts and noise."""
    settings = GRPOSettings(train_steps_fraction=0.5)
    results, loras = [], []
    for step in (3, 3, 4):
        t = trainer("--gradient_accumulation_steps", "2")
        torch.manual_seed(step * 7)  # global RNG state left by earlier work must not matter
        results.append(grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, step,
                                 settings))
        loras.append([p.detach().clone() for p in t.params])
    assert results[0] == results[1] and all(torch.equal(a, b) for a, b in zip(loras[0], loras[1]))
    assert results[0].reward != results[2].reward
    assert results[0].reward_queries == 2 * t.cfg.train_batch_size * settings.group_size


def test_inner_epochs_move_the_ratio_and_clip_it(trainer):
    t = trainer()
    result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0,
                       GRPOSettings(inner_epochs=2))
    # the second pass sees the first update: ratios leave 1, and far beyond clip_range 1e-4
    # (clip_fraction is the round's: the first pass's ratios are all exactly 1, the second's nearly all clipped)
    assert result.ratio_max_dev > 1e-3 and result.clip_fraction > 0.4 and not result.skipped
    assert result.updates == 2 and result.approx_kl > 0


def test_kl_to_the_base_model_is_zero_at_the_base_and_grows_with_the_lora(trainer):
    t = trainer()
    settings = GRPOSettings(kl_beta=0.5)
    prompts = _prompts(t, settings.group_size)
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), settings.noise_level)
    adv = torch.zeros(len(prompts))
    assert grpo_loss(t.gen, traj, adv, 1, settings).kl.item() == 0.0  # LoRA B starts at zero: the base model
    with torch.no_grad():
        for p in t.params:
            p.add_(0.05 * torch.randn_like(p))
    parts = grpo_loss(t.gen, traj, adv, 1, settings)
    assert parts.kl.item() > 0 and parts.loss.item() == pytest.approx(0.5 * parts.kl.item())
    parts.loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in t.params)  # the KL alone pulls the LoRA back


def test_non_finite_reward_skips_the_update(trainer):
    t = trainer()

    def broken(video, prompts):
        reward = torch.ones(video.shape[0])
        reward[1] = float("nan")
        return RewardOutput(reward=reward, loss=-reward)

    before = [p.detach().clone() for p in t.params]
    result = grpo_step(t.gen, broken, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0)
    assert result.skipped and result.nonfinite and math.isnan(result.loss)
    assert all(torch.equal(a, p) for a, p in zip(before, t.params))


def _sde_reward(t, settings: GRPOSettings) -> float:
    """Mean reward of the SDE policy on fixed seeds: every prompt twice."""
    prompts = t.run.prompts * 2
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(123), settings.noise_level)
        video = t.gen.decode(traj.final, [0, 8, 16])
        return t.reward(video, t.gen.reward_prompts(prompts)).reward.mean().item()


def test_short_grpo_run_follows_the_reward(trainer):
    """20 steps on brightness raise it; the same run on -brightness lowers it (so the rise is the
    reward's signal, not drift). Measured (1 thread): +0.0042 and -0.0020 from 0.3781.

    With the pre-Flow-GRPO options (last step trained, both CFG branches, the group's std): on this tiny
    random model most of the 20 steps' signal sits there. Flow-GRPO's defaults gave +0.0021 / +0.0012
    (no sign separation in 20 steps); last step alone back +0.0033 / -0.0003; uncond alone +0.0046 / +0.0018."""
    settings = GRPOSettings(group_size=8, train_steps_fraction=1.0, uncond="trained", std="group")
    gains = {}
    for sign in (1.0, -1.0):
        t = trainer("--reward_fn", "brightness", "--lr", "0.005", "--train_batch_size", "4")

        def signed(video, prompts, reward=t.reward, sign=sign):
            return RewardOutput(reward=sign * reward(video, prompts).reward, loss=torch.zeros(video.shape[0]))

        start = _sde_reward(t, settings)
        for step in range(20):
            result = grpo_step(t.gen, signed, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, step,
                               settings)
            assert not result.skipped and result.reward_queries == 4 * 8
        gains[sign] = _sde_reward(t, settings) - start
    assert gains[1.0] > 0.002, gains
    assert gains[-1.0] < -0.0005, gains


# ---------------------------------------------------------------- module:function rewards


def test_callable_reward_without_gradient_trains_with_grpo(trainer):
    t = trainer()
    reward = load_callable_reward("grpo_rewards:mean_red")
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    out = reward(video, ["a", "b"])
    torch.testing.assert_close(out.reward, ((video[:, 0] + 1) / 2).mean(dim=(1, 2, 3)))
    assert reward.differentiable is False
    before = [p.detach().clone() for p in t.params]
    result = grpo_step(t.gen, reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0)
    assert not result.skipped and math.isfinite(result.loss) and 0 < result.reward < 1
    assert result.reward_queries == t.cfg.train_batch_size * GRPOSettings().group_size
    assert not all(torch.equal(a, p) for a, p in zip(before, t.params))


@pytest.mark.parametrize("spec, message", [
    ("grpo_rewards", "is not 'module:function'"),
    ("grpo_rewards:", "is not 'module:function'"),
    ("no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
    ("grpo_rewards:missing", "module 'grpo_rewards' has no attribute 'missing'"),
    ("grpo_rewards:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
    ("grpo_rewards:no_arguments", "no_arguments() cannot be called as fn(videos, prompts)"),
    ("grpo_rewards:one_argument", "one_argument(videos) cannot be called as fn(videos, prompts)"),
    ("grpo_rewards:keyword_prompts", "cannot be called as fn(videos, prompts)"),
])
def test_bad_callable_specs_are_one_line_errors(spec, message):
    with pytest.raises(VaderError) as info:
        load_callable_reward(spec)
    text = str(info.value)
    assert text.startswith(f"reward_fn={spec!r}") and message in text and "\n" not in text


@pytest.mark.parametrize("name, message", [
    ("too_few", "returned (1,) scores for 2 videos"),
    ("returns_nan", "returned a non-finite score (nan) for prompt 'a'"),
    ("returns_text", "returned str; it must return 2 floats"),
    ("returns_complex", "returned torch.complex64 scores; it must return 2 real floats"),
    ("raises", "reward_fn='grpo_rewards:raises' raised RuntimeError: scorer service unavailable (called with 2"),
])
def test_bad_callable_scores_are_one_line_errors(name, message):
    reward = load_callable_reward(f"grpo_rewards:{name}")
    with pytest.raises(VaderError) as info:
        reward(torch.zeros(2, 3, 1, 4, 4), ["a", "b"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_callable_with_a_default_third_argument_loads():
    reward = load_callable_reward("grpo_rewards:with_extra_default")
    assert reward(torch.zeros(2, 3, 1, 4, 4), ["a", "b"]).reward.tolist() == [1.0, 1.0]



# ---------------------------------------------------------------- the tool: --method grpo


def test_vader_train_with_method_grpo_and_a_python_reward(tiny_cfg):
    """`vader train --method grpo --reward_fn module:function`: the same run folder (LoRA, metrics with
    the GRPO columns, checkpoints) as a VADER run, from a reward with no gradient."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from vader.train import train

    run = train(tiny_cfg("--method", "grpo", "--grpo", "{'group_size': 2}", "--reward_fn", "grpo_rewards:mean_red",
                         "--max_train_steps", "2", "--run_name", "grpo"))
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward_queries"] == 2 * 2 and "clip_fraction" in r for r in steps)  # batch 2 x group 2
    lora = load_file(str(Path(run) / "lora" / "adapter_model.safetensors"))
    assert lora and all(torch.isfinite(t).all() for t in lora.values())


@pytest.mark.parametrize("argv, message", [
    (["--reward_fn", "grpo_rewards:mean_red"], "is a Python function with no gradient"),
    (["--grpo", "{'group_size': 2}"], "is set but method='vader'"),
    (["--method", "grpo", "--grpo", "{'group_size': 1}"], "grpo.group_size=1 is invalid"),
    (["--method", "grpo", "--grpo", "{'groupsize': 2}"], "grpo: unknown key 'groupsize'"),
    (["--method", "grpo", "--reward_fn", "no_such_module:f"], "no_such_module"),
    (["--method", "dpo"], "method='dpo' is not valid"),
])
def test_method_and_callable_reward_config_errors_are_one_line(tmp_path, capsys, argv, message):
    from conftest import FAST, TINY_TRAIN

    from vader.cli import main

    assert main(["train", str(TINY_TRAIN), *FAST, "--project_dir", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
