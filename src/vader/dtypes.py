"""The one dtype table: the names settings, `vader score` and rewards accept, and their torch dtypes.

Names only at import: `vader.config` takes its choices from here, and `vader config` / `vader --help`
must not pay for importing torch, which `parse_dtype` / `torch_dtypes` import when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vader.errors import VaderError

if TYPE_CHECKING:
    import torch

# name -> torch's name for it. 'fp8' has none: it stores only the denoiser's Linear weights, and the
# run computes in bf16 (vader.models.presets.torch_dtype / denoiser_dtype, vader.models.fp8).
TORCH_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = ("fp32", "fp16", "bf16", "fp8")  # what the `dtype` setting accepts
BACKEND_DTYPES = tuple(TORCH_NAMES)  # what diffusers backends accept: no fp8 path for diffusers models
REWARD_DTYPES = (*TORCH_NAMES, *TORCH_NAMES.values())  # rewards take torch's own spelling too


def torch_dtypes() -> dict[str, torch.dtype]:
    """The table with torch dtypes: 'fp32' -> torch.float32, ... (no 'fp8')."""
    import torch

    return {name: getattr(torch, attr) for name, attr in TORCH_NAMES.items()}


def parse_dtype(key: str, name: str, choices: Sequence[str] = BACKEND_DTYPES) -> torch.dtype:
    """The torch dtype of `name`, one of `choices` (names of the table or torch's own); a one-line
    VaderError naming the setting `key` and the choices otherwise."""
    if name not in choices or not (name in TORCH_NAMES or name in TORCH_NAMES.values()):
        raise VaderError(f"{key}={name!r} is not a dtype; expected one of {', '.join(choices)}")
    import torch

    return getattr(torch, TORCH_NAMES.get(name, name))
