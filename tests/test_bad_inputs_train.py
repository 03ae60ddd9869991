"""Failures that happen while a run trains, through the real CLI: each ends in ONE `vader: error:` line
on stderr, alone on its line and the last one (the progress bar closed before it), exit status 2, no
traceback; the run folder is gone when nothing of value was made, else it keeps every checkpoint and
gets report.html + reward_curve.png of the steps logged (tests/test_bad_inputs.py: failures before
anything starts).

One row per failure: (id, argv, setup, needle, folder state). argv follows BASE (tiny, fast, offline,
verbose so that the progress bar is live, project_dir={pd}, run_name 'r'); `setup(monkeypatch, pd)`
breaks what the row breaks (or prepares a run to resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, TINY_TRAIN
from one_line import sigterm_when

import vader.train
from vader.cli import main
from vader.errors import VaderError
from vader.report import STOPPED_MARK

TRAIN = str(TINY_TRAIN)
BASE = [*FAST, "--verbose", "1", "--max_train_steps", "3", "--project_dir", "{pd}", "--run_name", "r"]
HERE = "test_bad_inputs_train"  # this module, for 'module:function' rewards (tests/ is on sys.path)


# ---- 'module:function' rewards (also imported by the subprocesses below) ----------------------------


def gold_breaks(videos, prompts):
    """A gold reward: scored only at validation, so with validation at the end it breaks at the END."""
    raise ValueError("the judge is offline")


def red_then_hang(videos, prompts):
    """GRPO's reward: the red mean; on call $HANG_AT it touches $HANG_MARKER and sleeps (a long step)."""
    global _CALLS
    _CALLS += 1
    if _CALLS == int(os.environ.get("HANG_AT", "0")):
        Path(os.environ["HANG_MARKER"]).write_text("in the step")
        time.sleep(120)
    return [float((videos[i, 0].mean() + 1) / 2) for i in range(len(prompts))]


_CALLS = 0


class FailAt:
    """The training reward; its training call `n` (gradient on: not a validation) raises `exc`."""

    def __init__(self, reward, n: int, exc: BaseException):
        self.reward, self.n, self.exc, self.calls = reward, n, exc, 0

    def __getattr__(self, name):
        return getattr(self.reward, name)

    def __call__(self, video, prompts):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                raise self.exc
        return self.reward(video, prompts)


def _break_reward_at(n: int):
    def setup(monkeypatch, pd):
        real = vader.train.make_reward
        monkeypatch.setattr(vader.train, "make_reward", lambda *a, **k: FailAt(
            real(*a, **k), n, VaderError("reward_fn='brightness' could not score: the scorer went away")))
    return setup


def _finished_run(monkeypatch, pd):
    """A finished run 'r' (2 of 2 steps, end-of-run validation and report)."""
    assert main(["train", TRAIN, *_base(pd), "--max_train_steps", "2", "--checkpointing_steps", "1",
                 "--is_sample_preview", "True", "--reward_fn", "brightness", "--verbose", "0"]) == 0


def _nothing(monkeypatch, pd):
    pass


GONE = "gone"  # no run folder left (nothing of value was made)
STOPPED = "stopped"  # kept: checkpoints, metrics, report.html marked stopped, reward_curve.png; no final LoRA
STOPPED_WITH_LORA = "stopped, LoRA saved"  # failed after the final LoRA was written (end-of-run validation)
UNCHANGED = "unchanged"  # a finished run, not touched by the refused command

CASES = [
    ("reward raises at step 1", ["--reward_fn", "brightness"], _break_reward_at(1),
     "could not score", GONE),
    ("reward raises at step 2, after checkpoint 1", ["--reward_fn", "brightness", "--checkpointing_steps", "1"],
     _break_reward_at(2), "could not score", STOPPED),
    ("diverged: lr 1e30", ["--lr", "1e30", "--max_train_steps", "8", "--checkpointing_steps", "1",
                           "--model.attention", "math"], _nothing, "max_nonfinite_steps=3 reached", STOPPED),
    ("gold reward raises at the end", ["--reward_fn", "brightness", "--is_sample_preview", "True",
                                       "--gold_reward", f"{HERE}:gold_breaks", "--max_train_steps", "2"],
     _nothing, "gold_reward='test_bad_inputs_train:gold_breaks' raised ValueError: the judge is offline",
     STOPPED_WITH_LORA),
    ("grpo reward returns NaN", ["--method", "grpo", "--grpo", "{'group_size': 2}", "--reward_fn",
                                 "grpo_rewards:returns_nan"], _nothing, "non-finite score", GONE),
    ("grpo reward returns too few scores", ["--method", "grpo", "--grpo", "{'group_size': 2}", "--reward_fn",
                                            "grpo_rewards:too_few"], _nothing, "it must return", GONE),
    ("resume latest of a finished run", ["--max_train_steps", "2", "--checkpointing_steps", "1",
                                         "--is_sample_preview", "True", "--reward_fn", "brightness",
                                         "--resume_from", "latest"],
     _finished_run, "run 'r' ({pd}/r) already finished at step 2 of 2; raise max_train_steps (now 2)", UNCHANGED),
    ("resume a finished run's last checkpoint by path", ["--max_train_steps", "2", "--reward_fn", "brightness",
                                                         "--is_sample_preview", "True", "--resume_from",
                                                         "{pd}/r/checkpoints/checkpoint-000002"],
     _finished_run, "already finished at step 2 of 2", UNCHANGED),
]


