"""The toy world's reward classifier (behind toy_alignment, toy_size and toy_frame): a small video
classifier trained on world.py's ground truth. (vader.toyworld.judge is a second, independent one that
no training reward uses: the gold measure.)

One head per attribute (shape 3, colour 4, size 2, motion 5, background 2) and one regression head
for the object's area (percent of the frame, mean over the clip). It reads [B, 3, T, H, W] clips in
[-1, 1] for any T >= 2 whose first and last frames are the clip's first and last (decode_frame
'fml' = 3, 'alt' = 9, 'all' = 17 frames): every frame goes through the same 2D conv stack, which
keeps an 8x8 spatial map, and the clip is summarised by its first, last and mean feature maps (so
motion is a change of position between the first and last maps) and by the maps pooled over space
and time (shape and colour, wherever the object is).

Saved in the published layout: `config.json` (hyper-parameters + class names) and
`model.safetensors`; `ToyClassifier.from_pretrained(folder)` loads it strictly.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES, select_frames
from vader.toyworld import layout, world

MODEL_TYPE = "vader_toy_classifier"
HEADS = tuple(world.ATTRIBUTES)  # shape, colour, size, motion, background
SCORE = "area_percent"  # the regression head: object area in percent of the frame


@dataclass
class ToyClassifierConfig:
    channels: tuple[int, ...] = (16, 32, 48)  # per-frame conv stack, each stride 2
    temporal_channels: int = 48
    hidden: int = 64
    resolution: int = world.RESOLUTION
    classes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in world.ATTRIBUTES.items()})
    score: str = SCORE

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> ToyClassifierConfig:
        return layout.config_from_dict(cls, data, where, MODEL_TYPE)


class ToyClassifier(nn.Module):
    def __init__(self, config: ToyClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ToyClassifierConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            c_in = c
        self.frame_net = nn.Sequential(*layers)
        self.map_size = config.resolution // 2 ** len(config.channels)
        # first, last, mean and (last - first) maps: the difference makes motion a local feature
        self.temporal = nn.Sequential(
            nn.Conv2d(4 * c_in, config.temporal_channels, 3, stride=2, padding=1),
            nn.GroupNorm(4, config.temporal_channels), nn.SiLU(),
        )
        side = (self.map_size + 1) // 2
        # + the per-frame maps max- and mean-pooled over space and time: position-free evidence for shape and
        # colour, which the position-keeping branch alone learned no better than chance
        self.trunk = nn.Sequential(nn.Linear(config.temporal_channels * side * side + 2 * c_in, config.hidden),
                                   nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(config.hidden, len(config.classes[k])) for k in HEADS})
        self.score_head = nn.Linear(config.hidden, 1)

    def features(self, clips: Tensor) -> Tensor:
        b, c, t, h, w = clips.shape
        if c != 3 or t < 2:
            raise VaderError(f"the toy classifier reads clips [B, 3, T>=2, H, W]; got shape {tuple(clips.shape)}")
        x = clips.float().clamp(-1, 1).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        r = self.config.resolution
        if (h, w) != (r, r):  # smaller samples (tiny presets) are judged at the size it was trained on
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=h > r or w > r)
        maps = self.frame_net(x)
        maps = maps.view(b, t, *maps.shape[1:])
        first, last = maps[:, 0], maps[:, -1]
        summary = torch.cat([first, last, maps.mean(1), last - first], dim=1)
        pooled = torch.cat([maps.amax(dim=(1, 3, 4)), maps.mean(dim=(1, 3, 4))], dim=1)
        return self.trunk(torch.cat([self.temporal(summary).flatten(1), pooled], dim=1))

    def forward(self, clips: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({head: logits [B, classes]}, area percent [B])."""
        h = self.features(clips)
        return {k: head(h) for k, head in self.heads.items()}, self.score_head(h).squeeze(-1)

    @torch.no_grad()
    def predict(self, clips: Tensor) -> list[world.Attributes]:
        """The most likely attributes of each clip (what the classifier sees, for logs and accuracy checks)."""
        return layout.attributes(self(clips)[0], self.config.classes)

    # -- published layout ------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        layout.save(self, self.config.to_dict(), folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ToyClassifier:
        """The classifier saved in `folder`; VaderError (one line) unless config.json and
        model.safetensors are there and the weights fill exactly this architecture."""
        data, state, config_path, weights_path = layout.read(folder, "toy classifier",
                                                             "ToyClassifier.save_pretrained")
        model = cls(ToyClassifierConfig.from_dict(data, where=str(config_path)))
        layout.load_strict(model, state, weights_path, "toy classifier")
        return model.eval()


def frame_indices(decode_frame: str, num_frames: int = world.NUM_FRAMES) -> list[int]:
    """The frames the training loop decodes for a clip decode_frame ('fml', 'alt', 'all'): what
    vader.frames.select_frames picks with the 'exact' strategy (no random draw for these modes)."""
    if decode_frame not in CLIP_DECODE_FRAMES:
        raise VaderError(f"decode_frame={decode_frame!r} is not a clip mode; use 'fml', 'alt' or 'all'")
    return select_frames(decode_frame, num_frames, random.Random(0))


__all__ = ["HEADS", "MODEL_TYPE", "SCORE", "ToyClassifier", "ToyClassifierConfig", "frame_indices"]
