"""The reward registry: every reward is described once, by one `RewardSpec` record in `REWARDS`.

A record says how to build the reward with its weights (`build`), how to build it with no weights on
the meta device for `vader plan` (`skeleton`), which weights it loads (`weights`), whether it needs a
decoded clip rather than single frames (`needs_clip`), its frames -> model-input resize when the run
gives none (`resize`), whether gradients flow through it (`differentiable`) and the `sources` keys that
override its weights (`source_keys`). Everything else is read off the records: `reward_names`,
`build_reward` (also {name: weight} mixes), `vader.rewards.skeleton.reward_skeleton`, `reward_sources`
/ `required_weights` / `check_reward_weights`, `check_decode_frame`, `is_differentiable`,
`describe_rewards`, and the reward keys of `SOURCE_KEYS`.

Adding a reward `foo`: one new file, `vader/rewards/foo.py` (the Reward subclass, its `build` and
`skeleton` factories, its `weights` function and `sources` key docs if it loads weights), and here its
module in the import line below plus one `RewardSpec("foo", ...)` entry in `REWARDS`. The reward
modules import no model library at import time (transformers / open_clip load inside the factories).

Model weights come from the Hugging Face hub (cache respected, `HF_HUB_OFFLINE` honoured) or from
local paths given in `sources` (keys: `vader.rewards.hub.SOURCE_KEYS`); `check_reward_weights`
says, before anything is generated, which weights are missing offline and how to get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vader.errors import VaderError
from vader.rewards import actpred, aesthetic, builtin, hps, pickscore, skeleton, toy, videoreward, xclip
from vader.rewards.base import (
    RESIZE_MODES,
    Reward,
    RewardOutput,
    WeightedReward,
    as_dtype,
    check_clip_decode,
)
from vader.rewards.callable import CallableReward
from vader.rewards.hub import SOURCE_KEYS, WeightSource, check_sources, validate_sources

__all__ = [
    "REWARDS", "RESIZE_MODES", "SOURCE_KEYS", "Reward", "RewardOutput", "RewardSpec", "WeightedReward",
    "build_reward", "check_decode_frame", "check_resize", "check_reward_weights", "combine_rewards",
    "describe_rewards", "is_differentiable", "no_weights", "required_weights", "reward_mix", "reward_names",
    "reward_skeleton", "reward_sources", "reward_spec",
]


def no_weights(sources: dict, **options: Any) -> tuple[WeightSource, ...]:
    """The `weights` of a reward that loads none."""
    return ()


@dataclass(frozen=True)
class RewardSpec:
    """One reward, described once.

    name: the `reward_fn` name (no ':' in it: 'module:function' is a Python callable, not a name).
    doc: one line for listings (`describe_rewards`).
    build(**options) -> Reward with its weights loaded. Options: device, dtype (a torch dtype),
        hps_version, grad_checkpoint, sources (validated {key: override}), resize (already resolved:
        the run's, else this record's `resize`), and whatever else the caller passes (e.g.
        actpred_frames); a factory ignores the options it has no use for.
    skeleton(**options) -> the same Reward class and module tree with every parameter on the meta
        device, reading no weights (for `vader plan`). Options: dtype, hps_version, resize (resolved),
        grad_checkpoint, actpred_frames, num_frames (the decoded clip length, or None). None: the plan
        refuses the reward.
    weights(sources, **options) -> every WeightSource `build` loads, given the validated `sources`
        overrides and the options (hps_version).
    needs_clip: why the reward reads several decoded frames (it ends the sentence "reward_fn 'name' ...,
        but decode_frame=... decodes one frame"); None when single frames are enough.
    resize: the reward's own frames -> model-input resize ('squash' or 'crop'), used when the run sets
        none; None for rewards that have no such setting.
    differentiable: gradients reach the frames (VADER can train on it), as the built reward's
        `differentiable` class attribute says (absent = True).
    source_keys: {key: what it overrides} for every `sources` key `build` and `weights` read (they join
        SOURCE_KEYS, which validate_sources and the config reference list).
    """

    name: str
    doc: str
    build: Callable[..., Reward]
    skeleton: Callable[..., Reward] | None
    weights: Callable[..., Iterable[WeightSource]] = no_weights
    needs_clip: str | None = None
    resize: str | None = None
    differentiable: bool = True
    source_keys: Mapping[str, str] = field(default_factory=dict, hash=False)


# HPS's factories and keys: they belong next to HPSReward in hps.py (another owner); here until they move.
REWARDS: dict[str, RewardSpec] = {spec.name: spec for spec in (
    RewardSpec("colorfulness", "Hasler & Süsstrunk colourfulness (no weights)",
               builtin.build_colorfulness, builtin.build_colorfulness),
    RewardSpec("brightness", "mean luma (no weights)", builtin.build_brightness, builtin.build_brightness),
    RewardSpec("aesthetic", "LAION aesthetic predictor on CLIP ViT-L/14", aesthetic.build_aesthetic,
               skeleton.aesthetic_skeleton, aesthetic.aesthetic_sources, resize="squash",
               source_keys=aesthetic.SOURCE_DOCS),
    RewardSpec("hps", "HPS v2 / v2.1 human preference score (open_clip ViT-H-14)", hps.build_hps,
               skeleton.hps_skeleton, hps.hps_weights, resize="squash", source_keys=hps.SOURCE_DOCS),
    RewardSpec("aesthetic_hps", "the original's aesthetic + HPS combination", hps.build_aesthetic_hps,
               skeleton.aesthetic_hps_skeleton, hps.aesthetic_hps_weights, resize="squash",
               source_keys={**aesthetic.SOURCE_DOCS, **hps.SOURCE_DOCS}),
    RewardSpec("pick_score", "PickScore v1 (CLIP-H fine-tuned on Pick-a-Pic)", pickscore.build_pick_score,
               skeleton.pick_score_skeleton, pickscore.pick_sources, resize="crop",
               source_keys=pickscore.SOURCE_DOCS),
    RewardSpec("actpred", "p(the prompt's Kinetics action | clip), VideoMAE", actpred.build_actpred_reward,
               skeleton.actpred_skeleton, actpred.actpred_sources, needs_clip=actpred.NEEDS_CLIP,
               source_keys=actpred.SOURCE_DOCS),
    RewardSpec("toy_alignment", "toy world: log p(the prompt's attributes | clip)", toy.build_toy_alignment,
               skeleton.toy_alignment_skeleton, toy.classifier_sources,
               needs_clip=toy.NEEDS_CLIP, source_keys=toy.SOURCE_DOCS),
    RewardSpec("toy_size", "toy world: the object's area in % of the frame", toy.build_toy_size,
               skeleton.toy_size_skeleton, toy.classifier_sources, source_keys=toy.SOURCE_DOCS),
    RewardSpec("toy_frame", "toy world: log p(the prompt's shape, colour, size, background | each frame alone)",
               toy.build_toy_frame, skeleton.toy_frame_skeleton, toy.classifier_sources,
               source_keys=toy.SOURCE_DOCS),
    RewardSpec("toy_judge", "toy world: share of the prompt's attributes the independent judge reads (no "
               "gradient; a gold reward)", toy.build_toy_judge, skeleton.toy_judge_skeleton, toy.judge_sources,
               needs_clip=toy.NEEDS_CLIP_JUDGE, differentiable=False, source_keys={toy.JUDGE_KEY: toy.JUDGE_DOC}),
    *(RewardSpec(name, doc, *videoreward.factory(name), videoreward.videoreward_sources,
                 needs_clip=videoreward.NEEDS_CLIP, source_keys=videoreward.SOURCE_DOCS)
      for name, doc in (
          ("videoreward", "VideoReward (VideoAlign, Qwen2-VL-2B): VQ + MQ + TA, normalised (its 'Overall')"),
          ("videoreward_vq", "VideoReward visual quality (normalised)"),
          ("videoreward_mq", "VideoReward motion quality (normalised)"),
          ("videoreward_ta", "VideoReward text alignment (normalised)"))),
    RewardSpec("xclip", "X-CLIP text-video similarity (microsoft/xclip-base-patch32, 8 frames)", xclip.build_xclip,
               xclip.xclip_skeleton, xclip.xclip_sources, needs_clip=xclip.NEEDS_CLIP,
               source_keys=xclip.SOURCE_DOCS),
)}


def _register_source_keys() -> None:
    """The records' `sources` keys join SOURCE_KEYS (validate_sources, the config reference): importing
    vader.rewards.hub always runs this module first, so they are there whenever the hub module is."""
    for spec in REWARDS.values():
        for key, doc in spec.source_keys.items():
            SOURCE_KEYS.setdefault(key, doc)


_register_source_keys()


def reward_names() -> tuple[str, ...]:
    return tuple(REWARDS)


def reward_spec(name: str) -> RewardSpec:
    """The record of a registered reward (VaderError naming the registered ones otherwise)."""
    return REWARDS[next(iter(reward_mix(name)))]


def describe_rewards() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered reward, in registry order."""
    return [(spec.name, spec.doc) for spec in REWARDS.values()]


def reward_mix(reward_fn: str | dict[str, float]) -> dict[str, float]:
    """{name: weight} for a reward name or mix; VaderError for an unknown name or an empty mix."""
    mix = {reward_fn: 1.0} if isinstance(reward_fn, str) else dict(reward_fn)
    unknown = [n for n in mix if n not in REWARDS]
    if unknown or not mix:
        raise VaderError(f"reward_fn={reward_fn!r}: unknown reward {', '.join(map(repr, unknown)) or '(empty)'}; "
                         f"available: {', '.join(REWARDS)}")
    return mix


def check_resize(resize: str | None) -> None:
    if resize is not None and resize not in RESIZE_MODES:
        raise VaderError(f"reward resize={resize!r} must be one of {', '.join(RESIZE_MODES)}")


def combine_rewards(parts: dict[str, tuple[float, Reward]]) -> Reward:
    """One reward of weight 1 as it is; otherwise their weighted sum."""
    only = next(iter(parts.values()))
    return only[1] if len(parts) == 1 and only[0] == 1.0 else WeightedReward(parts)


def is_differentiable(reward_fn: str | dict[str, float]) -> bool:
    """Whether gradients reach the frames through `reward_fn` (what VADER needs; GRPO takes any reward).
    A 'module:function' spec is a Python callable: not differentiable."""
    if isinstance(reward_fn, str) and ":" in reward_fn:
        return CallableReward.differentiable
    return all(REWARDS[name].differentiable for name in reward_mix(reward_fn))


def check_decode_frame(reward_fn: str | dict[str, float], decode_frame: str) -> None:
    """VaderError when a reward in `reward_fn` reads a clip (its record's `needs_clip`) but
    `decode_frame` decodes one frame (config validation, before any model loads)."""
    names = {reward_fn} if isinstance(reward_fn, str) else set(reward_fn)
    for spec in REWARDS.values():
        if spec.name in names and spec.needs_clip:
            check_clip_decode(spec.name, spec.needs_clip, decode_frame)


def reward_skeleton(reward_fn: str | dict[str, float], *, dtype: torch.dtype | str, hps_version: str = "v2.1",
                    resize: str | None = None, grad_checkpoint: bool = False, actpred_frames: str = "decoded",
                    num_frames: int | None = None) -> Reward:
    """The reward `build_reward(reward_fn, dtype=dtype, ...)` builds, with every parameter and buffer on
    the meta device (frozen, eval mode); no download, no weights file, no Hugging Face cache.

    num_frames: the decoded clip length the plan will feed, when known; ActPred then builds its position
    table for that length now, as a real CPU tensor (as the real run holds it).
    """
    dtype = as_dtype(dtype)
    check_resize(resize)
    mix = reward_mix(reward_fn)
    missing = [n for n in mix if REWARDS[n].skeleton is None]
    if missing:  # a reward registered without one: say so rather than guess its model
        raise VaderError(f"reward_fn={reward_fn!r}: no weightless skeleton for {', '.join(map(repr, missing))}; "
                         f"skeletons exist for: {', '.join(n for n, spec in REWARDS.items() if spec.skeleton)}")
    options = dict(dtype=dtype, hps_version=hps_version, grad_checkpoint=grad_checkpoint,
                   actpred_frames=actpred_frames, num_frames=num_frames)
    reward = combine_rewards({name: (weight, REWARDS[name].skeleton(resize=resize or REWARDS[name].resize, **options))
                              for name, weight in mix.items()})
    reward = reward.to(dtype=dtype)  # as build_reward: every floating weight in dtype (the aesthetic head too)
    reward.requires_grad_(False)
    return reward.eval()


def reward_sources(reward_fn: str | dict[str, float], hps_version: str = "v2.1",
                   sources: dict | None = None) -> list[tuple[str, WeightSource]]:
    """(reward name, WeightSource) for every model file/folder `reward_fn` loads."""
    sources = validate_sources(sources)
    out = [(name, s) for name in reward_mix(reward_fn) for s in REWARDS[name].weights(sources, hps_version=hps_version)]
    seen: set[tuple] = set()
    return [(n, s) for n, s in out if not (s.pair in seen or seen.add(s.pair))]


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
    resize: 'squash' or 'crop' for every image reward (None: each reward's own, its record's `resize`:
    the original's). grad_checkpoint: checkpoint the reward's vision tower (saves activation memory when
    backpropagating through it). Other options reach the factories.
    """
    check_resize(resize)
    mix = reward_mix(reward_fn)
    kwargs = dict(device=device, dtype=as_dtype(dtype), hps_version=hps_version, grad_checkpoint=grad_checkpoint,
                  sources=validate_sources(sources), **options)
    reward = combine_rewards({name: (weight, REWARDS[name].build(resize=resize or REWARDS[name].resize, **kwargs))
                              for name, weight in mix.items()})
    reward = reward.to(device=device, dtype=as_dtype(dtype)) if any(True for _ in reward.parameters()) else reward
    reward.requires_grad_(False)
    return reward.eval()
