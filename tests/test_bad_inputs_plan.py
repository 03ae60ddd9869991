"""Bad inputs to `vader plan` and `vader bench` through the real CLI: each ends in one `vader: error:`
line, exit status 2, no traceback, and nothing created — in the style of tests/test_bad_inputs.py.

One row per bad input: (id, argv, needles). Every row gets `BASE` (the tiny preset, fast, offline,
project_dir={pd}) after the config, before its own arguments, which win.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, TINY_TRAIN
from one_line import assert_one_line_error, tree

from vader.cli import main

TRAIN = str(TINY_TRAIN)
BASE = [*FAST, "--project_dir", "{pd}"]
BUDGET = "is not a memory size from 1 MiB to 1024 TiB"

CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- --budget: a positive size from 1 MiB to 1024 TiB ----
    ("budget text", ["plan", TRAIN, "--budget", "lots"], ["--budget='lots'", BUDGET, "24GiB"]),
    ("budget negative", ["plan", TRAIN, "--budget", "-1GiB"], ["--budget='-1GiB'", BUDGET, "positive"]),
    ("budget negative with =", ["plan", TRAIN, "--budget=-1GiB"], ["--budget='-1GiB'", BUDGET]),
    ("budget zero", ["plan", TRAIN, "--budget", "0"], ["--budget='0'", BUDGET]),
    ("budget rounds to 0 bytes", ["plan", TRAIN, "--budget", "0.0000000001"], ["--budget='0.0000000001'", BUDGET]),
    ("budget below 1 MiB", ["plan", TRAIN, "--budget", "0.5MiB"], ["--budget='0.5MiB'", "from 1 MiB"]),
    ("budget KiB", ["plan", TRAIN, "--budget", "512KiB"], ["--budget='512KiB'", BUDGET]),
    ("budget unknown unit", ["plan", TRAIN, "--budget", "24XB"], ["--budget='24XB'", BUDGET]),
    ("budget empty", ["plan", TRAIN, "--budget", ""], ["--budget=''", BUDGET]),
    ("budget past float", ["plan", TRAIN, "--budget", "9" * 400], ["--budget=", "to 1024 TiB"]),
    ("budget past 1024 TiB", ["plan", TRAIN, "--budget", "2048TiB"], ["--budget='2048TiB'", "to 1024 TiB"]),
    ("budget missing", ["plan", TRAIN, "--budget"], ["--budget", "expected one argument"]),
    ("fit without budget", ["plan", TRAIN, "--fit"], ["--fit needs --budget"]),
    ("fit: nothing fits", ["plan", TRAIN, "--budget", "1MiB", "--fit"],
     ["--budget='1MiB'", "nothing fits", "--grad_checkpoint True", "(2 plans)", "give a budget of at least",
      "lower train_batch_size"]),
    ("fit: nothing fits (grpo)", ["plan", TRAIN, "--method", "grpo", "--budget", "1MiB", "--fit"],
     ["--budget='1MiB'", "nothing fits", "--grad_checkpoint True", "give a budget of at least"]),
    # ---- the card: --gpu (a listed name, any case) or --tflops, not both; --mfu ----
    ("unknown gpu", ["plan", TRAIN, "--gpu", "H900"], ["--gpu='H900' is not known", "H100", "A100", "--tflops"]),
    ("empty gpu", ["plan", TRAIN, "--gpu", ""], ["--gpu='' is not known", "H100"]),
    ("gpu and tflops", ["plan", TRAIN, "--gpu", "A100", "--tflops", "5"],
     ["--gpu='A100'", "--tflops=5.0", "not both"]),
    ("tflops negative", ["plan", TRAIN, "--tflops", "-1"], ["--tflops=-1.0", "from 0.001 to 1e+06"]),
    ("tflops zero", ["plan", TRAIN, "--tflops", "0"], ["--tflops=0.0", "from 0.001"]),
    ("tflops inf", ["plan", TRAIN, "--tflops", "inf"], ["--tflops=inf", "from 0.001"]),
    ("tflops nan", ["plan", TRAIN, "--tflops", "nan"], ["--tflops=nan", "from 0.001"]),
    ("tflops -inf", ["plan", TRAIN, "--tflops", "-inf"], ["--tflops=-inf", "from 0.001"]),
    ("tflops past any card", ["plan", TRAIN, "--tflops", "1e7"], ["--tflops=10000000.0", "to 1e+06"]),
    ("tflops underflow", ["plan", TRAIN, "--tflops", "1e-300"], ["--tflops=1e-300", "from 0.001"]),
    ("tflops text", ["plan", TRAIN, "--tflops", "fast"], ["--tflops", "invalid float value: 'fast'"]),
    ("mfu nan", ["plan", TRAIN, "--mfu", "nan"], ["--mfu=nan", "from 0.001 to 1"]),
    ("mfu 2", ["plan", TRAIN, "--mfu", "2"], ["--mfu=2.0", "from 0.001 to 1"]),
    ("mfu zero", ["plan", TRAIN, "--mfu", "0"], ["--mfu=0.0", "from 0.001 to 1"]),
    ("mfu negative", ["plan", TRAIN, "--mfu", "-0.5"], ["--mfu=-0.5", "from 0.001 to 1"]),
    ("mfu inf", ["plan", TRAIN, "--mfu", "inf"], ["--mfu=inf"]),
    ("mfu -nan", ["plan", TRAIN, "--mfu", "-nan"], ["--mfu=nan", "from 0.001 to 1"]),
    ("mfu underflow", ["plan", TRAIN, "--mfu", "1e-300"], ["--mfu=1e-300", "from 0.001"]),
    ("mfu text", ["plan", TRAIN, "--mfu", "high"], ["--mfu", "invalid float value: 'high'"]),
    # ---- --num_processes: an integer from 1 to 65536; sharding='fsdp' as `vader train` refuses it ----
    ("processes zero", ["plan", TRAIN, "--num_processes", "0"], ["--num_processes=0", "integer from 1 to 65536"]),
    ("processes negative", ["plan", TRAIN, "--num_processes", "-4"], ["--num_processes=-4", "from 1 to 65536"]),
    ("processes past 65536", ["plan", TRAIN, "--num_processes", "65537"], ["--num_processes=65537", "to 65536"]),
    ("processes past int64", ["plan", TRAIN, "--num-processes", "9" * 30], ["--num_processes=999", "to 65536"]),
    ("processes text", ["plan", TRAIN, "--num_processes", "eight"], ["--num_processes", "invalid int value: 'eight'"]),
    ("processes fraction", ["plan", TRAIN, "--num_processes", "1.5"], ["--num_processes", "invalid int value: '1.5'"]),
    ("processes missing", ["plan", TRAIN, "--num_processes"], ["--num_processes", "expected one argument"]),
    ("sharding unknown", ["plan", TRAIN, "--sharding", "zero3", "--num_processes", "2"], ["sharding='zero3'", "fsdp"]),
    ("fsdp with fp8", ["plan", TRAIN, "--sharding", "fsdp", "--dtype", "fp8", "--num_processes", "2"],
     ["sharding='fsdp' with dtype='fp8'", "dtype='bf16'"]),
    ("fit: nothing fits on 8 processes", ["plan", TRAIN, "--budget", "1MiB", "--fit", "--num_processes", "8"],
     ["--budget='1MiB'", "nothing fits", "--sharding fsdp", "give a budget of at least"]),
    # ---- sizes a plan cannot run in minutes (PLAN_LIMITS), refused before any work ----
    ("train batch 100000", ["plan", TRAIN, "--train_batch_size", "100000"],
     ["train_batch_size=100000", "1700000 frames", "at most 2048"]),
    ("val batch 100000", ["plan", TRAIN, "--val_batch_size", "100000"], ["val_batch_size=100000", "at most 2048"]),
    ("frames 100001", ["plan", TRAIN, "--num_frames", "100001"], ["num_frames=100001", "at most 2048"]),
    ("side 2**31", ["plan", TRAIN, "--image_size", "(2147483648, 2147483648)"],
     ["image_size=(2147483648, 2147483648)", "at most 16384"]),
    ("steps 100000", ["plan", TRAIN, "--scheduler.num_sampling_steps", "100000", "--backprop_mode", "last"],
     ["scheduler.num_sampling_steps=100000", "at most 1000"]),
    ("backprop window 101", ["plan", TRAIN, "--scheduler.num_sampling_steps", "101", "--backprop_mode", "rand"],
     ["scheduler.num_sampling_steps=101", "101 with gradients", "at most 100"]),
    ("all steps 200", ["plan", TRAIN, "--scheduler.num_sampling_steps", "200", "--backprop_mode", "last",
                       "--all-steps"], ["would run 200", "--all-steps", "at most 100"]),
    ("bench batch 100000", ["bench", TRAIN, "--train_batch_size", "100000"],
     ["train_batch_size=100000", "at most 2048"]),
    # ---- the config (plan reads it as train does) ----
    ("plan missing callable", ["plan", TRAIN, "--method", "grpo", "--reward_fn", "grpo_rewards:nope"],
     ["reward_fn='grpo_rewards:nope'", "no attribute 'nope'"]),
    ("plan callable with vader", ["plan", TRAIN, "--reward_fn", "grpo_rewards:mean_red"],
     ["reward_fn='grpo_rewards:mean_red'", "--method grpo"]),
]


@pytest.mark.parametrize(("argv", "needles"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_plan_input_is_one_line_exit_2_and_creates_nothing(argv, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # tests/grpo_rewards.py for 'module:function'
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "pd"
    argv = [argv[0], argv[1], *[a.replace("{pd}", str(project)) for a in BASE], *argv[2:]]
    before = tree(tmp_path)
    code = main(argv)
    assert_one_line_error(code, capsys.readouterr().err, needles)
    assert tree(tmp_path) == before, "a refused plan left files behind"


def test_the_table_covers_plan_and_bench():
    assert len(CASES) >= 40 and {argv[0] for _, argv, _ in CASES} == {"plan", "bench"}
