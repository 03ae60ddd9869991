"""Tests named for the training-loop bugs they catch: each fails when that bug is put back.

Most build one tiny `Trainer` (tiny preset at 32x32, 4 sampling steps) and drive `train_step` /
`micro_step` directly with spies on what the loop hands to the optimizer, the decoder and the reward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import vader.backends.opensora
import vader.train
from vader.checkpoint import set_lora_dropout
from vader.errors import VaderError
from vader.frames import select_frames
from vader.methods.update import any_process, average_gradients
from vader.methods.vader import backprop_cutoff, micro_step
from vader.rewards.base import RewardOutput
from vader.seeds import make_generator, pick_prompts, set_step_seed
from vader.train import total_train_steps


def _spy_step(t) -> list[list[torch.Tensor]]:
    """Record the gradients the optimizer steps with."""
    seen: list[list[torch.Tensor]] = []
    real = t.optimizer.step

    def step(*args, **kwargs):
        seen.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in t.params])
        return real(*args, **kwargs)

    t.optimizer.step = step
    return seen


def _grads(t) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in t.params]


def _zero(t) -> None:
    for p in t.params:
        p.grad = None


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.stack([g.norm() for g in grads]).norm())


def _strict_rows(path: Path) -> list[dict]:
    def refuse(token: str):
        raise ValueError(f"non-JSON token {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the optimizer step: accumulation, clipping, direction


def test_gradient_accumulation_is_not_dropped(trainer):
    t = trainer("--gradient_accumulation_steps", "3", "--max_grad_norm", "0")
    set_lora_dropout(t.gen.denoiser, True)  # as train_step does
    parts = []
    for micro in range(3):  # each micro-step alone, before any update
        _zero(t)
        micro_step(t.gen, t.reward, t.cfg, t.accelerator, t.run.prompts, 0, micro)
        parts.append(_grads(t))
    _zero(t)
    seen = _spy_step(t)
    t.step(0)
    (stepped,) = seen
    assert all(_norm([g]) > 0 for g in (parts[0][1], parts[1][1], parts[2][1]))  # lora_B gets gradients
    assert not torch.allclose(parts[0][1], parts[2][1])  # different prompts and noise: different gradients
    for i, g in enumerate(stepped):
        torch.testing.assert_close(g, parts[0][i] + parts[1][i] + parts[2][i], rtol=1e-5, atol=1e-9)


def test_clipping_applies_max_grad_norm(trainer):
    t = trainer("--max_grad_norm", "1e-5")
    seen = _spy_step(t)
    result = t.step(0)
    assert result.grad_norm > 1e-4  # the logged norm is the one before clipping ...
    assert _norm(seen[0]) == pytest.approx(1e-5, rel=1e-3)  # ... the optimizer gets the clipped gradient


def test_optimizer_steps_down_the_loss_gradient(trainer):
    """AdamW's first step is exactly -lr * g / (|g| + eps) after weight decay, and it lowers the
    loss of the very batch it came from by a wide margin (a removed step or gradient ascent fail)."""
    t = trainer("--max_grad_norm", "0", "--reward_fn", "brightness", "--decode_frame", "all", "--lr", "0.005")
    before = [p.detach().clone() for p in t.params]
    seen = _spy_step(t)
    result = t.step(0)
    (g,) = seen
    group = t.optimizer.param_groups[0]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    moved, predicted = 0, 0.0
    for p0, p1, grad in zip(before, t.params, g):
        expected = p0 * (1 - lr * wd) - lr * grad / (grad.abs() + eps)
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-5, atol=1e-7)
        moved += int((grad != 0).sum())
        predicted += float((grad * (p1.detach() - p0)).sum())  # first-order change of the loss
    assert moved > 100 and predicted < 0
    # the same step again (same prompts, noise, dropout) with the updated LoRA
    loss_after, _, _ = micro_step(t.gen, t.reward, t.cfg, t.accelerator, t.run.prompts, 0, 0)
    _zero(t)
    drop = result.loss - loss_after.mean().item()
    assert drop > 0.8 * -predicted, (result.loss, loss_after.mean().item(), predicted)


def test_gradients_are_averaged_not_summed():
    """The all-reduce must average: with sums, N processes step N times too far."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad = torch.tensor([1.0, 2.0, 3.0])
    params[1].grad = None  # a parameter without a gradient on this process counts as zeros
    other = torch.tensor([3.0, 2.0, 1.0, 4.0, 6.0])  # the other process's flattened gradients

    def reduce(t, reduction):
        return {"mean": (t + other) / 2, "sum": t + other}[reduction]

    fake = SimpleNamespace(num_processes=2, reduce=reduce)
    average_gradients(params, fake)
    assert torch.equal(params[0].grad, torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(params[1].grad, torch.tensor([2.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# what each micro-step samples, decodes and scores


def test_prompts_depend_on_the_process_rank(tiny_cfg):
    cfg = tiny_cfg("--train_batch_size", "1", "--gradient_accumulation_steps", "2")
    prompts = [f"p{i}" for i in range(8)]
    for world in (2, 4):
        seen = [p for step in range(8 // (2 * world)) for micro in range(2) for rank in range(world)
                for p in pick_prompts(prompts, cfg, step, micro, rank, world)]
        assert sorted(seen) == prompts  # one epoch: every prompt once over all processes
        assert pick_prompts(prompts, cfg, 0, 0, 0, world) != pick_prompts(prompts, cfg, 0, 0, 1, world)


def test_reward_scores_each_sample_against_its_own_prompt(trainer, monkeypatch):
    """Batch of 2: the reward must get the prompts in the order the videos were generated from."""
    t = trainer("--decode_frame", "all", "--train_batch_size", "2")
    calls = []

    def spy(video, prompts):
        calls.append((video.detach().clone(), list(prompts)))
        return real(video, prompts)

    real = t.reward
    t.reward = spy
    micro_step(t.gen, t.reward, t.cfg, t.accelerator, t.run.prompts, 0, 0)
    (video, scored), = calls
    expected = pick_prompts(t.run.prompts, t.cfg, 0, 0, 0, 1)
    assert scored == t.gen.reward_prompts(expected) and len(set(expected)) == 2
    # regenerate from the scored prompts, in the scored order, with the micro-step's own noise
    raw = {t.gen.reward_prompts([p])[0]: p for p in t.run.prompts}
    rng = set_step_seed(t.cfg.seed, 0, 0, 0)
    backprop_cutoff(t.cfg.backprop_mode, t.cfg.scheduler.num_sampling_steps, rng)
    frames = select_frames(t.cfg.decode_frame, t.gen.num_frames, rng, t.cfg.decode_strategy, t.gen.vae)
    with torch.no_grad():
        latents = t.gen.sample_latents([raw[p] for p in scored], make_generator(rng))
        again = vader.backends.opensora.decode_selected(t.gen.vae, latents, t.gen.num_frames, frames, t.cfg.decode_strategy)
    torch.testing.assert_close(again, video, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(video[0], video[1], atol=1e-3)


@pytest.mark.parametrize(("decode_frame", "strategy"), [("3", "exact"), ("-1", "exact"), ("2", "latent"),
                                                         ("-1", "latent")])
def test_training_decodes_the_frames_select_frames_chose(trainer, monkeypatch, decode_frame, strategy):
    t = trainer("--decode_frame", decode_frame, "--decode_strategy", strategy)
    decoded = []
    real = vader.backends.opensora.decode_selected

    def spy(vae, z, num_frames, frames, strategy="exact"):
        decoded.append(list(frames))
        return real(vae, z, num_frames, frames, strategy)

    monkeypatch.setattr(vader.backends.opensora, "decode_selected", spy)  # what gen.decode calls
    expected = []
    for step in range(3):
        t.step(step)
        rng = set_step_seed(t.cfg.seed, step, 0, 0)
        backprop_cutoff(t.cfg.backprop_mode, t.cfg.scheduler.num_sampling_steps, rng)
        expected.append(select_frames(decode_frame, t.gen.num_frames, rng, t.cfg.decode_strategy, t.gen.vae))
    assert decoded == expected
    assert all(f != [0] for f in decoded) or decode_frame == "-1" and len({f[0] for f in decoded}) > 1


# ---------------------------------------------------------------------------------------------
# how long training runs


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_max_train_steps_overrides_epochs_on_any_number_of_processes(tiny_cfg, processes):
    cfg = tiny_cfg("--train_batch_size", "1", "--gradient_accumulation_steps", "8", "--max_train_steps", "800",
                   "--num_train_epochs", "200")
    assert total_train_steps(cfg, num_prompts=25, num_processes=processes) == 800  # as the original
    epochs = tiny_cfg("--train_batch_size", "1", "--gradient_accumulation_steps", "8", "--max_train_steps", "None",
                      "--num_train_epochs", "3")
    assert total_train_steps(epochs, num_prompts=25, num_processes=processes) == 3 * math.ceil(25 / (8 * processes))


# ---------------------------------------------------------------------------------------------
# LoRA dropout: on while training samples, off for validation


def _dropout_probe(model: torch.nn.Module) -> list[float]:
    """Fraction of zeroed inputs each LoRA dropout call produced (0 when inactive)."""
    from peft.tuners.lora import LoraLayer

    fractions: list[float] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            drop = module.lora_dropout["default"]
            drop.register_forward_hook(
                lambda m, inp, out: fractions.append(float(((out == 0) & (inp[0] != 0)).float().mean())))
    return fractions


def test_lora_dropout_is_active_in_training_and_off_in_validation(trainer, monkeypatch):
    t = trainer("--lora_dropout", "0.5", "--decode_frame", "0", "--is_sample_preview", "True")
    fractions = _dropout_probe(t.gen.denoiser)
    t.step(0)
    assert fractions and 0.4 < sum(fractions) / len(fractions) < 0.6  # half the inputs dropped
    others = [m for m in t.gen.denoiser.modules() if not isinstance(m, (torch.nn.Dropout, torch.nn.ModuleDict))]
    assert not any(m.training for m in others)  # the denoiser itself stays in eval mode
    # validation: deterministic videos, dropout off, whatever the global RNG holds
    from test_train import _capture_frames

    frames = _capture_frames(monkeypatch)
    fractions.clear()
    t.run.sample_videos(t.gen, None, t.run.dir / "a")
    torch.manual_seed(99)
    t.run.sample_videos(t.gen, None, t.run.dir / "b")
    assert fractions and max(fractions) == 0.0
    assert len(frames) == 4 and all((x == y).all() for x, y in zip(frames[:2], frames[2:]))
    fractions.clear()
    t.step(1)  # and back on for the next training step
    assert 0.4 < sum(fractions) / len(fractions) < 0.6


# ---------------------------------------------------------------------------------------------
# non-finite steps


class NaNAt:
    """Wraps a reward: the loss (and reward) of the given 1-based training calls is NaN."""

    def __init__(self, reward, calls: set[int], what: str = "loss"):
        self.reward, self.calls, self.what, self.n = reward, calls, what, 0

    def __call__(self, video, prompts):
        out = self.reward(video, prompts)
        if not torch.is_grad_enabled():  # validation: untouched
            return out
        self.n += 1
        if self.n not in self.calls:
            return out
        nan = torch.full_like(out.loss, float("nan"))
        if self.what == "reward":
            return RewardOutput(reward=out.reward + nan, loss=out.loss)
        return RewardOutput(reward=out.reward + nan, loss=out.loss + nan)


@pytest.mark.parametrize("what", ["loss", "reward"])
def test_nonfinite_step_is_skipped_leaving_lora_and_optimizer_unchanged(trainer, what):
    t = trainer("--gradient_accumulation_steps", "2")
    t.step(0)  # one real step: optimizer state exists
    lora = [p.detach().clone() for p in t.params]
    state = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    t.reward = NaNAt(t.reward, {2}, what)  # the second micro-step of the next step
    result = t.step(1)
    assert result.skipped and result.nonfinite
    assert all(torch.equal(a, b) for a, b in zip(lora, t.params))
    assert all(torch.equal(v, t.optimizer.state_dict()["state"][0][k]) for k, v in state.items())
    assert all(p.grad is None for p in t.params)
    result = t.step(2)
    assert not result.skipped and not any(torch.equal(a, b) for a, b in zip(lora, t.params) if a.abs().sum() > 0)


def test_nonfinite_gradient_is_skipped(trainer):
    t = trainer()
    real = t.accelerator.backward

    def backward(loss):
        real(loss)
        t.params[0].grad[0, 0] = float("inf")

    t.accelerator.backward = backward
    before = [p.detach().clone() for p in t.params]
    result = t.step(0)
    assert result.skipped and result.nonfinite and math.isinf(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, t.params))


def test_skip_decision_is_the_same_on_every_process():
    """A NaN on another process must skip the step here too (the flag is reduced)."""
    other_rank_flag = torch.tensor([1.0])
    fake = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                           reduce=lambda t, reduction: t + other_rank_flag if reduction == "sum" else None)
    assert any_process(False, fake) is True
    other_rank_flag = torch.tensor([0.0])
    fake.reduce = lambda t, reduction: t + other_rank_flag
    assert any_process(False, fake) is False and any_process(True, fake) is True


def test_nonfinite_steps_are_logged_skipped_and_n_in_a_row_stop_the_run(tiny_cfg, monkeypatch, capsys):
    """Through the CLI: NaN at step 3, then at 6, 7, 8 with max_nonfinite_steps=3 -> exit 2 after step
    8, one error line, strict-JSON metrics, and every saved LoRA finite and unchanged by skipped steps."""
    from conftest import FAST, TINY_TRAIN

    from vader.cli import main

    real = vader.train.make_reward
    monkeypatch.setattr(vader.train, "make_reward", lambda *a, **k: NaNAt(real(*a, **k), {3, 6, 7, 8}))
    project = Path(tiny_cfg().project_dir)
    code = main(["train", str(TINY_TRAIN), *FAST, "--project_dir", str(project), "--run_name", "nan",
                 "--max_train_steps", "12", "--checkpointing_steps", "1", "--max_nonfinite_steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vader: error: max_nonfinite_steps=3 reached")
    assert "steps 6..8" in err[0]
    run = project / "nan"
    rows = [r for r in _strict_rows(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["step"] for r in rows if r["skipped"]] == [3, 6, 7, 8]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert all(r["loss"] is None and r["reward"] is None for r in rows if r["skipped"])
    assert all(isinstance(r["loss"], float) for r in rows if not r["skipped"])
    loras = {s: load_file(str(run / "checkpoints" / f"checkpoint-{s:06d}" / "adapter_model.safetensors"))
             for s in range(1, 8)}
    assert all(torch.isfinite(v).all() for lora in loras.values() for v in lora.values())
    for skipped, previous in ((3, 2), (6, 5), (7, 5)):
        assert all(torch.equal(loras[skipped][k], loras[previous][k]) for k in loras[previous])
    assert not all(torch.equal(loras[4][k], loras[3][k]) for k in loras[3])
    assert not (run / "lora").exists()  # no final LoRA from a stopped run


def test_a_finished_run_with_skipped_steps_says_how_many(tiny_cfg, monkeypatch, capsys):
    """The final note and report.html's summary count the steps skipped as non-finite: "reward a (step 1)
    -> b (step 3)" alone would hide them."""
    from conftest import FAST, TINY_TRAIN

    from vader.cli import main

    real = vader.train.make_reward
    monkeypatch.setattr(vader.train, "make_reward", lambda *a, **k: NaNAt(real(*a, **k), {2}))
    project = Path(tiny_cfg().project_dir)
    assert main(["train", str(TINY_TRAIN), *FAST, "--project_dir", str(project), "--run_name", "nan",
                 "--max_train_steps", "3", "--verbose", "1"]) == 0
    out = capsys.readouterr().out
    (note,) = [line for line in out.splitlines() if line.startswith("[vader] reward ")]
    assert "(step 1) -> " in note and "(step 3); 1 step(s) skipped as non-finite" in note, note
    report = (project / "nan" / "report.html").read_text()
    assert "steps skipped as non-finite" in report and "<td>1 of 3</td>" in report


def test_huge_lr_stops_with_one_line_and_saves_no_nonfinite_tensor(tiny_cfg):
    """--lr 1e6: every step from 3 on is NaN on the tiny preset (with the reference attention kernels
    the figures were measured with; under sdpa the rounding differs and the NaN comes a step earlier)."""
    cfg = tiny_cfg("--run_name", "lr", "--lr", "1e6", "--max_train_steps", "10", "--checkpointing_steps", "1",
                   "--logger_type", "tensorboard", "--model.attention", "math")
    with pytest.raises(VaderError, match=r"max_nonfinite_steps=3 reached: steps 3\.\.5 .*lower lr") as info:
        vader.train.train(cfg)
    assert "\n" not in str(info.value)
    run = Path(cfg.project_dir) / "lr"
    rows = _strict_rows(run / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # the tracker was flushed and closed
    for folder in (run / "checkpoints").iterdir():
        for tensor in load_file(str(folder / "adapter_model.safetensors")).values():
            assert torch.isfinite(tensor).all(), folder


def test_a_run_stopped_by_nonfinite_steps_continues_as_its_message_says(tiny_cfg):
    """The stop message points at a lower lr and a checkpoint from before the divergence: doing
    that finishes the run with a finite LoRA (the latest checkpoints hold the already-diverged one)."""
    # math attention: the divergence starts at step 3, so checkpoint 1 is from before it (see above)
    cfg = tiny_cfg("--run_name", "lr", "--lr", "1e6", "--max_train_steps", "6", "--checkpointing_steps", "1",
                   "--model.attention", "math")
    with pytest.raises(VaderError, match="lower lr .* --resume_from <its folder> --allow_config_change True"):
        vader.train.train(cfg)
    first = Path(cfg.project_dir) / "lr" / "checkpoints" / "checkpoint-000001"
    run = vader.train.train(tiny_cfg("--lr", "0.01", "--max_train_steps", "6", "--checkpointing_steps", "1",
                                     "--resume_from", str(first), "--allow_config_change", "True",
                                     "--model.attention", "math"))
    assert run.name == "lr"
    rows = [r for r in _strict_rows(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and not any(r["skipped"] for r in rows[1:])
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "lora" / "adapter_model.safetensors")).values())


def test_gradient_checkpointing_replays_the_same_lora_dropout_masks(trainer):
    """Recomputation must redraw the very masks of the first forward (RNG state preserved), or the
    gradients belong to another network than the one that made the video."""
    grads, calls = {}, {}
    for ckpt in ("False", "True"):
        t = trainer("--lora_dropout", "0.5", "--grad_checkpoint", ckpt, "--max_grad_norm", "0", "--run_name",
                    f"ckpt-{ckpt}")
        fractions = _dropout_probe(t.gen.denoiser)
        seen = _spy_step(t)
        t.step(0)
        grads[ckpt], calls[ckpt] = seen[0], len(fractions)
    assert _norm(grads["False"]) > 0
    assert calls["True"] > calls["False"]  # the checkpointed forwards really ran again in backward
    for a, b in zip(grads["False"], grads["True"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_fp16_overflow_is_left_to_the_grad_scaler_and_not_counted(trainer):
    """With a GradScaler, inf gradients under a finite loss are the loss scale overflowing: the
    scaler's own step must run (it skips the update and lowers the scale), and the step must not
    count toward max_nonfinite_steps. (CPU stand-in for the scaler; tests/test_gpu.py runs fp16.)"""
    t = trainer("--max_grad_norm", "0")
    updates = []
    t.accelerator.scaler = SimpleNamespace(update=lambda: updates.append(True))

    def backward(loss):  # the scaled backward, overflowing in one element
        loss.backward()
        t.params[0].grad[0, 0] = float("inf")

    t.accelerator.backward = backward
    stepped = []
    t.optimizer.step = lambda *a, **k: stepped.append(True)  # what GradScaler.step does on inf: nothing
    result = t.step(0)
    assert stepped == [True] and result.skipped and not result.nonfinite
    t.reward = NaNAt(t.reward, {1})  # a NaN loss is not an overflow: counted, no optimizer step at all,
    result = t.step(1)  # but the scaler is updated, as its step would have (else its next unscale_ raises)
    assert stepped == [True] and updates == [True] and result.skipped and result.nonfinite
