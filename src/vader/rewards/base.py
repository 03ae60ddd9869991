"""The one reward interface: video frames in [-1, 1] and their prompts -> per-sample reward and loss.

Also the pieces the model-based rewards share: differentiable image preprocessing that matches
transformers' CLIPImageProcessor and open_clip's standard eval transform, a per-prompt text-embedding cache, and activation checkpointing for frozen
encoders (transformers only checkpoints in training mode; rewards stay in eval mode).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vader.dtypes import REWARD_DTYPES, parse_dtype
from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES

# OpenAI CLIP normalisation: CLIP ViT-L/14, open_clip ViT-H-14 (HPS) and the LAION ViT-H-14 processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "crop")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL / transformers `resample` codes we support


@dataclass
class RewardOutput:
    reward: Tensor  # [B], higher is better; logged
    loss: Tensor  # [B], what training minimises (keeps the original's scale for each reward)


class Reward(nn.Module):
    """Frozen scorer. Subclasses implement `score_images` or override `forward` for video rewards."""

    name: str = "reward"

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        """frames: [B, 3, K, H, W] in [-1, 1]; image rewards average over the K frames."""
        b, c, k, h, w = frames.shape
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b} videos")
        images = frames.permute(0, 2, 1, 3, 4).reshape(b * k, c, h, w)
        repeated = [p for p in prompts for _ in range(k)]
        out = self.score_images(images, repeated)
        return RewardOutput(reward=out.reward.view(b, k).mean(1), loss=out.loss.view(b, k).mean(1))

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        """Called once with every (cleaned) prompt before training/validation; text rewards cache
        their text embeddings here. The default does nothing."""

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError

    @staticmethod
    def to_unit(images: Tensor) -> Tensor:
        """[-1, 1] -> [0, 1] with the clamp the original applies before every reward model."""
        return (images.float() / 2 + 0.5).clamp(0, 1)


class WeightedReward(Reward):
    """A weighted sum of rewards: reward = Σ w_i r_i, loss = Σ w_i loss_i."""

    name = "mix"

    def __init__(self, parts: dict[str, tuple[float, Reward]]):
        super().__init__()
        self.weights = {name: float(w) for name, (w, _) in parts.items()}
        self.parts = nn.ModuleDict({name: r for name, (_, r) in parts.items()})

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        for reward in self.parts.values():
            reward.prepare(prompts, labels)

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        outs = {name: reward(frames, prompts) for name, reward in self.parts.items()}
        reward = torch.stack([self.weights[n] * o.reward for n, o in outs.items()]).sum(0)
        loss = torch.stack([self.weights[n] * o.loss for n, o in outs.items()]).sum(0)
        return RewardOutput(reward=reward, loss=loss)


# ---------------------------------------------------------------------------------------------
# preprocessing


@dataclass(frozen=True)
class ImageTransform:
    """Differentiable CLIP-style preprocessing of [N, 3, H, W] images in [0, 1] -> model input.

    mode 'crop': transformers' CLIPImageProcessor (the processor PickScore ships and CLIP ViT-L/14's)
    and open_clip's standard eval transform (not HPSv2's scorer, which letterboxes): resize the shortest side to `size` keeping the aspect ratio, centre-crop
    size x size. mode 'squash': resize the whole frame to size x size (what the original VADER did
    for aesthetic and HPS; nothing is cut off, the aspect ratio is not kept). Then normalise.

    The resize is antialiased and done in two passes, width then height, each clamped to [0, 1]:
    that is what PIL (and the torchvision uint8 kernels the processors use) does, so the only
    difference left to those pipelines on a uint8 image is their rounding to uint8
    (measured: <= 0.017 max, ~0.0046 mean abs difference after normalisation, i.e. ~1 uint8 level).
    """

    size: int = 224
    mode: str = "crop"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise VaderError(f"reward resize={self.mode!r} must be one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise VaderError(f"reward interpolation={self.interpolation!r} must be bilinear or bicubic")

    @classmethod
    def from_hf_processor(cls, processor, mode: str = "crop") -> ImageTransform:
        """The settings of a transformers CLIP-style image processor (or a processor holding one)."""
        ip = getattr(processor, "image_processor", processor)
        size = _get(ip.size, "shortest_edge") or _get(ip.size, "height")
        crop = getattr(ip, "crop_size", None)
        if mode == "crop" and crop is not None and (_get(crop, "height") or size) != size:
            raise VaderError(f"image processor crops {crop} after resizing to {size}: unsupported")
        resample = int(getattr(ip, "resample", 3) or 3)
        return cls(size=int(size), mode=mode, interpolation=_PIL_RESAMPLE.get(resample, "bicubic"),
                   mean=tuple(float(v) for v in ip.image_mean), std=tuple(float(v) for v in ip.image_std))

    def resize(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        s = self.size
        if self.mode == "squash":
            nh, nw = s, s
        elif h <= w:
            nh, nw = s, s * w // h
        else:
            nh, nw = s * h // w, s
        if nw != w:
            x = F.interpolate(x, size=(h, nw), mode=self.interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        if nh != h:
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        if self.mode == "crop":
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top: top + s, left: left + s]
        return x

    def __call__(self, x: Tensor) -> Tensor:
        x = self.resize(x.float())
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _get(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


# ---------------------------------------------------------------------------------------------
# text embeddings, checkpointing, dtype


class TextEmbeddingCache:
    """Normalised text embeddings per prompt, encoded once (in `prepare`, else on first use).

    Stored in float32, detached, on the device of the encoder at the time of encoding; moved to
    the image features' device when used.
    """

    def __init__(self, encode: Callable[[list[str]], Tensor]):
        self._encode = encode
        self._cache: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def add(self, prompts: Iterable[str], batch_size: int = 32) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i: i + batch_size]
            with torch.no_grad():
                embeds = self._encode(chunk).float()
            embeds = F.normalize(embeds, dim=-1)
            for prompt, emb in zip(chunk, embeds):
                self._cache[prompt] = emb.detach().clone()

    def get(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        self.add(prompts)
        return torch.stack([self._cache[p].to(device) for p in prompts])


def flag_checkpointed_as_training(model: nn.Module) -> None:
    """After `model.train(False)`: transformers checkpoints a module only in training mode, so the modules
    its `gradient_checkpointing_enable` flagged are marked training again (their forward reads nothing else
    from the flag; dropout stays off), and the reward checkpoints in eval mode."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


