"""The method seam (vader.methods): every registered method is a MethodModule, the loop dispatches
through it, and GRPO runs on every backend whose sampler is a rectified flow (Open-Sora, Wan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vader.backends import BACKENDS, backend_module
from vader.backends.base import FlowSampler
from vader.config import load_config
from vader.errors import VaderError
from vader.methods import METHODS, method_module


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_the_protocol_names(name):
    module = method_module(name)
    assert isinstance(module.METRICS, tuple) and all(isinstance(m, str) for m in module.METRICS)
    assert isinstance(module.DIFFERENTIABLE_REWARD, bool)
    assert callable(module.check_config) and callable(module.step)


def test_only_vader_needs_a_differentiable_reward():
    assert {name: method_module(name).DIFFERENTIABLE_REWARD for name in METHODS} == {"vader": True, "grpo": False}


def test_unknown_method_is_one_line():
    with pytest.raises(VaderError, match="method='ppo' is not valid; choose one of: vader, grpo"):
        method_module("ppo")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_log_prob_sampling_flag_matches_the_generator(name):
    module = backend_module(name)
    assert module.LOG_PROB_SAMPLING == issubclass(module.Generator, FlowSampler)
    assert {"opensora": True, "wan": True, "cogvideox": False, "ltx": True}[name] == module.LOG_PROB_SAMPLING


def test_trainer_dispatches_to_the_config_method(tiny_cfg, monkeypatch):
    """The loop calls the method module's `step` with the run's objects (no string dispatch)."""
    from vader.methods import grpo
    from vader.methods.update import StepResult
    from vader.run import Run, make_accelerator
    from vader.train import setup

    cfg = tiny_cfg("--run_name", "dispatch", "--method", "grpo", "--reward_fn", "grpo_rewards:mean_red")
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))
    seen = []
    monkeypatch.setattr(grpo, "step", lambda *args: seen.append(args) or StepResult(1.0, 2.0, 0.0, 0.5, None))
    assert t.step(3).reward == 2.0
    assert seen[0][0] is t.gen and seen[0][-1] == 3 and seen[0][-2] == t.run.prompts


# ---- GRPO on Wan (a diffusers backend) -------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    from backend_tiny import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _wan_config(tmp_path: Path, weights: Path, **keys):
    from backend_tiny import tiny_config_text

    path = tmp_path / "wan.py"
    path.write_text(tiny_config_text("wan", weights, project_dir=str(tmp_path / "runs"), **keys))
    return load_config(path)


def test_wan_flow_steps_are_its_euler_sampler(tmp_path, tiny_wan):
    """sample_with_logprobs at a vanishing noise level follows sample_latents' Euler steps: the flow
    state (schedule, conditioning, sign of the velocity) is the sampler's own."""
    from vader.backends import build_generator
    from vader.methods.grpo import sample_with_logprobs

    cfg = _wan_config(tmp_path, tiny_wan)
    gen = build_generator(cfg, "cpu")
    prompts = ["a cat playing piano on a stage"] * 2
    with torch.no_grad():
        ode = gen.sample_latents(prompts, torch.Generator().manual_seed(5))
    traj = sample_with_logprobs(gen, prompts, torch.Generator().manual_seed(5), noise_level=1e-7)
    assert len(traj.latents) == cfg.scheduler.num_sampling_steps + 1
    assert traj.log_probs.shape == (2, cfg.scheduler.num_sampling_steps)
    torch.testing.assert_close(traj.final, ode, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(traj.final, traj.latents[0])


def test_grpo_trains_a_wan_lora(tmp_path, tiny_wan):
    from vader.train import train

    cfg = _wan_config(tmp_path, tiny_wan, method="grpo", reward_fn="grpo_rewards:mean_red", max_train_steps=2,
                      checkpointing_steps=0, is_sample_preview=False, run_name="grpo-wan",
                      grpo=dict(group_size=2, noise_level=0.7))
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward_queries"] == 2 * 2 for r in steps)  # train_batch_size 2 prompts x group 2 (1 process)
    from safetensors.torch import load_file

    lora = load_file(run / "lora" / "adapter_model.safetensors")
    assert any(("lora_B" in k and v.abs().sum() > 0) for k, v in lora.items())  # B starts at zero: it moved
    assert (run / "lora" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_grpo_refuses_a_ddim_backend_in_one_line(tmp_path):
    from backend_tiny import save_tiny_cogvideox, tiny_config_text

    weights = save_tiny_cogvideox(tmp_path / "tiny-cog")
    path = tmp_path / "cog.py"
    path.write_text(tiny_config_text("cogvideox", weights, method="grpo", reward_fn="grpo_rewards:mean_red"))
    with pytest.raises(VaderError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "method='grpo'" in message and "opensora, wan" in message
    assert "model.type='cogvideox'" in message
