"""The VADER-vs-GRPO study's report (benchmarks/grpo_vs_vader.py) on synthetic runs: the deciding number,
its bootstrap interval, the lr-edge flag and the priced seconds come out of the curves as defined."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("grpo_vs_vader", REPO / "benchmarks" / "grpo_vs_vader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(variant: str, lr: float, seed: int, judged: list[float], seconds_per_query: float, every: int = 32) -> dict:
    curve = [{"queries": k * every, "seconds": k * every * seconds_per_query, "judge": j, "reward": -3 + j,
              "diversity": 1.0 - 0.1 * k} for k, j in enumerate(judged)]
    return {"variant": variant, "method": variant.split("-")[0], "lr": lr, "seed": seed,
            "queries_per_run": curve[-1]["queries"], "eval_queries": every, "heldout": ["a", "b"], "curve": curve}


def test_queries_to_grpo_best_level_and_the_edge_flag(study, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    base = 0.5
    # GRPO's best lr peaks at 0.6 at 128 queries (both seeds); VADER passes 0.6 at 32 queries on both seeds
    settings = {
        ("grpo-g8", 1e-3): [[base, 0.52, 0.55, 0.58, 0.60, 0.59], [base, 0.52, 0.56, 0.57, 0.60, 0.60]],
        ("grpo-g8", 3e-3): [[base, 0.40, 0.40, 0.40, 0.40, 0.40]] * 2,
        ("vader", 1e-4): [[base, 0.55, 0.55, 0.55, 0.55, 0.55]] * 2,
        ("vader", 3e-4): [[base, 0.62, 0.65, 0.66, 0.66, 0.67], [base, 0.61, 0.64, 0.66, 0.66, 0.66]],
        ("vader", 1e-3): [[base, 0.58, 0.60, 0.60, 0.60, 0.60]] * 2,
    }
    for (variant, lr), curves in settings.items():
        for seed, judged in enumerate(curves):
            rate = 0.5 if variant == "vader" else 0.25 + 0.25 * seed  # GRPO's fastest run: 0.25 s a query
            (runs / f"{variant}_lr{lr:g}_seed{seed}.json").write_text(json.dumps(_run(variant, lr, seed, judged, rate)))
    study.report(Namespace(out=str(tmp_path), bootstrap=200))
    table = (tmp_path / "table.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_lr"] == {"grpo-g8": 1e-3, "vader": 3e-4}
    assert "| grpo-g8 | 0.001 (best, at the edge of the range) | 2 |" in table  # the sweep must go lower
    assert "| vader | 0.0003 (best) | 2 |" in table  # inside its range: no flag
    judged = summary["queries_to_grpo_best_judge"]["grpo-g8"]
    assert judged["grpo"]["level"] == pytest.approx(0.60) and judged["grpo"]["queries"] == 128
    assert judged["vader"]["queries"] == 32 and judged["vader"]["grpo_over_this"][0] == pytest.approx(4.0)
    assert judged["vader"]["interval"] == [32, 32]  # every resample: VADER first eval already above 0.60
    # seconds priced at the family's fastest rate, not each run's own (contended) wall time
    assert "| vader (lr 0.0003) | 32 | 32-32 | 16 | 4.0x" in table
    assert "first reached at 128 queries (32 s)" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_a_grpo_that_never_beats_its_base_is_said(study, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed in range(2):
        (runs / f"grpo-g8_lr0.001_seed{seed}.json").write_text(json.dumps(_run("grpo-g8", 1e-3, seed, [0.5, 0.45, 0.48], 0.3)))
        (runs / f"vader_lr0.0003_seed{seed}.json").write_text(json.dumps(_run("vader", 3e-4, seed, [0.5, 0.4, 0.7], 0.3)))
    study.report(Namespace(out=str(tmp_path), bootstrap=50))
    table = (tmp_path / "table.md").read_text()
    assert "GRPO never rose above its base model" in table
    assert "| vader (lr 0.0003) | 64 |" in table  # 0.40 at 32 queries is below GRPO's best 0.48
