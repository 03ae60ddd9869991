"""Two CPU processes through `accelerate launch -m vader` with no `accelerate config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, REPO, TINY_TRAIN
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_process_training_shares_one_run_and_averages_gradients(tmp_path):
    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "vader", "train", str(TINY_TRAIN), *FAST, "--project_dir", str(tmp_path), "--run_name", "ddp",
           "--max_train_steps", "2", "--is_sample_preview", "True", "--verbose", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr + proc.stdout
    run = tmp_path / "ddp"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]  # one log line per step, not per process
    videos = sorted((run / "samples" / "step-000002").glob("*.mp4"))
    assert len(videos) == 1 * 2 * 2  # num_val_runs × val_batch_size × num_processes
    assert {v.name.split("-")[1] for v in videos} == {"rank0", "rank1"}
    lora = load_file(str(run / "lora" / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)


NAN_ON_RANK_1 = """
import sys

import torch

import vader.train
from vader.cli import main
from vader.rewards.base import RewardOutput

real = vader.train.make_reward


def make_reward(cfg, gen, run, device):
    reward = real(cfg, gen, run, device)
    calls = [0]

    def wrapped(video, prompts):
        out = reward(video, prompts)
        if torch.is_grad_enabled():
            calls[0] += 1
            if run.accelerator.process_index == 1 and calls[0] == 2:  # step 2, on one process only
                return RewardOutput(reward=out.reward, loss=out.loss * float("nan"))
        return out

    return wrapped


vader.train.make_reward = make_reward
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_nonfinite_on_one_process_skips_the_step_on_every_process(tmp_path):
    """Rank 1 alone gets a NaN loss at step 2: both processes skip that update (else their LoRAs
    would differ and the end-of-run check would fail), the run goes on and logs the skip once."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK_1)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           "train", str(TINY_TRAIN), *FAST, "--project_dir", str(tmp_path), "--run_name", "nan",
           "--max_train_steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True), (3, False)]
    assert rows[1]["loss"] is None and rows[2]["nonfinite_steps"] == 1
