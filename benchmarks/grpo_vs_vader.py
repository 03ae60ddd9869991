"""VADER (reward backprop) vs GRPO (Flow-GRPO policy gradient) on the toy world, judged by a model the
reward never saw: held-out judged accuracy against reward queries and training time, an lr sweep per
method, several seeds, bootstrap intervals.

    # runs (resumable: a finished run's JSON is skipped; with --claim several processes share one --out).
    # The committed sweep (grpo-g8 at 3e-2 ran seed 200 only; grpo-g4 and grpo-g8-2x seeds 200-201):
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_vader.py run --out benchmarks/grpo_vs_vader_results --claim \\
        --queries 768 --eval_queries 32 --seeds 200 201 202 --variants vader grpo-g8 \\
        --lrs vader=3e-4,1e-3,1e-4 grpo-g8=1e-3,3e-3,1e-2,3e-2
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_vader.py run --out benchmarks/grpo_vs_vader_results --claim \\
        --queries 768 --eval_queries 32 --seeds 200 201 --variants grpo-g8-2x grpo-g4 --lrs grpo-g8-2x=1e-2 grpo-g4=1e-2
    # the report: table.md, curves.png, summary.json from every run JSON in --out
    python benchmarks/grpo_vs_vader.py report --out benchmarks/grpo_vs_vader_results

The harness: the toy preset (configs/toy/vader_train.py, reward toy_alignment). Its 48 captions are split
into training prompts and held-out prompts (the last --heldout), which training never sees. Every run
starts from the same base and LoRA. A run stops after --queries reward queries (videos scored for
training) and is evaluated every --eval_queries queries, the same interval for every method: ODE samples
(what users generate) of every held-out prompt from fixed noise, scored by

- the judge (vader.toyworld.judge: another architecture, seed and augmentations than the reward's
  classifier, used by no reward): the share of the caption's five attributes it reads back, the gold
  measure the study decides on;
- the training reward (toy_alignment) on the same videos;
- diversity: --div_samples videos per held-out prompt from different noise, the mean RMS pixel
  difference between pairs (a collapse toward one video shows as a drop from the base model's).

Variants (VARIANTS): 'vader' (the preset: backprop through the last 3 of 12 steps), 'vader-full' (all
12 steps with checkpointing: AlignProp / DRaFT-full), and GRPO with Flow-GRPO's defaults at group sizes
a practitioner picks: 'grpo-g8' (8 videos per prompt, 4 prompts per round), 'grpo-g4' (4 per prompt, 8
prompts: the same 32 videos a round) and 'grpo-g8-2x' (grpo-g8 run for twice the queries).

Training seconds: runs share the cores with 1-3 others here, so the report prices each variant's queries at
its family's least-contended rate (the fastest run's seconds per query) rather than trusting wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# label -> (method, config overrides, grpo settings or None)
VARIANTS: dict[str, tuple[str, list[str], dict | None]] = {
    "vader": ("vader", [], None),
    "vader-full": ("vader", ["--backprop_mode", "12", "--grad_checkpoint", "True"], None),
    # 4 prompts x 8 videos = 32 videos per round, split into 2 optimizer steps (Flow-GRPO splits its
    # round into several; its recipes sample 12-24 per prompt, more than a 2-core CPU affords)
    "grpo-g8": ("grpo", ["--train_batch_size", "2", "--gradient_accumulation_steps", "2"], {"group_size": 8}),
    # the same 32 videos per round as 8 prompts x 4 videos: more prompts, a noisier group baseline
    # grpo-g8 with 2x the queries: does GRPO's judged level keep rising past the common budget?
    "grpo-g8-2x": ("grpo", ["--train_batch_size", "2", "--gradient_accumulation_steps", "2"], {"group_size": 8}),
    "grpo-g4": ("grpo", ["--train_batch_size", "2", "--gradient_accumulation_steps", "4"], {"group_size": 4}),
}

BUDGET = {"grpo-g8-2x": 2}  # variant -> multiple of --queries it runs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate the runs not done yet")
    run.add_argument("--out", required=True)
    run.add_argument("--config", default=str(REPO / "configs" / "toy" / "vader_train.py"))
    run.add_argument("--variants", nargs="+", default=["vader", "grpo-g8"], choices=sorted(VARIANTS))
    run.add_argument("--lrs", nargs="+", default=[], metavar="VARIANT=LR,LR",
                     help="learning rates per variant, e.g. vader=1e-4,3e-4 grpo-g8=1e-3")
    run.add_argument("--seeds", type=int, nargs="+", default=[200, 201, 202])
    run.add_argument("--queries", type=int, default=1024, help="reward queries per run")
    run.add_argument("--eval_queries", type=int, default=64, help="evaluate every N reward queries")
    run.add_argument("--heldout", type=int, default=12, help="the last N prompts are held out (never trained on)")
    run.add_argument("--div_samples", type=int, default=2)
    run.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th run from the i-th")
    run.add_argument("--claim", action="store_true",
                     help="with several processes on one --out: each takes the next run no other has claimed")
    run.add_argument("--grpo", default="{}", help="extra GRPO settings for every grpo variant (a dict literal)")
    rep = sub.add_parser("report", help="tables, curves and intervals from the runs in --out")
    rep.add_argument("--out", required=True)
    rep.add_argument("--bootstrap", type=int, default=2000)
    return p.parse_args()


# ---- one run --------------------------------------------------------------------------------------------


def build(args, variant: str, lr: float, seed: int, project: str):
    from vader.config import load_config
    from vader.run import Run, make_accelerator
    from vader.train import setup

    method, overrides, grpo = VARIANTS[variant]
    argv = ["--project_dir", project, "--verbose", "0", "--logger_type", "none", "--is_sample_preview", "False",
            "--checkpointing_steps", "0", "--lr", repr(lr), "--seed", str(seed), "--method", method, *overrides]
    if grpo is not None:
        argv += ["--grpo", repr({**grpo, **eval_literal(args.grpo)})]
    cfg = load_config(args.config, argv)
    accelerator = make_accelerator(cfg)
    return setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))


def eval_literal(text: str) -> dict:
    import ast

    value = ast.literal_eval(text)
    if not isinstance(value, dict):
        sys.exit(f"--grpo={text!r} must be a dict literal")
    return value


@torch.no_grad()
def evaluate(t, prompts: list[str], div_samples: int, judge) -> dict:
    """Judged accuracy (per attribute and mean), training reward and diversity of held-out ODE samples."""
    from vader.checkpoint import set_lora_dropout
    from vader.guards import guards

    set_lora_dropout(t.gen.denoiser, False)
    samples = [t.gen.generate(prompts, torch.Generator().manual_seed(10_000 + k)).cpu()
               for k in range(max(1, div_samples))]
    reward = t.reward(samples[0], t.gen.reward_prompts(prompts)).reward.float().mean().item()
    accuracy = judge(torch.cat(samples), prompts * len(samples))  # every sample judged: finer than 1 / prompts
    pairs = [((a - b) ** 2).mean(dim=(1, 2, 3, 4)).sqrt() for a, b in itertools.combinations(samples, 2)]
    # the run's own reward-hacking guards (vader.guards) on the same videos, one stack of seeds per prompt
    by_prompt = list(torch.stack(samples, dim=1).float())
    return {"reward": reward, "judge": statistics.mean(accuracy.values()), "judge_by_attribute": accuracy,
            "diversity": torch.stack(pairs).mean().item() if pairs else math.nan,
            **{f"guard_{k}": v for k, v in guards(by_prompt).items()}}


def make_judge():
    """judge(videos [B,3,T,H,W] in [-1, 1], captions) -> {attribute: share read back correctly}."""
    from vader.toyworld.judge import ToyJudge, judge_accuracy

    judge = ToyJudge.from_pretrained()
    return lambda videos, captions: judge_accuracy(judge, videos, captions)


def run_one(args, variant: str, lr: float, seed: int, judge) -> dict:
    from vader.methods.grpo import grpo_step
    from vader.methods.vader import train_step

    method = VARIANTS[variant][0]
    with tempfile.TemporaryDirectory() as project:
        t = build(args, variant, lr, seed, project)
        prompts = t.run.prompts
        train_prompts, heldout = prompts[: -args.heldout], prompts[-args.heldout:]
        curve = [{"step": 0, "queries": 0, "seconds": 0.0, **evaluate(t, heldout, args.div_samples, judge)}]
        queries, seconds, step, next_eval = 0, 0.0, 0, args.eval_queries
        budget = args.queries * BUDGET.get(variant, 1)
        while queries < budget:
            start = time.perf_counter()
            if method == "grpo":
                result = grpo_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, train_prompts, step)
                queries += result.reward_queries
            else:
                train_step(t.gen, t.reward, t.optimizer, t.params, t.cfg, t.accelerator, train_prompts, step)
                queries += t.cfg.train_batch_size * t.cfg.gradient_accumulation_steps
            seconds += time.perf_counter() - start
            step += 1
            if queries >= next_eval or queries >= budget:
                point = {"step": step, "queries": queries, "seconds": seconds,
                         **evaluate(t, heldout, args.div_samples, judge)}
                curve.append(point)
                next_eval = (queries // args.eval_queries + 1) * args.eval_queries
                print(f"{variant} lr={lr:g} seed={seed} step {step}: judge {point['judge']:.3f} reward "
                      f"{point['reward']:.3f} ({queries} queries, {seconds:.0f} s)", flush=True)
    return {"variant": variant, "method": method, "lr": lr, "seed": seed, "queries_per_run": budget,
            "eval_queries": args.eval_queries, "heldout": heldout, "curve": curve,
            "grpo": {**(VARIANTS[variant][2] or {}), **eval_literal(args.grpo)} if method == "grpo" else None}


def run_file(out: Path, variant: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{variant}_lr{lr:g}_seed{seed}.json"


def run_all(args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    lrs: dict[str, list[float]] = {}
    for item in args.lrs:
        name, _, values = item.partition("=")
        lrs[name] = [float(v) for v in values.split(",") if v]
    # in the order given: each variant's first lr (the one expected best) over every seed first, so that a
    # study cut short still compares the methods
    todo = sorted(((v, lr, s) for v in args.variants for lr in lrs.get(v, [3e-4]) for s in args.seeds),
                  key=lambda x: (lrs.get(x[0], [3e-4]).index(x[1]), args.seeds.index(x[2]), args.variants.index(x[0])))
    index, count = (int(x) for x in args.shard.split("/"))
    judge = make_judge()
    for k, (variant, lr, seed) in enumerate(todo):
        path = run_file(out, variant, lr, seed)
        if k % count != index or path.exists():
            continue
        if args.claim:  # processes sharing --out take the next unclaimed run (a killed one leaves its .claim)
            try:
                os.close(os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
        result = run_one(args, variant, lr, seed, judge)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)  # a killed run leaves no half-written result
        path.with_suffix(".claim").unlink(missing_ok=True)


# ---- the report ---------------------------------------------------------------------------------------------


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


LAST = 4  # evaluations averaged for a run's end level: the last 4 x 32 = 128 queries


def tail(run: dict, key: str) -> float:
    return statistics.mean(p[key] for p in run["curve"][-LAST:])


def guard_cell(runs: list[dict]) -> str:
    """The seed-mean guards (vader.guards) at the base and at the end; runs recorded before the study
    logged them show '—'."""
    if not all("guard_motion" in r["curve"][0] for r in runs):
        return "—"
    mean = lambda i, k: statistics.mean(r["curve"][i][f"guard_{k}"] for r in runs)  # noqa: E731
    return " / ".join(f"{mean(0, k):.3g} -> {mean(-1, k):.3g}" for k in ("motion", "temporal_consistency", "diversity"))


def mean_curve(runs: list[dict], key: str = "judge") -> list[tuple[float, float]]:
    """(queries, seed-mean of `key`) at each evaluation (every run of one setting evaluates at the same queries)."""
    return [(points[0]["queries"], statistics.mean(p[key] for p in points)) for points in zip(*(r["curve"] for r in runs))]


def first_reaching(curve: list[tuple[float, float]], level: float) -> float | None:
    """The first evaluation after training began (queries > 0) at or above `level`."""
    return next((q for q, v in curve if q > 0 and v >= level - 1e-12), None)


def best_level(curve: list[tuple[float, float]]) -> float:
    """The highest seed-mean level a curve reaches after training began."""
    return max(v for q, v in curve if q > 0)


def interval(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[int(0.025 * (len(xs) - 1))], xs[int(0.975 * (len(xs) - 1))]


def report(args) -> None:
    out = Path(args.out)
    runs = load_runs(out)
    if not runs:
        sys.exit(f"no runs in {out / 'runs'}")
    rate = rates(runs)
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    # each setting is ranked by its judged accuracy over the last LAST evaluations (one point is noisy)
    final = {key: statistics.mean(tail(r, "judge") for r in rs) for key, rs in groups.items()}
    variants = sorted({v for v, _ in groups})
    best = {v: max((lr for vv, lr in groups if vv == v), key=lambda lr, v=v: final[(v, lr)]) for v in variants}
    base = statistics.mean(r["curve"][0]["judge"] for r in runs)
    base_reward = statistics.mean(r["curve"][0]["reward"] for r in runs)
    base_div = statistics.mean(r["curve"][0]["diversity"] for r in runs)
    lines = [f"Held-out judged accuracy (the judge's share of the caption's 5 attributes read back, on "
             f"{len(runs[0]['heldout'])} held-out prompts; mean over seeds, min-max in brackets). Base model: judge "
             f"{base:.3f}, training reward {base_reward:.3f}, diversity {base_div:.4f}.", "",
             f"| variant | lr | seeds | judge (last {LAST} evals) | reward (last {LAST}) | final diversity | queries | "
             "train seconds (priced) | guards: motion / consistency / diversity, base -> end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (variant, lr), rs in sorted(groups.items()):
        ends = [r["curve"][-1] for r in rs]
        judged = [tail(r, "judge") for r in rs]
        lrs = sorted(lr for v, lr in groups if v == variant)
        mark = ""
        if best[variant] == lr:
            mark = " (best" + (", at the edge of the range" if lr in (lrs[0], lrs[-1]) and len(lrs) > 1 else "") + ")"
        lines.append(f"| {variant} | {lr:g}{mark} | {len(rs)} | {statistics.mean(judged):.3f} "
                     f"[{min(judged):.3f}-{max(judged):.3f}] | {statistics.mean(e['reward'] for e in ends):.3f} | "
                     f"{statistics.mean(e['diversity'] for e in ends):.4f} | {ends[0]['queries']} | "
                     f"{ends[0]['queries'] * rate[variant]:.0f} | {guard_cell(rs)} |")
    summary: dict = {"base_judge": base, "best_lr": best, "final_judge": {f"{v}@{lr:g}": x for (v, lr), x in final.items()}}
    grpos = [v for v in variants if v.startswith("grpo")]
    vaders = [v for v in variants if v.startswith("vader")]
    if grpos and vaders:
        # the deciding number against every GRPO setting (its best lr), the best first; the training reward,
        # secondary, against the best setting at VADER's budget
        budget = max(groups[(v, best[v])][0]["queries_per_run"] for v in vaders)
        ranked = sorted(grpos, key=lambda v: -final[(v, best[v])])
        common = [v for v in ranked if groups[(v, best[v])][0]["queries_per_run"] == budget]
        for g in ranked:
            lines += decide(groups, best, g, vaders, "judge", "judged held-out accuracy (the gold measure)",
                            summary, args.bootstrap, rate)
        for g in common[:1]:
            lines += decide(groups, best, g, vaders, "reward", "held-out training reward (toy_alignment; secondary)",
                            summary, args.bootstrap, rate)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(lines))
    plot(groups, best, out / "curves.png")


def decide(groups: dict, best: dict, g: str, vaders: list[str], key: str, what: str,
           summary: dict, bootstrap: int, rate: dict[str, float]) -> list[str]:
    """The deciding number on `key`: reward queries for each variant (at its best lr) to reach the best level
    GRPO setting `g` (at its best lr) reaches, with 95% bootstrap intervals over seeds (the level recomputed
    per resample)."""
    rng = random.Random(0)
    g_runs = groups[(g, best[g])]
    level = best_level(mean_curve(g_runs, key))
    g_q = first_reaching(mean_curve(g_runs, key), level)
    g_base = statistics.mean(r["curve"][0][key] for r in g_runs)
    lines = ["", f"**{what}, against {g}.** Its best level: {level:.3f} (lr {best[g]:g}, {len(g_runs)} seed(s), "
             f"{g_runs[0]['queries_per_run']} queries a run; seed mean; its base {g_base:.3f}), first reached at {g_q} queries ({_price(rate, g, g_q):.0f} s)."]
    if level <= g_base:
        lines[-1] += (" GRPO never rose above its base model here after training began, so the table only says "
                      "when each method first matched that level.")
    lines += ["Queries (and training seconds, priced as above) for each variant at its best lr to reach it; 95% bootstrap "
              "intervals over seeds; '>N' = not reached within the run's N queries (a ratio of 0.0 in an interval: some resamples never reach it):", "",
              "| variant | queries to GRPO's best level | 95% interval | seconds | GRPO's queries / these |",
              "|---|---|---|---|---|"]
    out = summary.setdefault(f"queries_to_grpo_best_{key}", {}).setdefault(g, {
        "grpo": {"lr": best[g], "level": level, "base": g_base, "queries": g_q, "seeds": len(g_runs),
                 "queries_per_run": g_runs[0]["queries_per_run"]}})
    for v in sorted(vaders) + [g]:
        rs = groups[(v, best[v])]
        q = first_reaching(mean_curve(rs, key), level)
        boots = []
        for _ in range(bootstrap):
            sample_g = [rng.choice(g_runs) for _ in g_runs]
            sample_v = sample_g if v == g else [rng.choice(rs) for _ in rs]
            lv = best_level(mean_curve(sample_g, key))
            q_v, q_g = first_reaching(mean_curve(sample_v, key), lv), first_reaching(mean_curve(sample_g, key), lv)
            boots.append((q_v if q_v is not None else math.inf, q_g))
        lo, hi = interval([b[0] for b in boots])
        rlo, rhi = interval([b[1] / b[0] if math.isfinite(b[0]) and b[0] > 0 else 0.0 for b in boots])
        if q:
            lines.append(f"| {v} (lr {best[v]:g}) | {q} | {_show(lo)}-{_show(hi)} | {_price(rate, v, q):.0f} | "
                         f"{g_q / q:.1f}x [{rlo:.1f}-{rhi:.1f}] |")
        else:
            lines.append(f"| {v} (lr {best[v]:g}) | >{rs[0]['queries_per_run']} | {_show(lo)}-{_show(hi)} | — | — |")
        out[v] = {"queries": q, "interval": [_finite(lo), _finite(hi)],  # null: never reached in a resample
                  "grpo_over_this": [g_q / q if q else None, rlo, rhi]}
    return lines


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _show(x: float) -> str:
    return ">max" if math.isinf(x) else f"{x:.0f}"


# Runs shared the 2 cores with 1-3 others, so a run's wall seconds say as much about its neighbours as about
# its method. Training seconds are priced instead at each family's least-contended rate (its fastest run's
# seconds per query); GRPO variants sample and train 32 videos a round alike and share grpo-g8's rate.
RATE_FAMILY = {"grpo-g8-2x": "grpo-g8", "grpo-g4": "grpo-g8"}


def _price(rate: dict[str, float], variant: str, queries: float | None) -> float:
    return math.nan if queries is None else queries * rate[variant]


def rates(runs: list[dict]) -> dict[str, float]:
    """variant -> training seconds per reward query (its family's fastest run)."""
    fastest: dict[str, float] = {}
    for r in runs:
        family = RATE_FAMILY.get(r["variant"], r["variant"])
        end = r["curve"][-1]
        fastest[family] = min(fastest.get(family, math.inf), end["seconds"] / end["queries"])
    return {r["variant"]: fastest[RATE_FAMILY.get(r["variant"], r["variant"])] for r in runs}


def plot(groups: dict, best: dict, path: Path) -> None:
    from vader.media import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (variant, lr), rs in sorted(groups.items()):
        if best[variant] != lr:
            continue
        for ax, x, key in ((axes[0], "queries", "judge"), (axes[1], "queries", "reward"), (axes[2], "queries", "diversity")):
            points = list(zip(*(r["curve"] for r in rs)))
            xs = [statistics.mean(p[x] for p in pts) for pts in points]
            ys = [statistics.mean(p[key] for p in pts) for pts in points]
            lo = [min(p[key] for p in pts) for pts in points]
            hi = [max(p[key] for p in pts) for pts in points]
            line, = ax.plot(xs, ys, "-o", ms=3, label=f"{variant} lr {lr:g} ({len(rs)} seeds)")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    for ax, (xl, yl) in zip(axes, (("reward queries", "held-out judged accuracy"),
                                   ("reward queries", "held-out training reward (toy_alignment)"),
                                   ("reward queries", "diversity (RMS pixel difference between samples)"))):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("best lr per variant: seed mean, band = min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    if args.command == "run":
        run_all(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
