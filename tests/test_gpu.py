"""CUDA paths: bf16 autocast on the GPU, bf16 weights, bitsandbytes AdamW8bit. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from vader.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _row(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_bf16_training_on_gpu(tiny_cfg):
    run = train(tiny_cfg("--dtype", "bf16", "--mixed_precision", "bf16", "--max_train_steps", "2",
                         "--grad_checkpoint", "True"))
    assert _row(run)["grad_norm"] > 0


def test_fp16_mixed_precision_with_grad_scaler(tiny_cfg):
    run = train(tiny_cfg("--dtype", "fp16", "--mixed_precision", "fp16", "--max_train_steps", "2"))
    assert _row(run)["loss"] == _row(run)["loss"]  # finite, not NaN


def test_adamw8bit_on_gpu(tiny_cfg):
    pytest.importorskip("bitsandbytes")
    run = train(tiny_cfg("--use_AdamW8bit", "True", "--max_train_steps", "2"))
    assert _row(run)["grad_norm"] > 0
