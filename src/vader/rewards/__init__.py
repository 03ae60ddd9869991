"""Reward registry: one name -> one factory; `build_reward` also takes {name: weight} mixes.

Names: colorfulness, brightness (weight-free), aesthetic, hps, aesthetic_hps, pick_score, actpred,
toy_alignment, toy_size (the toy world's classifier, shipped in the package).
Model weights come from the Hugging Face hub (cache respected, `HF_HUB_OFFLINE` honoured) or from
local paths given in `sources` (keys: `vader.rewards.hub.SOURCE_KEYS`); `check_reward_weights`
says, before anything is generated, which weights are missing offline and how to get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from vader.errors import VaderError
from vader.rewards.base import RESIZE_MODES, Reward, RewardOutput, WeightedReward, as_dtype
from vader.rewards.builtin import Brightness, Colorfulness
from vader.rewards.hub import SOURCE_KEYS, WeightSource, check_sources, folder_source, validate_sources
from vader.rewards.toy import SOURCE_DOC as _TOY_SOURCE_DOC
from vader.rewards.toy import SOURCE_KEY as _TOY_SOURCE_KEY

# Registered here, where the toy rewards are: importing vader.rewards.hub always runs this module first,
# so validate_sources and the config reference see the key.
SOURCE_KEYS.setdefault(_TOY_SOURCE_KEY, _TOY_SOURCE_DOC)

__all__ = [
    "AVAILABLE", "RESIZE_MODES", "SOURCE_KEYS", "Reward", "RewardOutput", "WeightedReward",
    "build_reward", "check_decode_frame", "check_reward_weights", "required_weights", "reward_names",
    "reward_sources",
]


def _aesthetic(*, device=None, dtype=torch.float32, sources=None, resize=None, grad_checkpoint=False, **_):
    from vader.rewards.aesthetic import AestheticReward, aesthetic_sources

    clip, head = aesthetic_sources(sources)
    return AestheticReward.from_pretrained(clip, head, device=device, dtype=dtype, resize=resize or "squash",
                                           grad_checkpoint=grad_checkpoint)


def _hps(*, device=None, dtype=torch.float32, hps_version="v2.1", sources=None, resize=None,
         grad_checkpoint=False, **_):
    from vader.rewards.hps import HPS_ARCH, HPSReward, hps_source

    return HPSReward.from_pretrained(hps_source(hps_version, sources), hps_version=hps_version,
                                     arch=(sources or {}).get("hps_arch", HPS_ARCH), device=device, dtype=dtype,
                                     resize=resize or "squash", grad_checkpoint=grad_checkpoint)


def _aesthetic_hps(**options):
    from vader.rewards.hps import AestheticHPSReward

    return AestheticHPSReward(_aesthetic(**options), _hps(**options))


def _pick_score(*, device=None, dtype=torch.float32, sources=None, resize=None, grad_checkpoint=False, **_):
    from vader.rewards.pickscore import PickScoreReward, pick_sources

    model, processor = pick_sources(sources)
    return PickScoreReward.from_pretrained(model, processor, device=device, dtype=dtype, resize=resize or "crop",
                                           grad_checkpoint=grad_checkpoint)


def _actpred(*, device=None, dtype=torch.float32, sources=None, grad_checkpoint=False, resize=None,
             hps_version=None, actpred_frames="decoded", **options):
    from vader.rewards.actpred import build_actpred  # lazily: its file may be absent in a partial install

    model = (sources or {}).get("actpred")
    return build_actpred(device=device, dtype=dtype, grad_checkpoint=grad_checkpoint, frames=actpred_frames,
                         **({"model": model} if model else {}), **options)


def _toy_alignment(**options):
    from vader.rewards.toy import build_toy_alignment

    return build_toy_alignment(**options)


def _toy_size(**options):
    from vader.rewards.toy import build_toy_size

    return build_toy_size(**options)


AVAILABLE: dict[str, Callable[..., Reward]] = {
    "colorfulness": lambda **_: Colorfulness(),
    "brightness": lambda **_: Brightness(),
    "aesthetic": _aesthetic,
    "hps": _hps,
    "aesthetic_hps": _aesthetic_hps,
    "pick_score": _pick_score,
    "actpred": _actpred,
    "toy_alignment": _toy_alignment,
    "toy_size": _toy_size,
}


def reward_names() -> tuple[str, ...]:
    return tuple(AVAILABLE)


def check_decode_frame(reward_fn: str | dict[str, float], decode_frame: str) -> None:
    """VaderError when a reward in `reward_fn` reads a clip but `decode_frame` decodes one frame
    (config validation, before any model loads)."""
    names = {reward_fn} if isinstance(reward_fn, str) else set(reward_fn)
    if "actpred" in names:
        from vader.rewards.actpred import check_decode_frame as check_actpred

        check_actpred(decode_frame)
    if "toy_alignment" in names:
        from vader.rewards.toy import check_decode_frame as check_toy

        check_toy(decode_frame)


def _spec(reward_fn: str | dict[str, float]) -> dict[str, float]:
    spec = {reward_fn: 1.0} if isinstance(reward_fn, str) else dict(reward_fn)
    unknown = [n for n in spec if n not in AVAILABLE]
    if unknown or not spec:
        raise VaderError(f"reward_fn={reward_fn!r}: unknown reward {', '.join(map(repr, unknown)) or '(empty)'}; "
                         f"available: {', '.join(AVAILABLE)}")
    return spec


def reward_sources(reward_fn: str | dict[str, float], hps_version: str = "v2.1",
                   sources: dict | None = None) -> list[tuple[str, WeightSource]]:
    """(reward name, WeightSource) for every model file/folder `reward_fn` loads."""
    sources = validate_sources(sources)
    out: list[tuple[str, WeightSource]] = []
    for name in _spec(reward_fn):
        if name in ("aesthetic", "aesthetic_hps"):
            from vader.rewards.aesthetic import aesthetic_sources

            out += [(name, s) for s in aesthetic_sources(sources)]
        if name in ("hps", "aesthetic_hps"):
            from vader.rewards.hps import hps_source

            out.append((name, hps_source(hps_version, sources)))
        if name == "pick_score":
            from vader.rewards.pickscore import pick_sources

            out += [(name, s) for s in pick_sources(sources)]
        if name == "actpred":
            out += [(name, s) for s in _actpred_sources(sources)]
        if name in ("toy_alignment", "toy_size"):
            from vader.rewards.toy import classifier_folder

            out.append((name, WeightSource(_TOY_SOURCE_KEY, "toy world classifier", local=classifier_folder(sources),
                                           kind="model")))
    seen: set[tuple] = set()
    return [(n, s) for n, s in out if not (s.pair in seen or seen.add(s.pair))]


def _actpred_sources(sources: dict) -> list[WeightSource]:
    if sources.get("actpred"):
        return [folder_source("actpred", "ActPred video classifier", sources["actpred"], "")]
    from vader.rewards.actpred import ACTPRED_WEIGHTS

    return [WeightSource("actpred", "ActPred video classifier", repo=repo, filename=file,
                         kind="model" if file is None else "file") for repo, file in ACTPRED_WEIGHTS]


def required_weights(reward_fn: str | dict[str, float], hps_version: str = "v2.1",
                     sources: dict | None = None) -> list[tuple[str, str | None]]:
    """(hub repo id, file) per model `reward_fn` loads; file None = the repo's model folder
    (config + weights). A local path from `sources` appears as (path, None)."""
    return [s.pair for _, s in reward_sources(reward_fn, hps_version, sources)]


def check_reward_weights(reward_fn: str | dict[str, float], hps_version: str = "v2.1", sources: dict | None = None,
                         *, cache_dir: str | os.PathLike | None = None) -> None:
    """Raise one VaderError (one line per missing model: repo id, file, the fix) when a reward's
    weights cannot load: a local path in `sources` that does not exist, or, offline
    (HF_HUB_OFFLINE=1), hub files that are not in the cache. Online, missing files download when
    the reward is built. Cheap: no model is built."""
    check_sources(reward_sources(reward_fn, hps_version, sources), cache_dir=cache_dir)


def build_reward(reward_fn: str | dict[str, float], *, device: str | torch.device | None = None,
                 dtype: torch.dtype | str = torch.float32, hps_version: str = "v2.1", grad_checkpoint: bool = False,
                 sources: dict | None = None, resize: str | None = None, **options) -> Reward:
    """A frozen (requires_grad False), eval-mode reward in `dtype` on `device` for a validated `reward_fn`.

    sources: per-model overrides (hub id, repo/file or local path), keys in SOURCE_KEYS.
    resize: 'squash' or 'crop' for every image reward (None: each reward's default — the original's:
    squash for aesthetic/hps, crop for pick_score). grad_checkpoint: checkpoint the reward's vision
    tower (saves activation memory when backpropagating through it). Other options reach the factories.
    """
    if resize is not None and resize not in RESIZE_MODES:
        raise VaderError(f"reward resize={resize!r} must be one of {', '.join(RESIZE_MODES)}")
    spec = _spec(reward_fn)
    kwargs = dict(device=device, dtype=as_dtype(dtype), hps_version=hps_version, grad_checkpoint=grad_checkpoint,
                  sources=validate_sources(sources), resize=resize, **options)
    parts: dict[str, tuple[float, Reward]] = {name: (weight, AVAILABLE[name](**kwargs)) for name, weight in spec.items()}
    only = next(iter(parts.values()))
    reward = only[1] if len(parts) == 1 and only[0] == 1.0 else WeightedReward(parts)
    reward = reward.to(device=device, dtype=as_dtype(dtype)) if any(True for _ in reward.parameters()) else reward
    reward.requires_grad_(False)
    return reward.eval()
