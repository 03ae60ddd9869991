"""Resume: which run 'latest' continues, refused config changes, the layout check, damaged files,
torn metrics, interrupted writes; and failed starts that leave no run folder behind."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vader.train
from vader.errors import VaderError
from vader.report import STOPPED_MARK
from vader.train import train

STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--reward_fn", "brightness"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture
def first(tiny_cfg):
    """A 2-step run 'a' with checkpoints 1 and 2."""
    cfg = tiny_cfg("--run_name", "a", *STEPS)
    return cfg, train(cfg)


def test_resume_latest_refuses_a_changed_reward_or_lr_listing_the_differences(first, tiny_cfg):
    cfg, run = first
    saved = (run / "config.json").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    for extra in (["--run_name", "a"], []):  # the named run, or the newest with the same config
        with pytest.raises(VaderError) as info:
            train(tiny_cfg(*extra, *STEPS[:4], "--max_train_steps", "3", "--resume_from", "latest",
                           "--lr", "0.01", "--reward_fn", "colorfulness"))
        message = str(info.value)
        assert "lr: 0.05 -> 0.01; reward_fn: 'brightness' -> 'colorfulness'" in message, message
        assert "\n" not in message and "allow_config_change" in message
    assert (run / "config.json").read_text() == saved and (run / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in Path(cfg.project_dir).iterdir()) == [".cache", "a"]  # no new run folder


def test_resume_latest_continues_the_run_with_the_same_config_not_the_newest(first, tiny_cfg):
    _, run = first
    other = train(tiny_cfg("--run_name", "b", *STEPS, "--lr", "0.01"))  # newer, other lr
    assert (other / "checkpoints").is_dir()
    resumed = train(tiny_cfg(*STEPS, "--max_train_steps", "3", "--resume_from", "latest", "--validation_steps", "7"))
    assert resumed == run  # cosmetic keys (max_train_steps, validation_steps) may change
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3]


def test_allowed_config_change_is_logged_and_the_old_config_kept(first, tiny_cfg):
    _, run = first
    resumed = train(tiny_cfg("--run_name", "a", *STEPS, "--max_train_steps", "3", "--resume_from", "latest",
                             "--lr", "0.01", "--allow_config_change", "True"))
    assert resumed == run
    (change,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 2 and change["changes"] == {"lr": [0.05, 0.01]}
    assert json.loads((run / "config-000002.json").read_text())["lr"] == 0.05
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01
    rows = _rows(run)
    assert {"step": 2, "config_change": "lr: 0.05 -> 0.01"} in rows
    assert [r["lr"] for r in rows if "loss" in r] == [0.05, 0.05, 0.01]


def test_resume_layout_check_refuses_another_seed_even_when_changes_are_allowed(first, tiny_cfg):
    _, run = first
    with pytest.raises(VaderError, match=r"was trained with seed=200 \(now 7\)"):
        train(tiny_cfg(*STEPS, "--max_train_steps", "3", "--seed", "7", "--allow_config_change", "True",
                       "--resume_from", str(run / "checkpoints" / "checkpoint-000001")))


def test_torn_last_metrics_line_does_not_break_a_resume(first, tiny_cfg):
    _, run = first
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.6')  # killed mid-append
    train(tiny_cfg("--run_name", "a", *STEPS, "--max_train_steps", "3", "--resume_from", "latest"))
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3]


def test_resume_with_a_damaged_checkpoint_blames_resume_from(first, tiny_cfg):
    _, run = first
    folder = run / "checkpoints" / "checkpoint-000001"
    (folder / "training_state.pt").write_bytes(b"")
    with pytest.raises(VaderError, match=r"^resume_from=.*checkpoint-000001.*cannot read training_state\.pt"):
        train(tiny_cfg(*STEPS, "--resume_from", str(folder)))
    folder = run / "checkpoints" / "checkpoint-000002"
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VaderError, match=r"^resume_from=.*checkpoint-000002.*(truncated|corrupt)"):
        train(tiny_cfg(*STEPS, "--resume_from", str(folder)))
    assert (run / "lora").is_dir()  # the resumed run's folder is never removed


def test_interrupted_checkpoint_writes_are_cleaned_at_resume_and_resume_is_exact(first, tiny_cfg):
    _, run = first
    full = train(tiny_cfg("--run_name", "full", *STEPS, "--max_train_steps", "4"))
    ckpts = run / "checkpoints"
    step2 = [r for r in _rows(run) if r.get("step") == 2 and "loss" in r]
    tmp = ckpts / ".checkpoint-000003.tmp-4242"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"half")
    (ckpts / "checkpoint-000002").rename(ckpts / ".checkpoint-000002.old-4242")  # killed mid-overwrite
    train(tiny_cfg("--run_name", "a", *STEPS, "--max_train_steps", "4", "--resume_from", "latest"))
    assert not list(run.rglob(".*tmp*")) and not list(run.rglob(".*old*"))
    assert [r for r in _rows(run) if r.get("step") == 2 and "loss" in r] == step2  # resumed at 2, not 1
    a, b = _lora(run / "lora"), _lora(full / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# failed starts


def test_a_run_that_fails_before_any_output_leaves_no_folder(tiny_cfg, monkeypatch):
    def broken(*args, **kwargs):
        raise VaderError("reward could not start")

    monkeypatch.setattr(vader.train, "make_reward", broken)
    cfg = tiny_cfg("--run_name", "fails", "--logger_type", "tensorboard")
    with pytest.raises(VaderError, match="could not start"):
        train(cfg)
    assert not (Path(cfg.project_dir) / "fails").exists()
    cfg = tiny_cfg(*STEPS)  # a timestamped name, same thing
    with pytest.raises(VaderError):
        train(cfg)
    assert not [p for p in Path(cfg.project_dir).iterdir() if p.name.startswith("train-")]


def test_a_failed_start_in_an_existing_folder_keeps_it(first, tiny_cfg, monkeypatch):
    _, run = first
    monkeypatch.setattr(vader.train, "make_reward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        train(tiny_cfg("--run_name", "a", *STEPS, "--max_train_steps", "3", "--resume_from", "latest"))
    assert (run / "lora").is_dir() and (run / "checkpoints" / "checkpoint-000002").is_dir()


def test_a_new_run_in_a_folder_that_holds_a_run_is_refused(first, tiny_cfg):
    _, run = first
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(VaderError, match=r"^run_name='a' already holds a training run .*resume_from='latest'"):
        train(tiny_cfg("--run_name", "a", *STEPS, "--lr", "0.01"))
    assert (run / "metrics.jsonl").read_text() == metrics


def test_runs_started_in_the_same_second_get_their_own_folders(tiny_cfg, monkeypatch):
    import vader.run

    monkeypatch.setattr(vader.run.time, "strftime", lambda fmt: "20260101-000000")
    cfg = tiny_cfg("--max_train_steps", "1")
    a, b = train(cfg), train(tiny_cfg("--max_train_steps", "1"))
    assert (a.name, b.name) == ("train-20260101-000000", "train-20260101-000000-2")
    assert len(_rows(a)) == len(_rows(b)) == 1


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise_exact(tiny_cfg, tmp_path):
    """SIGKILL a training process wherever it is once it has a checkpoint (possibly inside the next
    checkpoint write), resume 'latest': the final LoRA equals an uninterrupted run's bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import FAST, REPO, TINY_TRAIN

    args = [*FAST, *STEPS, "--max_train_steps", "8", "--project_dir", str(tmp_path / "runs"), "--run_name", "k"]
    full = train(tiny_cfg(*STEPS, "--max_train_steps", "8", "--run_name", "full"))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vader", "train", str(TINY_TRAIN), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    try:
        while proc.poll() is None and not (ckpts / "checkpoint-000002").is_dir():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "runs" / "k" / "lora").exists()
    subprocess.run([sys.executable, "-m", "vader", "train", str(TINY_TRAIN), *args, "--resume_from", "latest"],
                   env=env, check=True, capture_output=True)
    a, b = _lora(tmp_path / "runs" / "k" / "lora"), _lora(full / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _rows(tmp_path / "runs" / "k") if "loss" in r] == list(range(1, 9))


