"""ActPred: how surely a video action classifier sees the prompt's action in the generated clip.

As in the original VADER (VideoCrafter version): VideoMAE fine-tuned on Kinetics-400
(`MCG-NJU/videomae-base-finetuned-kinetics`) classifies the decoded clip; the reward is the softmax
probability of the target action class (0..1) and the loss is the classifier's cross-entropy for that
class, -log p (what the original backpropagates: `outputs.loss` with the target as label).

The target action comes from the prompt (a class name found in it; see `vader.rewards.kinetics`) or
from an explicit label given to `prepare` ({prompt: label}; in a prompts file `prompt<TAB>label`).
Names are checked against the model's own `config.id2label`, so any video classifier with named
classes works the same way.

Frames (`frames`): 'decoded' (default, the original's) shows the classifier the decoded frames as
they are, as the original built VideoMAE with `num_frames` = the decoded frame count (8 for 'alt' on
16 frames): VideoMAE's position embeddings are a fixed sinusoid table, so the same weights take any
clip length; vader sets the table for each clip instead of rebuilding the model. An odd count is
sampled evenly up to a multiple of the tubelet (2) so every decoded frame is seen: 'fml' (3 frames)
shows first, middle, middle, last.
'resample' samples the decoded frames uniformly in time to `config.num_frames` (16 for the base
model, the length it was fine-tuned on), repeating frames when fewer were decoded: 'alt' on 16
frames shows each of 8 frames twice; 'all' on 51 frames shows 16 evenly spaced ones. Classifiers
other than VideoMAE always take `config.num_frames` ('resample'). One decoded frame ('-1' or a frame
index) is no clip, and raises VaderError.

Preprocessing is VideoMAEImageProcessor's, done on tensors so gradients reach the frames: resize the
shortest edge to 224 (bilinear, antialiased), centre-crop 224x224, scale to [0, 1], normalise with the
processor's mean/std (ImageNet's for the Kinetics checkpoints). The original instead squashed frames
to 224x224 without keeping the aspect ratio; the processor's crop is what the classifier was
evaluated with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES
from vader.rewards.aesthetic import quiet_transformers
from vader.rewards.base import Reward, RewardOutput, as_dtype, flag_checkpointed_as_training
from vader.rewards.hub import WeightSource, folder_source, loading_problems
from vader.rewards.kinetics import prompt_key, resolve_label
from vader.weights import download_command, download_hint

ACTPRED_MODEL = "MCG-NJU/videomae-base-finetuned-kinetics"
# (hub repository, file) pairs an offline check needs; None = the repository's model files.
ACTPRED_WEIGHTS = [(ACTPRED_MODEL, None)]
# the `sources` key it reads -> what it overrides (documented in the config reference)
SOURCE_DOCS = {
    "actpred": "ActPred video classifier: hub id or local folder (default MCG-NJU/videomae-base-finetuned-kinetics)",
}
# how the decoded frames reach the classifier (see the module docstring)
FRAME_MODES = ("decoded", "resample")
NEEDS_CLIP = "classifies a clip"  # why actpred refuses single frames (its record)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes


@dataclass(frozen=True)
class ClipTransform:
    """The image processor's steps as numbers: resize, centre crop, normalise."""

    shortest_edge: int | None = 224  # resize so the shorter side is this (aspect kept) ...
    resize: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_processor(cls, processor: Any) -> ClipTransform:
        """From a (VideoMAE) image processor, or its `to_dict()` / preprocessor_config.json contents."""
        d = dict(processor) if isinstance(processor, Mapping) else processor.to_dict()
        shortest, resize = None, None
        if d.get("do_resize", True):
            size = d.get("size")
            if isinstance(size, int):  # old feature extractors: an int is the shortest edge
                shortest = size
            elif isinstance(size, Mapping) and size.get("shortest_edge"):
                shortest = int(size["shortest_edge"])
            elif isinstance(size, Mapping) and size.get("height") and size.get("width"):
                resize = (int(size["height"]), int(size["width"]))
            else:
                raise VaderError(f"ActPred cannot follow the image processor's resize setting size={size!r}")
        crop = None
        if d.get("do_center_crop", True):
            c = d.get("crop_size")
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        if not d.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            mean, std = d.get("image_mean", IMAGENET_MEAN), d.get("image_std", IMAGENET_STD)
            mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
            std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
        resample = d.get("resample", 2)
        resample = getattr(resample, "value", resample)
        if resample not in _INTERPOLATION:
            raise VaderError(f"ActPred supports nearest/bilinear/bicubic resizing, not the processor's resample={resample!r}")
        return cls(shortest, resize, crop, mean, std, _INTERPOLATION[resample])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is not None:
            return self.resize
        if self.shortest_edge is None:
            return height, width
        s = self.shortest_edge
        # the processor's rule (transformers' get_resize_output_image_size): long side truncated
        return (int(s * height / width), s) if width <= height else (s, int(s * width / height))


