"""report.html: one self-contained page per training run and per `vader eval`.

Everything the page shows is inside the file: plots are matplotlib PNGs and videos are animated GIFs,
both as data URIs, so the page can be mailed, attached to an issue or opened from a laptop after
copying one file. Links to the full-quality mp4s (relative to the page) sit beside each GIF.

    training: <run>/report.html   reward curve with validation (and gold) rewards, guards at every
                                  validation, base-vs-LoRA videos of the same seeds
    eval:     <eval>/report.html  reward table with 95% intervals and win rates, guards, per-prompt
                                  rows, base-vs-LoRA videos of the same seeds
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vader.guards import GUARD_NAMES, guard_drops
from vader.media import finite_number, pyplot, read_metrics, reward_curve_points, to_uint8

GIF_SIDE = 192  # longest side of a GIF in the page: enough to judge a video, small enough to inline 16 of them
GIF_FRAMES = 32  # at most this many frames per GIF (longer videos are subsampled evenly)
MAX_PAIRS = 12  # base/LoRA pairs shown; eval.json and the mp4s hold all of them
STOPPED_MARK = 'data-status="stopped"'  # in the report of a run that stopped before its end (not finished)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td.t, th:first-child { text-align: left; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 6px 10px; margin: 6px 0; }
.pairs { display: flex; flex-wrap: wrap; gap: 14px; }
.pair { border: 1px solid #ddd; padding: 6px; font-size: 12px; max-width: 420px; }
.pair figure { display: inline-block; margin: 2px; text-align: center; }
.pair img { image-rendering: pixelated; display: block; }
.muted { color: #777; font-size: 12px; }
"""


# ---- pieces ---------------------------------------------------------------------------------------


def png_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_size(video: torch.Tensor, side: int = GIF_SIDE) -> tuple[int, int]:
    """(width, height) a video [3, T, H, W] is shown at: its longest side `side` pixels."""
    h, w = video.shape[-2:]
    return max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w)))


def gif_data_uri(video: torch.Tensor, fps: int = 8, side: int = GIF_SIDE, max_frames: int = GIF_FRAMES) -> str:
    """A video [3, T, H, W] in [-1, 1] as an animated GIF data URI with at most `max_frames` frames,
    shrunk so its longest side is at most `side` (small videos keep their size: the page enlarges them
    with crisp pixels, so a 64x64 toy clip costs a few KB, not the 190 KB of a 192x192 GIF)."""
    from PIL import Image

    frames = to_uint8(video)  # [T, H, W, 3]
    if len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    images = [Image.fromarray(f) for f in frames]
    h, w = frames.shape[1:3]
    if max(h, w) > side:
        size = display_size(video, side)
        images = [im.resize(size, Image.BILINEAR) for im in images]
    buf = io.BytesIO()
    duration = max(20, round(1000 / max(1, fps)))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def format_number(x: float) -> str:
    """4 decimals, or 3 significant digits in e-notation for magnitudes below 1e-3 (not 0)."""
    return f"{x:.3e}" if x != 0 and abs(x) < 1e-3 else f"{x:.4f}"


def format_ci(entry: dict[str, Any]) -> str:
    """{'mean': m, 'ci95': [lo, hi]} -> 'm [lo, hi]'."""
    return f"{format_number(entry['mean'])} [{format_number(entry['ci95'][0])}, {format_number(entry['ci95'][1])}]"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _num(x: Any) -> str:
    if not finite_number(x):
        return "–"
    return f"{x:.3e}" if x != 0 and abs(x) < 1e-3 else f"{x:.4f}"


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].replace("–", "")
    try:
        float(head or "0")
    except ValueError:
        return False
    return True


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Numbers right-aligned, text (prompts, names) left-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" if _is_number(str(c)) else f'<td class="t">{_e(c)}</td>'
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, kind: str, alt: str, size: tuple[int, int] | None = None) -> str:
    # data-kind lets a reader (and the tests) tell plots from videos
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{uri}" data-kind="{kind}" alt="{_e(alt)}"{dims}>'


