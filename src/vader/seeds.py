"""Hashed RNG streams: every (step, micro-step, rank, ...) gets a seed of its own that does not depend on
history, so a resumed run draws exactly what an uninterrupted one would, and the same seed gives the
same run."""

from __future__ import annotations

import hashlib
import random

import torch


def step_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for one (step, micro-step, rank, ...) that does not depend on history."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def set_step_seed(seed: int, step: int, micro: int, rank: int) -> random.Random:
    """Seed torch's global RNG (LoRA dropout) and return a Python RNG for this micro-step."""
    s = step_seed(seed, "train", step, micro, rank)
    torch.manual_seed(s)
    return random.Random(s)


def make_generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


def pick_prompts(prompts: list[str], cfg, step: int, micro: int, rank: int, world: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Deterministic epoch-wise shuffling: every prompt once per epoch, the same on resume (`cfg`: its
    seed, train_batch_size and gradient_accumulation_steps)."""
    out = []
    for j in range(cfg.train_batch_size):
        index = ((step * cfg.gradient_accumulation_steps + micro) * world + rank) * cfg.train_batch_size + j
        epoch, position = divmod(index, len(prompts))
        order = list(range(len(prompts)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        out.append(prompts[order[position]])
    return out


__all__ = ["make_generator", "pick_prompts", "set_step_seed", "step_seed"]
