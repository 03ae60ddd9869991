"""LAION aesthetic score: CLIP ViT-L/14 image embedding -> the improved-aesthetic-predictor MLP.

Only CLIP's vision tower and projection are loaded (the text tower is not needed).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.rewards.base import (
    ImageTransform,
    Reward,
    RewardOutput,
    as_dtype,
    check_pinned,
    checkpoint_layers,
    freeze,
    module_dtype,
)
from vader.rewards.hub import (
    WeightSource,
    file_source,
    folder_source,
    given_sources,
    load_error,
    pretrained_path,
    resolve_file,
)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
# the LAION `sac+logos+ava1-l14-linearMSE.pth` MLP, as TRL publishes it for DDPO
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
# the `sources` keys it reads -> what they override (documented in the config reference)
SOURCE_DOCS = {
    "aesthetic_clip": "CLIP ViT-L/14 for 'aesthetic': hub id or local save_pretrained folder "
                      "(default openai/clip-vit-large-patch14; only the vision tower is loaded)",
    "aesthetic_head": "LAION aesthetic MLP state dict (.pth): local file, hub repo or repo/file "
                      "(default trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth = sac+logos+ava1-l14-linearMSE)",
}


def aesthetic_sources(sources: dict | None = None, **_: object) -> tuple[WeightSource, WeightSource]:
    """The CLIP folder and the MLP file, with `sources` overrides (the registry's `weights`)."""
    sources = sources or {}
    clip = folder_source("aesthetic_clip", "CLIP ViT-L/14 (aesthetic)", sources.get("aesthetic_clip"), AESTHETIC_CLIP)
    head = file_source("aesthetic_head", "LAION aesthetic MLP", sources.get("aesthetic_head"), *AESTHETIC_HEAD)
    return clip, head


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head: linear layers only (no activations), with the
    dropouts of the published model, so its state-dict keys are layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)

    @classmethod
    def from_file(cls, path: str) -> AestheticMLP:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VaderError(f"could not read the aesthetic MLP {path} ({type(exc).__name__}: {exc})") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if "layers.0.weight" not in state:
            raise VaderError(f"{path} is not an aesthetic MLP state dict (no layers.0.weight; keys: "
                             f"{', '.join(list(state)[:5])})")
        head = cls(in_dim=state["layers.0.weight"].shape[1])
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise VaderError(f"{path} does not fit the aesthetic MLP: {exc}") from exc
        return head


def _vision_parts(clip_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(vision_model, visual_projection) of a transformers CLIPModel or CLIPVisionModelWithProjection."""
    vision = getattr(clip_model, "vision_model", None)
    projection = getattr(clip_model, "visual_projection", None)
    if vision is None or projection is None:
        raise TypeError(f"{type(clip_model).__name__} has no vision_model/visual_projection "
                        "(expected transformers CLIPModel or CLIPVisionModelWithProjection)")
    return vision, projection


def clip_image_embeds(vision: nn.Module, projection: nn.Module, pixels: Tensor) -> Tensor:
    """Projected (not normalised) CLIP image embeddings, independent of the transformers version."""
    return projection(vision(pixel_values=pixels, return_dict=True).pooler_output)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load report and progress bar (the loaders check the loading info instead;
    the CLIP text weights are 'unexpected' on purpose when only the vision tower is loaded)."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def check_loading_info(src: WeightSource, path: str, info: dict) -> None:
    """VaderError when weights the model needs were not in the checkpoint (they would be random)."""
    bad = [*(info.get("missing_keys") or []), *(info.get("mismatched_keys") or [])]
    if bad:
        raise VaderError(f"{src.what} at {path} lacks weights the model needs: "
                         f"{', '.join(sorted(map(str, bad))[:5])}{' ...' if len(bad) > 5 else ''}")


def load_clip_vision(src: WeightSource, dtype: torch.dtype) -> nn.Module:
    """CLIPVisionModelWithProjection from a CLIPModel checkpoint (vision tower + projection only)."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    path = pretrained_path(src)
    try:
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, CLIPConfig):
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim  # not always in the nested config
        else:
            vision_config = config
        with quiet_transformers():
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                path, config=vision_config, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise load_error(src, exc) from exc
    check_loading_info(src, path, info)
    return model


class AestheticReward(Reward):
    """LAION aesthetic predictor on CLIP ViT-L/14 image embeddings (as the original VADER).

    Range: score ≈ 1..10 (most images 4–7); reward = score. Loss as the original: |score − target| ·
    grad_scale with target 10 and grad_scale 0.1, so 0..0.9 (≈ 0.3–0.6 in practice).
    Preprocessing: 'squash' (default, the original: the whole frame resized to 224x224, bilinear)
    or 'crop' (CLIP's processor: shortest side 224 bicubic, centre crop); CLIP mean/std.
    """

    name = "aesthetic"

    def __init__(self, clip_model: nn.Module, head: nn.Module, *, resize: str = "squash", target: float = 10.0,
                 grad_scale: float = 0.1, grad_checkpoint: bool = False):
        super().__init__()
        self.vision_model, self.visual_projection = _vision_parts(clip_model)  # the text tower is dropped
        self.head = head
        self.target, self.grad_scale = float(target), float(grad_scale)
        size = int(getattr(getattr(self.vision_model, "config", None), "image_size", 224))
        self.transform = ImageTransform(size=size, mode=resize,
                                        interpolation="bilinear" if resize == "squash" else "bicubic")
        if grad_checkpoint:
            checkpoint_layers(self.vision_model.encoder.layers)
        freeze(self)

    @classmethod
    def from_pretrained(cls, clip: str | WeightSource | None = None, head: str | WeightSource | None = None, *,
                        device=None, dtype: torch.dtype | str = torch.float32, **kwargs) -> AestheticReward:
        """clip: hub id / local folder of a CLIPModel (default openai/clip-vit-large-patch14);
        head: local .pth, hub repo or repo/file (default the LAION MLP from trl-lib/ddpo-aesthetic-predictor)."""
        dtype = as_dtype(dtype)
        clip_src, head_src = given_sources((clip, head), ("aesthetic_clip", "aesthetic_head"), aesthetic_sources)
        head_path = resolve_file(head_src)
        check_pinned(head_src, head_path)
        mlp = AestheticMLP.from_file(head_path)
        vision = load_clip_vision(clip_src, dtype)
        return cls(vision, mlp, **kwargs).to(device=device, dtype=dtype)

    def scores(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> aesthetic scores [N] (float32)."""
        pixels = self.transform(self.to_unit(images)).to(module_dtype(self.vision_model))
        embeds = F.normalize(clip_image_embeds(self.vision_model, self.visual_projection, pixels).float(), dim=-1)
        return self.head(embeds.to(module_dtype(self.head))).squeeze(-1).float()

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        score = self.scores(images)
        return RewardOutput(reward=score, loss=(score - self.target).abs() * self.grad_scale)


def build_aesthetic(*, device=None, dtype: torch.dtype | str = torch.float32, sources: dict | None = None,
                    resize: str, grad_checkpoint: bool = False, **_: object) -> AestheticReward:
    """The registry's factory: the reward with the weights `sources` names (defaults otherwise); `resize`
    as resolved by the registry (the run's, else the record's)."""
    clip, head = aesthetic_sources(sources)
    return AestheticReward.from_pretrained(clip, head, device=device, dtype=dtype, resize=resize,
                                           grad_checkpoint=grad_checkpoint)