def checkpoint_layers(layers: Iterable[nn.Module]) -> None:
    """Activation checkpointing for each layer whenever autograd is on, in eval mode too."""
    for layer in layers:
        if getattr(layer, "_vader_checkpointed", False):
            continue
        original = layer.forward

        @functools.wraps(original)
        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward
        layer._vader_checkpointed = True


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A reward's dtype: a torch dtype as is, a name of `vader.dtypes.REWARD_DTYPES`, None -> fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return parse_dtype("reward dtype", str(dtype), REWARD_DTYPES)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------
# pinned weight files: (hub repo, file) -> (sha256, size in bytes), the LFS oids of the files the
# defaults were written against (read from the hub's LFS pointers). A file that differs (a truncated
# download, a corrupted cache, a replaced upload) would give silently different rewards.

PINNED_FILES: dict[tuple[str, str], tuple[str, int]] = {
    ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"):  # = LAION sac+logos+ava1-l14-linearMSE.pth
        ("21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", 3714759),
    ("xswu/HPSv2", "HPS_v2.1_compressed.pt"):  # commit 697403c, the snapshot the original hard-codes
        ("c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837", 1972490005),
    ("xswu/HPSv2", "HPS_v2_compressed.pt"):
        ("07cb0d20626232204ca3a6ec53ff5984e7e53212a8a7b0e0ec2bac1bdaf125a1", 1972484501),
}
# Files above this are not re-hashed when the hub cache already names their blob by its sha256
# (hashing 2 GB on every build costs seconds); their size is still checked.
FULL_HASH_LIMIT = 64 * 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_pinned(src, path: str | os.PathLike) -> None:
    """VaderError (one line: file, expected and actual sha256) when the file resolved for a pinned
    hub source is not the published one. Local files a user chose (reward_sources paths) and other
    hub files are not pinned."""
    if getattr(src, "local", None) or (src.repo, src.filename) not in PINNED_FILES:
        return
    expected, size = PINNED_FILES[(src.repo, src.filename)]
    blob = Path(path).resolve()
    actual_size = blob.stat().st_size
    if actual_size == size and size > FULL_HASH_LIMIT and _SHA256.fullmatch(blob.name):
        actual = blob.name  # the hub cache's content address
    elif actual_size != size:
        actual = f"a file of {actual_size} bytes, not {size}"
    else:
        actual = file_sha256(blob)
    if actual != expected:
        raise VaderError(
            f"{src.what} {src.repo}/{src.filename} at {path} is not the published file: expected sha256 "
            f"{expected}, got {actual}; delete it from the Hugging Face cache and download it again, or set "
            f"reward_sources[{src.key!r}] to a local file you trust"
        )

def check_clip_decode(reward: str, needs: str, decode_frame: str) -> None:
    """VaderError unless `decode_frame` decodes a clip (config validation, before any model loads);
    `needs` says why `reward` reads several frames."""
    if str(decode_frame) not in CLIP_DECODE_FRAMES:
        raise VaderError(f"reward_fn {reward!r} {needs}, but decode_frame={decode_frame!r} decodes one frame; "
                         f"use decode_frame {', '.join(repr(m) for m in CLIP_DECODE_FRAMES)}")