def pairs_grid(pairs: Sequence[dict], fps: int) -> str:
    """Base and LoRA side by side, one box per (prompt, seed). Each pair: prompt, base, lora (videos),
    optional base_score/lora_score, base_href/lora_href (mp4 links relative to the page), seed."""
    boxes = []
    for p in pairs[:MAX_PAIRS]:
        cells = []
        for side in ("base", "lora"):
            score = p.get(f"{side}_score")
            label = ("base" if side == "base" else "LoRA") + (f" {score:.4f}" if finite_number(score) else "")
            href = p.get(f"{side}_href")
            link = f' <a href="{_e(href)}">mp4</a>' if href else ""
            video = _img(gif_data_uri(p[side], fps=fps), "video", side, display_size(p[side]))
            cells.append(f"<figure>{video}"
                         f"<figcaption>{_e(label)}{link}</figcaption></figure>")
        seed = f" · seed {p['seed']}" if p.get("seed") is not None else ""
        boxes.append(f'<div class="pair"><div>{_e(p["prompt"])}{_e(seed)}</div>{"".join(cells)}</div>')
    more = (f'<p class="muted">{len(pairs) - MAX_PAIRS} more pair(s) not shown (see the mp4s)</p>'
            if len(pairs) > MAX_PAIRS else "")
    return f'<div class="pairs">{"".join(boxes)}</div>{more}'


