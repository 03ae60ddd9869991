"""Find published weights (hub id or local folder) and load them strictly, with one-line errors.

A checkpoint is what `from_pretrained` names, exactly as the Open-Sora configs write it:

- a hub repo id such as ``hpcai-tech/OpenSora-STDiT-v3``, in the hub's own layout (``config.json``
  + ``model.safetensors``, keys with no prefix). The Hugging Face cache is looked at first, with no
  network call; only when the files are not cached and the hub is not offline are they downloaded.
- a local folder with that same layout (e.g. made by ``hf download <repo> --local-dir <folder>``).
- a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``); the architecture then
  comes from the config alone.

Loading never materialises a second, full-precision copy of a model: the module is built on the
``meta`` device (no memory, no initialisation), every tensor is read from the file and converted
to the target dtype and device one at a time, and ``load_state_dict(..., assign=True)`` adopts
those tensors as the parameters. Peak memory is the model in its target dtype plus one tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from vader.errors import VaderError
from vader.weights import (
    cached_file,
    download_command,
    download_hint,
    hub_cache_dir,
    is_repo_id,
    local_file,
    offline,
)

CONFIG_FILE = "config.json"
# Tried in this order. The published Open-Sora v1.2 repos hold `model.safetensors`.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's weights are: `source` as the user wrote it, resolved to files on disk."""

    source: str
    weights: tuple[Path, ...]
    config: dict = field(default_factory=dict)  # the checkpoint's config.json ({} if it has none)


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(
    name_or_path: str,
    what: str = "from_pretrained",
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Checkpoint:
    """Local folder, local file or hub repo -> `Checkpoint`; one-line `VaderError` when absent.

    `what` names the config key in messages (e.g. "model.from_pretrained").
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return _from_folder(local / subfolder if subfolder else local, name_or_path, what)
    if local.is_file():
        if local.suffix not in SINGLE_FILE_SUFFIXES:
            raise VaderError(f"{what}={name_or_path!r} is a file but not a weights file "
                             f"({', '.join(SINGLE_FILE_SUFFIXES)}); give the folder holding it instead")
        return Checkpoint(name_or_path, (local,), {})
    if not is_repo_id(name_or_path):
        raise VaderError(f"{what}={name_or_path!r}: no such local folder or file, and not a hub repo id "
                         "(which looks like 'org/name')")
    return _from_hub(name_or_path, what, subfolder, cache_dir)


def local_config(name_or_path: str | None, subfolder: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> dict:
    """The checkpoint's config.json if it is on this machine (folder or HF cache), else {}.

    Never downloads: used to describe a model (`vader inspect`) without fetching anything.
    """
    path = local_file(name_or_path, CONFIG_FILE, subfolder, cache_dir)
    return _read_json(path) if path else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VaderError(f"could not read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise VaderError(f"{path} does not hold a JSON object")
    return data


def _from_folder(folder: Path, source: str, what: str) -> Checkpoint:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            weights = _shards(path, lambda shard: folder / shard) if name.endswith(".index.json") else (path,)
            missing = [p for p in weights if not p.is_file()]
            if missing:
                raise VaderError(f"{what}={source!r}: {path.name} lists {missing[0].name}, which is not in {folder}")
            config = folder / CONFIG_FILE
            return Checkpoint(source, weights, _read_json(config) if config.is_file() else {})
    raise VaderError(f"{what}={source!r}: the folder {folder} has none of {', '.join(WEIGHT_FILES)}")


def _shards(index: Path, locate: Callable[[str], Path | None]) -> tuple[Path, ...]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise VaderError(f"{index} has no weight_map")
    out = []
    for shard in dict.fromkeys(weight_map.values()):
        path = locate(shard)
        if path is None:
            return ()
        out.append(path)
    return tuple(out)


def _fix(repo: str) -> str:
    return (f"fetch it with {download_hint(download_command(repo))} where there is network and copy the HF "
            "cache here, or set from_pretrained to a local folder holding config.json and model.safetensors")


def _from_hub(repo: str, what: str, subfolder: str | None, cache_dir: str | os.PathLike[str] | None) -> Checkpoint:
    cached = cached_checkpoint(repo, subfolder, cache_dir)
    if cached is not None:
        return cached
    where = cache_dir or hub_cache_dir()
    if offline():
        raise VaderError(f"{what}={repo!r}: the weights are not in the Hugging Face cache ({where}) and "
                         f"HF_HUB_OFFLINE=1; {_fix(repo)}")
    return _download(repo, what, subfolder, cache_dir)


def cached_checkpoint(repo: str, subfolder: str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> Checkpoint | None:
    """The hub repo's checkpoint when its weights (every shard) are in the Hugging Face cache, else None.
    No network call."""
    for name in WEIGHT_FILES:
        found = cached_file(repo, name, subfolder, cache_dir)
        if found is None:
            continue
        if name.endswith(".index.json"):
            weights = _shards(found, lambda shard: cached_file(repo, shard, subfolder, cache_dir))
            if not weights:
                continue  # some shards are not cached
        else:
            weights = (found,)
        config = cached_file(repo, CONFIG_FILE, subfolder, cache_dir)
        return Checkpoint(repo, weights, _read_json(config) if config else {})
    return None


def _download(repo: str, what: str, subfolder: str | None, cache_dir: str | os.PathLike[str] | None) -> Checkpoint:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def get(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename, subfolder=subfolder, cache_dir=cache_dir))
        except GatedRepoError:
            raise VaderError(f"{what}={repo!r} is gated: accept its terms on huggingface.co and log in with "
                             "`hf auth login`") from None
        except RepositoryNotFoundError:
            raise VaderError(f"{what}={repo!r}: no such model repo on the hub (or it is private: log in with "
                             "`hf auth login`)") from None
        except LocalEntryNotFoundError:  # the hub could not be reached, and the file is not cached
            raise VaderError(f"{what}={repo!r}: the hub could not be reached and the weights are not in the "
                             f"Hugging Face cache ({cache_dir or hub_cache_dir()}); {_fix(repo)}") from None
        except EntryNotFoundError:
            return None
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise VaderError(f"{what}={repo!r}: download of {filename} failed ({type(exc).__name__}: {first})") \
                from None

    config_path = get(CONFIG_FILE)
    for name in WEIGHT_FILES:
        path = get(name)
        if path is None:
            continue
        weights = _shards(path, get) if name.endswith(".index.json") else (path,)
        if weights:
            return Checkpoint(repo, weights, _read_json(config_path) if config_path else {})
    raise VaderError(f"{what}={repo!r}: the repo has none of {', '.join(WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------------------
# Reading and loading
# ---------------------------------------------------------------------------------------------


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return factory()


def _as_paths(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # not a zip-format torch file, pickled objects, corrupt file
        raise VaderError(f"could not read weights file {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VaderError(f"{path} does not hold a state dict")
    return state


def tensor_shapes(paths: Path | str | Iterable[Path | str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the files, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in _as_paths(paths):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            shapes.update({k: tuple(v.shape) for k, v in _torch_load(path).items()})
    return shapes


def read_state_dict(
    paths: Path | str | Iterable[Path | str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Every tensor of the files, each converted to `dtype` (floating point only) and `device` as it is read.

    Only one tensor at a time exists in the file's dtype; a bf16 target never sees an fp32 model.
    """
    from safetensors import safe_open

    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    for path in _as_paths(paths):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped
                for key in f.keys():
                    state[key] = convert(f.get_tensor(key))
        else:
            loaded = _torch_load(path)
            for key in list(loaded):
                state[key] = convert(loaded.pop(key))
    return state


def mismatch(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None if the keys and shapes equal the model's state dict, else what differs (one line)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    differ = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if not (missing or unexpected or differ):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} (first: {unexpected[0]})")
    if differ:
        k = differ[0]
        parts.append(f"{len(differ)} with another shape (first: {k} is {_shape(shapes[k])} in the file, "
                     f"{_shape(expected[k])} in the model)")
    hint = _hint(list(expected), unexpected, missing)
    return "; ".join(parts) + (f"; {hint}" if hint else "")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _hint(expected: list[str], unexpected: list[str], missing: list[str]) -> str:
    if not unexpected or not missing:
        return ""
    if all("lora_" in k for k in unexpected):
        return "this looks like a LoRA adapter: give it as lora_ckpt_path"
    for prefix in ("module.", "model.", "base_model.model.", "_orig_mod."):
        if all(k.startswith(prefix) for k in unexpected) and {k.removeprefix(prefix) for k in unexpected} & set(missing):
            return f"the file's keys carry a '{prefix}' prefix that the published checkpoints do not have"
    if len(missing) == len(expected):
        return "no key matches: is this a checkpoint of another model?"
    return ""


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True, assign=True)`, with one line naming what does not fit."""
    problem = mismatch(model, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise VaderError(f"checkpoint {source} does not fit the model: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    check_materialized(model, source)


def check_materialized(model: nn.Module, source: str = "the checkpoint") -> None:
    """Raise if any parameter, buffer or tensor attribute is still on the meta device."""
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                left.append(f"{prefix}.{name}" if prefix else name)
    if left:
        raise VaderError(f"after loading {source}, {len(left)} tensor(s) are still on the meta device "
                         f"(first: {left[0]}); they are neither in the checkpoint nor recomputed")


def load_checkpoint(
    factory: Callable[[], M],
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
) -> M:
    """Build `factory()` on meta, check the file's keys/shapes against it, then load tensors straight into it.

    The check reads only the safetensors headers, so a wrong checkpoint fails before any weight is read.
    """
    model = build_on_meta(factory)
    problem = mismatch(model, tensor_shapes(checkpoint.weights))
    if problem:
        raise VaderError(f"checkpoint {checkpoint.source} does not fit the model: {problem}")
    load_strict(model, read_state_dict(checkpoint.weights, dtype, device), checkpoint.source)
    return model
