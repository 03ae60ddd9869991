"""VADER (reward backprop) vs GRPO (policy gradient) on one harness: held-out reward against reward
queries and against wall time, several training seeds, an lr sweep per method, and sample diversity.

    python benchmarks/grpo_vs_vader.py --out benchmarks/grpo_vs_vader  [--steps 120 --seeds 200 201 202 ...]

Defaults are the study on the toy world (configs/toy/vader_train.py, reward toy_alignment): its 48
captions are split into training prompts and held-out prompts (--heldout, the last ones), which
training never sees. Every method starts from the same base and LoRA (rank from the config).
Methods: vader-last (backprop_mode 'last'), vader-rand ('rand') and grpo (vader.methods.grpo, Flow-GRPO's
defaults unless --group_size/--noise_level say otherwise). Held-out reward: ODE samples (what users
generate) of every held-out prompt from fixed noise, scored on the whole clip. Diversity: for each
held-out prompt, --div_samples videos from different noise; the RMS pixel difference between pairs,
averaged (lower = more alike; a collapse toward one video shows as a drop from the base model's).

Writes <out>/curves.json, <out>/curves.png and <out>/table.md; `--merge DIR...` reports the runs of
several earlier --out folders together (methods run as parallel processes, one thread each). Wall time counts training only
(evaluation excluded), on whatever machine runs it: compare methods within one run of the script.
`--config configs/tiny/vader_train.py --reward_fn brightness` gives a smoke run in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("vader-last", "vader-rand", "grpo")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "toy" / "vader_train.py"))
    p.add_argument("--reward_fn", default=None, help="override the config's reward")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[200, 201, 202])
    p.add_argument("--vader_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--grpo_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--group_size", type=int, default=4)
    p.add_argument("--noise_level", type=float, default=0.7)
    p.add_argument("--heldout", type=int, default=12, help="the last N prompts are held out (never trained on)")
    p.add_argument("--div_samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="only report: the runs of these earlier --out folders together (e.g. methods run as two "
                        "processes side by side), written to --out")
    p.add_argument("--overrides", nargs=argparse.REMAINDER, default=[], help="extra config overrides, last")
    return p.parse_args()


def build(args, method: str, lr: float, seed: int, project: str):
    from vader.config import load_config
    from vader.run import Run, make_accelerator
    from vader.train import setup

    argv = ["--project_dir", project, "--verbose", "0", "--logger_type", "none", "--is_sample_preview", "False",
            "--checkpointing_steps", "0", "--lr", repr(lr), "--seed", str(seed), "--max_train_steps", str(args.steps)]
    if args.reward_fn:
        argv += ["--reward_fn", args.reward_fn]
    if method.startswith("vader-"):
        argv += ["--backprop_mode", method.split("-", 1)[1]]
    cfg = load_config(args.config, argv + args.overrides)
    accelerator = make_accelerator(cfg)
    return setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))


@torch.no_grad()
def evaluate(t, prompts: list[str], div_samples: int) -> tuple[float, float]:
    """(mean held-out reward of ODE samples from fixed noise, mean pairwise RMS pixel difference)."""
    from vader.checkpoint import set_lora_dropout

    set_lora_dropout(t.gen.denoiser, False)
    samples = [t.gen.generate(prompts, torch.Generator().manual_seed(10_000 + k)).cpu()
               for k in range(max(1, div_samples))]
    reward = t.reward(samples[0], t.gen.reward_prompts(prompts)).reward.float().mean().item()
    pairs = [((a - b) ** 2).mean(dim=(1, 2, 3, 4)).sqrt() for a, b in itertools.combinations(samples, 2)]
    return reward, torch.stack(pairs).mean().item() if pairs else float("nan")


def run_one(args, method: str, lr: float, seed: int) -> dict:
    from vader.methods.grpo import GRPOSettings, grpo_step
    from vader.methods.vader import train_step

    with tempfile.TemporaryDirectory() as project:
        t = build(args, method, lr, seed, project)
        prompts = t.run.prompts
        if args.heldout >= len(prompts):
            sys.exit(f"--heldout {args.heldout} leaves no training prompt of {len(prompts)}")
        train_prompts, heldout = prompts[: -args.heldout], prompts[-args.heldout:]
        settings = GRPOSettings(group_size=args.group_size, noise_level=args.noise_level)
        reward, diversity = evaluate(t, heldout, args.div_samples)
        curve = [{"step": 0, "queries": 0, "seconds": 0.0, "reward": reward, "diversity": diversity}]
        queries, seconds = 0, 0.0
        for step in range(args.steps):
            start = time.perf_counter()
            if method == "grpo":
                result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, train_prompts, step,
                                   settings)
                queries += result.reward_queries
            else:
                train_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, train_prompts, step)
                queries += t.cfg.train_batch_size * t.cfg.gradient_accumulation_steps
            seconds += time.perf_counter() - start
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                reward, diversity = evaluate(t, heldout, args.div_samples)
                curve.append({"step": step + 1, "queries": queries, "seconds": seconds, "reward": reward,
                              "diversity": diversity})
                print(f"{method} lr={lr:g} seed={seed} step {step + 1}: held-out reward {reward:.4f} "
                      f"({queries} queries, {seconds:.0f} s)", flush=True)
    return {"method": method, "lr": lr, "seed": seed, "curve": curve}


def mean_curve(runs: list[dict]) -> list[dict]:
    """Average over seeds, point by point (every run of one method and lr logs the same steps);
    reward_std is the seeds' spread of the gain over their own step-0 reward."""
    out = []
    starts = [r["curve"][0]["reward"] for r in runs]
    for points in zip(*(r["curve"] for r in runs)):
        rewards = [p["reward"] for p in points]
        gains = [p["reward"] - s for p, s in zip(points, starts)]  # spread of the gain, not of the seeds' bases
        out.append({"step": points[0]["step"], "queries": statistics.mean(p["queries"] for p in points),
                    "seconds": statistics.mean(p["seconds"] for p in points), "reward": statistics.mean(rewards),
                    "reward_std": statistics.pstdev(gains), "diversity": statistics.mean(p["diversity"] for p in points)})
    return out


