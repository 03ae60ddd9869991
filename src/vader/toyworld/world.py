"""A procedural world of captioned clips, deterministic from a seed.

One object (a shape of some colour and size) moves on a plain background for 17 frames (one
temporal-VAE chunk) at 64×64. Its caption is plain English built from the attributes:

    "a small red circle moving left on a dark background"

The attribute combinations are split once, deterministically, into pretraining captions (what the
toy base model is trained on) and held-out captions that the base model never sees: alignment
measured on held-out captions measures generalisation, not memory.

Clips are [3, T, H, W] float tensors in [-1, 1], vader's video convention.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "still")
BACKGROUNDS = ("dark", "light")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "motion": MOTIONS, "background": BACKGROUNDS,
}

NUM_FRAMES = 17  # one temporal-VAE chunk
RESOLUTION = 64

RGB = {
    "red": (0.90, 0.15, 0.15), "green": (0.15, 0.80, 0.20), "blue": (0.20, 0.35, 0.95), "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND_RGB = {"dark": (0.08, 0.08, 0.10), "light": (0.82, 0.82, 0.78)}
RADIUS = {"small": 0.11, "large": 0.20}  # fraction of the frame side
TRAVEL = 0.45  # fraction of the frame side an object moves over the clip
DIRECTION = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}
MOTION_WORDS = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                "still": "standing still"}

HELDOUT_FRACTION = 0.2  # of the (shape, colour, motion) triples
SPLIT_SEED = 0


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    motion: str
    background: str

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value not in ATTRIBUTES[key]:
                raise ValueError(f"{key}={value!r}; choose one of {', '.join(ATTRIBUTES[key])}")


def caption(a: Attributes) -> str:
    return f"a {a.size} {a.colour} {a.shape} {MOTION_WORDS[a.motion]} on a {a.background} background"


_CAPTION = re.compile(
    r"\ba (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?:moving (?P<motion>\w+)|standing (?P<still>still)) "
    r"on a (?P<background>\w+) background\b"
)


def parse_caption(text: str) -> Attributes | None:
    """The attributes a caption names (Open-Sora's score suffixes and case ignored), or None."""
    m = _CAPTION.search(text.lower())
    if m is None:
        return None
    try:
        return Attributes(shape=m["shape"], colour=m["colour"], size=m["size"], motion=m["motion"] or m["still"],
                          background=m["background"])
    except ValueError:
        return None


def all_attributes() -> list[Attributes]:
    return [Attributes(*values) for values in itertools.product(SHAPES, COLOURS, SIZES, MOTIONS, BACKGROUNDS)]


def _held_out_triples(seed: int = SPLIT_SEED) -> set[tuple[str, str, str]]:
    """A fixed fifth of the (shape, colour, motion) triples; every single value stays in pretraining."""
    triples = list(itertools.product(SHAPES, COLOURS, MOTIONS))
    rng = random.Random(seed)
    while True:
        held = set(rng.sample(triples, round(HELDOUT_FRACTION * len(triples))))
        kept = [t for t in triples if t not in held]
        if all({t[i] for t in kept} == set(values) for i, values in enumerate((SHAPES, COLOURS, MOTIONS))):
            return held


def split(seed: int = SPLIT_SEED) -> tuple[list[Attributes], list[Attributes]]:
    """(pretraining, held-out) attribute combinations: held out are the combinations whose
    (shape, colour, motion) triple the base model never saw, in any size or background."""
    held = _held_out_triples(seed)
    pretrain, heldout = [], []
    for a in all_attributes():
        (heldout if (a.shape, a.colour, a.motion) in held else pretrain).append(a)
    return pretrain, heldout


def pretrain_captions() -> list[str]:
    return [caption(a) for a in split()[0]]


def heldout_captions() -> list[str]:
    return [caption(a) for a in split()[1]]


def clip_seed(a: Attributes, seed: int) -> int:
    digest = hashlib.sha256(repr((caption(a), seed)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def trajectory(a: Attributes, seed: int, num_frames: int = NUM_FRAMES) -> Tensor:
    """Object centres [T, 2] (x, y) in [0, 1] frame units; the start and speed jitter with the seed."""
    rng = random.Random(clip_seed(a, seed))
    dx, dy = DIRECTION[a.motion]
    travel = TRAVEL * rng.uniform(0.85, 1.15)
    margin = RADIUS[a.size] + 0.04
    # start so that the whole path stays inside the frame
    cx = 0.5 - dx * travel / 2 + rng.uniform(-1, 1) * max(0.0, 0.5 - margin - (travel / 2 if dx else 0))
    cy = 0.5 - dy * travel / 2 + rng.uniform(-1, 1) * max(0.0, 0.5 - margin - (travel / 2 if dy else 0))
    t = torch.linspace(0, 1, num_frames)
    return torch.stack([cx + dx * travel * t, cy + dy * travel * t], dim=1)


def _mask(shape: str, x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, r: float, px: float) -> Tensor:
    """Soft coverage in [0, 1] of one shape (anti-aliased over about one pixel `px`)."""
    u, v = x - cx, y - cy
    if shape == "circle":
        dist = torch.sqrt(u * u + v * v) - r
    elif shape == "square":
        side = r * 0.88  # same area feel as the circle
        dist = torch.maximum(u.abs(), v.abs()) - side
    else:  # an upward equilateral triangle around its centroid: the max of its three edge distances
        circumradius = r * 1.3
        k = math.sqrt(3.0) / 2
        dist = torch.maximum(torch.maximum(v, -k * u - 0.5 * v), k * u - 0.5 * v) - circumradius / 2
    return torch.sigmoid(-dist / px * 2.0)


def render(a: Attributes, seed: int = 0, num_frames: int = NUM_FRAMES, resolution: int = RESOLUTION) -> Tensor:
    """One clip [3, T, H, W] in [-1, 1]: the object on its background, moving as its caption says."""
    centres = trajectory(a, seed, num_frames)
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    px = 1.0 / resolution
    masks = torch.stack([_mask(a.shape, x, y, c[0], c[1], RADIUS[a.size], px) for c in centres])  # [T, H, W]
    fg = torch.tensor(RGB[a.colour]).view(3, 1, 1, 1)
    bg = torch.tensor(BACKGROUND_RGB[a.background]).view(3, 1, 1, 1)
    clip = bg + (fg - bg) * masks.unsqueeze(0)
    return clip * 2 - 1


def render_batch(attrs: list[Attributes], seeds: list[int], num_frames: int = NUM_FRAMES,
                 resolution: int = RESOLUTION) -> Tensor:
    """[B, 3, T, H, W] clips."""
    return torch.stack([render(a, s, num_frames, resolution) for a, s in zip(attrs, seeds)])


def labels(a: Attributes) -> dict[str, int]:
    """Class index per attribute (what the toy classifier predicts)."""
    return {key: ATTRIBUTES[key].index(getattr(a, key)) for key in ATTRIBUTES}


__all__ = [
    "ATTRIBUTES", "Attributes", "BACKGROUNDS", "COLOURS", "MOTIONS", "NUM_FRAMES", "RESOLUTION", "SHAPES", "SIZES",
    "all_attributes", "caption", "heldout_captions", "labels", "parse_caption", "pretrain_captions", "render",
    "render_batch", "split", "trajectory",
]
