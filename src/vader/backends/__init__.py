"""Video-model backends: Open-Sora v1.2 (vader's own models), Wan2.1 and CogVideoX (diffusers' classes).

The registry below is the one place a backend is named: a new backend is one module implementing
`vader.backends.base.BackendModule` plus one line here. Everything else (config checks, `vader inspect`,
`vader plan`, the preflight, training, inference) asks the backend module and never branches on which one
it is. This file imports no torch, so validating a config stays light; a backend module is imported only
when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vader.errors import VaderError

if TYPE_CHECKING:
    from vader.backends.base import BackendModule

BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # backend name: (its module, the model.type values that select it)
    "opensora": ("vader.backends.opensora", ("STDiT3-XL/2", "STDiT3-tiny")),
    "wan": ("vader.backends.wan", ("wan",)),
    "cogvideox": ("vader.backends.cogvideox", ("cogvideox",)),
    "ltx": ("vader.backends.ltx", ("ltx",)),
}
MODEL_TYPES: tuple[str, ...] = tuple(t for _, types in BACKENDS.values() for t in types)


def backend_of(model_type: str) -> str:
    """The backend a model.type selects ('STDiT3-XL/2' -> 'opensora', 'wan' -> 'wan')."""
    for name, (_, types) in BACKENDS.items():
        if model_type in types:
            return name
    raise VaderError(f"model.type={model_type!r} is not valid; choose one of: {', '.join(MODEL_TYPES)}")


def backend_module(name: str) -> BackendModule:
    """The module of backend `name`: its check_config, settings, build, meta_part, weight_problems, ..."""
    if name not in BACKENDS:
        raise VaderError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name][0])  # type: ignore[return-value]


def backend_class(name: str) -> type:
    """The generator class of backend `name` (e.g. 'wan' -> WanGenerator)."""
    return backend_module(name).Generator


def settings_class(name: str) -> type:
    """The settings class of backend `name` (e.g. 'wan' -> WanSettings)."""
    return backend_module(name).Settings


def settings_from_config(cfg) -> object:  # type: ignore[no-untyped-def]
    """The settings the config's backend is built from (`VaderConfig` -> WanSettings, ...)."""
    return backend_module(cfg.backend).settings(cfg)


def build_generator(cfg, device, prompts: list[str] | None = None, cache=None):  # type: ignore[no-untyped-def]
    """The config's pipeline; with `prompts`, every prompt encoded (through `cache`) and the text encoder
    released before the denoiser and the VAE load."""
    return backend_module(cfg.backend).build(cfg, device, prompts=prompts, cache=cache)


__all__ = ["BACKENDS", "MODEL_TYPES", "backend_class", "backend_module", "backend_of", "build_generator",
           "settings_class", "settings_from_config"]
