"""Every check that needs more than the config itself, run once before anything is created.

`preflight(cfg, command)` is the first call of every entry point (train, infer): a run that cannot
start fails here with one one-line `VaderError` naming every problem found, before a run folder, a
tracker or a model exists. It creates nothing (no mkdir, no download) and makes at most one network
call: a short probe of the hub, only when some weights are neither local nor cached and the hub is
not marked offline.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from vader import weights
from vader.backends import backend_class, backend_module
from vader.checkpoint import ADAPTER_FILE
from vader.config import VaderConfig, is_callable_spec
from vader.errors import VaderError
from vader.images import image_problems
from vader.lora_formats import DIFFUSERS_FILE, is_foreign, lora_file, read_lora
from vader.models.presets import torch_dtype
from vader.rewards import hub, reward_sources
from vader.run import load_prompts
from vader.sharding import check_sharding

COMMANDS = ("train", "infer")
WANDB_OFF_MODES = ("offline", "disabled", "dryrun")


def preflight(cfg: VaderConfig, command: str) -> None:
    """Raise one VaderError (one line) naming every problem found; create nothing."""
    if command not in COMMANDS:
        raise ValueError(f"preflight command must be one of {COMMANDS}, not {command!r}")
    checks: list[Callable[[VaderConfig, str], list[str]]] = [
        check_project_dir, check_prompts, check_lora_files, check_tracker, check_runtime, check_weights,
    ]
    problems: list[str] = []
    for check in checks:
        try:
            problems += check(cfg, command)
        except VaderError as exc:
            problems.append(str(exc))
    if problems:
        raise VaderError("; also: ".join(" ".join(p.split()) for p in problems))


# ---- the run folder -----------------------------------------------------------------------------


def check_project_dir(cfg: VaderConfig, command: str) -> list[str]:
    """project_dir (and the run folder in it) must be, or be creatable as, a writable folder.

    Walks up to the first existing parent instead of trying a mkdir, so nothing is created."""
    problems = []
    for key, text in (("project_dir", cfg.project_dir), ("run_name", cfg.run_name)):
        if text is not None and "\0" in text:
            problems.append(f"{key}={text!r} contains a NUL character, which no file name can hold")
    if problems:
        return problems
    target = Path(cfg.project_dir).expanduser().absolute()
    problem = _folder_problem(target)
    if problem:
        return [f"project_dir={cfg.project_dir!r}: {problem}"]
    if cfg.run_name:
        problem = _folder_problem(target / cfg.run_name)
        if problem:
            return [f"run_name={cfg.run_name!r}: {problem}"]
    return []


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _folder_problem(target: Path) -> str | None:
    existing = target
    while not _exists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing == target:
        if not target.is_dir():
            return f"{target} exists and is not a folder"
        if not os.access(target, os.W_OK | os.X_OK):
            return f"the folder {target} is not writable"
        return None
    if not existing.is_dir():
        return f"cannot create it: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create it: {existing} is not writable"
    return None


# ---- inputs ---------------------------------------------------------------------------------------


def check_prompts(cfg: VaderConfig, command: str) -> list[str]:
    """The prompts must parse, with the one parser train, infer and score use, and their first-frame
    images must suit the model (none for text-to-video; every prompt or none, or every prompt, for
    image-to-video), be readable images of the video's shape, and (train) not leave the reward only the
    given frame 0 (vader.images)."""
    return image_problems(cfg, load_prompts(cfg), command)


def check_lora_files(cfg: VaderConfig, command: str) -> list[str]:
    """A LoRA named by lora_ckpt_path (and, for train, the adapter of a resume_from folder) must be a
    readable weights file: a zero-length, truncated or corrupt file is caught here, not after the
    models are loaded. Reads the safetensors header, or the .pt file's tensors (a LoRA is small). A LoRA
    in diffusers' format (or one the backend's pipeline converts) is read whole: its key format, its
    pieces and NaN/inf are checked here; its module names and sizes need the model (checked on loading)."""
    problems = []
    if cfg.lora_ckpt_path:
        path: Path | None = lora_file(cfg.lora_ckpt_path)
        if Path(cfg.lora_ckpt_path).is_dir() and not path.is_file():
            problems.append(f"lora_ckpt_path={cfg.lora_ckpt_path!r}: the folder has no {ADAPTER_FILE} (ours) or "
                            f"{DIFFUSERS_FILE} (diffusers') (expected a checkpoint or lora folder, an adapter file or "
                            "an original .pt)")
            path = None
        if path is not None:
            problem = weights_file_problem(path) or foreign_lora_problem(cfg, path)
            if problem:
                problems.append(f"lora_ckpt_path={cfg.lora_ckpt_path!r}: {problem}")
    if command == "train" and cfg.resume_from and cfg.resume_from != "latest":
        adapter = Path(cfg.resume_from) / ADAPTER_FILE
        problem = weights_file_problem(adapter) if adapter.is_file() else None
        if problem:
            problems.append(f"resume_from={cfg.resume_from!r}: {problem}")
    return problems


def foreign_lora_problem(cfg: VaderConfig, path: Path) -> str | None:
    """Why a LoRA file in diffusers' (or a convertible) format cannot be loaded, as far as the file alone
    tells (unknown key format, LoRA biases, NaN/inf), or None; None for our own format."""
    if not is_foreign(path):
        return None
    try:
        pipeline = getattr(backend_class(cfg.backend), "pipeline_class", None)
    except (VaderError, ImportError):
        pipeline = None
    try:
        read_lora(path, [pipeline] if pipeline else None, key="lora_ckpt_path")
    except VaderError as exc:
        return str(exc).removeprefix(f"lora_ckpt_path={str(path)!r}: ")
    return None


def weights_file_problem(path: Path) -> str | None:
    """Why `path` is not a readable tensor file (.safetensors or torch.save), or None if it is."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror or type(exc).__name__})"
    if size == 0:
        return f"{path} is empty (0 bytes)"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:  # checks the header against the file size
                handle.keys()
        else:
            import torch

            # mmap reads only the zip directory and the pickle; a legacy (non-zip) file is read whole
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # any parse failure of a user file: corrupt, truncated, not weights
        if "Unsupported global" in str(exc):
            # torch's advice (weights_only=False) would run the file's pickled code: not for a LoRA
            return (f"{path} holds Python objects besides tensors, which vader does not unpickle (a LoRA .pt is a "
                    "state dict of tensors: save it with torch.save(model.state_dict(), path))")
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return f"{path} is not a readable weights file, it may be truncated or corrupt ({type(exc).__name__}" \
               + (f": {first})" if first else ")")
    return None


