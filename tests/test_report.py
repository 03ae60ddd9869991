"""report.html: self-contained, every plot and video decodes, and it renders in a browser as a person sees it;
guards and the gold reward at every validation of a training run."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vader.evaluate import _summarise
from vader.report import eval_report, training_report

BASE_RGB = (220, 40, 40)  # the synthetic base videos' square
LORA_RGB = (40, 200, 60)  # the synthetic LoRA videos' square


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "a":
            self.links.append(attrs.get("href", ""))


def _parse(path: Path) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(data-kind, decoded image) for every <img>, and the link targets; fails on any non-inline image."""
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    decoded = []
    for attrs in parser.images:
        src = attrs["src"]
        assert src.startswith("data:image/"), f"not self-contained: {src[:60]}"
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        decoded.append((attrs.get("data-kind", ""), image))
    return decoded, parser.links


def _square_video(rgb: tuple[int, int, int], frames: int = 6, size: int = 16, moving: bool = True) -> torch.Tensor:
    v = torch.full((3, frames, size, size), -1.0)
    colour = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1
    for t in range(frames):
        x = 2 + (t if moving else 0)
        v[:, t, 4:12, x:x + 8] = colour[:, None, None]
    return v


def _synthetic_eval(folder: Path, prompts: int = 2, seeds: int = 2):
    videos = {"base": [[_square_video(BASE_RGB) for _ in range(seeds)] for _ in range(prompts)],
              "lora": [[_square_video(LORA_RGB, moving=False) for _ in range(seeds)] for _ in range(prompts)]}
    rng = np.random.default_rng(0)
    scores = {"colorfulness": {"base": rng.normal(0.3, 0.02, (prompts, seeds)).tolist(),
                               "lora": rng.normal(0.5, 0.02, (prompts, seeds)).tolist()}}
    folder.mkdir(parents=True, exist_ok=True)
    result = _summarise(folder, [f"prompt {i}" for i in range(prompts)], seeds, scores, videos)
    return result, videos


def test_eval_report_is_self_contained_and_every_image_decodes(tmp_path):
    result, videos = _synthetic_eval(tmp_path / "eval")
    page = eval_report(result, videos, fps=8)
    assert page == tmp_path / "eval" / "report.html"
    images, links = _parse(page)
    plots = [im for kind, im in images if kind == "plot"]
    gifs = [im for kind, im in images if kind == "video"]
    assert len(plots) == 2 and all(im.format == "PNG" and im.width > 200 for im in plots)
    assert len(gifs) == 8  # 2 prompts x 2 seeds, base and LoRA
    assert all(im.format == "GIF" and im.size == (16, 16) for im in gifs)  # stored small, shown at 192 px
    assert page.read_text().count('data-kind="video" alt="base" width="192" height="192"') == 4
    # the moving base videos keep their 6 frames; the frozen LoRA ones collapse to one (PIL merges repeats)
    assert sorted(im.n_frames for im in gifs) == [1] * 4 + [6] * 4
    first = np.asarray(gifs[0].convert("RGB"))
    assert np.abs(first - np.array(BASE_RGB)).sum(-1).min() < 30  # the base square survives the palette
    assert sorted(links) == sorted(f"{side}/p{i:04d}-s{s}.mp4" for side in ("base", "lora")
                                   for i in range(2) for s in range(2))
    text = page.read_text()
    assert "colorfulness" in text and "win rate" in text and "possible reward hacking" in text  # motion froze
    assert not (tmp_path / "eval" / "report.html.tmp").exists()


