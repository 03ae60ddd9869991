"""The toy world's rewards, scored by its shipped classifier (vader.toyworld.classifier).

- `toy_alignment` (text-conditioned, the analogue of HPS / ActPred): reward = mean over the five
  attributes (shape, colour, size, motion, background) of log p(the value the prompt names | clip);
  0 is a perfect match, log(1/5)..log(1/2) per head is chance. loss = -reward. It reads a clip
  (decode_frame 'fml', 'alt' or 'all'): motion cannot be judged from one frame. A prompt must be a
  toy caption, or carry one as its explicit label (`prompt<TAB>caption` in a prompt file).
- `toy_size` (prompt-free, the analogue of aesthetic): reward = the object's area in percent of the
  frame as the classifier's regression head sees it (small objects ~4, large ~13); loss = -reward,
  so training makes the object bigger. One decoded frame is enough (it is repeated).

- `toy_frame` (the analogue of an image reward): toy_alignment's shape, colour, size and background
  scored on each decoded frame alone; it cannot see motion.
- `toy_judge` (a gold reward, no gradient): the share of the caption's five attributes that the
  independent judge (vader.toyworld.judge: another architecture, seed and augmentations, weights in
  `vader/assets/toyworld/judge`, `reward_sources['toy_judge']` to override) reads back from the clip.
  For `gold_reward`: it scores validation videos and is never trained on (VADER refuses it as
  reward_fn: it has no gradient).

Weights: the package folder `vader/assets/toyworld/classifier` (config.json + model.safetensors), or
`reward_sources['toy_classifier']` = another folder saved by ToyClassifier.save_pretrained.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES
from vader.rewards.base import Reward, RewardOutput, as_dtype, check_clip_decode
from vader.rewards.hub import WeightSource
from vader.toyworld import WEIGHTS, world
from vader.toyworld.classifier import ToyClassifier

SOURCE_KEY = "toy_classifier"
SOURCE_DOC = ("toy world video classifier for 'toy_alignment' and 'toy_size': a local folder with config.json + "
              "model.safetensors (default: the package's vader/assets/toyworld/classifier)")
SOURCE_DOCS = {SOURCE_KEY: SOURCE_DOC}  # the `sources` key both toy rewards read -> what it overrides
DEFAULT_FOLDER = str(Path(WEIGHTS) / "classifier")
_SCORE_SUFFIX = re.compile(r"\s*aesthetic score:\s*[\d.]+\.?\s*$", re.IGNORECASE)

NEEDS_CLIP = "judges motion, which needs a clip"  # why toy_alignment refuses single frames (its record)


def classifier_folder(sources: dict | None = None) -> str:
    return str((sources or {}).get(SOURCE_KEY) or DEFAULT_FOLDER)


def load_classifier(sources: dict | None = None, device=None, dtype: torch.dtype | str = torch.float32):
    model = ToyClassifier.from_pretrained(classifier_folder(sources))
    return model.to(device=device, dtype=as_dtype(dtype)).requires_grad_(False).eval()


def classifier_sources(sources: dict | None = None, **_: object) -> tuple[WeightSource]:
    """The classifier folder both toy rewards load (the registry's `weights`)."""
    return (WeightSource(SOURCE_KEY, "toy world classifier", local=classifier_folder(sources), kind="model"),)


def parse_prompt(prompt: str, what: str | None = None, reward: str = "toy_alignment") -> world.Attributes:
    """The toy attributes a prompt names (Open-Sora's 'aesthetic score: 6.5.' suffix ignored)."""
    attrs = world.parse_caption(_SCORE_SUFFIX.sub("", prompt))
    what = what or f"prompt {prompt!r}"
    if attrs is None:
        raise VaderError(
            f"the {reward} reward cannot read {what}: it must name a toy clip like "
            f"{world.caption(world.all_attributes()[0])!r} (sizes {'/'.join(world.SIZES)}, colours "
            f"{'/'.join(world.COLOURS)}, shapes {'/'.join(world.SHAPES)}, moving {'/'.join(world.MOTIONS[:-1])} "
            f"or standing still, on a {'/'.join(world.BACKGROUNDS)} background)"
        )
    return attrs


class ToyTargets(Reward):
    """What a toy reward scores each prompt against: the attributes its caption (or explicit label) names.
    Shared by toy_alignment and toy_judge, so that a free-form prompt with a label is judged as trained."""

    name = "toy_alignment"

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._targets: dict[str, world.Attributes] = {}

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        """Parse every prompt up front: one VaderError for the first that names no toy clip. An explicit
        label ({prompt: toy caption}, e.g. from a prompt file's tab column) replaces the prompt's own words."""
        labels = labels or {}
        bad = []
        for prompt in dict.fromkeys(prompts):
            try:
                self._targets[prompt] = (parse_prompt(labels[prompt], f"the label {labels[prompt]!r} of prompt {prompt!r}",
                                                      reward=self.name)
                                         if prompt in labels else parse_prompt(prompt, reward=self.name))
            except VaderError as exc:
                bad.append(exc)
        if bad:
            more = f" ({len(bad) - 1} more prompts have the same problem)" if len(bad) > 1 else ""
            raise VaderError(f"{bad[0]}{more}")

    def target(self, prompt: str) -> world.Attributes:
        if prompt not in self._targets:
            self._targets[prompt] = parse_prompt(prompt, reward=self.name)
        return self._targets[prompt]

    @property
    def targets(self) -> dict[str, str]:
        """{prompt: attributes} (for the run log)."""
        return {p: world.caption(a) for p, a in self._targets.items()}


class ToyAlignment(ToyTargets):
    """reward = mean over attributes of log p(prompt's value | clip); loss = -reward."""

    name = "toy_alignment"

    def log_probs(self, frames: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """{attribute: log p(the prompt's value) [B]}."""
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} clips")
        if frames.shape[2] < 2:
            check_clip_decode("toy_alignment", NEEDS_CLIP, "one frame")
        targets = [world.labels(self.target(p)) for p in prompts]
        logits, _ = self.model(frames)
        out = {}
        for key, head in logits.items():
            index = torch.tensor([t[key] for t in targets], device=head.device)
            out[key] = head.float().log_softmax(-1).gather(1, index[:, None]).squeeze(1)
        return out

    def predict(self, frames: Tensor) -> list[str]:
        """The caption the classifier reads off each clip (for logging what it sees)."""
        return [world.caption(a) for a in self.model.predict(frames)]

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        reward = torch.stack(list(self.log_probs(frames, prompts).values())).mean(0)
        return RewardOutput(reward=reward, loss=-reward)


class ToySize(Reward):
    """reward = the object's area in percent of the frame; loss = -reward."""

    name = "toy_size"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        if frames.shape[2] == 1:  # the classifier reads clips; a still frame is a clip of a still object
            frames = frames.expand(-1, -1, 2, -1, -1)
        _, area = self.model(frames)
        area = area.float()
        return RewardOutput(reward=area, loss=-area)


class ToyFrame(ToyAlignment):
    """reward = mean over shape, colour, size and background of log p(the prompt's value | one frame),
    averaged over the decoded frames, each scored alone (repeated into a still clip); loss = -reward.
    What an image reward (HPS, PickScore, aesthetic) is to a video: it cannot see motion, so the
    caption's motion is not scored. The whole-clip study (benchmarks/whole_clip_study.py) trains on it."""

    name = "toy_frame"

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        b, c, k, h, w = frames.shape
        stills = frames.permute(0, 2, 1, 3, 4).reshape(b * k, c, 1, h, w).expand(-1, -1, 2, -1, -1)
        parts = self.log_probs(stills, [p for p in prompts for _ in range(k)])
        reward = torch.stack([v for key, v in parts.items() if key != "motion"]).mean(0).view(b, k).mean(1)
        return RewardOutput(reward=reward, loss=-reward)


JUDGE_KEY = "toy_judge"
JUDGE_DOC = ("toy world judge for 'toy_judge': a local folder with config.json + model.safetensors (default: the "
             "package's vader/assets/toyworld/judge)")
NEEDS_CLIP_JUDGE = "judges motion, which needs a clip"


class ToyJudgeReward(ToyTargets):
    """The independent judge as a reward: the share of the caption's five attributes it reads back from
    the clip (0..1, per video). No gradient: it measures, it is never trained on (a gold_reward).

    Why the share read back and not the judge's log-probability: it is what the report calls accuracy
    (per attribute, base vs LoRA), it is bounded, and it cannot be raised by making the judge more
    confident on clips it already reads right, only by clips that show the caption."""

    name = "toy_judge"
    differentiable = False

    def parts(self, frames: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """{attribute: 1.0 where the judge reads the caption's value, else 0.0} [B] (`vader eval` reports
        each part beside the reward, as toy_judge/<attribute>)."""
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} clips")
        if frames.shape[2] < 2:
            check_clip_decode("toy_judge", NEEDS_CLIP_JUDGE, "one frame")
        if torch.is_grad_enabled() and frames.requires_grad:  # a VADER step: it would backpropagate nothing
            raise VaderError("reward_fn='toy_judge' has no gradient: it is the held-out judge, for "
                             "gold_reward='toy_judge'; train on toy_alignment (or use method='grpo', which needs "
                             "scores only)")
        targets = [world.labels(self.target(p)) for p in prompts]
        with torch.no_grad():  # tensor ops only (no .tolist()): `vader plan` runs it on fake tensors
            logits = self.model(frames.detach().to(next(self.model.parameters()).device))
            return {k: (logits[k].argmax(-1).to(frames.device)
                        == torch.tensor([t[k] for t in targets], device=frames.device)).float()
                    for k in world.ATTRIBUTES}

    def breakdown(self, frames: Tensor, prompts: list[str]) -> dict[str, float]:
        """{attribute: the share of the videos where the judge reads the caption's value} (the run's report
        shows it for the base model and the LoRA)."""
        return {k: float(v.mean()) for k, v in self.parts(frames, prompts).items()}

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        reward = torch.stack(list(self.parts(frames, prompts).values())).mean(0)
        return RewardOutput(reward=reward, loss=-reward)


def judge_sources(sources: dict | None = None, **_: object) -> tuple[WeightSource]:
    from vader.toyworld.judge import FOLDER

    folder = str((sources or {}).get(JUDGE_KEY) or FOLDER)
    return (WeightSource(JUDGE_KEY, "toy world judge", local=folder, kind="model"),)


def build_toy_judge(*, device=None, sources=None, **_) -> ToyJudgeReward:
    from vader.toyworld.judge import ToyJudge

    (src,) = judge_sources(sources)
    return ToyJudgeReward(ToyJudge.from_pretrained(src.local).to(device=device))


def build_toy_frame(*, device=None, dtype=torch.float32, sources=None, **_) -> ToyFrame:
    return ToyFrame(load_classifier(sources, device, dtype))


def build_toy_alignment(*, device=None, dtype=torch.float32, sources=None, **_) -> ToyAlignment:
    return ToyAlignment(load_classifier(sources, device, dtype))


def build_toy_size(*, device=None, dtype=torch.float32, sources=None, **_) -> ToySize:
    return ToySize(load_classifier(sources, device, dtype))


__all__ = [
    "CLIP_DECODE_FRAMES", "DEFAULT_FOLDER", "JUDGE_DOC", "JUDGE_KEY", "NEEDS_CLIP", "NEEDS_CLIP_JUDGE", "SOURCE_DOC",
    "SOURCE_DOCS", "SOURCE_KEY", "ToyAlignment", "ToyFrame", "ToyJudgeReward", "ToySize", "ToyTargets", "build_toy_alignment",
    "build_toy_frame", "build_toy_judge", "build_toy_size", "classifier_folder", "classifier_sources",
    "judge_sources", "load_classifier", "parse_prompt",
]