# ---- tracker and optional packages ------------------------------------------------------------


def check_tracker(cfg: VaderConfig, command: str) -> list[str]:
    """The experiment tracker must be able to start: the package is there, and wandb has credentials
    (or runs offline), so a run does not fail after its folder is made."""
    if cfg.debug or cfg.logger_type == "none" or (cfg.logger_type == "wandb" and not cfg.use_wandb):
        return []
    fixes = "or use --logger_type tensorboard, or --debug True (no tracker)"
    if cfg.logger_type == "tensorboard":
        if not (_installed("tensorboard") or _installed("tensorboardX")):
            return ["logger_type='tensorboard' needs the tensorboard package: `pip install tensorboard`, "
                    "or use --logger_type none"]
        return []
    if not _installed("wandb"):
        return [f"logger_type='wandb' needs wandb: `pip install 'vader[wandb]'`, {fixes}"]
    if os.environ.get("WANDB_MODE", "").strip().lower() in WANDB_OFF_MODES or os.environ.get("WANDB_API_KEY"):
        return []
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if _netrc_has(host):
        return []
    return [f"logger_type='wandb' has no credentials (no WANDB_API_KEY, no {host} entry in ~/.netrc): run "
            f"`wandb login`, or set WANDB_MODE=offline, {fixes}"]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _netrc_has(host: str) -> bool:
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_runtime(cfg: VaderConfig, command: str) -> list[str]:
    """Settings that are valid keys but fail on this machine or in this version."""
    problems = []
    try:
        torch_dtype(cfg.dtype)
    except VaderError as exc:
        problems.append(str(exc))
    if command == "train":
        try:
            check_sharding(cfg.sharding, cfg.dtype)
        except VaderError as exc:
            problems.append(str(exc))
    if command == "train" and cfg.use_AdamW8bit and not _installed("bitsandbytes"):
        problems.append("use_AdamW8bit=True needs bitsandbytes: `pip install 'vader[bnb]'`, or set "
                        "use_AdamW8bit=False")
    return problems


# ---- weights --------------------------------------------------------------------------------------


def check_weights(cfg: VaderConfig, command: str) -> list[str]:
    """Every model and reward weight the run needs, in one line: local paths that do not exist always;
    hub weights that are not cached when offline, or when the hub does not answer a short probe."""
    # the backend's own lookup: whole lines (every part of a pipeline at once) and records merged below
    problems, found = backend_module(cfg.backend).weight_problems(cfg)
    if command == "train" and not is_callable_spec(cfg.reward_fn):  # a callable has none
        found += hub.missing(reward_sources(cfg.reward_fn, cfg.hps_version, cfg.reward_sources))
    gold = cfg.gold_reward
    if command == "train" and gold is not None and not is_callable_spec(gold):
        seen = {m.name for m in found}
        found += [m for m in hub.missing(reward_sources(gold, cfg.hps_version, cfg.reward_sources)) if m.name not in seen]
    problems += [m.problem if m.problem and m.problem.startswith(m.key) else f"{m.key}={m.name!r}: {m.problem}"
                 for m in found if m.fetch is None]
    fetchable = [m for m in found if m.fetch is not None]
    if not fetchable:
        return problems
    unreachable = None
    if not weights.offline():
        first_repo = next(m.name for m in fetchable).split("/")
        unreachable = weights.probe_hub("/".join(first_repo[:2]))
        if unreachable is None:
            return problems  # they download when the models are built
    if unreachable is None:
        why, hint = weights.OFFLINE, ""
    else:
        why = f"the hub cannot be reached ({unreachable}), so nothing can be downloaded"
        hint = "; on a machine without network set HF_HUB_OFFLINE=1"
    keys = ", ".join(dict.fromkeys(m.key for m in fetchable))
    problems.append(weights.missing_message((m.name for m in fetchable), (m.fetch for m in fetchable if m.fetch),
                                            f"point the keys at local paths ({keys}){hint}", why))
    return problems


__all__ = ["preflight", "weights_file_problem"]
