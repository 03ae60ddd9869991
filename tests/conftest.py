"""Shared fixtures: no network, tiny configs, a temp project dir."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub: without it every hub call hangs ~45 s offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = REPO / "configs" / "tiny" / "vader_train.py"
TINY_INFER = REPO / "configs" / "tiny" / "vader_inference.py"
OPENSORA_TRAIN = REPO / "configs" / "opensora-v1-2" / "vader" / "vader_train.py"
OPENSORA_INFER = REPO / "configs" / "opensora-v1-2" / "vader" / "vader_inference.py"

# Smaller than the shipped preset so that a whole training run takes a few seconds.
FAST = [
    "--image_size", "(32, 32)", "--scheduler.num_sampling_steps", "4", "--verbose", "0",
    "--logger_type", "none", "--is_sample_preview", "False", "--checkpointing_steps", "0",
]


# Tiny models: a second thread only adds sync cost (60x slower on a loaded 2-core box), and one
# fixed thread count keeps float reductions identical between runs that tests compare.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny_cfg(**overrides) -> validated VaderConfig writing into tmp_path."""
    from vader.config import load_config

    def make(*extra: str, **overrides):
        argv = [*FAST, "--project_dir", str(tmp_path / "runs"), *extra]
        for key, value in overrides.items():
            argv += [f"--{key}", repr(value) if not isinstance(value, str) else value]
        return load_config(TINY_TRAIN, argv)

    return make


@pytest.fixture
def trainer(tiny_cfg):
    """trainer(*overrides) -> a set-up tiny Trainer (run folder under tmp_path), for tests that call
    train_step / grpo_step directly."""
    from vader.run import Run, make_accelerator
    from vader.train import setup

    def make(*extra: str):
        cfg = tiny_cfg("--run_name", "t", *extra)
        accelerator = make_accelerator(cfg)
        return setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))

    return make