def _metrics(run: Path) -> None:
    rows = [{"step": s, "reward": 0.1 * s, "loss": -0.1 * s} for s in range(1, 5)]
    rows += [{"step": 2, "val_reward": 0.2, "val_gold_reward": 0.7, "guard_motion": 0.05,
              "guard_temporal_consistency": 0.97},
             {"step": 4, "val_reward": 0.4, "val_gold_reward": 0.6, "guard_motion": 0.04,
              "guard_temporal_consistency": 0.98},
             {"step": 4, "base_val_reward": 0.15, "base_val_gold_reward": 0.72},
             {"step": 4, "guard_motion_base": 0.05, "guard_temporal_consistency_base": 0.97, "guard_motion": 0.04,
              "guard_temporal_consistency": 0.98}]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_training_report_has_the_curves_the_guards_and_the_videos(tmp_path):
    run = tmp_path / "run"
    _metrics(run)
    before = [(f"prompt {i}", _square_video(BASE_RGB), 0.1) for i in range(3)]
    after = [(f"prompt {i}", _square_video(LORA_RGB), 0.3) for i in range(3)]
    images, _ = _parse(training_report(run, before, after))
    assert [kind for kind, _ in images].count("plot") == 2  # reward (with gold) and guards
    assert [kind for kind, _ in images].count("video") == 6
    text = (run / "report.html").read_text()
    assert "0.7000 → 0.6000" in text  # the gold reward fell while the training reward rose: visible
    assert "0.1500" in text  # the base model's validation reward
    # without previews or validation rows the page still says what the run logged
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    images, _ = _parse(training_report(bare))
    assert [kind for kind, _ in images] == ["plot"]


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _screenshot(page: Path, out: Path, size: str = "1100,2400") -> np.ndarray:
    browser = _chromium()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           f"--screenshot={out}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def _pixels_near(shot: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(shot - np.array(rgb)).sum(-1) < tol).sum())


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (apt-get install chromium)")
def test_eval_report_renders_in_chromium(tmp_path):
    """As a person sees it: the plots' colours and both sides' videos are on the screenshot."""
    result, videos = _synthetic_eval(tmp_path / "eval")
    shot = _screenshot(eval_report(result, videos, fps=8), tmp_path / "shot.png")
    # each GIF is 192x192 with an 8x8 square of 16x16 -> 96x96 = 9216 pixels of its colour per video
    assert _pixels_near(shot, BASE_RGB) >= 4 * 9216 * 0.9
    assert _pixels_near(shot, LORA_RGB) >= 4 * 9216 * 0.9
    assert _pixels_near(shot, (31, 119, 180), tol=10) > 100  # matplotlib's tab:blue (LoRA markers, bars)
    assert _pixels_near(shot, (127, 127, 127), tol=10) > 100  # tab:gray (base)
    # and the same page with its images removed shows none of it: the check above sees the images
    stripped = tmp_path / "eval" / "noimages.html"
    stripped.write_text((tmp_path / "eval" / "report.html").read_text().replace("<img ", "<span "))
    bare = _screenshot(stripped, tmp_path / "bare.png")
    assert _pixels_near(bare, BASE_RGB) == 0 and _pixels_near(bare, LORA_RGB) == 0


# ---- guards and the gold reward during training -------------------------------------------------


def _rows(still: bool, n: int = 4) -> list:
    return [(f"prompt {i % 2}", _square_video(BASE_RGB, moving=not still), 0.0) for i in range(n)]


def test_each_validation_logs_guards_and_warns_once_the_reward_rises_while_motion_freezes(tiny_cfg, capsys):
    from vader.run import Run, make_accelerator

    cfg = tiny_cfg("--run_name", "guards")
    run = Run.create(cfg, make_accelerator(cfg), kind="train")
    run.log_validation(1, 0.20, [], gold=0.9, rows=_rows(still=False))  # the reference
    run.log_validation(2, 0.10, [], gold=0.8, rows=_rows(still=True))  # frozen but the reward fell: quiet
    run.log_validation(3, 0.50, [], gold=0.4, rows=_rows(still=True))  # frozen and the reward rose: warn
    run.log_validation(4, 0.60, [], rows=_rows(still=False))  # moving again
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["guard_motion"] > 0 and rows[1]["guard_motion"] == 0.0
    assert [r.get("val_gold_reward") for r in rows] == [0.9, 0.8, 0.4, None]
    assert ["guard_warning" in r for r in rows] == [False, False, True, False]
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "step 3" in err[0] and "since step 1" in err[0] and "motion" in err[0]
    # a resumed run keeps the first validation as its reference
    again = Run.create(cfg, make_accelerator(cfg), kind="train")
    again.keep_history_until(4)
    assert again.reference is not None and again.reference["step"] == 1
    assert again.reference["guards"]["motion"] == rows[0]["guard_motion"]


def test_training_logs_the_gold_reward_and_guards_and_writes_report(tiny_cfg):
    from vader.media import read_metrics
    from vader.train import train

    cfg = tiny_cfg("--run_name", "gold", "--max_train_steps", "2", "--validation_steps", "1", "--is_sample_preview", "True",
                   "--gold_reward", "brightness")
    assert cfg.reward_fn != "brightness"
    run = train(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    vals = [r for r in rows if "val_reward" in r]
    assert [r["step"] for r in vals] == [1, 2]
    for r in vals:
        assert np.isfinite(r["val_gold_reward"]) and np.isfinite(r["guard_motion"])
        assert 0 < r["guard_temporal_consistency"] <= 1
    base = [r for r in rows if "base_val_reward" in r]
    assert len(base) == 1 and np.isfinite(base[0]["base_val_gold_reward"])
    images, _ = _parse(run / "report.html")
    kinds = [kind for kind, _ in images]
    assert kinds.count("plot") == 2 and kinds.count("video") == 2 * cfg.num_val_runs * cfg.val_batch_size


@pytest.mark.parametrize("value, message", [
    ("nope", "gold_reward='nope'"),
    ("colorfulness", "is the training reward"),
    ("no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
])
def test_gold_reward_errors_are_one_line(tiny_cfg, value, message):
    from vader.errors import VaderError

    with pytest.raises(VaderError) as exc:
        tiny_cfg("--reward_fn", "colorfulness", "--gold_reward", value)
    assert message in str(exc.value) and "\n" not in str(exc.value)