def _base(pd: Path) -> list[str]:
    return [a.replace("{pd}", str(pd)) for a in BASE]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(err: str) -> str:
    """The error: the last line of stderr, alone on it (no bar before it on that line, none after)."""
    lines = err.rstrip("\n").split("\n")
    assert "Traceback" not in err, err
    assert sum("vader: error:" in line for line in lines) == 1, err
    assert lines[-1].startswith("vader: error: "), repr(err[-600:])
    return lines[-1]


@pytest.mark.parametrize(("name", "argv", "setup", "needle", "state"), CASES, ids=[c[0] for c in CASES])
def test_a_failure_while_training_is_one_last_line_exit_2_and_keeps_what_has_value(
        name, argv, setup, needle, state, tmp_path, monkeypatch, capsys):
    pd = tmp_path / "runs"
    setup(monkeypatch, pd)
    run = pd / "r"
    before = _snapshot(run) if run.is_dir() else None
    capsys.readouterr()
    code = main(["train", TRAIN, *_base(pd), *[a.replace("{pd}", str(pd)) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle.replace("{pd}", str(pd)) in _error_line(err)
    if state == GONE:
        assert not run.exists(), sorted(p.name for p in run.iterdir())
        return
    if state == UNCHANGED:
        assert _snapshot(run) == before
        return
    assert any((run / "checkpoints").glob("checkpoint-*")) and (run / "metrics.jsonl").is_file()
    assert (run / "lora").is_dir() == (state == STOPPED_WITH_LORA)
    assert (run / "reward_curve.png").stat().st_size > 1000
    report = (run / "report.html").read_text()
    assert STOPPED_MARK in report and "the run stopped after step" in report
    assert not list(run.rglob(".*.tmp*"))


def test_a_diverged_run_reports_its_skipped_steps(tmp_path, capsys):
    pd = tmp_path / "runs"
    assert main(["train", TRAIN, *_base(pd), "--lr", "1e30", "--max_train_steps", "8", "--model.attention",
                 "math"]) == 2
    report = (pd / "r" / "report.html").read_text()
    assert "steps skipped as non-finite" in report and "3 of " in report


# ---- SIGTERM ----------------------------------------------------------------------------------------


def _launch(tmp_path: Path, hang_at: int, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    pd, marker = tmp_path / "runs", tmp_path / "in-step"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "src")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HANG_AT=str(hang_at), HANG_MARKER=str(marker))
    argv = [sys.executable, "-m", "vader", "train", TRAIN, *_base(pd), "--method", "grpo", "--grpo",
            "{'group_size': 2}", "--reward_fn", f"{HERE}:red_then_hang", "--logger_type", "tensorboard", *extra]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, pd / "r", marker


def _terminate_when(proc: subprocess.Popen, marker: Path) -> str:
    return sigterm_when(proc, marker.exists, "the run reaching the hanging reward call")


def test_sigterm_during_the_first_grpo_step_leaves_no_folder(tmp_path):
    proc, run, marker = _launch(tmp_path, hang_at=1)
    err = _terminate_when(proc, marker)
    assert proc.returncode == 143, err
    assert err.rstrip("\n").split("\n")[-1] == "vader: terminated (SIGTERM)" and "Traceback" not in err
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))


def test_sigterm_after_a_checkpoint_keeps_it_and_writes_the_report(tmp_path):
    proc, run, marker = _launch(tmp_path, 2, "--checkpointing_steps", "1")  # one reward call per step
    err = _terminate_when(proc, marker)
    assert proc.returncode == 143, err
    assert (run / "checkpoints" / "checkpoint-000001").is_dir() and not (run / "lora").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    report = (run / "report.html").read_text()
    assert STOPPED_MARK in report and "terminated (SIGTERM)" in report
    assert (run / "reward_curve.png").is_file() and list((run / "logs").rglob("events.out.tfevents.*"))
