"""LoRA adapters and resumable training state on disk, written atomically.

A checkpoint folder is a peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
so `peft.PeftModel.from_pretrained(denoiser, folder)` loads it) plus `training_state.pt` and
`state.json` for resuming. Folders are written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind a valid name.

`load_lora` (and `saved_lora_config`) also take a LoRA in diffusers' format, e.g. a run's
`lora/diffusers/` (see `vader.lora_formats`): the format is told from the file, callers do not change.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from vader.errors import VaderError
from vader.lora_formats import (
    ADAPTER_FILE,
    DIFFUSERS_FILE,
    is_foreign,
    load_into,
    lora_config_for,
    lora_file,
    pipelines_of,
    read_lora,
)

PEFT_PREFIX = "base_model.model."  # what PeftModel adds; the original's .pt files carry it
STATE_FILE = "state.json"


def lora_config(rank: int, alpha: float = 8.0, dropout: float = 0.01, *, targets: Sequence[str]) -> LoraConfig:
    """`targets`: the module names to adapt (a generator's `lora_target_modules`)."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))


def lora_on_meta(model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    """peft's adapters injected into a meta-device model (no memory): what plans and inspection count."""
    inject_adapter_in_model(lora_config(rank, alpha, dropout, targets=targets), model, low_cpu_mem_usage=True)


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


def saved_lora_config(path: str | Path, key: str | None = None) -> LoraConfig | None:
    """The LoraConfig saved beside an adapter (our folders), or None (a bare file, the original .pt).

    A LoRA in diffusers' format (a folder holding pytorch_lora_weights.safetensors, or such a file) gives
    the config that adapts exactly its modules at its ranks (`lora_formats.lora_config_for`, dropout 0).
    An adapter_config.json that is not JSON, not an object, or lacks a usable rank or target modules
    is one VaderError naming the file (and `key`, the setting the path came from, when given)."""
    file = lora_file(path)
    if file.is_file() and is_foreign(file):
        return lora_config_for(read_lora(file, key=key or "lora_ckpt_path"))
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / "adapter_config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        config = LoraConfig.from_pretrained(str(folder))
        targets = config.target_modules
        if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
            raise ValueError(f"r={config.r!r} is not a rank (a whole number >= 1)")
        if isinstance(config.lora_alpha, bool) or not isinstance(config.lora_alpha, (int, float)):
            raise ValueError(f"lora_alpha={config.lora_alpha!r} is not a number")
        if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
            raise ValueError(f"target_modules={targets!r} names no module")
    except Exception as exc:  # not JSON, not UTF-8, unreadable, or not a LoRA's settings
        where = f"{key}={str(path)!r}: " if key else ""
        raise VaderError(f"{where}the LoRA settings file {file} cannot be used ({_first_line(exc)}); it must be the "
                         "adapter_config.json saved with the adapter: restore it, or point at a complete LoRA "
                         "folder") from None
    return config


def _check_scale(model: nn.Module, saved: LoraConfig | None, path: Path) -> None:
    """Rank and alpha set the LoRA's scale: loading with other values would silently change it."""
    current = getattr(model, "peft_config", {}).get("default")
    if saved is None or current is None:
        return
    if (saved.r, float(saved.lora_alpha)) != (current.r, float(current.lora_alpha)):
        raise VaderError(f"LoRA {path} was trained with lora_rank={saved.r}, lora_alpha={saved.lora_alpha}; "
                         f"set those (now {current.r}, {current.lora_alpha})")


def load_lora(model: nn.Module, path: str | Path, key: str = "lora_ckpt_path") -> int:
    """Load our adapter folder/safetensors, the original VADER `peft_model_<step>.pt`, or a LoRA in
    diffusers' format (a folder holding pytorch_lora_weights.safetensors, or the file; musubi/kohya and
    original-checkpoint keys converted by the model's pipeline) into the LoRA injected in `model`;
    returns #tensors.

    `key` is the config key the path came from, so that errors blame what the user set."""
    path = lora_file(path)
    if not path.is_file():
        raise VaderError(f"{key}={str(path)!r}: no such file (expected a checkpoint folder, "
                         f"{ADAPTER_FILE}, a diffusers {DIFFUSERS_FILE} or an original peft_model_<step>.pt)")
    if is_foreign(path):  # diffusers' format or one its pipelines convert: keys renamed, strength rescaled
        return load_into(model, read_lora(path, pipelines_of(model), key), key)
    _check_scale(model, saved_lora_config(path), path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"holds a {type(state).__name__}, not a dict of tensors")
    except Exception as exc:  # truncated, zero-length, not a tensor file: whatever the reader raises
        raise VaderError(f"{key}={str(path)!r}: cannot read the LoRA file ({_first_line(exc)}); it is corrupt, "
                         "truncated or not a LoRA: point it at a complete checkpoint") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        first = sorted(missing)[:1] + sorted(unexpected)[:1]
        raise VaderError(f"{key}: LoRA file {path} does not fit this denoiser/lora_rank: {len(missing)} missing and "
                         f"{len(unexpected)} unexpected keys (e.g. {', '.join(first)})")
    for name, value in get_peft_model_state_dict(model).items():
        if state[name].shape != value.shape:
            raise VaderError(f"{key}: LoRA file {path}: {name} has shape {tuple(state[name].shape)}, the model "
                             f"expects {tuple(value.shape)} (check lora_rank)")
    bad = _nonfinite(state)
    if bad:
        raise VaderError(f"{key}={str(path)!r}: {bad} holds NaN or inf values; use an earlier checkpoint")
    set_peft_model_state_dict(model, state)
    return len(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor name holding NaN/inf, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def set_lora_dropout(model: nn.Module, active: bool) -> None:
    """Switch only the LoRA dropout modules: training samples with the denoiser in eval mode (no
    caption dropout) but with LoRA dropout on, as the original did (peft's new layers stayed in train
    mode after its `.eval()`); validation and inference sample with it off."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout.train(active)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every LoRA layer bypassed inside the block, restored after it (the
    before/after samples of a run use the same denoiser object, no second copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


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
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    bad = _nonfinite(state)
    if bad:  # a NaN LoRA is worse than none: it would overwrite a good one and load silently
        raise VaderError(f"refusing to save the LoRA to {folder}: {bad.removeprefix(PEFT_PREFIX)} holds NaN or inf")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(folder)
    try:
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


def clean_partial_writes(run_dir: Path) -> list[Path]:
    """Remove what an interrupted atomic write left in a run folder; returns what was removed.

    `.X.tmp-<pid>` folders are incomplete copies: removed. `.X.old-<pid>` is the previous complete
    folder moved aside during an overwrite: removed when X exists, else (killed between the two
    renames) put back, so the checkpoint is not lost."""
    removed: list[Path] = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in sorted(parent.glob(".*.tmp-*")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        for path in sorted(parent.glob(".*.old-*")):
            final = parent / path.name[1:].rsplit(".old-", 1)[0]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            else:
                path.rename(final)
    for path in sorted((run_dir / "samples").rglob(".*.tmp.mp4")) if (run_dir / "samples").is_dir() else []:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# Keys that do not change what a resumed run computes: logging, cadence, where files go, how long to
# train, memory-only switches (checkpointing recomputes the same values), keys accepted for
# compatibility only. Every other key changes results and must match on resume.
# `model.attention` is not free: sdpa and math differ by float rounding (1e-6 of the output in fp32,
# about 1% in bf16), which would break the bit-exact resume. `model.enable_flash_attn` is: it can
# only agree with model.attention (True with 'math' is refused), so that key carries any difference.
RESUME_FREE_KEYS = frozenset({
    "verbose", "is_vader_training", "lora_ckpt_path", "resume_from", "project_dir", "run_name",
    "logger_type", "use_wandb", "wandb_entity", "wandb_project", "debug",
    "validation_steps", "checkpointing_steps", "checkpoints_total_limit", "is_sample_preview", "num_val_runs",
    "val_batch_size", "save_fps", "video_quality", "max_train_steps", "num_train_epochs", "max_nonfinite_steps",
    "allow_config_change", "grad_checkpoint", "sharding", "reward_grad_checkpoint", "vae.micro_batch_size",
    "vae.offload_cache",
    "model.enable_flash_attn", "model.enable_layernorm_kernel", "frame_interval", "multi_resolution",
    "condition_frame_length", "align", "guard_drop", "gold_reward",
})


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and prefix == "" and key in ("model", "vae", "text_encoder", "scheduler"):
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a config (as saved in config.json) that change results, flattened, JSON-normalised."""
    flat = _flatten(json.loads(json.dumps(config, default=str)))
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS}


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, current)} for result-changing keys that differ; keys one side lacks (another
    vader version) are not compared. A key of `defaults` (a settings dict such as `grpo`) is compared by
    the settings it resolves to, key by key: None, a partial dict and the full defaults are the same run,
    and a difference reads `grpo.group_size: 4 -> 8`."""
    old, new = result_config(saved), result_config(current)
    for key, values in (defaults or {}).items():
        if key in old and key in new and old[key] != new[key]:
            old, new = _resolved(old, key, values), _resolved(new, key, values)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def _resolved(flat: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`key` (None or a partial dict) replaced by one `key.<name>` per setting, the defaults filled in."""
    value = flat[key]
    if value is not None and not isinstance(value, dict):
        return flat  # not a config vader would have run: compared as written
    settings = {**json.loads(json.dumps(defaults)), **(value or {})}
    out = {k: v for k, v in flat.items() if k != key}
    out.update({f"{key}.{k}": v for k, v in settings.items()})
    return out


