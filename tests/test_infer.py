"""Inference: a failed start leaves no run folder, as for training."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, TINY_INFER

import vader.infer
from vader.config import load_config
from vader.errors import VaderError


def test_an_infer_run_that_fails_before_its_videos_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise VaderError("generator could not start")

    monkeypatch.setattr(vader.infer, "build_generator", broken)
    cfg = load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path / "runs"), "--run_name", "fails"])
    with pytest.raises(VaderError, match="could not start"):
        vader.infer.infer(cfg)
    assert not (Path(cfg.project_dir) / "fails").exists()


def test_infer_writes_its_videos(tmp_path):
    cfg = load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path / "runs"), "--run_name", "ok",
                                   "--num_val_runs", "1", "--val_batch_size", "1"])
    paths = vader.infer.infer(cfg)
    assert len(paths) == 1 and paths[0].is_file() and paths[0].parent == Path(cfg.project_dir) / "ok" / "samples"
