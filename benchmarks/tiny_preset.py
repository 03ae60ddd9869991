"""Figures for the built-in tiny preset: wall time, seconds per training step, first/last reward.

    python benchmarks/tiny_preset.py [extra overrides, e.g. --max_train_steps 60]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    start = time.perf_counter()
    from vader.config import load_config
    from vader.train import train

    imported = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "tiny" / "vader_train.py",
                          ["--project_dir", tmp, "--verbose", "0", *sys.argv[1:]])
        run = train(cfg)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    end = time.perf_counter()
    steps = [r for r in rows if "reward" in r]
    seconds = [r["step_seconds"] for r in steps]
    print(f"imports {imported - start:.1f} s | whole run {end - imported:.1f} s | {len(steps)} steps")
    print(f"seconds per step: median {statistics.median(seconds):.3f}, first {seconds[0]:.3f}")
    first = statistics.mean(r["reward"] for r in steps[:3])
    last = statistics.mean(r["reward"] for r in steps[-3:])
    print(f"reward: step 1 {steps[0]['reward']:.4f}, last {steps[-1]['reward']:.4f} "
          f"(mean of first 3 {first:.4f}, last 3 {last:.4f})")
    val = [r["val_reward"] for r in rows if "val_reward" in r]
    if val:
        print(f"validation reward at the end: {val[-1]:.4f}")


if __name__ == "__main__":
    main()