def sample_indices(decoded: int, needed: int) -> list[int]:
    """`needed` frame indices spread evenly over `decoded` frames (segment centres; repeats if fewer)."""
    return [min(decoded - 1, int((i + 0.5) * decoded / needed)) for i in range(needed)]


def preprocess_clip(frames: Tensor, transform: ClipTransform, num_frames: int) -> Tensor:
    """[B, 3, K, H, W] in [-1, 1] -> the classifier's pixel_values [B, num_frames, 3, h, w] (float32),
    differentiable with respect to `frames`."""
    if frames.dim() != 5 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [B, 3, K, H, W], got {tuple(frames.shape)}")
    b, _, k, height, width = frames.shape
    if k < 2:
        raise VaderError(
            f"ActPred classifies a clip but got {k} decoded frame; decode_frame '-1' or a frame index "
            f"decodes one frame: use decode_frame {', '.join(repr(m) for m in CLIP_DECODE_FRAMES)}"
        )
    x = Reward.to_unit(frames)[:, :, sample_indices(k, num_frames)]  # [B, 3, T, H, W] in [0, 1]
    x = x.permute(0, 2, 1, 3, 4).reshape(b * num_frames, 3, height, width)
    size = transform.output_size(height, width)
    if size != (height, width):
        mode = transform.interpolation
        smooth = mode != "nearest"
        x = F.interpolate(x, size=size, mode=mode, antialias=smooth, align_corners=False if smooth else None)
        if mode == "bicubic":
            x = x.clamp(0, 1)  # the processor resizes uint8, which saturates
    if transform.crop is not None:
        x = center_crop(x, *transform.crop)
    mean = torch.tensor(transform.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.view(b, num_frames, 3, *x.shape[-2:])


def sinusoid_positions(n_position: int, dim: int) -> Tensor:
    """VideoMAE's fixed position table [1, n_position, dim] (transformers' get_sinusoid_encoding_table,
    computed in float64 like it, returned as float32)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
    return table.float()[None]


def center_crop(x: Tensor, crop_h: int, crop_w: int) -> Tensor:
    """The processor's centre crop: zero-pad first when the image is smaller than the crop."""
    h, w = x.shape[-2:]
    if crop_h > h or crop_w > w:
        pad_w, pad_h = max(crop_w - w, 0), max(crop_h - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - crop_h) / 2.0), int((w - crop_w) / 2.0)
    return x[..., top:top + crop_h, left:left + crop_w]


