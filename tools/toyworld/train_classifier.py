"""Train the toy world's judge (vader.toyworld.classifier) and save it in the package.

    .venv/bin/python tools/toyworld/train_classifier.py            # -> src/vader/assets/toyworld/classifier/

Reproducible from --seed (one CPU thread). It sees clips of EVERY attribute combination, held-out
ones included (it is the judge, not the generator), rendered with many seeds, radius jitter (so the
area head learns a continuous size), and augmentations standing in for a generator's flaws: blur,
noise, colour jitter, downscale-upscale, per-frame shifts and flicker. It trains on the three clip
decodings the training loop can pass (decode_frame 'fml' 3, 'alt' 9, 'all' 17 frames) and reports
per-head accuracy on fresh seeds, clean and augmented, in `training.json` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vader.toyworld import WEIGHTS, world
from vader.toyworld.classifier import HEADS, ToyClassifier, ToyClassifierConfig, frame_indices

CLIP_MODES = ("fml", "alt", "all")  # vader.frames.CLIP_DECODE_FRAMES, in the order training cycles them
RADIUS_JITTER = (0.8, 1.2)  # x the caption size's radius: small 0.088..0.132, large 0.16..0.24
EVAL_SEED_BASE = 10_000_000  # evaluation seeds never overlap training seeds (< 10M)


def render(a: world.Attributes, seed: int, radius: float) -> tuple[Tensor, float]:
    """world.render with a given radius, and the object's area in percent of the frame (mean over frames)."""
    res = world.RESOLUTION
    centres = world.trajectory(a, seed)
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    masks = torch.stack([world._mask(a.shape, x, y, c[0], c[1], radius, 1.0 / res) for c in centres])
    fg = torch.tensor(world.RGB[a.colour]).view(3, 1, 1, 1)
    bg = torch.tensor(world.BACKGROUND_RGB[a.background]).view(3, 1, 1, 1)
    return (bg + (fg - bg) * masks.unsqueeze(0)) * 2 - 1, float(masks.mean()) * 100


def sample_batch(rng: random.Random, size: int, seed_base: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    combos = world.all_attributes()
    clips, targets, areas = [], {k: [] for k in HEADS}, []
    for _ in range(size):
        a = rng.choice(combos)
        clip, area = render(a, seed_base + rng.randrange(10_000_000), world.RADIUS[a.size] * rng.uniform(*RADIUS_JITTER))
        clips.append(clip)
        areas.append(area)
        for k, v in world.labels(a).items():
            targets[k].append(v)
    return torch.stack(clips), {k: torch.tensor(v) for k, v in targets.items()}, torch.tensor(areas)


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(clips: Tensor, g: torch.Generator, p: float = 0.85) -> Tensor:
    """What a small generator gets wrong, per clip with probability p: colour jitter, downscale-upscale,
    blur, per-frame shift and flicker, noise. Clips [B, 3, T, H, W] in [-1, 1]."""
    out = []
    for clip in clips:
        if torch.rand((), generator=g) > p:
            out.append(clip)
            continue
        _, t, h, w = clip.shape
        x = clip.permute(1, 0, 2, 3) / 2 + 0.5  # [T, 3, H, W] in [0, 1]
        gain = 1 + 0.12 * (2 * torch.rand(1, 3, 1, 1, generator=g) - 1)
        contrast = 1 + 0.25 * (2 * torch.rand((), generator=g) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean * gain + 0.08 * (2 * torch.rand((), generator=g) - 1)
        if torch.rand((), generator=g) < 0.6:
            side = int(torch.randint(32, h + 1, (), generator=g))
            x = F.interpolate(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False),
                              size=(h, w), mode="bilinear", align_corners=False)
        if torch.rand((), generator=g) < 0.6:
            x = _blur(x, 0.3 + 1.2 * float(torch.rand((), generator=g)))
        if torch.rand((), generator=g) < 0.5:  # frame jitter: each frame shifted by up to a pixel, flickering
            shifts = torch.randint(-1, 2, (t, 2), generator=g)
            x = torch.stack([torch.roll(f, (int(s[0]), int(s[1])), dims=(1, 2)) for f, s in zip(x, shifts)])
            x = x * (1 + 0.06 * (2 * torch.rand(t, 1, 1, 1, generator=g) - 1))
        x = x + 0.12 * float(torch.rand((), generator=g)) * torch.randn(x.shape, generator=g)
        out.append((x.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3))
    return torch.stack(out)


def losses(model: ToyClassifier, clips: Tensor, targets: dict[str, Tensor], areas: Tensor) -> tuple[Tensor, dict]:
    logits, area = model(clips)
    ce = {k: F.cross_entropy(logits[k], targets[k]) for k in HEADS}
    reg = F.smooth_l1_loss(area, areas, beta=1.0)
    return sum(ce.values()) + 0.2 * reg, {**{k: float(v.detach()) for k, v in ce.items()}, "area": float(reg.detach())}


@torch.no_grad()
def evaluate(model: ToyClassifier, seeds_per_combo: int = 2, augmented: bool = False, seed: int = 1) -> dict:
    """Accuracy per head and area MAE (percent points) on fresh seeds, every combination, every clip mode."""
    model.eval()
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    combos = world.all_attributes()
    correct = {k: 0 for k in HEADS}
    abs_err, n = 0.0, 0
    for mode in CLIP_MODES:
        idx = frame_indices(mode)
        for s in range(seeds_per_combo):
            items = [(a, EVAL_SEED_BASE + 1000 * s + i, world.RADIUS[a.size] * rng.uniform(*RADIUS_JITTER))
                     for i, a in enumerate(combos)]
            for start in range(0, len(items), 80):
                chunk = items[start:start + 80]
                rendered = [render(a, sd, r) for a, sd, r in chunk]
                clips = torch.stack([c for c, _ in rendered])[:, :, idx]
                if augmented:
                    clips = augment(clips, g, p=1.0)
                logits, area = model(clips)
                for k in HEADS:
                    truth = torch.tensor([world.labels(a)[k] for a, _, _ in chunk])
                    correct[k] += int((logits[k].argmax(-1) == truth).sum())
                abs_err += float((area - torch.tensor([ar for _, ar in rendered])).abs().sum())
                n += len(chunk)
    return {**{k: round(correct[k] / n, 4) for k in HEADS}, "area_mae_percent": round(abs_err / n, 3), "clips": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(WEIGHTS) / "classifier"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval_seeds", type=int, default=2, help="fresh seeds per combination and clip mode")
    args = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread also keeps the run reproducible
    torch.manual_seed(args.seed)
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    model = ToyClassifier(ToyClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    start, curve = time.time(), []
    for step in range(args.steps):
        model.train()
        clips, targets, areas = sample_batch(rng, args.batch)
        clips = augment(clips[:, :, frame_indices(CLIP_MODES[step % 3])], g)
        loss, parts = losses(model, clips, targets, areas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), **{k: round(v, 4) for k, v in parts.items()}})
            print(f"step {step} loss {float(loss.detach()):.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f" ({time.time() - start:.0f} s)", flush=True)
    train_s = time.time() - start
    model.save_pretrained(args.out)
    clean = evaluate(model, args.eval_seeds, augmented=False)
    aug = evaluate(model, args.eval_seeds, augmented=True)
    report = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "train_seconds": round(train_s, 1), "parameters": sum(p.numel() for p in model.parameters()),
              "fresh_seed_accuracy": {"clean": clean, "augmented": aug}, "curve": curve}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