def page(title: str, sections: Sequence[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_page(path: str | Path, text: str) -> Path:
    """Write via a temporary name and rename, so a reader never sees half a page."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- eval -----------------------------------------------------------------------------------------


def _interval_plot(result) -> str:
    """Per reward: base and LoRA means with their 95% intervals, side by side."""
    plt = pyplot()
    names = list(result.rewards)
    fig, axes = plt.subplots(1, len(names), figsize=(max(5.5, 3.2 * len(names) + 0.6), 3.4), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        r = result.rewards[name]
        for x, side, color in ((0, "base", "tab:gray"), (1, "lora", "tab:blue")):
            mean, (low, high) = r[side]["mean"], r[side]["ci95"]
            ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=6, ms=7)
        ax.set_xticks([0, 1], ["base", "LoRA"])
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(f"{name}\nwin rate {r['win_rate']:.2f}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("mean reward with 95% bootstrap interval (same prompts and seeds)", fontsize=9)
    fig.tight_layout()
    return png_data_uri(fig)


def _guard_bars(base: dict[str, float], lora: dict[str, float], title: str) -> str:
    plt = pyplot()
    names = [g for g in GUARD_NAMES if g in base and g in lora]
    fig, axes = plt.subplots(1, len(names), figsize=(max(5.5, 2.6 * len(names) + 0.6), 2.8), dpi=100, squeeze=False)
    for ax, g in zip(axes[0], names):
        ax.bar([0, 1], [base[g], lora[g]], color=["tab:gray", "tab:blue"])
        ax.set_xticks([0, 1], ["base", "LoRA"])
        ax.set_title(g.replace("_", " "), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_data_uri(fig)


def eval_report(result, videos: dict[str, list[list[torch.Tensor]]], fps: int = 8, guard_drop: float = 0.5,
                title: str | None = None, path: str | Path | None = None) -> Path:
    """<eval folder>/report.html for an EvalResult; `videos[side][prompt][seed]` as generated. `path`: where
    to write the page instead (eval writes into a partial folder that is renamed to result.folder)."""
    sections = [f'<p>{len(result.prompts)} prompt(s) × {result.seeds} seed(s); base and LoRA from the same '
                f'seeds. Folder: <code>{_e(result.folder)}</code></p>']
    rows = []
    for name, r in result.rewards.items():
        rows.append([name, *(format_ci(r[k]) for k in ("base", "lora", "delta")), f"{r['win_rate']:.3f}", r["n"]])
    sections.append("<h2>Rewards</h2>" + table(["reward", "base [95% CI]", "LoRA [95% CI]", "LoRA − base [95% CI]",
                                                "win rate", "videos"], rows))
    sections.append(_img(_interval_plot(result), "plot", "rewards with intervals"))
    base, lora = result.guards["base"], result.guards["lora"]
    fallen = guard_drops(base, lora, guard_drop)
    warn = (f'<div class="warn">guards fell by more than guard_drop={guard_drop:g}: {_e("; ".join(fallen))} — '
            "possible reward hacking; look at the videos</div>" if fallen else "")
    sections.append("<h2>Guards</h2>" + warn + table(
        ["guard", "base", "LoRA"], [[g, _num(base[g]), _num(lora[g])] for g in GUARD_NAMES if g in base]))
    sections.append(_img(_guard_bars(base, lora, "guards on the same videos"), "plot", "guards"))
    header = ["#", "prompt"] + [f"{n} {s}" for n in result.rewards for s in ("base", "LoRA", "win")]
    prompt_rows = [[e["index"], e["prompt"], *(v for n in result.rewards
                                              for v in (_num(e[n]["base"]), _num(e[n]["lora"]),
                                                        f"{e[n]['win_rate']:.2f}"))]
                   for e in result.per_prompt]
    sections.append("<h2>Per prompt</h2>" + table(header, prompt_rows))
    first = next(iter(result.scores), None)
    pairs = []
    for s in range(min(result.seeds, 2)):  # two seeds per prompt at most in the page: the mp4s hold the rest
        for i, prompt in enumerate(result.prompts):
            pair = {"prompt": prompt, "seed": s, "base": videos["base"][i][s], "lora": videos["lora"][i][s],
                    "base_href": f"base/p{i:04d}-s{s}.mp4", "lora_href": f"lora/p{i:04d}-s{s}.mp4"}
            if first is not None:
                pair["base_score"] = result.scores[first]["base"][i][s]
                pair["lora_score"] = result.scores[first]["lora"][i][s]
            pairs.append(pair)
    pairs.sort(key=lambda p: p["seed"])
    label = f" ({first})" if first else ""
    sections.append(f"<h2>Videos: base (left) vs LoRA (right), same seed{_e(label)}</h2>" + pairs_grid(pairs, fps))
    out = Path(path) if path is not None else Path(result.folder) / "report.html"
    return write_page(out, page(title or "vader eval: base vs LoRA", sections))


# ---- training -------------------------------------------------------------------------------------


def _training_curve(metrics: Path, rows: list[dict]) -> str:
    plt = pyplot()
    steps, rewards, bad = reward_curve_points(metrics)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if steps:
        ax.plot(steps, rewards, lw=1, marker="o", ms=2, color="tab:blue", label="training reward")
    val = [(r["step"], r["val_reward"]) for r in rows if finite_number(r.get("val_reward"))]
    if val:
        ax.plot(*zip(*val), "s-", color="tab:orange", ms=5, label="validation reward")
    base = [r["base_val_reward"] for r in rows if finite_number(r.get("base_val_reward"))]
    if base:
        ax.axhline(base[-1], color="tab:gray", ls="--", label=f"base model validation ({base[-1]:.4f})")
    if bad:
        ax.plot(bad, [0.0] * len(bad), "x", color="red", ms=7, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"{len(bad)} non-finite (skipped)")
    gold = [(r["step"], r["val_gold_reward"]) for r in rows if finite_number(r.get("val_gold_reward"))]
    if gold:  # a different reward: its own axis
        ax2 = ax.twinx()
        ax2.plot(*zip(*gold), "^-", color="tab:green", ms=5, label="gold reward (not trained on)")
        ax2.set_ylabel("gold reward", color="tab:green")
        ax2.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return png_data_uri(fig)


def _guard_curves(rows: list[dict]) -> str | None:
    names = [g for g in GUARD_NAMES if any(finite_number(r.get(f"guard_{g}")) and "val_reward" in r for r in rows)]
    if not names:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(2.9 * len(names) + 0.6, 2.8), dpi=100, squeeze=False)
    for ax, g in zip(axes[0], names):
        points = [(r["step"], r[f"guard_{g}"]) for r in rows if "val_reward" in r and finite_number(r.get(f"guard_{g}"))]
        ax.plot(*zip(*points), "o-", color="tab:purple", ms=4, label="LoRA")
        base = [r[f"guard_{g}_base"] for r in rows if finite_number(r.get(f"guard_{g}_base"))]
        if base:
            ax.axhline(base[-1], color="tab:gray", ls="--", label="base")
        ax.set_title(g.replace("_", " "), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("guards at each validation (a fall while the reward rises suggests reward hacking)", fontsize=9)
    fig.tight_layout()
    return png_data_uri(fig)


def _gold_parts(rows: list[dict]) -> str | None:
    """The gold reward's parts (the toy judge: the share of each attribute it reads back), base vs LoRA on
    the end-of-run videos, from the last row that has them."""
    row = next((r for r in reversed(rows) if "gold_videos" in r), None)
    if row is None:
        return None
    names = [k[len("gold_"):-len("_base")] for k in row if k.startswith("gold_") and k.endswith("_base")]
    body = [[n, f"{row[f'gold_{n}_base']:.3f}", f"{row[f'gold_{n}']:.3f}", f"{row[f'gold_{n}'] - row[f'gold_{n}_base']:+.3f}"]
            for n in names if finite_number(row.get(f"gold_{n}_base")) and finite_number(row.get(f"gold_{n}"))]
    if not body:
        return None
    name = row.get("gold_name")
    what = f"Gold reward {_e(name)} by part" if isinstance(name, str) else "Gold reward by part"
    if name == "toy_judge":  # say what the numbers are: the independent judge's accuracy, not a score
        what = "Gold reward toy_judge by part: the independent judge's accuracy per attribute"
    return (f"<h2>{what} (base vs LoRA, {int(row['gold_videos'])} end-of-run videos, "
            "same prompts and seeds)</h2>" + table(["part", "base model", "LoRA", "change"], body))


def training_report(run_dir: str | Path, before: list | None = None, after: list | None = None,
                    fps: int = 8, stopped: str | None = None) -> Path:
    """<run>/report.html from metrics.jsonl and, when given, the end-of-run base/LoRA previews
    ((prompt, video, reward or None) lists in the same order, same seeds). `stopped`: why a run that
    did not reach its end stopped (shown first; the page is then marked with STOPPED_MARK)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.is_file() else []
    sections = [f"<p>Run folder: <code>{_e(run_dir)}</code></p>"]
    if stopped:
        sections.insert(0, f'<div class="warn" {STOPPED_MARK}>{_e(stopped)}</div>')
    summary = []
    steps = [r for r in rows if finite_number(r.get("reward"))]
    if steps:
        summary.append(["training reward (first → last step)", f"{steps[0]['reward']:.4f} → {steps[-1]['reward']:.4f}"])
    counts = [r["nonfinite_steps"] for r in rows if "loss" in r and finite_number(r.get("nonfinite_steps"))]
    if counts and counts[-1]:
        logged = len({r.get("step") for r in rows if "loss" in r})
        summary.append(["steps skipped as non-finite (loss, reward or gradient; LoRA not updated)",
                        f"{int(counts[-1])} of {logged}"])
    vals = [r for r in rows if finite_number(r.get("val_reward"))]
    base = [r["base_val_reward"] for r in rows if finite_number(r.get("base_val_reward"))]
    if vals:
        summary.append(["validation reward (last)", f"{vals[-1]['val_reward']:.4f}"])
    if base:
        summary.append(["base model validation reward (same prompts and seeds)", f"{base[-1]:.4f}"])
    golds = [r for r in rows if finite_number(r.get("val_gold_reward"))]
    if golds:
        summary.append(["gold reward, validation (first → last)",
                        f"{golds[0]['val_gold_reward']:.4f} → {golds[-1]['val_gold_reward']:.4f}"])
    base_gold = [r["base_val_gold_reward"] for r in rows if finite_number(r.get("base_val_gold_reward"))]
    if base_gold:
        summary.append(["gold reward, base model", f"{base_gold[-1]:.4f}"])
    if summary:
        sections.append(table(["", "value"], summary))
    parts = _gold_parts(rows)
    if parts:
        sections.append(parts)
    warnings = [r["guard_warning"] for r in rows if r.get("guard_warning")]
    sections += [f'<div class="warn">{_e(w)}</div>' for w in warnings]
    if steps or vals:
        sections.append("<h2>Reward</h2>" + _img(_training_curve(metrics, rows), "plot", "reward curve"))
    guard_plot = _guard_curves(rows)
    if guard_plot is not None:
        sections.append("<h2>Guards</h2>" + _img(guard_plot, "plot", "guards"))
    if before and after:
        pairs = [{"prompt": p, "base": b, "lora": a, "base_score": bs, "lora_score": ls}
                 for (p, b, bs), (_, a, ls) in zip(before, after)]
        sections.append("<h2>Videos: base (left) vs LoRA (right), same seed</h2>" + pairs_grid(pairs, fps))
    return write_page(run_dir / "report.html", page(f"vader training: {run_dir.name}", sections))


__all__ = ["display_size", "eval_report", "format_ci", "format_number", "gif_data_uri", "page", "pairs_grid",
           "png_data_uri", "table", "training_report", "write_page"]
