"""The published folder layout both toy-world models use (the reward's classifier and the judge):
`config.json` (hyper-parameters + class names) and `model.safetensors`, loaded strictly, every problem a
one-line VaderError naming the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vader.errors import VaderError
from vader.toyworld import world


def config_from_dict(cls: type, data: dict, where: str, model_type: str) -> Any:
    """A toy model's config dataclass `cls` from its config.json dict: the model_type checked, unknown keys
    refused, channels as a tuple, one head per world attribute; each problem one line naming `where`."""
    if data.get("model_type") != model_type:
        raise VaderError(f"{where}: model_type={data.get('model_type')!r}; expected {model_type!r}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known - {"model_type"})
    if unknown:
        raise VaderError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    kwargs = {k: v for k, v in data.items() if k in known}
    if "channels" in kwargs:
        kwargs["channels"] = tuple(int(c) for c in kwargs["channels"])
    cfg = cls(**kwargs)
    heads = tuple(world.ATTRIBUTES)
    if set(cfg.classes) != set(heads):
        raise VaderError(f"{where}: classes has heads {sorted(cfg.classes)}; expected {sorted(heads)}")
    return cfg


def save(model: nn.Module, config: dict, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def read(folder: str | Path, what: str, writer: str) -> tuple[dict, dict[str, Tensor], Path, Path]:
    """(config dict, state dict, config path, weights path) of a saved folder. `what` names the model in
    messages ('toy classifier'), `writer` the method that writes the layout."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise VaderError(f"{what} folder {folder}: {path.name} is missing; it needs config.json and "
                             f"model.safetensors (as {writer} writes them)")
    try:
        return json.loads(config_path.read_text()), load_file(str(weights_path)), config_path, weights_path
    except (OSError, ValueError) as exc:
        raise VaderError(f"{what} folder {folder} could not be read ({type(exc).__name__}: {exc})") from exc


def load_strict(model: nn.Module, state: dict[str, Tensor], weights_path: Path, what: str) -> None:
    """Load `state` into `model`, refusing (one line) missing, unexpected or reshaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
                if keys]
    if problems:
        raise VaderError(f"{what} {weights_path} does not match its config.json: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def attributes(logits: dict[str, Tensor], classes: dict[str, list[str]]) -> list[world.Attributes]:
    """The most likely attributes of each clip from per-head logits [B, classes]."""
    picks = {k: v.argmax(-1).tolist() for k, v in logits.items()}
    n = len(next(iter(picks.values())))
    return [world.Attributes(**{k: classes[k][picks[k][i]] for k in world.ATTRIBUTES}) for i in range(n)]


__all__ = ["attributes", "config_from_dict", "load_strict", "read", "save"]
