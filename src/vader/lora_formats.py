"""LoRA files in diffusers' format: the one a run writes for other tools, and the ones vader loads.

Out: `bake` folds the LoRA's strength (alpha / rank) into lora_B and writes lora_alpha = rank and
lora_dropout = 0 in the metadata, so a loader that reads the metadata (diffusers) and one that reads
the tensors alone (alpha defaults to the rank) both apply W + B @ A, what was trained, and no loader
turns a dropout layer on.

In: a `pytorch_lora_weights.safetensors` (ours, or any diffusers-format LoRA) or a LoRA in another key
format that the backend pipeline's own `lora_state_dict` converts (musubi-tuner/kohya `lora_unet_...`
with `.alpha`, the original Wan `diffusion_model.blocks...`, LTX-Video's). `read_lora` gives one
(A, B) per module with the strength baked into B, as written out; `lora_config_for` is the peft
config that adapts exactly those modules; `load_into` copies them into a denoiser's LoRA layers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vader.errors import VaderError

ADAPTER_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME: our LoRA folders
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_PREFIX = "base_model.model."
TRANSFORMER_PREFIX = "transformer."  # diffusers' prefix of the denoiser's LoRA keys
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# keys that only LoRA files outside peft's own format have: diffusers, the original Wan / LTX-Video
# checkpoints' names, musubi-tuner / kohya
FOREIGN_PREFIXES = (TRANSFORMER_PREFIX, "diffusion_model.", "lora_unet_")
FOREIGN_MARKERS = (".lora_down.", ".lora_up.")
# the denoiser class -> the diffusers pipeline whose LoRA loader (and key conversion) it matches
PIPELINES = {
    "WanTransformer3DModel": "WanPipeline",
    "CogVideoXTransformer3DModel": "CogVideoXPipeline",
    "LTXVideoTransformer3DModel": "LTXPipeline",
}
SHOWN = 3  # module names an error lists


# ---- out ------------------------------------------------------------------------------------------


def _module(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def lora_scales(state: dict[str, Tensor], config: Any) -> dict[str, float]:
    """{module: the scale peft applies} for a peft state dict (keys `<module>.lora_A.weight`) and its
    LoraConfig: lora_alpha (or its alpha_pattern entry) over the rank, or over its square root (rsLoRA)."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = dict(getattr(config, "alpha_pattern", None) or {})
    scales = {}
    for key, value in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = _module(key)
        rank = value.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
        scales[module] = alpha / (math.sqrt(rank) if getattr(config, "use_rslora", False) else rank)
    return scales


def bake(state: dict[str, Tensor], config: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state with lora_B multiplied by its module's scale, metadata saying lora_alpha = rank and
    lora_dropout = 0): applying W + B @ A from the tensors alone is what the peft model computes.
    A scale of exactly 1 leaves the tensors untouched (bit-equal to the peft state)."""
    scales = lora_scales(state, config)
    out = {}
    for key, value in state.items():
        scale = scales.get(_module(key), 1.0)
        out[key] = value * scale if key.endswith(".lora_B.weight") and scale != 1.0 else value
    metadata = config.to_dict()
    rank_pattern = dict(metadata.get("rank_pattern") or {})
    metadata.update(lora_alpha=metadata["r"], alpha_pattern=rank_pattern, lora_dropout=0.0, use_rslora=False)
    for name, value in metadata.items():
        if isinstance(value, set):
            metadata[name] = sorted(value)
    return out, metadata


# diffusers' WanTransformer3DModel module names -> the original Wan checkpoint's (what ComfyUI's Wan model
# and the Wan-Video code name them): the inverse of diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`
WAN_ORIGINAL_NAMES = (
    (".attn1.to_out.0", ".self_attn.o"), (".attn1.to_q", ".self_attn.q"), (".attn1.to_k", ".self_attn.k"),
    (".attn1.to_v", ".self_attn.v"), (".attn2.to_out.0", ".cross_attn.o"), (".attn2.to_q", ".cross_attn.q"),
    (".attn2.to_k", ".cross_attn.k"), (".attn2.to_v", ".cross_attn.v"), (".attn2.add_k_proj", ".cross_attn.k_img"),
    (".attn2.add_v_proj", ".cross_attn.v_img"), (".ffn.net.0.proj", ".ffn.0"), (".ffn.net.2", ".ffn.2"),
)
ORIGINAL_WAN_PREFIX = "diffusion_model."


def original_wan_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A baked diffusers-format Wan LoRA (`transformer.blocks.N.attn1.to_q.lora_A.weight`) under the
    original Wan names (`diffusion_model.blocks.N.self_attn.q.lora_A.weight`), the names ComfyUI's Wan
    loader maps. No `.alpha` keys: the strength is in B, and a loader without alpha applies scale 1.
    A module outside the blocks' attention and FFN has no original name here: ValueError."""
    out = {}
    for key, value in state.items():
        name = key[len(TRANSFORMER_PREFIX):] if key.startswith(TRANSFORMER_PREFIX) else key
        module, _, tail = name.partition(".lora_")
        for ours, theirs in WAN_ORIGINAL_NAMES:
            if module.startswith("blocks.") and module.endswith(ours):
                out[f"{ORIGINAL_WAN_PREFIX}{module[:-len(ours)]}{theirs}.lora_{tail}"] = value
                break
        else:
            raise ValueError(f"LoRA key {key!r} has no original Wan name (only the blocks' attention and FFN do)")
    return out