def describe_differences(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [c for c in checkpoint_dirs(run_dir / "checkpoints") if (c / "training_state.pt").is_file()]
    return found[-1] if found else None


def find_resume_run(project_dir: Path, run_name: str | None, config: dict[str, Any],
                    defaults: dict[str, dict[str, Any]] | None = None) -> Path:
    """The run folder `resume_from='latest'` continues: the one named by run_name, else the newest
    run (by its latest checkpoint) whose saved config matches `config` in every result-changing key
    (settings dicts compared by value with `defaults`, as `config_differences`)."""
    if run_name is not None:
        run_dir = project_dir / run_name
        if latest_checkpoint(run_dir) is None:
            raise VaderError(f"resume_from='latest': run_name={run_name!r} has no checkpoint under {run_dir}; "
                             "check run_name, or drop resume_from to start a new run")
        return run_dir
    runs = [r for r in project_dir.iterdir() if latest_checkpoint(r) is not None] if project_dir.is_dir() else []
    if not runs:
        raise VaderError(f"resume_from='latest': no checkpoint found under project_dir={str(project_dir)!r}")
    runs.sort(key=lambda r: latest_checkpoint(r).stat().st_mtime, reverse=True)  # type: ignore[union-attr]
    for run_dir in runs:
        saved = read_run_config(run_dir)
        if saved is not None and not config_differences(saved, config, defaults):
            return run_dir
    newest = runs[0]
    saved = read_run_config(newest)
    why = describe_differences(config_differences(saved, config, defaults)) if saved is not None else "no config.json"
    raise VaderError(f"resume_from='latest': no run under {project_dir} has this config (newest, "
                     f"{newest.name!r}: {why}); name the run with run_name (and allow_config_change=True to "
                     "change those keys)")


def find_resume_dir(resume_from: str, project_dir: Path, run_name: str | None = None,
                    config: dict[str, Any] | None = None, defaults: dict[str, dict[str, Any]] | None = None) -> Path:
    """A checkpoint folder: the path given, or for 'latest' the latest checkpoint of `find_resume_run`."""
    if resume_from == "latest":
        folder = latest_checkpoint(find_resume_run(project_dir, run_name, config or {}, defaults))
        assert folder is not None  # find_resume_run only returns runs with a checkpoint
        return folder
    path = Path(resume_from)
    if not (path / "training_state.pt").is_file():
        raise VaderError(f"resume_from={resume_from!r}: not a checkpoint folder (no training_state.pt)")
    if not (path / ADAPTER_FILE).is_file():
        raise VaderError(f"resume_from={resume_from!r}: the checkpoint has no {ADAPTER_FILE} (incomplete or "
                         "damaged); resume from another checkpoint")
    return path


def load_training_state(folder: Path) -> dict[str, Any]:
    """training_state.pt of a checkpoint, checked: one line naming resume_from on any damage."""
    path = folder / "training_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, zero-length, not a torch file
        raise VaderError(f"resume_from={str(folder)!r}: cannot read {path.name} ({_first_line(exc)}); it is "
                         "corrupt or truncated: resume from another checkpoint") from None
    if not isinstance(state, dict) or not {"step", "optimizer"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise VaderError(f"resume_from={str(folder)!r}: {path.name} lacks 'step'/'optimizer' (has {keys}); "
                         "resume from another checkpoint")
    return state
