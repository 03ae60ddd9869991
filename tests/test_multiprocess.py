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