# ---- in -------------------------------------------------------------------------------------------


def lora_file(path: str | Path) -> Path:
    """The weights file a LoRA path names: a folder's adapter_model.safetensors (ours), else its
    pytorch_lora_weights.safetensors (diffusers'); a file as given. The path may not exist."""
    path = Path(path)
    if path.is_dir():
        ours, theirs = path / ADAPTER_FILE, path / DIFFUSERS_FILE
        return theirs if theirs.is_file() and not ours.is_file() else ours
    return path


def is_foreign(path: Path, keys: list[str] | None = None) -> bool:
    """Whether a LoRA file is not in peft's key format (ours, the original VADER .pt): diffusers',
    musubi/kohya's, a checkpoint's original names. Reads only the header of a .safetensors."""
    if path.name == DIFFUSERS_FILE:
        return True
    if path.suffix != ".safetensors":
        return False  # the original VADER .pt files: peft's keys
    if keys is None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:  # unreadable: the peft path reports it as it always did
            return False
    return any(k.startswith(FOREIGN_PREFIXES) or any(m in k for m in FOREIGN_MARKERS) for k in keys)


@dataclass
class ForeignLora:
    """A LoRA read from a file in diffusers' (or a convertible) format, in the denoiser's module names."""

    path: Path
    modules: dict[str, tuple[Tensor, Tensor]]  # module -> (A [r, in], B [out, r] with the strength baked in)
    converted_by: str | None  # the pipeline whose lora_state_dict converted the keys; None: diffusers' keys

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _) in self.modules.items()}


