"""Bad inputs to `vader eval`, through the real CLI: each ends in one `vader: error:` line, exit status 2,
no traceback, and nothing left behind — neither a refusal before anything starts nor a failure half-way
(a broken LoRA, a reward that raises) leaves a folder, a partial folder or a cache it created.

One row per bad input: (id, argv, needles). argv is what follows `vader eval`; `{in}` is a folder of
prepared bad files (LoRA variants included), `{lora}` a good tiny LoRA and `{pd}` the project_dir the
eval would write to. Most rows start with EVAL (tiny config, the good LoRA, 1 seed, 2 prompts, fast,
project_dir={pd}); their own arguments follow and win.

Below the table: SIGTERM of a running eval (a subprocess) removes its partial folder, and the partial
folder a killed eval left is removed by the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, TINY_TRAIN
from one_line import assert_one_line_error, sigterm_when, tree
from safetensors.torch import load_file, save_file

import vader.evaluate
from vader.cli import main
from vader.evaluate import MAX_EVAL_VIDEOS, OWNER_FILE, partial_path

TRAIN = str(TINY_TRAIN)
EVAL = [TRAIN, "--lora", "{lora}", "--seeds", "1", "--prompts", "{in}/ok.txt", *FAST, "--project_dir", "{pd}"]

CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- the LoRA ----
    ("adapter_config.json not JSON", [*EVAL, "--lora", "{in}/badjson"],
     ["--lora=", "badjson/adapter_config.json", "cannot be used", "JSONDecodeError"]),
    ("adapter_config.json a list", [*EVAL, "--lora", "{in}/listjson"], ["adapter_config.json", "not an object"]),
    ("adapter_config.json without targets", [*EVAL, "--lora", "{in}/emptyjson"], ["target_modules=None"]),
    ("adapter_config.json rank text", [*EVAL, "--lora", "{in}/rankjson"], ["r='four' is not a rank"]),
    ("LoRA for another model", [*EVAL, "--lora", "{in}/othermodel"], ["--lora=", "does not fit this config's denoiser"]),
    ("LoRA rank differs from its weights", [*EVAL, "--lora", "{in}/rank8"], ["has shape", "lora_rank"]),
    ("adapter_config.json null", [*EVAL, "--lora", "{in}/nulljson"], ["holds a JSON NoneType, not an object"]),
    ("adapter_config.json binary", [*EVAL, "--lora", "{in}/binjson"], ["adapter_config.json", "UnicodeDecodeError"]),
    ("LoRA given as its adapter_config.json", [*EVAL, "--lora", "{lora}/adapter_config.json"],
     ["is the LoRA's settings file, not its weights"]),
    ("missing LoRA", [*EVAL, "--lora", "{in}/none"], ["--lora=", "no such file"]),
    ("zero-length LoRA", [*EVAL, "--lora", "{in}/zero"], ["--lora=", "cannot read the LoRA file"]),
    ("NaN LoRA weights", [*EVAL, "--lora", "{in}/nan"], ["--lora=", "holds NaN or inf"]),
    ("LoRA whose videos are NaN", [*EVAL, "--lora", "{in}/huge"],
     ["--lora=", "is broken", "2 of 2 LoRA videos of seed 0 are non-finite", "no folder kept"]),
    # ---- config keys eval would ignore ----
    ("lora_ckpt_path", [*EVAL, "--lora_ckpt_path", "{lora}"], ["--lora_ckpt_path is not used", "--lora PATH"]),
    ("resume_from", [*EVAL, "--resume_from", "latest"], ["--resume_from is not used", "--lora PATH"]),
    ("resume-from=", [*EVAL, "--resume-from=latest"], ["--resume_from is not used"]),
    ("lora-ckpt-path", [*EVAL, "--lora-ckpt-path", "{lora}"], ["--lora_ckpt_path is not used"]),
    ("resume_from as key=value", [*EVAL, "resume_from=latest"], ["--resume_from is not used"]),
    # ---- seeds ----
    ("seeds 10**9", [*EVAL, "--seeds", str(10**9)],
     ["--seeds=1000000000", "2,000,000,000 videos", f"limit of {MAX_EVAL_VIDEOS:,}", "--seeds 5000"]),
    ("seeds just over the limit", [*EVAL, "--seeds", str(MAX_EVAL_VIDEOS // 2 + 1)], [f"limit of {MAX_EVAL_VIDEOS:,}"]),
    ("seeds 10**20", [*EVAL, "--seeds", str(10**20)], ["--seeds=10**15 or more", "more than 10**15 videos"]),
    ("10001 prompts x 1 seed", [*EVAL, "--prompts", "{in}/many.txt"], ["10,001 videos", "a shorter prompts file"]),
    ("seeds 0", [*EVAL, "--seeds", "0"], ["--seeds='0' must be a whole number >= 1"]),
    ("seeds of 5000 digits", [*EVAL, "--seeds", "-" + "9" * 5000], ["--seeds='-999", "...'"]),
    ("seeds 1.5", [*EVAL, "--seeds", "1.5"], ["--seeds='1.5'"]),
    ("seeds 10**9 as text", [*EVAL, "--seeds", "10**9"], ["--seeds='10**9'"]),
    ("seeds negative", [*EVAL, "--seeds=-3"], ["--seeds='-3'"]),
    # ---- rewards ----
    ("rewards a dict", [*EVAL, "--rewards", "{'colorfulness': 1.0}"],
     ["--rewards=", "comma-separated list of reward names", "module:function", "reward_fn"]),
    ("rewards a list", [*EVAL, "--rewards", "['colorfulness']"], ["comma-separated list of reward names"]),
    ("rewards with weights", [*EVAL, "--rewards", "colorfulness:1.0,brightness:0.5"],
     ["'colorfulness:1.0' looks like a weight", "reward_fn"]),
    ("rewards unknown", [*EVAL, "--rewards", "colorfulness,nope"], ["'nope' is not a reward", "brightness"]),
    ("rewards empty", [*EVAL, "--rewards", ",,"], ["names no reward"]),
    ("rewards module missing", [*EVAL, "--rewards", "no_such_module_x:fn"], ["module 'no_such_module_x' not found"]),
    ("rewards offline weights", [*EVAL, "--rewards", "hps"], ["reward weights are missing", "hf download xswu/HPSv2"]),
    ("reward that raises", [*EVAL, "--rewards", "grpo_rewards:raises"],
     ["--rewards='grpo_rewards:raises' raised RuntimeError", "scorer service unavailable"]),
    ("reward that returns NaN", [*EVAL, "--rewards", "grpo_rewards:returns_nan"], ["non-finite"]),
    # ---- prompts ----
    ("prompts a folder", [*EVAL, "--prompts", "{in}"], ["--prompts=", "is a folder, not a prompts file"]),
    ("prompts missing", [*EVAL, "--prompts", "{in}/none.txt"], ["--prompts=", "no such file"]),
    ("prompts empty", [*EVAL, "--prompts", "{in}/empty.txt"], ["is empty"]),
    ("prompts not UTF-8", [*EVAL, "--prompts", "{in}/latin1.txt"], ["not UTF-8"]),
    ("prompts a device", [*EVAL, "--prompts", "/dev/null"], ["is not a regular file"]),
    # ---- the eval folder ----
    ("project_dir/eval a file", [*EVAL, "--project_dir", "{in}/evalfile"], ["eval is a file, not a folder"]),
    ("project_dir/eval a broken link", [*EVAL, "--project_dir", "{in}/evallink"], ["eval is a broken link"]),
    ("project_dir a file", [*EVAL, "--project_dir", "{in}/afile"], ["project_dir=", "not a folder"]),
    ("run_name taken", [*EVAL, "--project_dir", "{in}/done", "--run_name", "taken"],
     ["run_name='taken'", "eval/taken already exists", "choose another run_name or delete that folder"]),
    ("run_name being written", [*EVAL, "--project_dir", "{in}/busy", "--run_name", "busy"],
     ["run_name='busy'", "another vader eval", "is writing"]),
    ("run_name with a slash", [*EVAL, "--run_name", "a/b"], ["run_name='a/b'", "plain name"]),
    ("run_name ..", [*EVAL, "--run_name", ".."], ["run_name='..'", "plain name"]),
    ("run_name hidden", [*EVAL, "--run_name", ".x.partial"], ["run_name='.x.partial'", "plain name"]),
    # ---- usage ----
    ("no --lora", [TRAIN, *FAST], ["--lora"]),
    ("--seeds without a value", [*EVAL, "--seeds"], ["--seeds", "expected one argument"]),
    ("unknown config key", [*EVAL, "--seeed", "3"], ["seeed", "did you mean"]),
    ("val_batch_size 0", [*EVAL, "--val_batch_size", "0"], ["val_batch_size=0"]),
    ("missing config", ["{in}/none.py", "--lora", "{lora}"], ["config file not found"]),
]


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A 1-step tiny training run's lora/ folder."""
    from vader.config import load_config
    from vader.train import train

    root = tmp_path_factory.mktemp("evallora")
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(root), "--run_name", "run", "--max_train_steps", "1"])
    return train(cfg) / "lora"


