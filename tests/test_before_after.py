"""The end of a training run: the base model's videos beside the LoRA's, same prompts and seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import add_lora, lora_config, lora_disabled
from vader.media import plot_before_after
from vader.train import train


def test_lora_disabled_runs_the_base_model_and_restores_the_lora():
    torch.manual_seed(0)
    net = torch.nn.Module()  # one of the denoiser's LoRA targets, alone
    net.qkv = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    base = net.qkv(x).detach()
    params = add_lora(net, lora_config(4, 8.0, 0.0, targets=LORA_TARGETS))
    with torch.no_grad():
        for p in params:
            p.add_(0.5)  # a LoRA that changes the output (peft starts lora_B at zero)
    with_lora = net.qkv(x).detach()
    assert not torch.allclose(with_lora, base)
    with lora_disabled(net):
        assert torch.equal(net.qkv(x).detach(), base)
    assert torch.equal(net.qkv(x).detach(), with_lora)
    assert all(p.requires_grad for p in params)


def test_training_ends_with_a_before_after_grid_and_the_base_reward(tiny_cfg):
    cfg = tiny_cfg("--run_name", "ba", "--max_train_steps", "3", "--is_sample_preview", "True",
                   "--num_val_runs", "1", "--val_batch_size", "2", "--validation_steps", "0")
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_reward" in r][-1]
    base = [r for r in rows if "base_val_reward" in r]
    assert len(base) == 1 and base[0]["step"] == val["step"] == 3
    # the LoRA moved, so its videos (and their reward) differ from the base model's
    assert base[0]["base_val_reward"] != val["val_reward"]
    assert sorted(p.name for p in (run / "samples" / "base").iterdir()) == sorted(Path(v).name for v in val["videos"])
    image = np.asarray(Image.open(run / "before_after.png").convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 400 and image.std() > 10


def test_before_after_grid_shows_each_video(tmp_path):
    red = -torch.ones(3, 5, 16, 16)
    red[0] = 1.0
    blue = -torch.ones(3, 5, 16, 16)
    blue[2] = 1.0
    out = plot_before_after([("p", red, 0.1)], [("p", blue, 0.2)], tmp_path / "g.png")
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    reddish = ((image[..., 0] > 200) & (image[..., 2] < 60)).sum()
    bluish = ((image[..., 2] > 200) & (image[..., 0] < 60)).sum()
    assert reddish > 1000 and bluish > 1000
    # base on the left, LoRA on the right
    cols_red = np.nonzero(((image[..., 0] > 200) & (image[..., 2] < 60)).any(0))[0]
    cols_blue = np.nonzero(((image[..., 2] > 200) & (image[..., 0] < 60)).any(0))[0]
    assert cols_red.max() < cols_blue.min()