def _read(path: Path, key: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # truncated, zero-length, not a safetensors file
        raise VaderError(f"{key}={str(path)!r}: cannot read the LoRA file ({_first_line(exc)}); it is corrupt, "
                         "truncated or not a LoRA") from None
    try:
        metadata = json.loads(raw) if raw else None
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
    except ValueError as exc:
        raise VaderError(f"{key}={str(path)!r}: the LoRA settings in the file's metadata ({METADATA_KEY}) cannot be "
                         f"read ({_first_line(exc)})") from None
    return state, metadata


def _convert(state: dict[str, Tensor], pipelines: list[str]) -> tuple[dict[str, Tensor], str | None]:
    """The state in diffusers' key format (`transformer.<module>.lora_A.weight`), converted by the first
    pipeline's `lora_state_dict` that yields only such keys; diffusers' own keys pass unchanged."""
    if all(k.startswith(TRANSFORMER_PREFIX) for k in state):
        return state, None
    import diffusers

    why = ""
    for name in pipelines:
        pipeline = getattr(diffusers, name, None)
        if pipeline is None:
            continue
        try:
            out = pipeline.lora_state_dict(dict(state))
        except Exception as exc:  # a converter that does not know these keys: try the next
            why = why or f"{name}.lora_state_dict: {_first_line(exc)}"
            continue
        if out and all(k.startswith(TRANSFORMER_PREFIX) for k in out):
            return out, name
    raise ValueError(why)


def read_lora(path: str | Path, pipelines: list[str] | None = None, key: str = "lora_ckpt_path") -> ForeignLora:
    """A diffusers-format (or convertible) LoRA file, checked: one-line VaderErrors naming `key` for an
    unknown key format, keys of other pipeline parts, LoRA pieces vader does not load (biases, conv),
    mismatched A/B and NaN/inf. `pipelines`: the pipeline names to convert with, the backend's first
    (default: every video pipeline vader has a backend for)."""
    path = Path(path)
    where = f"{key}={str(path)!r}"
    raw, metadata = _read(path, key)
    if not raw:
        raise VaderError(f"{where}: the LoRA file holds no tensors")
    order = list(dict.fromkeys([*(pipelines or []), *PIPELINES.values()]))
    try:
        state, converted_by = _convert(raw, order)
    except ValueError as exc:
        others = sorted(k for k in raw if not k.startswith(TRANSFORMER_PREFIX))
        if len(others) < len(raw):  # diffusers' format, with LoRAs of other pipeline parts
            raise VaderError(f"{where}: the file also holds LoRAs of other pipeline parts than the denoiser "
                             f"({', '.join(others[:SHOWN])}); vader loads only a denoiser LoRA "
                             f"(keys {TRANSFORMER_PREFIX}<module>.lora_A/B.weight): save the transformer's LoRA alone") from None
        first = ", ".join(sorted(raw)[:SHOWN]) + (f"; {str(exc)[:160]}" if str(exc) else "")
        raise VaderError(f"{where}: unknown LoRA format (keys such as {first}): vader loads its own LoRA folders, "
                         f"diffusers' {DIFFUSERS_FILE} (keys transformer.<module>.lora_A.weight) and the formats "
                         f"diffusers' {'/'.join(order)}.lora_state_dict convert (musubi-tuner/kohya lora_unet_..., "
                         "original diffusion_model....)") from None
    settings = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in (metadata or {}).items()
                if k.startswith(TRANSFORMER_PREFIX)}
    modules = _modules(state, settings, where)
    bad = next((m for m, (a, b) in modules.items() if not (bool(torch.isfinite(a).all())
                                                          and bool(torch.isfinite(b).all()))), None)
    if bad is not None:
        raise VaderError(f"{where}: the LoRA of {bad} holds NaN or inf values; use another LoRA")
    return ForeignLora(path, modules, converted_by)


def _modules(state: dict[str, Tensor], settings: dict[str, Any], where: str) -> dict[str, tuple[Tensor, Tensor]]:
    from peft.utils.other import get_pattern_key

    parts: dict[str, dict[str, Tensor]] = {}
    other: list[str] = []
    for name, value in state.items():
        name = name.removeprefix(TRANSFORMER_PREFIX)
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if name.endswith(suffix):
                parts.setdefault(name.removesuffix(suffix), {})[suffix] = value
                break
        else:
            other.append(name)
    if other:
        what = "LoRA biases (lora_B.bias), which vader's LoRA has not" if any(k.endswith(".lora_B.bias") for k in other) \
            else "keys that are not lora_A/lora_B weights"
        raise VaderError(f"{where}: the LoRA file holds {what} (e.g. {', '.join(sorted(other)[:SHOWN])})")
    alpha_pattern = dict(settings.get("alpha_pattern") or {})
    rslora = bool(settings.get("use_rslora", False))
    modules = {}
    for module, tensors in sorted(parts.items()):
        a, b = tensors.get(".lora_A.weight"), tensors.get(".lora_B.weight")
        if a is None or b is None:
            missing = "lora_B" if a is not None else "lora_A"
            raise VaderError(f"{where}: {module} has no {missing}.weight (a LoRA needs both)")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise VaderError(f"{where}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not the two "
                             "factors of a linear layer's LoRA (rank x in, out x rank)")
        rank = a.shape[0]
        if ".alpha" in tensors:
            alpha = float(tensors[".alpha"].item())
        elif "lora_alpha" in settings or alpha_pattern:
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), settings.get("lora_alpha", rank))
        else:
            alpha = rank  # no metadata: a tensor-only LoRA applies B @ A (diffusers and ComfyUI do the same)
        scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
        b = b.float() * scale if scale != 1.0 else b
        modules[module] = (a, b)
    return modules


