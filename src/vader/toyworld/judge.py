"""The toy world's independent judge: a second video classifier that no reward uses, for measuring what
training on `toy_alignment` (whose classifier is vader.toyworld.classifier) really changed.

Independent of the reward's classifier by construction:
- another architecture: a (2+1)D conv network over 8 frames resampled from the clip (two per-frame
  spatial layers, then two 3D layers that mix time), each frame paired with its temporal difference,
  pooled over space and time at the end (the reward's classifier runs a 2D stack per frame and compares
  only the first, last and mean feature maps, keeping their positions);
- another seed, batch size and schedule, and other augmentations (random resized crops, channel mixing,
  posterisation, small cut-outs, dropped or repeated frames; the classifier's are blur, jitter,
  downscaling and flicker), in tools/toyworld/train_judge.py;
- five heads (shape, colour, size, motion, background) and no area regression.

Its accuracy on fresh seeds, clean and augmented, is in `training.json` beside its weights
(vader/assets/toyworld/judge/). `judge_accuracy(videos, captions)` is the share of each attribute it
reads back; the `toy_judge` reward (vader.rewards.toy) turns that into a held-out gold measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.toyworld import WEIGHTS, layout, world

MODEL_TYPE = "vader_toy_judge"
HEADS = tuple(world.ATTRIBUTES)
FOLDER = str(Path(WEIGHTS) / "judge")


@dataclass
class ToyJudgeConfig:
    channels: tuple[int, ...] = (24, 48, 64, 64)  # Conv3d stack: two spatial layers, then two spatio-temporal
    frames: int = 8  # clips are resampled to this many frames, first and last kept
    hidden: int = 96
    resolution: int = world.RESOLUTION
    classes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in world.ATTRIBUTES.items()})

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> ToyJudgeConfig:
        return layout.config_from_dict(cls, data, where, MODEL_TYPE)


def resample(clips: Tensor, frames: int) -> Tensor:
    """[B, 3, T, H, W] -> [B, 3, frames, H, W]: evenly spaced frames by index, first and last kept."""
    t = clips.shape[2]
    index = torch.linspace(0, t - 1, frames).round().long().to(clips.device)
    return clips.index_select(2, index)


class ToyJudge(nn.Module):
    def __init__(self, config: ToyJudgeConfig | None = None):
        super().__init__()
        self.config = config = config or ToyJudgeConfig()
        layers: list[nn.Module] = []
        c_in = 6  # the frame and its difference to the previous one
        for i, c in enumerate(config.channels):
            # (2+1)D: the first two layers see each frame alone (a 3D kernel from the start mixed a moving
            # object's positions into its outline, and shape stayed at chance for 350 steps), the last two
            # mix time (8 frames -> 2) for motion; space halves at every layer, so the last sees 33 pixels
            spatial = i < 2
            kernel = ((1, 5, 5) if i == 0 else (1, 3, 3)) if spatial else (3, 3, 3)
            stride = (1, 2, 2) if spatial else (2, 2, 2)
            layers += [nn.Conv3d(c_in, c, kernel, stride=stride, padding=tuple(k // 2 for k in kernel)),
                       nn.GroupNorm(8, c), nn.GELU()]
            c_in = c
        self.net = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Linear(2 * c_in, config.hidden), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(config.hidden, len(config.classes[k])) for k in HEADS})

    def forward(self, clips: Tensor) -> dict[str, Tensor]:
        """{head: logits [B, classes]} of clips [B, 3, T >= 2, H, W] in [-1, 1]."""
        b, c, t, h, w = clips.shape
        if c != 3 or t < 2:
            raise VaderError(f"the toy judge reads clips [B, 3, T>=2, H, W]; got shape {tuple(clips.shape)}")
        x = resample(clips.float().clamp(-1, 1), self.config.frames)
        r = self.config.resolution
        if (h, w) != (r, r):
            n = x.shape[2]
            flat = x.permute(0, 2, 1, 3, 4).reshape(b * n, 3, h, w)
            flat = F.interpolate(flat, size=(r, r), mode="bilinear", align_corners=False, antialias=h > r or w > r)
            x = flat.view(b, n, 3, r, r).permute(0, 2, 1, 3, 4)
        diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        maps = self.net(torch.cat([x, diff], dim=1))
        pooled = torch.cat([maps.mean(dim=(2, 3, 4)), maps.amax(dim=(2, 3, 4))], dim=1)
        h = self.trunk(pooled)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, clips: Tensor) -> list[world.Attributes]:
        return layout.attributes(self(clips), self.config.classes)

    # -- published layout ------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        layout.save(self, self.config.to_dict(), folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path = FOLDER) -> ToyJudge:
        """The judge saved in `folder` (default: the package's); a one-line VaderError unless config.json and
        model.safetensors are there and fill exactly this architecture."""
        data, state, config_path, weights_path = layout.read(folder, "toy judge", "ToyJudge.save_pretrained")
        model = cls(ToyJudgeConfig.from_dict(data, where=str(config_path)))
        layout.load_strict(model, state, weights_path, "toy judge")
        return model.eval().requires_grad_(False)


def judge_accuracy(judge: ToyJudge, videos: Tensor, captions: list[str], batch: int = 32) -> dict[str, float]:
    """{attribute: share of the videos whose attribute the judge reads as the caption names it}."""
    if len(captions) != videos.shape[0]:
        raise ValueError(f"{len(captions)} captions for {videos.shape[0]} videos")
    targets = []
    for caption in captions:
        attrs = world.parse_caption(caption)
        if attrs is None:
            raise VaderError(f"the toy judge cannot read caption {caption!r}: it names no toy clip")
        targets.append(attrs)
    hits = {k: 0 for k in HEADS}
    for start in range(0, len(targets), batch):
        for got, want in zip(judge.predict(videos[start:start + batch]), targets[start:start + batch]):
            for k in HEADS:
                hits[k] += getattr(got, k) == getattr(want, k)
    return {k: hits[k] / len(targets) for k in HEADS}


__all__ = ["FOLDER", "HEADS", "MODEL_TYPE", "ToyJudge", "ToyJudgeConfig", "judge_accuracy", "resample"]
