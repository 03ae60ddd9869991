from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, OPENSORA_TRAIN, REPO, TINY_INFER, TINY_TRAIN

from vader.cli import main


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    return env


def test_config_prints_resolved_json(capsys):
    assert main(["config", str(OPENSORA_TRAIN), "--num-frames", "2s", "--aspect-ratio", "3:4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_frames"] == "2s" and out["aspect_ratio"] == "3:4"
    assert out["model"]["from_pretrained"] == "hpcai-tech/OpenSora-STDiT-v3"


def test_config_keys_lists_every_key(capsys):
    assert main(["config", str(TINY_TRAIN), "--keys"]) == 0
    out = capsys.readouterr().out
    assert "backprop_mode" in out and "scheduler.cfg_scale" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["config", str(TINY_TRAIN), "--seeed", "1"], "did you mean 'seed'"),
        (["train", str(TINY_TRAIN), "--decode_frame", "middle"], "decode_frame='middle'"),
        (["infer", "/no/such/config.py"], "config file not found"),
        (["train", str(TINY_TRAIN), "stray"], "unexpected argument 'stray'"),
        (["train", str(TINY_TRAIN), "--reward_fn", "aesthetic", *FAST], "openai/clip-vit-large-patch14"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 or err.splitlines()[1].startswith("- ")  # one line, or one per model


def test_help_everywhere():
    for argv in (["--help"], ["train", "--help"], ["infer", "--help"], ["run", "--help"], ["config", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "vader", *argv], capture_output=True, text=True, env=_env())
        assert proc.returncode == 0 and "usage: vader" in proc.stdout, argv


def test_no_command_prints_usage_and_fails():
    proc = subprocess.run([sys.executable, "-m", "vader"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_run_follows_is_vader_training(tmp_path):
    """`vader run` with the inference config generates videos and trains nothing."""
    code = main(["run", str(TINY_INFER), *FAST, "--project_dir", str(tmp_path), "--run_name", "r"])
    assert code == 0
    assert list((tmp_path / "r" / "samples").glob("*.mp4"))
    assert not (tmp_path / "r" / "lora").exists()


def test_run_trains_with_the_training_config(tmp_path):
    code = main(["run", str(TINY_TRAIN), *FAST, "--project_dir", str(tmp_path), "--run_name", "t",
                 "--max_train_steps", "1"])
    assert code == 0 and (tmp_path / "t" / "lora" / "adapter_model.safetensors").is_file()


def test_inspect_keys_of_the_published_denoiser_match_the_reference_listing(capsys):
    assert main(["inspect", str(OPENSORA_TRAIN), "--part", "denoiser", "--keys"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    fixture = (REPO / "tests" / "fixtures" / "stdit3" / "stdit3_xl2_keys.tsv").read_text().strip().splitlines()
    assert out == fixture and len(out) == 973
