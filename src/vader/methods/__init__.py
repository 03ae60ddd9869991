"""Training methods: how one optimizer step turns sampled videos and a reward into a LoRA update.

The registry below is the one place a method is named: a new method is one module implementing
`vader.methods.base.MethodModule` plus one line here. The loop (`vader.train`) and the plan
(`vader.plan`) ask the method module; nothing branches on which method it is. This file imports no
torch (config validation reads the names).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vader.errors import VaderError

if TYPE_CHECKING:
    from vader.methods.base import MethodModule

METHODS: dict[str, str] = {
    "vader": "vader.methods.vader",  # reward gradients backpropagated through the sampler (VADER, DRaFT-K)
    "grpo": "vader.methods.grpo",  # policy gradient on SDE samples with group-normalised rewards (Flow-GRPO)
}


def method_module(name: str) -> MethodModule:
    if name not in METHODS:
        raise VaderError(f"method={name!r} is not valid; choose one of: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])  # type: ignore[return-value]


__all__ = ["METHODS", "method_module"]
