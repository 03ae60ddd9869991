from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import add_lora, lora_config
from vader.methods.vader import backprop_cutoff
from vader.models.presets import tiny_stdit3_config
from vader.models.stdit3 import STDiT3
from vader.sampling import TextCondition, conditioning, make_timesteps, sample

# Design doc worked example: 240p 3:4 (276x368), 51 frames, bf16 conditioning.
REFERENCE_240P_2S = [1000.0, 985.87, 971.17, 955.86, 939.91, 923.26, 905.88, 887.72, 868.72, 848.82, 827.96,
                     806.06, 783.05, 758.84, 733.33, 706.42, 677.99, 647.90, 616.00, 582.13, 546.10, 507.69,
                     466.67, 422.75, 375.61, 324.89, 270.18, 210.96, 146.67, 76.62]


def _schedule(height, width, frames, dtype=torch.bfloat16, steps=30):
    cond = conditioning(1, height, width, frames, 24, dtype, torch.device("cpu"))
    return torch.stack(make_timesteps(steps, 1, cond=cond, num_frames=frames))[:, 0]


def test_timestep_transform_matches_reference_worked_example():
    got = _schedule(276, 368, 51)
    assert torch.allclose(got, torch.tensor(REFERENCE_240P_2S), atol=0.01)


def test_sixteen_frames_give_a_finite_decreasing_schedule():
    # the reference's `num_frames // 17 * 5` makes this NaN; we use the true 4 latent frames
    got = _schedule(240, 426, 16)
    assert torch.isfinite(got).all()
    assert (got[1:] < got[:-1]).all() and got[0] == 1000


def test_no_transform_is_uniform():
    got = torch.stack(make_timesteps(4, 2, use_timestep_transform=False))
    assert torch.equal(got[:, 0], torch.tensor([1000.0, 750.0, 500.0, 250.0]))


@pytest.mark.parametrize(("mode", "expected"), [("last", 29), ("specific", 15), (3, 27), (30, 0)])
def test_backprop_cutoff(mode, expected):
    assert backprop_cutoff(mode, 30, random.Random(0)) == expected


def test_rand_cutoff_covers_every_step_and_is_seeded():
    cuts = {backprop_cutoff("rand", 6, random.Random(s)) for s in range(200)}
    assert cuts == set(range(6))
    assert backprop_cutoff("rand", 30, random.Random(7)) == backprop_cutoff("rand", 30, random.Random(7))
    assert backprop_cutoff(None, 30, random.Random(0)) is None