def test_an_allowed_lr_change_is_the_lr_the_optimizer_uses(first, tiny_cfg):
    """The optimizer state saved in a checkpoint carries the old lr; the new one must win."""
    from vader.run import Run, make_accelerator
    from vader.train import _resume, setup

    _, run = first
    cfg = tiny_cfg("--run_name", "lr", *STEPS, "--lr", "0.01")
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))
    assert _resume(cfg, run / "checkpoints" / "checkpoint-000002", t, {"lr": (0.05, 0.01)})[0] == 2
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.01]
    assert t.optimizer.state_dict()["state"]  # the moments were loaded


# ---------------------------------------------------------------------------------------------
# finished runs, and runs stopped during their end-of-run validation

PREVIEW = [*STEPS, "--is_sample_preview", "True"]


def _shape(run: Path) -> list[tuple[int, list[str]]]:
    """Each metrics row's step and keys: what a redone validation must not double."""
    return [(r["step"], sorted(r)) for r in _rows(run)]


def test_a_finished_run_resumed_says_it_is_finished_and_changes_nothing(tiny_cfg):
    run = train(tiny_cfg("--run_name", "a", *PREVIEW))
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    for extra in (["--resume_from", "latest"], ["--run_name", "a", "--resume_from", "latest"],
                  ["--resume_from", str(run / "checkpoints" / "checkpoint-000002")]):
        with pytest.raises(VaderError) as info:
            train(tiny_cfg(*PREVIEW, *extra))
        message = str(info.value)
        assert message.startswith(f"run 'a' ({run}) already finished at step 2 of 2; raise max_train_steps (now 2)")
        assert "\n" not in message
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files
    train(tiny_cfg(*PREVIEW, "--max_train_steps", "3", "--resume_from", "latest"))  # more steps: it continues
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in _rows(run) if "base_val_reward" in r] == [2, 3]  # the end at 2 stays history