def _variant(lora: Path, folder: Path, config: dict | None = None, text: str | None = None, fill=None) -> None:
    shutil.copytree(lora, folder)
    if config is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if text is not None:
        (folder / "adapter_config.json").write_text(text)
    if fill is not None:
        state = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k: torch.full_like(v, fill) for k, v in state.items()}, str(folder / "adapter_model.safetensors"))


def _prepare(folder: Path, lora: Path) -> None:
    folder.mkdir()
    (folder / "ok.txt").write_text("a red fox in the snow\na blue cube\n")
    (folder / "latin1.txt").write_bytes("a dog\ncafé au lait\n".encode("latin-1"))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "afile").write_text("a file, not a folder")
    (folder / "many.txt").write_text("".join(f"prompt {i}\n" for i in range(MAX_EVAL_VIDEOS + 1)))
    (folder / "evallink").mkdir()
    (folder / "evallink" / "eval").symlink_to(folder / "no-such-target")
    _variant(lora, folder / "badjson", text="{not json")
    _variant(lora, folder / "listjson", text="[1, 2]")
    _variant(lora, folder / "emptyjson", text="{}")
    _variant(lora, folder / "nulljson", text="null")
    _variant(lora, folder / "binjson")
    (folder / "binjson" / "adapter_config.json").write_bytes(b"\xff\xfe\x00 not text")
    _variant(lora, folder / "rankjson", config={"r": "four"})
    _variant(lora, folder / "othermodel", config={"target_modules": ["no_such_layer"]})
    _variant(lora, folder / "rank8", config={"r": 8})
    _variant(lora, folder / "nan", fill=float("nan"))
    _variant(lora, folder / "huge", fill=1e30)  # finite weights whose videos overflow to NaN
    (folder / "zero").mkdir()
    (folder / "zero" / "adapter_model.safetensors").write_bytes(b"")
    (folder / "evalfile").mkdir()
    (folder / "evalfile" / "eval").write_text("not the eval folder")
    (folder / "done" / "eval" / "taken").mkdir(parents=True)
    (folder / "done" / "eval" / "taken" / "eval.json").write_text("{}")
    busy = partial_path(folder / "busy" / "eval", "busy")
    busy.mkdir(parents=True)
    (busy / OWNER_FILE).write_text(vader.evaluate._owner_line())  # this process: alive


