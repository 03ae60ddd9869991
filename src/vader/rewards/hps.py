"""HPS v2 / v2.1 (Human Preference Score): open_clip ViT-H-14 with the HPS checkpoint; the score is
the cosine between each image and its own prompt. Also the original's aesthetic + HPS combination.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.rewards.aesthetic import AestheticReward, aesthetic_sources, build_aesthetic
from vader.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    Reward,
    RewardOutput,
    TextEmbeddingCache,
    as_dtype,
    check_pinned,
    freeze,
    module_dtype,
)
from vader.rewards.hub import WeightSource, file_source, resolve_file

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"


SOURCE_DOCS = {
    "hps": "HPS checkpoint ({'state_dict': ...}): local file, hub repo or repo/file "
           "(default xswu/HPSv2/HPS_v2.1_compressed.pt, or HPS_v2_compressed.pt for hps_version v2.0)",
    "hps_arch": "open_clip model name the HPS checkpoint fits, or a path to an open_clip model-config .json "
                "(default ViT-H-14)",
}


def hps_version_file(hps_version: str) -> str:
    try:
        return HPS_FILES[str(hps_version)]
    except KeyError:
        raise VaderError(f"hps_version={hps_version!r} must be one of {', '.join(HPS_FILES)}") from None


def hps_source(hps_version: str = "v2.1", sources: dict | None = None) -> WeightSource:
    spec = (sources or {}).get("hps")
    return file_source("hps", f"HPS {hps_version} checkpoint", spec, HPS_REPO, hps_version_file(hps_version))


def load_checkpoint(path: str) -> dict[str, Tensor]:
    """The state dict of an HPS checkpoint ({'state_dict': ...}, as HPSv2 saves it, or a bare one)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: no mmap
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise VaderError(f"could not read the HPS checkpoint {path} ({type(exc).__name__}: {exc})") from exc
        warnings.warn(f"{path} holds more than tensors; loading it with weights_only=False (trusted file only)",
                      stacklevel=2)
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _register_arch(arch: str) -> str:
    """An open_clip model name; a path to an open_clip model-config .json is registered under its stem."""
    import open_clip

    path = Path(arch).expanduser()
    if arch.endswith(".json"):
        if not path.is_file():
            raise VaderError(f"sources['hps_arch']={arch!r}: no such open_clip model config")
        open_clip.add_model_config(path)
        return path.stem
    return arch


