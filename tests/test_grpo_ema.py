"""GRPO's EMA of the LoRA (grpo.ema, Flow-GRPO's ema.py): the closed form, what validation and the final
LoRA use, and an exact resume; plus the trained-step window, CFG-free training and the round's log-ratio
statistics. On the tiny preset (see conftest.FAST)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vader.methods.grpo as grpo
from vader.errors import VaderError
from vader.methods.grpo import GRPOSettings, grpo_loss, grpo_step, sample_with_logprobs, train_mask
from vader.methods.update import LoraEMA
from vader.rewards.base import RewardOutput
from vader.train import train

GRPO = ["--method", "grpo", "--reward_fn", "grpo_rewards:mean_red"]


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_ema_is_flow_grpos_closed_form():
    """The LoRA held at c from 0: after k blended updates (interval 1) the EMA is c (1 - prod_n decay_n),
    decay_n = min((1 + n) / (10 + n), 0.9)."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA([p], decay=0.9, interval=1)
    with torch.no_grad():
        p.fill_(2.0)
    for _ in range(12):
        ema.update()
    keep = math.prod(min((1 + n) / (10 + n), 0.9) for n in range(1, 13))
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 2.0 * (1 - keep)))
    # interval 8: nothing before the 7th update ((n + 1) % 8 == 0, as Flow-GRPO), then one blend
    q = torch.nn.Parameter(torch.zeros(2))
    slow = LoraEMA([q], decay=0.9, interval=8)
    with torch.no_grad():
        q.fill_(1.0)
    for _ in range(6):
        slow.update()
    assert torch.equal(slow.shadow[0], torch.zeros(2))
    slow.update()
    torch.testing.assert_close(slow.shadow[0], torch.full((2,), 1 - 8 / 17))
    with slow.applied():  # the EMA in the parameter's place, the trained value back after
        torch.testing.assert_close(q.detach(), torch.full((2,), 1 - 8 / 17))
    assert torch.equal(q.detach(), torch.ones(2))


def test_ema_follows_every_optimizer_update_of_a_round(trainer):
    """Attached to the optimizer: a round of 2 updates (2 micro-batches) is 2 EMA updates."""
    t = trainer("--method", "grpo", "--gradient_accumulation_steps", "2", "--grpo",
                "{'ema': True, 'ema_interval': 1}")
    assert t.ema is not None and t.ema.updates == 0
    result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0)
    assert result.updates == 2 and t.ema.updates == 2
    assert not all(torch.equal(e, p.detach()) for e, p in zip(t.ema.shadow, t.params))


