"""CUDA paths: bf16 weights under bf16 autocast, fp16 with a GradScaler, bitsandbytes AdamW8bit.

Skipped without a GPU. Each test builds a tiny Trainer (vader.train.setup) and checks what its name
says on the objects themselves: weight and activation dtypes, the scaler and its scale, the 8-bit
optimizer state, and that the LoRA moves.
"""

from __future__ import annotations

import math

import pytest
import torch

import vader.methods.vader
import vader.train
from vader.run import Run, make_accelerator
from vader.train import Trainer, setup

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def trainer(tiny_cfg):
    """trainer(*overrides) -> a set-up tiny Trainer on the GPU (run folder under tmp_path)."""

    def make(*extra: str) -> Trainer:
        cfg = tiny_cfg("--run_name", "gpu", "--max_train_steps", "3", *extra)
        accelerator = make_accelerator(cfg)
        return setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))

    return make


def _frozen(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for n, p in module.named_parameters() if "lora_" not in n]


def _snapshot(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.params]


def _moved(before: list[torch.Tensor], t: Trainer) -> bool:
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, t.params, strict=True))


def test_bf16_training_on_gpu(trainer) -> None:
    t = trainer("--dtype", "bf16", "--mixed_precision", "bf16", "--grad_checkpoint", "True")
    assert all(p.device.type == "cuda" for p in t.gen.denoiser.parameters())
    assert all(p.dtype == torch.bfloat16 for p in _frozen(t.gen.denoiser))
    assert all(p.dtype == torch.bfloat16 for p in t.gen.vae.parameters())
    assert t.params and all(p.dtype == torch.float32 for p in t.params)  # the LoRA trains in fp32

    # A LoRA-wrapped projection: its fp32 adapter must not pull the matmul out of bf16 autocast.
    seen: list[torch.dtype] = []
    handle = t.gen.denoiser.spatial_blocks[0].attn.qkv.register_forward_hook(
        lambda _m, _a, out: seen.append(out.dtype)
    )
    before = _snapshot(t)
    try:
        result = t.step(0)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert not result.skipped and math.isfinite(result.loss) and result.grad_norm > 0
    assert _moved(before, t)
    assert all(p.dtype == torch.float32 for p in t.params)


def test_fp16_mixed_precision_with_grad_scaler(trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    t = trainer("--dtype", "fp16", "--mixed_precision", "fp16")
    scaler = t.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert t.optimizer.scaler is scaler  # the optimizer steps through it
    assert all(p.dtype == torch.float16 for p in _frozen(t.gen.denoiser))
    assert all(p.dtype == torch.float32 for p in t.params)  # GradScaler cannot unscale fp16 gradients
    scale = scaler.get_scale()
    assert scale > 1.0  # the loss really is scaled (accelerate starts at 2**16)

    # Normal steps: an overflow while the scale calibrates is a legal skip that halves the scale;
    # within a few steps one must go through and move the LoRA.
    before = _snapshot(t)
    for step in range(3):
        result = t.step(step)
        assert not result.nonfinite and math.isfinite(result.loss)
        if not result.skipped:
            break
        assert scaler.get_scale() == scale / 2
        scale = scaler.get_scale()
    assert not result.skipped and _moved(before, t)
    assert scaler.get_scale() == scale  # no overflow: unchanged (growth only after 2000 good steps)

    # An inf gradient with finite loss and reward: the scaler skips the update and halves the scale.
    real_micro_step = vader.methods.vader.micro_step

    def overflowing(*args, **kwargs):
        out = real_micro_step(*args, **kwargs)
        t.params[0].grad.view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(vader.methods.vader, "micro_step", overflowing)
    before = _snapshot(t)
    result = t.step(3)
    assert result.skipped and not result.nonfinite  # an overflow, not a bad run
    assert t.optimizer.step_was_skipped
    assert scaler.get_scale() == scale / 2
    assert not _moved(before, t)


def test_adamw8bit_on_gpu(trainer) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    # rank 64 on the tiny model (hidden 64) makes LoRA matrices of 4096+ elements: bitsandbytes keeps
    # smaller tensors' state in fp32 (min_8bit_size 4096), so a small rank would test nothing 8-bit.
    t = trainer("--use_AdamW8bit", "True", "--lora_rank", "64")
    inner = t.optimizer.optimizer
    assert type(inner) is bnb.optim.AdamW8bit
    before = _snapshot(t)
    result = t.step(0)
    assert not result.skipped and math.isfinite(result.loss) and _moved(before, t)
    large = [p for p in t.params if p.numel() >= 4096]
    assert large, "no LoRA tensor is large enough for 8-bit state"
    for p in large:
        state = inner.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == p.shape
