"""Train the toy world's independent judge (vader.toyworld.judge) and save it in the package.

    OMP_NUM_THREADS=1 .venv/bin/python tools/toyworld/train_judge.py     # -> src/vader/assets/toyworld/judge/

Reproducible from --seed (one CPU thread; about 6 minutes on the shared 2-core machine). Like the
reward's classifier it sees clips of every attribute combination (held-out captions included: it
judges, it does not generate), rendered by the same renderer, but from another range of seeds, with its
own architecture, optimiser schedule and augmentations, chosen to differ from train_classifier.py's:
random resized crops, colour channel mixing, posterisation, a small grey cut-out, a dropped frame
(the previous one repeated), noise. It reports per-attribute accuracy on fresh seeds (never used in
training), clean and augmented, for the clip lengths training can decode (17, 9 and 3 frames), in
`training.json` beside the weights."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_classifier import EVAL_SEED_BASE, RADIUS_JITTER, render, sample_batch  # noqa: E402

from vader.toyworld import world  # noqa: E402
from vader.toyworld.classifier import frame_indices  # noqa: E402
from vader.toyworld.judge import FOLDER, HEADS, ToyJudge, ToyJudgeConfig  # noqa: E402

CLIP_MODES = ("all", "alt", "fml")


def augment(clips: Tensor, g: torch.Generator, p: float = 0.8) -> Tensor:
    """Per clip with probability p: random resized crop, channel mixing, posterisation, a cut-out, a frame
    dropped (the one before it repeated), noise. Clips [B, 3, T, H, W] in [-1, 1]."""
    out = []
    for clip in clips:
        if torch.rand((), generator=g) > p:
            out.append(clip)
            continue
        _, t, h, w = clip.shape
        x = clip.permute(1, 0, 2, 3) / 2 + 0.5  # [T, 3, H, W] in [0, 1]
        if torch.rand((), generator=g) < 0.6:  # crop 88-100% of the side, resized back: a small object
            # zoomed by up to 1/0.88 stays smaller than the smallest large one (radius 0.15 < 0.16)
            side = int(torch.randint(int(0.88 * h), h + 1, (), generator=g))
            top, left = (int(torch.randint(0, h - side + 1, (), generator=g)) for _ in range(2))
            x = F.interpolate(x[:, :, top:top + side, left:left + side], size=(h, w), mode="bilinear",
                              align_corners=False)
        mix = torch.eye(3) + 0.08 * torch.randn(3, 3, generator=g)
        x = torch.einsum("ij,tjhw->tihw", mix, x)
        if torch.rand((), generator=g) < 0.4:
            levels = int(torch.randint(6, 17, (), generator=g))
            x = torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)
        if torch.rand((), generator=g) < 0.4:  # an 8x8 cut-out of mid grey
            cy, cx = (int(torch.randint(0, h - 8, (), generator=g)) for _ in range(2))
            x = x.clone()
            x[:, :, cy:cy + 8, cx:cx + 8] = 0.5
        if t > 3 and torch.rand((), generator=g) < 0.4:  # a dropped frame: the previous one shown twice
            k = int(torch.randint(1, t - 1, (), generator=g))
            x = torch.cat([x[:k], x[k - 1:k], x[k + 1:]])
        x = x + 0.1 * float(torch.rand((), generator=g)) * torch.randn(x.shape, generator=g)
        out.append((x.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3))
    return torch.stack(out)


@torch.no_grad()
def evaluate(model: ToyJudge, seeds_per_combo: int = 2, augmented: bool = False, seed: int = 7) -> dict:
    """Accuracy per attribute on fresh seeds, every combination, every clip length."""
    model.eval()
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    combos = world.all_attributes()
    correct, n = {k: 0 for k in HEADS}, 0
    for mode in CLIP_MODES:
        idx = frame_indices(mode)
        for s in range(seeds_per_combo):
            items = [(a, EVAL_SEED_BASE + 500_000 + 1000 * s + i, world.RADIUS[a.size] * rng.uniform(*RADIUS_JITTER))
                     for i, a in enumerate(combos)]
            for start in range(0, len(items), 80):
                chunk = items[start:start + 80]
                clips = torch.stack([render(a, sd, r)[0] for a, sd, r in chunk])[:, :, idx]
                if augmented:
                    clips = augment(clips, g, p=1.0)
                logits = model(clips)
                for k in HEADS:
                    truth = torch.tensor([world.labels(a)[k] for a, _, _ in chunk])
                    correct[k] += int((logits[k].argmax(-1) == truth).sum())
                n += len(chunk)
    return {**{k: round(correct[k] / n, 4) for k in HEADS}, "clips": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=FOLDER)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_seeds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    model = ToyJudge(ToyJudgeConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    warmup = max(1, args.steps // 20)  # a short linear warm-up, then cosine to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    start, curve = time.time(), []
    for step in range(args.steps):
        model.train()
        # seeds offset from the classifier's draws (seed_base): other clips, not only another order
        clips, targets, _ = sample_batch(rng, args.batch, seed_base=20_000_000)
        clips = augment(clips[:, :, frame_indices(CLIP_MODES[rng.randrange(3)])], g)
        logits = model(clips)
        parts = {k: F.cross_entropy(logits[k], targets[k], label_smoothing=0.05) for k in HEADS}
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), **{k: round(float(v.detach()), 4) for k, v in parts.items()}})
            print(f"step {step} loss {float(loss.detach()):.3f} " + " ".join(f"{k} {float(v.detach()):.3f}" for k, v in parts.items())
                  + f" ({time.time() - start:.0f} s)", flush=True)
    train_s = time.time() - start
    model.save_pretrained(args.out)
    report = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "train_seconds": round(train_s, 1), "parameters": sum(p.numel() for p in model.parameters()),
              "fresh_seed_accuracy": {"clean": evaluate(model, args.eval_seeds),
                                      "augmented": evaluate(model, args.eval_seeds, augmented=True)},
              "curve": curve}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