def lora_config_for(lora: ForeignLora, dropout: float = 0.0):  # type: ignore[no-untyped-def]
    """The peft LoraConfig that adapts exactly the file's modules at their ranks, alpha = rank (the
    strength is in B)."""
    from peft import LoraConfig

    ranks = lora.ranks
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=sorted(ranks),
                      rank_pattern=pattern, alpha_pattern=dict(pattern))


def load_into(model: nn.Module, lora: ForeignLora, key: str = "lora_ckpt_path") -> int:
    """Copy the file's LoRA into the LoRA layers peft injected into `model` (adapter 'default'), each B
    divided by the layer's own scale, so the model computes W + B @ A of the file whatever its
    lora_alpha; LoRA layers the file does not name get B = 0 (they add nothing). One-line VaderErrors:
    modules the model lacks, a LoRA for another model size, modules the model's LoRA does not adapt,
    another rank. Returns the number of tensors loaded."""
    from peft.tuners.lora import LoraLayer

    where = f"{key}={str(lora.path)!r}"
    named = dict(model.named_modules())
    unknown = [m for m in lora.modules if m not in named]
    if unknown:
        raise VaderError(f"{where}: {len(unknown)} of the {len(lora.modules)} modules of the LoRA match no module of "
                         f"this denoiser ({type(model).__name__}): {', '.join(unknown[:SHOWN])}"
                         f"{', ...' if len(unknown) > SHOWN else ''}; it is a LoRA for another model")
    for module, (a, b) in lora.modules.items():
        target = named[module]
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        shape = tuple(base.weight.shape) if isinstance(getattr(base, "weight", None), torch.Tensor) else None
        if not isinstance(base, nn.Linear) or shape is None:
            raise VaderError(f"{where}: {module} is a {type(base).__name__} in this denoiser, not a linear layer; "
                             "it is a LoRA for another model")
        if (b.shape[0], a.shape[1]) != shape:
            raise VaderError(f"{where}: {module}.lora_A/B give a ({b.shape[0]}, {a.shape[1]}) update (lora_A "
                             f"{tuple(a.shape)}, lora_B {tuple(b.shape)}), the model's {module}.weight is {shape}: "
                             "a LoRA for another model size")
    layers = {name: m for name, m in named.items() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    outside = [m for m in lora.modules if m not in layers]
    if outside:
        raise VaderError(f"{where}: the LoRA adapts {len(outside)} module(s) that this run's LoRA does not "
                         f"({', '.join(outside[:SHOWN])}{', ...' if len(outside) > SHOWN else ''}); vader trains a "
                         "LoRA on the backend's target modules only: use this LoRA with vader infer or vader eval")
    for module, rank in lora.ranks.items():
        have = layers[module].r["default"]
        if rank != have:
            raise VaderError(f"{where}: the LoRA has rank {rank} at {module}, this run's LoRA rank {have}: "
                             f"set lora_rank={rank}")
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if name in lora.modules:
                a, b = lora.modules[name]
                lora_a.copy_(a.to(lora_a.dtype))
                scale = layer.scaling["default"]
                lora_b.copy_((b.float() / scale if scale != 1.0 else b).to(lora_b.dtype))
            else:
                lora_b.zero_()
    return 2 * len(lora.modules)


def pipelines_of(model: nn.Module | None = None, pipeline: str | None = None) -> list[str]:
    """The pipeline names to convert a LoRA for `model` (its own first) or for the named pipeline."""
    names = [pipeline] if pipeline else []
    if model is not None and type(model).__name__ in PIPELINES:
        names.append(PIPELINES[type(model).__name__])
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
