"""LoRA adapters and resumable training state on disk, written atomically.

A checkpoint folder is a peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
so `peft.PeftModel.from_pretrained(denoiser, folder)` loads it) plus `training_state.pt` and
`state.json` for resuming. Folders are written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind a valid name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from vader.errors import VaderError

LORA_TARGETS = ["qkv", "q_linear", "kv_linear"]  # the denoiser's attention projections, as the original
PEFT_PREFIX = "base_model.model."  # what PeftModel adds; the original's .pt files carry it
ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "state.json"


def lora_config(rank: int, alpha: float = 8.0, dropout: float = 0.01) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS))


def add_lora(model: nn.Module, config: LoraConfig) -> list[nn.Parameter]:
    """Inject LoRA in place, freeze everything else; returns the trainable LoRA parameters."""
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()  # adapters train in fp32 even when the base weights are bf16
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def saved_lora_config(path: str | Path) -> LoraConfig | None:
    """The LoraConfig saved beside an adapter (our folders), or None (a bare file, the original .pt)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "adapter_config.json").is_file():
        return None
    return LoraConfig.from_pretrained(str(folder))


def _check_scale(model: nn.Module, saved: LoraConfig | None, path: Path) -> None:
    """Rank and alpha set the LoRA's scale: loading with other values would silently change it."""
    current = getattr(model, "peft_config", {}).get("default")
    if saved is None or current is None:
        return
    if (saved.r, float(saved.lora_alpha)) != (current.r, float(current.lora_alpha)):
        raise VaderError(f"LoRA {path} was trained with lora_rank={saved.r}, lora_alpha={saved.lora_alpha}; "
                         f"set those (now {current.r}, {current.lora_alpha})")


def load_lora(model: nn.Module, path: str | Path) -> int:
    """Load our adapter folder/safetensors or the original VADER `peft_model_<step>.pt`; returns #tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise VaderError(f"lora_ckpt_path={str(path)!r}: no such file (expected a checkpoint folder, "
                         f"{ADAPTER_FILE} or an original peft_model_<step>.pt)")
    _check_scale(model, saved_lora_config(path), path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        first = sorted(missing)[:1] + sorted(unexpected)[:1]
        raise VaderError(f"LoRA file {path} does not fit this denoiser/lora_rank: {len(missing)} missing and "
                         f"{len(unexpected)} unexpected keys (e.g. {', '.join(first)})")
    for key, value in get_peft_model_state_dict(model).items():
        if state[key].shape != value.shape:
            raise VaderError(f"LoRA file {path}: {key} has shape {tuple(state[key].shape)}, the model expects "
                             f"{tuple(value.shape)} (check lora_rank)")
    set_peft_model_state_dict(model, state)
    return len(state)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def save_adapter(folder: Path, model: nn.Module, config: LoraConfig, extra: dict[str, Any] | None = None,
                 training_state: dict[str, Any] | None = None) -> Path:
    """Write an adapter folder atomically (and the resume state when given)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(folder)
    try:
        state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(extra or {}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_dir(tmp, folder)
    return folder


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()
             and (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else checkpoint_dirs(root):
        shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(resume_from: str, project_dir: Path) -> Path:
    """'latest' = newest complete checkpoint of any run under project_dir; else a folder path."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / "training_state.pt").is_file():
            raise VaderError(f"resume_from={resume_from!r}: not a checkpoint folder (no training_state.pt)")
        return path
    candidates = [c for run in project_dir.glob("*/checkpoints") for c in checkpoint_dirs(run)
                  if (c / "training_state.pt").is_file()]
    if not candidates:
        raise VaderError(f"resume_from='latest': no checkpoint found under {project_dir}")
    return max(candidates, key=lambda p: p.stat().st_mtime)