@pytest.mark.parametrize("how", ["interrupted", "killed"])
def test_a_run_stopped_in_its_end_of_run_validation_redoes_it_once(tiny_cfg, monkeypatch, how):
    full = train(tiny_cfg("--run_name", "full", *PREVIEW))

    @contextlib.contextmanager
    def ctrl_c(model):
        raise KeyboardInterrupt  # in the base model's videos: the LoRA's validation row is written

    with monkeypatch.context() as m:
        m.setattr(vader.train, "lora_disabled", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg("--run_name", "a", *PREVIEW))
    run = full.parent / "a"
    assert [s for s, keys in _shape(run) if "val_reward" in keys] == [2] and (run / "lora").is_dir()
    if how == "killed":  # kill -9: no report at all
        (run / "report.html").unlink()
    else:
        assert "the run stopped after step 2: interrupted" in (run / "report.html").read_text()
    assert train(tiny_cfg(*PREVIEW, "--resume_from", "latest")) == run
    assert _shape(run) == _shape(full)  # the validation redone, no row doubled
    assert STOPPED_MARK not in (run / "report.html").read_text()
    with pytest.raises(VaderError, match="already finished at step 2 of 2"):
        train(tiny_cfg(*PREVIEW, "--resume_from", "latest"))
    assert _shape(run) == _shape(full)


# ---------------------------------------------------------------------------------------------
# GRPO settings are compared by value


def test_grpo_settings_compare_by_their_resolved_values():
    from dataclasses import asdict

    from vader.checkpoint import config_differences, describe_differences
    from vader.methods.grpo import GRPOSettings
    from vader.train import SETTINGS_DEFAULTS

    defaults = asdict(GRPOSettings())
    base = {"method": "grpo", "lr": 0.05}
    for a, b in ((None, defaults), (None, {"group_size": 4}), ({"noise_level": 0.7}, {"clip_range": 1e-4}),
                 (defaults, None), ({"inner_epochs": 1}, {"inner_epochs": 1.0})):
        assert config_differences({**base, "grpo": a}, {**base, "grpo": b}, SETTINGS_DEFAULTS) == {}, (a, b)
    diff = config_differences({**base, "grpo": None}, {**base, "grpo": {**defaults, "group_size": 3}}, SETTINGS_DEFAULTS)
    assert describe_differences(diff) == "grpo.group_size: 4 -> 3"
    diff = config_differences({**base, "grpo": {"kl_beta": 0.1}}, {**base, "grpo": None, "lr": 0.01}, SETTINGS_DEFAULTS)
    assert describe_differences(diff) == "grpo.kl_beta: 0.1 -> 0.0; lr: 0.05 -> 0.01"
    assert config_differences({"method": "vader", "grpo": None}, {"method": "vader"}, SETTINGS_DEFAULTS) == {}


def test_resuming_grpo_with_the_default_settings_spelled_out_is_not_a_change(tiny_cfg):
    from dataclasses import asdict

    from vader.methods.grpo import GRPOSettings

    grpo = ["--method", "grpo", "--reward_fn", "grpo_rewards:mean_red", "--checkpointing_steps", "1"]
    run = train(tiny_cfg("--run_name", "g", *grpo, "--max_train_steps", "1"))
    spelled = repr({**asdict(GRPOSettings())})
    with pytest.raises(VaderError, match=r"grpo\.group_size: 4 -> 3"):
        train(tiny_cfg(*grpo, "--max_train_steps", "2", "--resume_from", "latest", "--run_name", "g",
                       "--grpo", repr({**asdict(GRPOSettings()), "group_size": 3})))
    assert train(tiny_cfg(*grpo, "--max_train_steps", "2", "--resume_from", "latest", "--grpo", spelled)) == run
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2]
    assert not (run / "config_changes.jsonl").exists()
