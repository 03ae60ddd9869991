"""Find published weights (hub id or local folder) and load them strictly, with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vader.errors import VaderError

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_weights(name_or_path: str, subfolder: str | None = None) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a local folder or a hub repo (downloaded or cached)."""
    local = Path(name_or_path)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise VaderError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")
        config = folder / "config.json"
        return (config if config.is_file() else None), weights
    return _from_hub(name_or_path, subfolder)


def _from_hub(repo: str, subfolder: str | None) -> tuple[Path | None, Path]:
    from huggingface_hub import hf_hub_download

    last_error: Exception | None = None
    for filename in WEIGHT_FILES:
        try:
            weights = Path(hf_hub_download(repo, filename, subfolder=subfolder, local_files_only=_offline()))
            break
        except Exception as exc:  # not cached / not on the hub / no network: try the next name
            last_error = exc
    else:
        raise VaderError(
            f"weights for '{repo}' are not available here ({type(last_error).__name__}); fetch them with "
            f"`huggingface-cli download {repo}` on a machine with network (then copy the HF cache), or set "
            "from_pretrained to a local folder"
        )
    try:
        config = Path(hf_hub_download(repo, "config.json", subfolder=subfolder, local_files_only=_offline()))
    except Exception:
        config = None
    return config, weights


def read_config(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None else {}


def read_state_dict(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    """Tensors from safetensors (memory-mapped, straight to `device`) or a torch file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(device))
    else:
        state = torch.load(str(path), map_location=device, weights_only=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with one line naming what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (first: {k} {tuple(state[k].shape)} in the file, "
                         f"{tuple(expected[k].shape)} in the model)")
        raise VaderError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
