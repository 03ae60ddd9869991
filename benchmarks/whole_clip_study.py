"""Does a reward that watches the whole clip move motion where a single-frame reward cannot? The toy
world's answer, judged by the independent judge (vader.toyworld.judge), never by the reward's classifier.

    OMP_NUM_THREADS=1 python benchmarks/whole_clip_study.py run --out benchmarks/whole_clip_results
    python benchmarks/whole_clip_study.py report --out benchmarks/whole_clip_results

Conditions (CONDITIONS), each the quick-start preset (configs/toy/vader_train.py: lr 6e-4, 120 steps,
backprop through the last 3 of 12 steps) with another reward / decode:

- 'clip-all': toy_alignment on every frame (decode_frame='all', 17 frames): the whole-clip reward;
- 'clip-alt': toy_alignment on every other frame ('alt', 9 frames): a strided subset;
- 'frame': toy_frame, the same classifier's shape, colour, size and background on one random frame
  (decode_frame='-1'): what an image reward (HPS, PickScore, aesthetic) sees. It cannot read motion.

Training prompts are the preset's captions but the last --heldout, which are judged: the judge's
accuracy per attribute (motion is the one that needs a clip), base vs LoRA, mean over seeds with the
seeds' min-max, plus diversity (mean RMS pixel difference between videos of one prompt from different
noise, which falls when a run collapses to one video).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_vs_vader import evaluate, make_judge  # noqa: E402  (the same held-out evaluation as the GRPO study)

REPO = Path(__file__).resolve().parents[1]
CONDITIONS: dict[str, list[str]] = {
    "clip-all": ["--reward_fn", "toy_alignment", "--decode_frame", "all"],
    "clip-alt": ["--reward_fn", "toy_alignment", "--decode_frame", "alt"],
    "frame": ["--reward_fn", "toy_frame", "--decode_frame", "-1"],
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True)
    run.add_argument("--config", default=str(REPO / "configs" / "toy" / "vader_train.py"))
    run.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    run.add_argument("--seeds", type=int, nargs="+", default=[200, 201, 202])
    run.add_argument("--steps", type=int, default=120)
    run.add_argument("--heldout", type=int, default=12)
    run.add_argument("--div_samples", type=int, default=4, help="samples per held-out prompt (all judged)")
    run.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th run from the i-th")
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    return p.parse_args()


def run_one(args, condition: str, seed: int, judge) -> dict:
    from vader.config import load_config
    from vader.methods.vader import train_step
    from vader.run import Run, make_accelerator
    from vader.train import setup

    with tempfile.TemporaryDirectory() as project:
        argv = ["--project_dir", project, "--verbose", "0", "--logger_type", "none", "--is_sample_preview", "False",
                "--checkpointing_steps", "0", "--seed", str(seed), "--gold_reward", "None", *CONDITIONS[condition]]
        cfg = load_config(args.config, argv)
        accelerator = make_accelerator(cfg)
        t = setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))
        prompts = t.run.prompts
        train_prompts, heldout = prompts[: -args.heldout], prompts[-args.heldout:]
        judged = evaluate_with_clip_reward(t, heldout, args.div_samples, judge)
        before = judged
        start = time.perf_counter()
        for step in range(args.steps):
            train_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, train_prompts, step)
        seconds = time.perf_counter() - start
        after = evaluate_with_clip_reward(t, heldout, args.div_samples, judge)
    print(f"{condition} seed {seed}: judge {before['judge']:.3f} -> {after['judge']:.3f}, motion "
          f"{before['judge_by_attribute']['motion']:.3f} -> {after['judge_by_attribute']['motion']:.3f} ({seconds:.0f} s)",
          flush=True)
    return {"condition": condition, "seed": seed, "steps": args.steps, "seconds": seconds, "heldout": heldout,
            "before": before, "after": after}


def evaluate_with_clip_reward(t, prompts, div_samples, judge) -> dict:
    """evaluate(), with the training reward's column meaning the same in every condition: toy_alignment on
    the whole clip (a 'frame' run's own reward is the single-frame one)."""
    from vader.rewards import build_reward

    if not hasattr(t, "_clip_reward"):
        t._clip_reward = build_reward("toy_alignment")
    own, t.reward = t.reward, t._clip_reward
    try:
        return evaluate(t, prompts, div_samples, judge)
    finally:
        t.reward = own


def run_all(args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    index, count = (int(x) for x in args.shard.split("/"))
    judge = make_judge()
    todo = [(c, s) for c in args.conditions for s in args.seeds]
    for k, (condition, seed) in enumerate(todo):
        path = out / "runs" / f"{condition}_seed{seed}.json"
        if k % count != index or path.exists():
            continue
        result = run_one(args, condition, seed, judge)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)


def report(args) -> None:
    out = Path(args.out)
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        sys.exit(f"no runs in {out / 'runs'}")
    attributes = list(runs[0]["before"]["judge_by_attribute"])
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["condition"], []).append(r)
    base = {a: statistics.mean(r["before"]["judge_by_attribute"][a] for r in runs) for a in attributes}
    lines = [f"Judged accuracy on {len(runs[0]['heldout'])} held-out captions, base model vs LoRA after "
             f"{runs[0]['steps']} steps (mean over seeds, min-max in brackets); judge: vader.toyworld.judge, not the "
             "reward's classifier. 'clip reward' = toy_alignment on the whole clip for every condition.", "",
             "| condition | seeds | " + " | ".join(attributes) + " | mean | clip reward | diversity |",
             "|---|---|" + "---|" * (len(attributes) + 3),
             "| base model | | " + " | ".join(f"{base[a]:.3f}" for a in attributes) +
             f" | {statistics.mean(r['before']['judge'] for r in runs):.3f} | "
             f"{statistics.mean(r['before']['reward'] for r in runs):.3f} | "
             f"{statistics.mean(r['before']['diversity'] for r in runs):.4f} |"]
    for condition in [c for c in CONDITIONS if c in by]:
        rs = by[condition]

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]"

        lines.append(f"| {condition} | {len(rs)} | " +
                     " | ".join(cell([r["after"]["judge_by_attribute"][a] for r in rs]) for a in attributes) +
                     f" | {cell([r['after']['judge'] for r in rs])} | {cell([r['after']['reward'] for r in rs])} | "
                     f"{statistics.mean(r['after']['diversity'] for r in rs):.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse()
    run_all(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
