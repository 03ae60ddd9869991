"""`vader eval`: bootstrap intervals, win rate, and base vs LoRA end to end on the tiny preset (the guards' values:
test_guards.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vader.evaluate import bootstrap_ci, eval_main, paired_win_rate
from vader.media import read_video


def test_bootstrap_ci_of_constant_values_has_zero_width():
    assert bootstrap_ci([0.7] * 20) == pytest.approx((0.7, 0.7, 0.7))


def test_bootstrap_ci_covers_the_known_mean_and_is_deterministic():
    x = np.random.default_rng(1).normal(loc=2.0, scale=1.0, size=400)
    mean, low, high = bootstrap_ci(x)
    assert low < 2.0 < high
    assert low < mean < high
    assert 0.1 < high - low < 0.3  # ~ 2 · 1.96 · 1/sqrt(400) = 0.196
    assert bootstrap_ci(x) == (mean, low, high)
    assert bootstrap_ci(x, seed=5) != (mean, low, high)


def test_paired_win_rate_counts_ties_half():
    assert paired_win_rate([1, 2, 3], [0, 2, 4]) == 0.5
    assert paired_win_rate([0, 0], [1, 1]) == 1.0
    assert paired_win_rate([1, 1, 1, 1], [0, 0, 0, 2]) == 0.25
    with pytest.raises(ValueError):
        paired_win_rate([1, 2], [1])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A 2-step tiny training run (random weights, colorfulness): its lora/ folder is what eval loads."""
    from conftest import FAST, TINY_TRAIN

    from vader.config import load_config
    from vader.train import train

    root = tmp_path_factory.mktemp("evaltrain")
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(root), "--run_name", "run", "--max_train_steps", "2",
                                   "--validation_steps", "0"])
    return train(cfg)


def _eval_args(tmp: Path, lora: Path, *extra: str) -> list[str]:
    from conftest import FAST, TINY_TRAIN

    return [str(TINY_TRAIN), "--lora", str(lora), "--seeds", "2", *FAST, "--project_dir", str(tmp),
            "--val_batch_size", "4", *extra]


def test_eval_end_to_end_compares_base_and_lora_on_the_same_seeds(lora_run, tmp_path, capsys, monkeypatch):
    import vader.evaluate

    frames: dict[Path, torch.Tensor] = {}  # what each mp4 was made from (H.264 may round differently)
    write = vader.evaluate.write_video

    def recording_write(path, video, **kwargs):
        path = Path(path)
        folder = path.parent.parent  # videos go into the hidden partial folder, renamed at the end
        assert folder.name.startswith(".") and folder.name.endswith(".partial"), path
        frames[folder.with_name(folder.name[1:-len(".partial")]) / path.parent.name / path.name] = video.clone()
        return write(path, video, **kwargs)

    monkeypatch.setattr(vader.evaluate, "write_video", recording_write)  # as evaluate writes them
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red ball\na blue cube on grass\na dog running\n")
    args = _eval_args(tmp_path, lora_run / "lora", "--prompts", str(prompts), "--rewards", "colorfulness,brightness")
    assert eval_main([*args, "--run_name", "first"]) == 0
    table = capsys.readouterr().out
    assert "colorfulness" in table and "guard: motion" in table and "win rate" in table
    assert eval_main([*args, "--run_name", "second"]) == 0

    first, second = tmp_path / "eval" / "first", tmp_path / "eval" / "second"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["first", "second"]  # no partial folder left
    assert not list(first.glob(".*"))  # nor its owner file
    data = json.loads((first / "eval.json").read_text())
    assert data["seeds"] == 2 and data["prompts"] == ["a red ball", "a blue cube on grass", "a dog running"]
    for name in ("colorfulness", "brightness"):
        r = data["rewards"][name]
        assert r["n"] == 6
        for side in ("base", "lora", "delta"):
            low, high = r[side]["ci95"]
            assert low <= r[side]["mean"] <= high
        assert 0.0 <= r["win_rate"] <= 1.0
        base, lora = np.array(data["scores"][name]["base"]), np.array(data["scores"][name]["lora"])
        assert base.shape == lora.shape == (3, 2)
        assert r["base"]["mean"] == pytest.approx(base.mean()) and r["lora"]["mean"] == pytest.approx(lora.mean())
        assert r["win_rate"] == paired_win_rate(base, lora)
    # the LoRA changed the videos (2 steps at lr 0.05 on a random model), so the scores differ
    assert data["scores"]["colorfulness"]["base"] != data["scores"]["colorfulness"]["lora"]
    assert [row["prompt"] for row in data["per_prompt"]] == data["prompts"]
    assert set(data["per_prompt"][0]["colorfulness"]) == {"base", "lora", "win_rate"}
    for side in ("base", "lora"):
        assert set(data["guards"][side]) == {"motion", "temporal_consistency", "diversity"}
        assert sorted(p.name for p in (first / side).iterdir()) == [f"p{i:04d}-s{s}.mp4" for i in range(3)
                                                                    for s in range(2)]
    assert read_video(first / "lora" / "p0001-s1.mp4").shape == (3, 17, 32, 32)
    page = (first / "report.html").read_text()
    assert page.count('data-kind="video"') == 12 and page.count('data-kind="plot"') == 2  # 3 prompts x 2 seeds x 2
    assert "a blue cube on grass" in page and 'href="lora/p0002-s1.mp4"' in page
    # same seeds: a second eval's base videos (and scores) are the first one's, frame for frame
    assert len(frames) == 24
    for video in sorted((first / "base").iterdir()):
        assert torch.equal(frames[video], frames[second / "base" / video.name])
        assert not torch.equal(frames[video], frames[first / "lora" / video.name])
    assert json.loads((second / "eval.json").read_text())["scores"]["colorfulness"]["base"] == \
        data["scores"]["colorfulness"]["base"]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0"], "--seeds='0' must be a whole number >= 1"),
    (["--seeds", "two"], "--seeds='two'"),
    (["--rewards", "colorfulness,nope"], "'nope' is not a reward"),
    (["--prompts", "missing.txt"], "--prompts='missing.txt': no such file"),
])
def test_eval_user_errors_are_one_line_and_create_nothing(lora_run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    args = [a for a in _eval_args(tmp_path / "proj", lora_run / "lora") if a not in ("--seeds", "2")]
    assert eval_main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vader: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "proj").exists()


