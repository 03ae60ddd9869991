"""The tiny preset trains with every model reward (tiny random reward models in published formats)."""

from __future__ import annotations

import json
import math

import pytest
from test_actpred import tiny_dir  # noqa: F401  (fixture: a tiny VideoMAE saved with save_pretrained)
from test_reward_models import sources  # noqa: F401  (fixture: tiny CLIP/HPS/aesthetic/PickScore files)

from vader.train import train


@pytest.mark.parametrize("name", ["aesthetic", "hps", "aesthetic_hps", "pick_score", "actpred"])
def test_tiny_preset_trains_with_each_reward(tiny_cfg, sources, tiny_dir, name):  # noqa: F811
    weights = {**sources, "actpred": str(tiny_dir)}
    prompts = ["a man playing guitar on a stage", "a girl riding a bike in a park"]
    cfg = tiny_cfg("--reward_fn", name, "--reward_sources", repr(weights), "--prompt", repr(prompts),
                   "--max_train_steps", "1", "--decode_frame", "fml")
    run = train(cfg)
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["grad_norm"] > 0 and not row["skipped"]  # gradients reached the LoRA and it was updated
    assert math.isfinite(row["loss"]) and math.isfinite(row["reward"])


def test_actpred_rejects_single_frame_decoding_at_config_time(tiny_cfg):
    from vader.errors import VaderError

    with pytest.raises(VaderError, match="clip"):
        tiny_cfg("--reward_fn", "actpred", "--decode_frame", "-1")


def test_actpred_prompt_without_action_fails_before_training(tiny_cfg, tiny_dir, tmp_path):  # noqa: F811
    from vader.errors import VaderError

    cfg = tiny_cfg("--reward_fn", "actpred", "--reward_sources", repr({"actpred": str(tiny_dir)}),
                   "--prompt", repr(["a quiet lake at dawn"]), "--decode_frame", "fml", "--run_name", "bad")
    with pytest.raises(VaderError, match="a quiet lake at dawn"):
        train(cfg)
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()


def test_explicit_label_in_prompt_file(tiny_cfg, tiny_dir, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person on a stage at night\tplaying guitar\n")
    cfg = tiny_cfg("--reward_fn", "actpred", "--reward_sources", repr({"actpred": str(tiny_dir)}),
                   "--prompt_path", str(prompts), "--decode_frame", "alt", "--max_train_steps", "1")
    run = train(cfg)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"] > 0