class StepRecorder(nn.Module):
    """Wraps the denoiser: records, per sampling step, whether autograd was on and whether a gradient
    flowed back through that step's output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.grad_enabled: list[bool] = []
        self.got_grad: set[int] = set()

    def forward(self, *args, **kwargs):
        step = len(self.grad_enabled)
        self.grad_enabled.append(torch.is_grad_enabled())
        out = self.inner(*args, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda g, s=step: self.got_grad.add(s) if g.abs().sum() > 0 else None)
        return out


def _tiny_denoiser():
    torch.manual_seed(0)
    model = STDiT3(tiny_stdit3_config(caption_channels=8, model_max_length=6))
    model.init_weights(std=0.125)
    params = add_lora(model, lora_config(rank=2, dropout=0.0, targets=LORA_TARGETS))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # non-zero B so every LoRA matrix receives gradient
    return model.eval(), params


def _run(model, steps: int, cutoff, grad_checkpoint=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 2, 4, 4, generator=g)
    y = torch.randn(1, 1, 6, 8, generator=g)
    text = TextCondition(y=y, mask=torch.tensor([[1, 1, 1, 0, 0, 0]]), y_null=torch.zeros_like(y))
    cond = conditioning(1, 32, 32, 5, 24, torch.float32, torch.device("cpu"))
    ts = make_timesteps(steps, 1, cond=cond, num_frames=5)
    return sample(model, z, text, cond, ts, cfg_scale=4.0, cutoff=cutoff, grad_checkpoint=grad_checkpoint)


@pytest.mark.parametrize(("mode", "steps"), [("last", 5), (2, 5), (5, 5), ("specific", 17), ("rand", 6)])
def test_gradients_reach_lora_only_through_selected_steps(mode, steps):
    model, params = _tiny_denoiser()
    recorder = StepRecorder(model)
    cutoff = backprop_cutoff(mode, steps, random.Random(3))
    out = _run(recorder, steps, cutoff)
    out.pow(2).mean().backward()
    selected = set(range(cutoff, steps))
    assert recorder.grad_enabled == [i in selected for i in range(steps)]
    assert recorder.got_grad == selected
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_truncation_changes_the_gradient_and_is_deterministic():
    """cutoff=2 is not full backprop (cutoff=0), and repeating it gives the identical gradient."""
    model, params = _tiny_denoiser()

    def grads(cutoff):
        for p in params:
            p.grad = None
        _run(model, 4, cutoff=cutoff).sum().backward()
        return torch.cat([p.grad.flatten() for p in params])

    truncated, again, full = grads(2), grads(2), grads(0)
    assert torch.equal(truncated, again)
    assert not torch.allclose(truncated, full)


def test_inference_keeps_no_graph():
    model, _ = _tiny_denoiser()
    recorder = StepRecorder(model)
    out = _run(recorder, 4, cutoff=None)
    assert not out.requires_grad and recorder.grad_enabled == [False] * 4


def _forward_count_and_grads(model, params, grad_checkpoint: bool) -> tuple[int, list[torch.Tensor]]:
    """Forward calls of the first spatial block over sampling (3 steps, 2 with gradients) and backward."""
    calls = []
    handle = model.spatial_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for p in params:
            p.grad = None
        _run(model, 3, cutoff=1, grad_checkpoint=grad_checkpoint).square().mean().backward()
    finally:
        handle.remove()
    return len(calls), [p.grad.clone() for p in params]


def test_denoiser_grad_checkpoint_recomputes_each_call():
    """`grad_checkpoint` must really checkpoint each denoiser call with gradients: its forward runs again
    in backward (the step without gradients runs once), and the gradients do not change."""
    model, params = _tiny_denoiser()
    model.gradient_checkpointing = False  # only the per-call checkpoint of the sampler
    plain_calls, plain = _forward_count_and_grads(model, params, grad_checkpoint=False)
    calls, checkpointed = _forward_count_and_grads(model, params, grad_checkpoint=True)
    assert plain_calls == 3
    assert calls == 1 + 2 * 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_cfg_scale_one_equals_conditional_only():
    model, _ = _tiny_denoiser()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 2, 4, 4, generator=g)
    y = torch.randn(1, 1, 6, 8, generator=g)
    mask = torch.ones(1, 6, dtype=torch.long)
    cond = conditioning(1, 32, 32, 5, 24, torch.float32, torch.device("cpu"))
    ts = make_timesteps(1, 1, cond=cond, num_frames=5)
    with torch.no_grad():
        guided = sample(model, z, TextCondition(y, mask, torch.zeros_like(y)), cond, ts, cfg_scale=1.0)
        c2 = {k: v.repeat(1) for k, v in cond.items()}
        v = model(z, ts[0], y=y, mask=mask, **c2)[:, :4]
    assert torch.allclose(guided, z + v * ts[0][0] / 1000, atol=1e-5)


def test_original_precision_fp32_weights_under_bf16_autocast():
    """`--dtype fp32 --mixed_precision bf16` (the original's denoiser precision): sampling with gradients
    runs, latents and LoRA gradients stay fp32 and finite, and the latents stay near the fp32 run."""
    model, params = _tiny_denoiser()
    exact = _run(model, 3, cutoff=1).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, 3, cutoff=1, grad_checkpoint=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out.detach() - exact).abs().max() < 0.05 * exact.abs().max()
    out.square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