def test_eval_bad_lora_path_is_a_one_line_error(tmp_path, capsys):
    from conftest import FAST, TINY_TRAIN

    code = eval_main([str(TINY_TRAIN), "--lora", str(tmp_path / "nolora"), *FAST, "--project_dir", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--lora=" in err and "no such file" in err and "\n" not in err
    assert not (tmp_path / "p").exists()


def test_eval_of_a_corrupt_lora_fails_in_one_line_and_removes_its_folder(tmp_path, capsys):
    from conftest import FAST, TINY_TRAIN

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes(b"")  # passes the path check, fails on loading
    code = eval_main([str(TINY_TRAIN), "--lora", str(lora), *FAST, "--project_dir", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--lora=" in err and "cannot read the LoRA file" in err and "\n" not in err
    assert not (tmp_path / "p" / "eval").exists()


def _preview_rows(n: int, frames: int = 5, still: bool = False, seed: int = 0) -> list:
    """(prompt, video [3, F, H, W], score) rows: a bright square that moves one pixel per frame (or not)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        video = torch.full((3, frames, 16, 16), -1.0)
        x0 = int(torch.randint(0, 6, (1,), generator=gen))
        for f in range(frames):
            x = x0 if still else x0 + f
            video[:, f, 4:8, x:x + 4] = 1.0
        rows.append((f"prompt {i % 2}", video, 0.0))
    return rows


@pytest.mark.parametrize("lora_reward, warns", [(0.9, True), (0.1, False)])
def test_training_warns_when_the_reward_rises_while_motion_freezes(tiny_cfg, capsys, lora_reward, warns):
    """The end-of-run guard: LoRA videos frozen (motion 0) against moving base videos, same prompts:
    one warning line and guard_* columns in metrics.jsonl when the reward rose; no warning when it fell."""
    import json

    from vader.run import Run, make_accelerator

    cfg = tiny_cfg("--run_name", f"guard-{warns}")
    run = Run.create(cfg, make_accelerator(cfg), kind="train")
    run.check_guards(3, 0.5, lora_reward, _preview_rows(4), _preview_rows(4, still=True))
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["guard_motion"] == 0.0 and rows[-1]["guard_motion_base"] > 0
    assert rows[-1]["guard_temporal_consistency"] >= rows[-1]["guard_temporal_consistency_base"]
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert ("guard_warning" in rows[-1]) == warns and len(err) == int(warns)
    if warns:
        assert "motion" in err[0] and "guard_drop=0.5" in err[0]