@pytest.mark.parametrize(("argv", "needles"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_eval_input_is_one_line_exit_2_and_leaves_nothing(argv, needles, lora, tmp_path, capsys):
    inputs, project = tmp_path / "in", tmp_path / "pd"
    _prepare(inputs, lora)
    argv = [a.replace("{in}", str(inputs)).replace("{pd}", str(project)).replace("{lora}", str(lora)) for a in argv]
    before = tree(tmp_path)
    code = main(["eval", *argv])
    assert_one_line_error(code, capsys.readouterr().err, needles)
    assert tree(tmp_path) == before, "a failed eval left files behind"


def test_the_table_is_large():
    assert len(CASES) >= 40


# ---- SIGTERM, and what a kill -9 leaves ------------------------------------------------------------


def _eval_argv(lora: Path, prompts: Path, project: Path, *extra: str) -> list[str]:
    return [TRAIN, "--lora", str(lora), "--prompts", str(prompts), *FAST, "--project_dir", str(project), *extra]


def test_sigterm_removes_the_partial_folder(lora, tmp_path):
    """A real `vader eval` process, SIGTERM'd once its partial folder holds videos: exit 143, one line
    saying so, and neither the partial nor a final folder (nor the project_dir it made) remains."""
    prompts, project = tmp_path / "p.txt", tmp_path / "pd"
    prompts.write_text("a red fox\na blue cube\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vader", "eval",
                             *_eval_argv(lora, prompts, project, "--seeds", "200", "--run_name", "k")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = partial_path(project / "eval", "k")
    err = sigterm_when(proc, lambda: any((partial / "lora").glob("*.mp4")), "a LoRA video in the partial folder",
                       timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "vader: eval stopped by SIGTERM; its partial folder was removed", err
    assert "Traceback" not in err
    assert not project.exists(), sorted(tree(project))


def test_sigterm_in_process_cleans_up_and_restores_the_handler(lora, tmp_path, monkeypatch, capsys):
    """SIGTERM while an in-process eval writes its videos: the same cleanup as an error, exit 143, and the
    caller's SIGTERM handler back in place afterwards."""
    prompts, project = tmp_path / "p.txt", tmp_path / "pd"
    prompts.write_text("a red fox\n")
    project.mkdir()
    write = vader.evaluate.write_video

    def write_then_term(path, video, **kwargs):
        write(path, video, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(vader.evaluate, "write_video", write_then_term)
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
    try:
        assert main(["eval", *_eval_argv(lora, prompts, project, "--seeds", "1")]) == 128 + signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the handler set before the eval is in place again
        assert len(calls) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert [p.name for p in project.iterdir()] == [".cache"]  # the text cache stays, as training's does


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_evals_partial_folder_is_removed_by_the_next_eval(lora, tmp_path, capsys):
    """What kill -9 leaves (a partial folder whose process is gone, one whose owner line was never written)
    is removed by the next eval, with a note; the same run_name is then free, and a live one is kept."""
    prompts, project = tmp_path / "p.txt", tmp_path / "pd"
    prompts.write_text("a red fox\n")
    root = project / "eval"
    killed = partial_path(root, "k")
    (killed / "base").mkdir(parents=True)
    (killed / "base" / "p0000-s0.mp4").write_bytes(b"half a video")
    (killed / OWNER_FILE).write_text(f"{socket.gethostname()} {_dead_pid()} -\n")
    ownerless = partial_path(root, "eval-20250101-000000")
    ownerless.mkdir()
    os.utime(ownerless, (time.time() - 3600, time.time() - 3600))
    live = partial_path(root, "running")
    live.mkdir()
    (live / OWNER_FILE).write_text(vader.evaluate._owner_line())

    assert main(["eval", *_eval_argv(lora, prompts, project, "--seeds", "1", "--run_name", "k")]) == 0
    out = capsys.readouterr().out
    assert f"removed {killed}: the partial folder of an eval that was killed" in out
    assert f"removed {ownerless}" in out and str(live) not in out
    assert sorted(p.name for p in root.iterdir()) == [live.name, "k"]
    assert sorted(p.name for p in (root / "k").iterdir()) == ["base", "eval.json", "lora", "report.html"]
    assert json.loads((root / "k" / "eval.json").read_text())["folder"] == str(root / "k")
    assert str(root / "k") in (root / "k" / "report.html").read_text()

    # the same run_name again: refused, naming the folder; without run_name a timestamped name is found
    assert main(["eval", *_eval_argv(lora, prompts, project, "--seeds", "1", "--run_name", "k")]) == 2
    err = capsys.readouterr().err
    assert "run_name='k'" in err and "already exists" in err and len(err.splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_nothing(lora, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the videos: one line naming the error, exit 2, nothing kept."""
    import errno

    prompts, project = tmp_path / "p.txt", tmp_path / "pd"
    prompts.write_text("a red fox\n")

    def full(path, video, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vader.evaluate, "write_video", full)
    assert main(["eval", *_eval_argv(lora, prompts, project, "--seeds", "1")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot write there (No space left on device" in err, err
    assert not project.exists()


def test_stop_on_signals_raises_once_keeps_an_ignored_sighup_and_restores_handlers():
    from vader.evaluate import Stopped, stop_on_signals

    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(Stopped) as info:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            assert info.value.code == 128 + signal.SIGTERM and info.value.signal_name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, while the cleanup would run: ignored
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) is old_term
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old_hup)