class ActPred(Reward):
    """Reward = p(target action | clip) from a frozen video classifier; loss = -log p.

    Range 0..1 (chance is 1/num_classes = 0.0025 for Kinetics-400).
    """

    name = "actpred"

    def __init__(self, model: nn.Module, transform: ClipTransform | None = None, grad_checkpoint: bool = False,
                 frames: str = "decoded"):
        super().__init__()
        if frames not in FRAME_MODES:
            raise VaderError(f"actpred frames={frames!r} must be one of {', '.join(FRAME_MODES)}")
        config = getattr(model, "config", None)
        id2label = getattr(config, "id2label", None)
        if not id2label:
            raise VaderError("the ActPred model has no config.id2label: it must be a video classifier with named classes")
        self.model = model
        self.num_frames = int(config.num_frames)
        self._embeddings = getattr(getattr(model, "videomae", None), "embeddings", None)
        if frames == "decoded" and not hasattr(self._embeddings, "position_embeddings"):
            frames = "resample"  # not a VideoMAE: the position table cannot follow the clip length
        self.frames = frames
        self._tubelet = int(getattr(config, "tubelet_size", 1))
        self._hidden = int(getattr(config, "hidden_size", 0))
        self._patches_per_step = (getattr(getattr(self._embeddings, "patch_embeddings", None), "num_patches", 0)
                                  // max(1, self.num_frames // self._tubelet))
        self._positions: dict[int, Tensor] = {}
        image_size = config.image_size
        image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        self.transform = transform or ClipTransform(shortest_edge=image_size[0], crop=image_size)
        out = self.transform.crop or self.transform.resize
        if out is not None and tuple(out) != image_size:
            raise VaderError(
                f"the image processor makes {out[0]}x{out[1]} frames but the ActPred model takes "
                f"{image_size[0]}x{image_size[1]}"
            )
        self.id2label = {int(i): str(name) for i, name in id2label.items()}
        self.label_names = [self.id2label[i] for i in sorted(self.id2label)]
        self.label2id = {name: i for i, name in self.id2label.items()}
        self._targets: dict[str, str] = {}  # prompt_key(prompt) -> label
        self.grad_checkpoint = bool(grad_checkpoint)
        if self.grad_checkpoint:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:  # transformers < 5
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ActPred:
        """Always eval (no dropout). transformers only checkpoints layers in training mode, so with
        grad_checkpoint the checkpointed layers alone are flagged as training (their own forward
        reads nothing else from the flag; dropout inside stays off)."""
        super().train(False)
        if self.grad_checkpoint:
            flag_checkpointed_as_training(self.model)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- targets -----------------------------------------------------------------------------

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        """Fix every prompt's target action before training: an explicit label ({prompt: label},
        compared ignoring case and punctuation) wins, else the action named in the prompt. Raises one
        VaderError for the first prompt without a recognisable action (and says how many more)."""
        explicit = {prompt_key(p): label for p, label in (labels or {}).items()}
        unknown = set(explicit) - {prompt_key(p) for p in prompts}
        if unknown:
            raise VaderError(
                f"action labels were given for prompts that are not among the {len(set(prompts))} prompts "
                "(compared ignoring case and punctuation; key labels by the prompt text the reward sees): "
                + ", ".join(repr(k) for k in sorted(unknown)[:3])
            )
        errors: list[VaderError] = []
        for prompt in dict.fromkeys(prompts):
            key = prompt_key(prompt)
            try:
                self._targets[key] = resolve_label(prompt, self.label_names, explicit.get(key))
            except VaderError as exc:
                errors.append(exc)
        if errors:
            more = f" ({len(errors) - 1} more prompts have the same problem)" if len(errors) > 1 else ""
            raise VaderError(f"{errors[0]}{more}")

    def target_label(self, prompt: str) -> str:
        """The action rewarded for `prompt` (resolved now if `prepare` did not see it)."""
        key = prompt_key(prompt)
        if key not in self._targets:
            self._targets[key] = resolve_label(prompt, self.label_names)
        return self._targets[key]

    @property
    def targets(self) -> dict[str, str]:
        """{normalised prompt: action} for every prompt resolved so far (for logging)."""
        return dict(self._targets)

    # -- scoring -----------------------------------------------------------------------------

    def clip_length(self, decoded: int) -> int:
        """Frames the classifier sees for `decoded` decoded frames."""
        if self.frames == "resample":
            return self.num_frames
        return decoded + (-decoded) % self._tubelet

    def preprocess(self, frames: Tensor) -> Tensor:
        return preprocess_clip(frames, self.transform, self.clip_length(frames.shape[2]))

    def _use_positions(self, clip_length: int) -> None:
        """The position table VideoMAE built with num_frames=clip_length would have (what the
        original got by building the model per frame count)."""
        if self.frames != "decoded":
            return
        n = (clip_length // self._tubelet) * self._patches_per_step
        if n not in self._positions:
            self._positions[n] = sinusoid_positions(n, self._hidden)
        self._embeddings.position_embeddings = self._positions[n]

    def logits(self, frames: Tensor) -> Tensor:
        """Class logits [B, num_classes] (float32) for clips [B, 3, K, H, W] in [-1, 1]."""
        pixel_values = self.preprocess(frames).to(self.dtype)
        self._use_positions(pixel_values.shape[1])
        return self.model(pixel_values=pixel_values).logits.float()

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        """frames: [B, 3, K, H, W] in [-1, 1], K >= 2; one prompt per clip."""
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} clips")
        target = torch.tensor([self.label2id[self.target_label(p)] for p in prompts], device=frames.device)
        log_probs = self.logits(frames).log_softmax(-1)
        log_p = log_probs.gather(1, target.to(log_probs.device)[:, None]).squeeze(1)
        return RewardOutput(reward=log_p.exp(), loss=-log_p)

    def predict(self, frames: Tensor) -> list[str]:
        """The classifier's top action for each clip (for logging what it sees)."""
        with torch.no_grad():
            return [self.id2label[int(i)] for i in self.logits(frames).argmax(-1)]


def _load_model(name: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForVideoClassification

    try:
        with quiet_transformers():  # the loading report is checked below instead of printed
            model, info = AutoModelForVideoClassification.from_pretrained(name, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        import os

        if os.path.isdir(name):
            raise VaderError(
                f"ActPred model folder {name!r} could not be loaded ({type(exc).__name__}: {exc}); it needs "
                "config.json (with id2label) and the weights, as save_pretrained writes them"
            ) from exc
        raise VaderError(
            f"ActPred model {name!r} could not be loaded ({type(exc).__name__}); download it with "
            f"{download_hint(download_command(name))} or pass a local folder"
        ) from exc
    check_strict(name, info)
    return model


def check_strict(name: str, info: dict) -> None:
    """VaderError unless the checkpoint filled exactly the classifier's weights: a missing weight would
    run with its random init (e.g. a VideoMAE without the Kinetics head), an unexpected one means the
    checkpoint belongs to another architecture."""
    problems = loading_problems(info)
    if problems:
        raise VaderError(f"ActPred model {name!r} does not match its classifier exactly: {'; '.join(problems)}; "
                         "pass a video classifier saved with save_pretrained (config.json with id2label + weights)")


def _load_processor(name: str) -> Any | None:
    """The model's saved image processor, or None when it has none (defaults then apply)."""
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        return None


def build_actpred(
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    model: str | nn.Module | None = None,
    processor: Any = None,
    grad_checkpoint: bool = False,
    frames: str = "decoded",
    **_: Any,
) -> ActPred:
    """A frozen, eval-mode ActPred reward.

    model: hub id or local folder (default `MCG-NJU/videomae-base-finetuned-kinetics`), or a built
    classifier module. processor: an image processor (or its dict) to take resize/crop/mean/std from;
    by default the one saved with the model, else shortest edge = crop = config.image_size with
    ImageNet mean/std (what the Kinetics VideoMAE checkpoints use). frames: 'decoded' (the original's:
    the classifier sees the decoded frames) or 'resample' (to config.num_frames); see the module
    docstring. A model loaded by name must fill exactly the classifier's weights (VaderError
    otherwise). Other keyword arguments (e.g. hps_version) are accepted and ignored, so one call can
    build any reward.
    """
    dtype = as_dtype(dtype)
    name = ACTPRED_MODEL if model is None else model
    if isinstance(name, nn.Module):
        module = name
    else:
        module = _load_model(str(name), dtype)
        if processor is None:
            processor = _load_processor(str(name))
    transform = ClipTransform.from_processor(processor) if processor is not None else None
    module = module.to(dtype=dtype) if device is None else module.to(device=device, dtype=dtype)
    return ActPred(module, transform, grad_checkpoint=grad_checkpoint, frames=frames)


def actpred_sources(sources: dict | None = None, **_: Any) -> list[WeightSource]:
    """The classifier folder: `sources['actpred']`, else ACTPRED_WEIGHTS (the registry's `weights`)."""
    sources = sources or {}
    if sources.get("actpred"):
        return [folder_source("actpred", "ActPred video classifier", sources["actpred"], "")]
    return [WeightSource("actpred", "ActPred video classifier", repo=repo, filename=file,
                         kind="model" if file is None else "file") for repo, file in ACTPRED_WEIGHTS]


def build_actpred_reward(*, sources: dict | None = None, actpred_frames: str = "decoded", **options: Any) -> ActPred:
    """The registry's factory: `build_actpred` with the run's options (`sources['actpred']` as the
    model, `actpred_frames` as frames)."""
    model = (sources or {}).get("actpred")
    return build_actpred(frames=actpred_frames, **({"model": model} if model else {}), **options)


__all__ = [
    "ACTPRED_MODEL", "ACTPRED_WEIGHTS", "CLIP_DECODE_FRAMES", "FRAME_MODES", "SOURCE_DOCS", "ActPred", "ClipTransform",
    "actpred_sources", "build_actpred", "build_actpred_reward", "check_strict",
    "preprocess_clip", "sample_indices", "sinusoid_positions",
]