def test_the_final_lora_is_the_ema_and_says_so_and_a_resume_is_exact(tiny_cfg):
    ema = ["--grpo", "{'group_size': 2, 'ema': True, 'ema_interval': 1}", "--checkpointing_steps", "1"]
    full = train(tiny_cfg(*GRPO, *ema, "--max_train_steps", "3", "--run_name", "full"))
    state = json.loads((full / "lora" / "state.json").read_text())
    assert state["weights"].startswith("EMA of the trained LoRA") and "3 updates" in state["weights"]
    saved = torch.load(full / "checkpoints" / "checkpoint-000003" / "training_state.pt", weights_only=True)
    final, trained = _lora(full / "lora"), _lora(full / "checkpoints" / "checkpoint-000003")
    shadow = saved["ema"]["shadow"]
    assert saved["ema"]["updates"] == 3 and len(shadow) == len(final)
    # the checkpoint keeps the trained LoRA (to resume from), the run's LoRA is the average
    assert not all(torch.equal(final[k], trained[k]) for k in final)
    assert sorted(float(s.abs().sum()) for s in shadow) == pytest.approx(
        sorted(float(v.abs().sum()) for v in final.values()), rel=1e-6)

    train(tiny_cfg(*GRPO, *ema, "--max_train_steps", "1", "--run_name", "part"))
    part = train(tiny_cfg(*GRPO, *ema, "--max_train_steps", "3", "--run_name", "part", "--resume_from", "latest"))
    a, b = _lora(part / "lora"), _lora(full / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_ema_the_final_lora_is_the_trained_one(tiny_cfg):
    run = train(tiny_cfg(*GRPO, "--grpo", "{'group_size': 2}", "--max_train_steps", "1", "--run_name", "plain"))
    assert json.loads((run / "lora" / "state.json").read_text())["weights"] == "the trained LoRA"


def test_validation_samples_with_the_ema(trainer, monkeypatch):
    t = trainer("--method", "grpo", "--grpo", "{'ema': True}")
    with torch.no_grad():
        for p in t.params:
            p.add_(1.0)  # the trained LoRA moved; the EMA (no update yet) is still the initial one
    seen = []
    monkeypatch.setattr(type(t.run), "validate", lambda self, gen, reward, step, previews=None: seen.append(
        [p.detach().clone() for p in t.params]))
    from vader.train import _evaluated

    with _evaluated(t):
        t.run.validate(t.gen, t.reward, 1)
    assert all(torch.equal(a, e) for a, e in zip(seen[0], t.ema.shadow))
    assert not any(torch.equal(a, p.detach()) for a, p in zip(seen[0], t.params))


def test_the_last_step_is_never_trained_and_a_window_starts_later(trainer, monkeypatch):
    """grpo_step with the defaults evaluates transitions 0..K-1, K = int(0.99 x 4) = 3: never the last."""
    trained: list[int] = []
    real = grpo.grpo_loss

    def spy(gen, traj, advantages, i, *args, **kwargs):
        trained.append(i)
        return real(gen, traj, advantages, i, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    t = trainer()
    n = t.cfg.scheduler.num_sampling_steps
    grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, GRPOSettings())
    assert sorted(set(trained)) == list(range(n - 1))
    window = train_mask(12, 2, GRPOSettings(train_steps_start=3), None)  # type: ignore[arg-type]
    assert window[:, 3:11].all() and not window[:, :3].any() and not window[:, 11].any()
    assert GRPOSettings(train_steps_start=3).trained_steps(12) == 8


def test_window_errors_are_one_line(tiny_cfg):
    with pytest.raises(VaderError, match=r"grpo.train_steps_start=4 is invalid: below int\(train_steps_fraction"):
        tiny_cfg("--method", "grpo", "--grpo", "{'train_steps_start': 4}")
    with pytest.raises(VaderError, match=r"grpo.train_steps_start=1 is invalid: 0 with train_steps='per_sample'"):
        GRPOSettings(train_steps_start=1, train_steps="per_sample")


def test_cfg_free_training_gives_the_unconditional_branch_no_weight(trainer):
    """scheduler.cfg_scale=1 (Flow-GRPO's CFG-free training): detaching the unconditional branch changes
    nothing, it carries no gradient either way."""
    t = trainer("--scheduler.cfg_scale", "1")
    prompts = [p for p in t.run.prompts[:2] for _ in range(2)]
    with torch.no_grad():
        traj = sample_with_logprobs(t.gen, prompts, torch.Generator().manual_seed(0), 0.7)
        for p in t.params:
            p.add_(0.05 * torch.randn_like(p))
    grads = {}
    for uncond in ("detached", "trained"):
        t.optimizer.zero_grad(set_to_none=True)
        grpo_loss(t.gen, traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), 1, GRPOSettings(uncond=uncond)).loss.backward()
        grads[uncond] = torch.cat([p.grad.flatten() for p in t.params])
    assert grads["trained"].norm() > 0
    torch.testing.assert_close(grads["detached"], grads["trained"], rtol=1e-5, atol=1e-9)


def test_the_round_logs_log_ratio_statistics_and_tied_groups(trainer):
    g = 4

    def reward(video, prompts):  # the first prompt's group tied, the second's spread
        values = [0.5 if k < g else float(k % g) for k in range(len(prompts))]
        return RewardOutput(reward=torch.tensor(values), loss=-torch.tensor(values))

    t = trainer("--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    result = grpo_step(t.gen, reward, t.optimizer, t.params, t.cfg, t.accelerator, t.run.prompts, 0, GRPOSettings())
    assert result.updates == 2 and result.zero_std_groups == 0.5
    # the second update is off-policy: |log ratio| > 0 and approx_kl = 0.5 E[log r^2] <= 0.5 max|log r|^2
    worst = -math.log1p(-min(result.ratio_max_dev, 0.999))  # |log r| is largest for r = 1 - max|r - 1|
    assert result.log_ratio_abs > 0 and 0 < result.approx_kl <= 0.5 * worst**2 + 1e-9
    assert result.clip_fraction > 0
