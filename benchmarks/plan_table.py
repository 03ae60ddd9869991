"""The README's memory table: Open-Sora v1.2 VADER training and inference planned by `vader plan`.

    HF_HUB_OFFLINE=1 python benchmarks/plan_table.py [--budget 24GiB] [--out benchmarks/plan_table.md]

For each resolution x length: the original VADER-Open-Sora settings (its config: reference math
attention, T5 fp32 on the GPU, grad_checkpoint, backprop 'last', one random decoded frame, HPS, bf16),
vader's defaults (the same config with fused attention), and what `vader plan --fit` adds to fit the
budget. Figures are tensor bytes from fake-tensor plans (no GPU involved); add ~1-2 GiB for the CUDA
context and allocator slack.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vader.plan import GIB, fit, make_plan, parse_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "opensora-v1-2" / "vader" / "vader_train.py")
SIZES = [(r, n) for r in ("240p", "360p", "480p", "720p") for n in ("2s", "4s")]
ORIGINAL = ["--model.attention", "math"]


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plan_table.md"))
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    from vader.config import load_config

    rows = []
    start = time.time()
    for resolution, length in SIZES:
        base = ["--resolution", resolution, "--num-frames", length, "--aspect-ratio", "9:16"]
        original = make_plan(load_config(CONFIG, [*base, *ORIGINAL]))
        default = make_plan(load_config(CONFIG, base))
        fitted = fit(CONFIG, base, budget, tflops=989, mfu=0.35)
        flags = " ".join(f"`--{k} {v}`" for k, v in fitted.overrides) or "(none)"
        fit_peak = gib(fitted.plan.peak) if fitted.plan else "does not fit"
        cfg = default.cfg
        h, w = cfg.height_width
        rows.append(f"| {resolution} {length} ({h}x{w}, {cfg.frames} frames) | {gib(original.train.peak)} / "
                    f"{gib(original.peak)} | {gib(default.train.peak)} / {gib(default.peak)} | {flags} | {fit_peak} | "
                    f"{gib(default.infer.peak)} | {default.train.total_flops / 1e12:,.0f} |")
        print(rows[-1], f"({time.time() - start:.0f}s)", flush=True)
    table = "\n".join([
        f"| size | original settings: step / run peak (GiB) | vader defaults: step / run peak | `--fit {args.budget}` "
        "adds | fitted peak | inference peak | TFLOP per step |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