@contextlib.contextmanager
def quiet_root_warnings() -> Iterator[None]:
    """Drop the root logger's records while open_clip builds a model ("No pretrained weights loaded")."""
    root = logging.getLogger()
    drop = logging.Filter("vader-nothing")  # a filter that matches no logger name: drops every record
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class HPSReward(Reward):
    """HPS v2 / v2.1 on open_clip ViT-H-14.

    Range: score = cosine(image embedding, embedding of the sample's own prompt) in [-1, 1],
    typically 0.2–0.35 for generated images; reward = score; loss = 1 − score (as the original).
    Preprocessing: 'squash' (default, the original VADER: the whole frame resized to 224x224, bilinear)
    or 'crop' (open_clip's standard eval transform: shortest side 224 bicubic, centre crop); CLIP
    mean/std. Neither is HPSv2's own scoring preprocessing: `hpsv2.score` letterboxes (open_clip
    `image_transform(..., resize_longest_max=True)`: longest side to 224, padded to a square), which
    vader does not implement; 'crop' is tested against open_clip's transform, not against hpsv2.
    Text embeddings are encoded once per prompt (in `prepare`, else on first use) and cached.
    """

    name = "hps"

    def __init__(self, model: nn.Module, tokenizer=None, *, resize: str = "squash", grad_checkpoint: bool = False):
        super().__init__()
        import open_clip

        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(HPS_ARCH)
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.transform = ImageTransform(
            size=int(size), mode=resize,
            interpolation="bilinear" if resize == "squash" else cfg.get("interpolation", "bicubic"),
            mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)))
        if grad_checkpoint:
            visual.set_grad_checkpointing(True)
        self.text = TextEmbeddingCache(self._encode_text)
        freeze(self)

    @classmethod
    def from_pretrained(cls, checkpoint: str | WeightSource | None = None, *, hps_version: str = "v2.1",
                        arch: str = HPS_ARCH, device=None, dtype: torch.dtype | str = torch.float32,
                        **kwargs) -> HPSReward:
        """checkpoint: local .pt, hub repo or repo/file (default xswu/HPSv2, file by hps_version);
        arch: the open_clip model name it fits (ViT-H-14), or a path to an open_clip model-config .json."""
        import open_clip

        dtype = as_dtype(dtype)
        src = checkpoint if isinstance(checkpoint, WeightSource) else hps_source(
            hps_version, None if checkpoint is None else {"hps": checkpoint})
        path = resolve_file(src)
        check_pinned(src, path)
        state = load_checkpoint(path)
        arch = _register_arch(arch)
        try:
            with quiet_root_warnings():  # "No pretrained weights loaded": they are loaded just below
                model = open_clip.create_model(arch, pretrained=None, device=device or "cpu")
        except RuntimeError as exc:
            raise VaderError(f"open_clip cannot build {arch!r} (sources['hps_arch']): {str(exc)[:200]}") from exc
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise VaderError(f"{path} does not fit open_clip {arch}: {str(exc)[:400]}") from exc
        del state
        if result.missing_keys:
            raise VaderError(f"{path} does not fit open_clip {arch}: {len(result.missing_keys)} weights missing "
                             f"({', '.join(result.missing_keys[:4])}{' ...' if len(result.missing_keys) > 4 else ''})")
        if result.unexpected_keys:
            warnings.warn(f"{path}: {len(result.unexpected_keys)} entries not used by open_clip {arch} "
                          f"({', '.join(result.unexpected_keys[:4])})", stacklevel=2)
        return cls(model.to(dtype=dtype), open_clip.get_tokenizer(arch), **kwargs)

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        self.text.add(prompts)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(prompts).to(device))

    def image_embeds(self, images: Tensor) -> Tensor:
        pixels = self.transform(self.to_unit(images)).to(module_dtype(self.model))
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        image = self.image_embeds(images)
        return (image * self.text.get(prompts, image.device)).sum(-1)

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        score = self.scores(images, prompts)
        return RewardOutput(reward=score, loss=1.0 - score)


class AestheticHPSReward(Reward):
    """The original's 'aesthetic_hps': loss = (1.5 · aesthetic_loss + hps_loss) / 2 and
    reward = (aesthetic + 15 · hps) / 2 (weights chosen in the original to balance the scales).

    Range: reward ≈ (5..7 + 15 · 0.2..0.35) / 2 ≈ 4–6 in practice (0.5..12.5 in theory); loss =
    (0.15 · |aesthetic − 10| + 1 − hps) / 2 ≈ 0.6–0.7 in practice.
    """

    name = "aesthetic_hps"

    def __init__(self, aesthetic: AestheticReward, hps: HPSReward):
        super().__init__()
        self.aesthetic, self.hps = aesthetic, hps

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        self.hps.prepare(prompts, labels)

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        a = self.aesthetic.score_images(images, prompts)
        h = self.hps.score_images(images, prompts)
        return RewardOutput(reward=(a.reward + 15 * h.reward) / 2, loss=(1.5 * a.loss + h.loss) / 2)


# ---- the registry's record (vader.rewards.REWARDS) --------------------------------------------------


def hps_weights(sources: dict, *, hps_version: str = "v2.1", **_: object) -> tuple[WeightSource, ...]:
    return (hps_source(hps_version, sources),)


def build_hps(*, device=None, dtype=torch.float32, hps_version="v2.1", sources=None, resize: str,  # type: ignore[no-untyped-def]
              grad_checkpoint=False, **_: object) -> HPSReward:
    (source,) = hps_weights(sources or {}, hps_version=hps_version)
    return HPSReward.from_pretrained(source, hps_version=hps_version, arch=(sources or {}).get("hps_arch", HPS_ARCH),
                                     device=device, dtype=dtype, resize=resize, grad_checkpoint=grad_checkpoint)


def aesthetic_hps_weights(sources: dict, **options: object) -> tuple[WeightSource, ...]:
    return (*aesthetic_sources(sources), *hps_weights(sources, **options))  # type: ignore[arg-type]


def build_aesthetic_hps(**options: object) -> AestheticHPSReward:
    return AestheticHPSReward(build_aesthetic(**options), build_hps(**options))  # type: ignore[arg-type]
