"""vader.dtypes: the one table of dtype names, and every place that reads a dtype name uses it."""

from __future__ import annotations

import pytest
import torch

from vader.dtypes import BACKEND_DTYPES, DTYPES, REWARD_DTYPES, TORCH_NAMES, parse_dtype, torch_dtypes
from vader.errors import VaderError


def test_the_table() -> None:
    assert torch_dtypes() == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert set(DTYPES) == {*TORCH_NAMES, "fp8"}  # fp8: stored in the denoiser only, the run computes in bf16
    assert BACKEND_DTYPES == ("fp32", "bf16", "fp16")  # no fp8 path for diffusers models
    assert parse_dtype("reward dtype", "bfloat16", REWARD_DTYPES) is torch.bfloat16


@pytest.mark.parametrize("name", ["fp8", "fp64", "float16", "", "int8"])
def test_a_bad_name_is_one_line(name: str) -> None:
    with pytest.raises(VaderError, match=rf"^vae_dtype={name!r} is not a dtype; expected one of fp32, bf16, fp16$"):
        parse_dtype("vae_dtype", name)


def test_every_reader_takes_the_same_names() -> None:
    from vader.models.presets import torch_dtype
    from vader.rewards.base import as_dtype

    for name, dtype in torch_dtypes().items():
        assert torch_dtype(name) is dtype and as_dtype(name) is dtype and as_dtype(dtype) is dtype
    assert as_dtype(None) is torch.float32 and as_dtype("float16") is torch.float16
    with pytest.raises(VaderError, match="reward dtype='fp8' is not a dtype"):
        as_dtype("fp8")
    with pytest.raises(VaderError, match="dtype='fp64' is not a dtype"):
        torch_dtype("fp64")
