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


def test_config_prints_the_resolved_values_a_run_derives(capsys):
    assert main(["config", str(OPENSORA_TRAIN), "--num-frames", "2s", "--aspect-ratio", "3:4",
                 "--num_val_runs", "3", "--val_batch_size", "2"]) == 0
    resolved = json.loads(capsys.readouterr().out)["resolved"]
    assert resolved["frames"] == 51 and resolved["height_width"] == [276, 368]
    assert resolved["video_frames_height_width"] == [51, 272, 368]  # 276 is not a multiple of 8
    assert resolved["latent_shape_CTHW"] == [4, 15, 34, 46]
    assert resolved["total_optimizer_steps"] == 800 and resolved["videos_per_validation"] == 6
    assert "272x368" in resolved["note"]


def test_config_resolved_steps_follow_the_trainer(capsys):
    from vader.config import load_config
    from vader.train import total_train_steps

    argv = ["--max_train_steps", "None", "--num_train_epochs", "3", "--train_batch_size", "3"]
    assert main(["config", str(TINY_TRAIN), *argv]) == 0
    resolved = json.loads(capsys.readouterr().out)["resolved"]
    assert resolved["prompts"] == 8 and resolved["latent_shape_CTHW"] == [4, 5, 8, 8]
    assert resolved["total_optimizer_steps"] == total_train_steps(load_config(TINY_TRAIN, argv), 8, 1) == 9
    assert "note" not in resolved


def test_config_keys_of_a_missing_config_file_fails(capsys):
    assert main(["config", "/no/such/config.py", "--keys"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("vader: error: config file not found")


@pytest.mark.parametrize("content", [b"\x00\x01binary", b"{\"lr\": 1}\n{", b"raise SystemExit(3)\n"])
def test_config_file_that_is_not_python_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "cfg.py"
    bad.write_bytes(content)
    assert main(["config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vader: error: could not read config file") and len(err.splitlines()) == 1


def test_config_folder_as_config_file_is_one_line(tmp_path, capsys):
    assert main(["config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


class _ClosedPipe:
    """stdout after the reader (`| head`) has gone."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_pipe_ends_quietly(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["config", str(TINY_TRAIN), "--keys"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("extra", [[], ["--keys"]])  # less and more output than the stdout buffer
def test_output_into_a_closed_pipe_has_no_traceback(extra):
    """The real process: its stdout pipe is closed before it writes, as in `vader inspect ... | head`
    once head has exited."""
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as usual
    proc = subprocess.Popen([sys.executable, "-m", "vader", "config", str(TINY_TRAIN), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def test_a_multi_line_user_error_is_printed_on_one_line(monkeypatch, capsys):
    from vader import config
    from vader.errors import VaderError

    def fail(*_, **__):
        raise VaderError("reward weights are missing:\n- hps: a\n- aesthetic: b")

    monkeypatch.setattr(config, "load_config", fail)
    assert main(["config", str(TINY_TRAIN)]) == 2
    assert capsys.readouterr().err == "vader: error: reward weights are missing: - hps: a - aesthetic: b\n"


def test_top_level_help_lists_every_command(capsys):
    """argparse formats help strings with %: a literal percent in a command's help once crashed --help."""
    from vader.cli import COMMANDS, main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