def first_reaching(curve: list[dict], level: float) -> dict | None:
    return next((p for p in curve if p["reward"] >= level), None)


def report(args, runs: list[dict], out: Path) -> None:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    curves = {key: mean_curve(value) for key, value in groups.items()}
    best = {}  # per method, the lr with the highest final mean held-out reward
    for (method, lr), curve in curves.items():
        if method not in best or curve[-1]["reward"] > curves[(method, best[method])][-1]["reward"]:
            best[method] = lr
    base = statistics.mean(c[0]["reward"] for c in curves.values())
    base_div = statistics.mean(c[0]["diversity"] for c in curves.values())
    lines = [f"Held-out reward (mean ± std over seeds {', '.join(map(str, args.seeds))}; base model {base:.4f}, "
             f"base diversity {base_div:.4f}; ± is the seeds' std of the gain over the base); every method at every lr:", "",
             "| method | lr | final held-out reward | reward queries | train seconds | diversity |",
             "|---|---|---|---|---|---|"]
    for (method, lr), curve in sorted(curves.items()):
        end = curve[-1]
        mark = " (best)" if best.get(method) == lr else ""
        lines.append(f"| {method} | {lr:g}{mark} | {end['reward']:.4f} ± {end['reward_std']:.4f} | "
                     f"{end['queries']:.0f} | {end['seconds']:.0f} | {end['diversity']:.4f} |")
    if "grpo" in best:
        target = curves[("grpo", best["grpo"])][-1]["reward"]
        levels = [base + f * (target - base) for f in (0.25, 0.5, 0.75, 1.0)]
        lines += ["", "Reward queries (and training seconds) until the seed-mean held-out reward first reaches a "
                  "level, at each method's best lr; levels are fractions of the way from the base model to GRPO's "
                  "final reward (100% = GRPO's final; a level at or below the base counts as reached at 0); — = not reached:", "",
                  "| method | " + " | ".join(f"{int(f * 100)}% ({lv:.4f})" for f, lv in
                                             zip((0.25, 0.5, 0.75, 1.0), levels)) + " |",
                  "|---|" + "---|" * len(levels)]
        for method, lr in sorted(best.items()):
            cells = []
            for level in levels:
                hit = first_reaching(curves[(method, lr)][1:], level) if level > base else curves[(method, lr)][0]
                cells.append(f"{hit['queries']:.0f} q, {hit['seconds']:.0f} s" if hit else "—")
            lines.append(f"| {method} (lr {lr:g}) | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, best, out / "curves.png")


def plot(curves: dict, best: dict, path: Path) -> None:
    from vader.media import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, lr), curve in sorted(curves.items()):
        style = "-" if best.get(method) == lr else ":"
        for ax, x in zip(axes, ("queries", "seconds")):
            xs = [p[x] for p in curve]
            ys = [p["reward"] for p in curve]
            sd = [p["reward_std"] for p in curve]
            line, = ax.plot(xs, ys, style, label=f"{method} lr {lr:g}")
            if style == "-":
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("reward queries")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("held-out reward (seed mean)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=10)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        loaded = [json.loads((Path(d) / "curves.json").read_text()) for d in args.merge]
        args.seeds = sorted({seed for data in loaded for seed in data["args"]["seeds"]})
        runs = [run for data in loaded for run in data["runs"]]
        (out / "curves.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
        report(args, runs, out)
        return
    runs = []
    for method in args.methods:
        for lr in args.grpo_lrs if method == "grpo" else args.vader_lrs:
            for seed in args.seeds:
                runs.append(run_one(args, method, lr, seed))
                (out / "curves.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    report(args, runs, out)


if __name__ == "__main__":
    main()
