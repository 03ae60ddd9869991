"""VideoReward (VideoAlign, "Improving Video Generation with Human Feedback"): a Qwen2-VL-2B reward model
with three scores per clip, Visual Quality (VQ), Motion Quality (MQ) and Text Alignment (TA).

The model (as KwaiVGI/VideoAlign's `Qwen2VLRewardModelBT` with the published training settings):
Qwen2-VL-2B-Instruct, three added special tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> (the token
embeddings resized to the tokenizer, 151660 rows) and a bias-free reward head `rm_head` =
Linear(hidden, 1). The prompt is VideoAlign's 'detailed_special' template, which holds each special token
once; each score is the reward head applied to the last hidden state at its token. The published checkpoint
(the hub repository KwaiVGI/VideoReward: model_config.json and checkpoint-*/) stores a peft LoRA (r 64,
alpha 128 on every language-model linear layer) in adapter_model.safetensors plus every other trained weight
in non_lora_state_dict.pth (peft key names, `base_model.model.` + the transformers-4.4x Qwen2-VL names);
vader merges the LoRA into the weights (W += alpha/r · B·A) once at load time, so the model that runs is a
plain transformers Qwen2VLForConditionalGeneration plus `rm_head`.

Scores are normalised as VideoAlign's inference does by default (use_norm=True): (raw - mean) / std with
the published per-dimension statistics (model_config.json's inference_config; defaults below). Rewards:
'videoreward_vq', 'videoreward_mq', 'videoreward_ta' (one dimension each) and 'videoreward' = VQ + MQ + TA,
VideoAlign's own 'Overall' (an equal-weight sum of the normalised scores, computed from ONE forward pass).
loss = -reward.

Frames: VideoAlign samples the clip at 2 fps ('uniform': smart_nframes + linspace(0, n-1, k).round()):
k = (frames / video_fps · 2) clamped to [4, frames rounded down to even], rounded to even; e.g. 33 frames at
16 fps -> 4 frames [0, 11, 21, 32]; 81 frames at 16 fps -> 10 frames. Clips shorter than 4 frames give
their frame count rounded down to even (2 or 3 decoded frames -> 2); a single frame is refused (VaderError).
`video_fps` is the decoded clip's frame rate (the run's save_fps; 16, Wan2.1's, when not given).

Preprocessing, differentiable in torch (what VideoAlign's fetch_video + Qwen2-VL's video processor do):
[-1, 1] -> [0, 1], the sampled frames resized to smart_resize(h, w, factor 28, min_pixels 128·28·28,
max_pixels = data_config.max_frame_pixels = 448·448) with antialiased bicubic (torchvision's, which VideoAlign
uses on uint8 frames: clamped to [0, 1] here), normalised with the processor's mean/std (OpenAI CLIP's),
then cut into 2 x 14 x 14 temporal-spatial patches in the 2x2-merge order the processor emits
(pixel_values_videos [T/2 · H/14 · W/14, 1176], video_grid_thw [T/2, H/14, W/14]).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.rewards.aesthetic import quiet_transformers
from vader.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    RewardOutput,
    as_dtype,
    flag_checkpointed_as_training,
)
from vader.rewards.hub import WeightSource, folder_source, load_error, pretrained_path
from vader.weights import download_command, offline

VIDEOREWARD_REPO = "KwaiVGI/VideoReward"
BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
SOURCE_DOCS = {
    "videoreward": "VideoReward checkpoint folder (model_config.json + checkpoint-*/ with adapter_model.safetensors "
                   "and non_lora_state_dict.pth): hub id or local folder (default KwaiVGI/VideoReward)",
    "videoreward_base": "VideoReward's base Qwen2-VL model (config, weights, processor and tokenizer files): hub id "
                        "or local folder (default Qwen/Qwen2-VL-2B-Instruct)",
}
NEEDS_CLIP = "scores a clip sampled at 2 fps"
DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# VideoAlign's published normalisation (model_config.json inference_config): (mean, std) per dimension
NORM = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
FPS = 2.0  # data_config.fps
MAX_PIXELS = 448 * 448  # data_config.max_frame_pixels (200704)
MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' VIDEO_MIN_PIXELS (fetch_video's default)
MIN_FRAMES, MAX_FRAMES, FRAME_FACTOR = 4, 768, 2
DEFAULT_VIDEO_FPS = 16.0

# VideoAlign's prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN, verbatim (its "  " line ends included:
# they are tokens the model was trained on).
_PROMPT_LINES = [
    "",
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 "
    "being the worst and 10 being the best. Each evaluation should be independent of the others.",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:",
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense "
    "of harmony and balance.",
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. ",
    "",
    "Please provide the ratings of Visual Quality: <|VQ_reward|>",
    "END",
    "",
    "**Motion Quality:**  ",
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:",
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
    "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, "
    "or missing body parts).",
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing "
    "should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, "
    "mouth movements).",
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
    "motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally "
    "with the background, without obvious artifacts or the feeling of cut-and-paste effects.",
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where "
    "the video might have blurry or unsteady sections that hinder visual continuity.",
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.",
    "",
    "Please provide the ratings of Motion Quality: <|MQ_reward|>",
    "END",
    "",
    "**Text Alignment:**  ",
    "Assess how well the video matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.",
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.",
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
    "checking if real-world locations or scenes are accurately represented, though some stylistic adaptation "
    "is acceptable.  ",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the video adheres to this style.",
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) "
    "are consistent with the expected behavior from the prompt.",
    "",
    "Textual prompt - {text_prompt}",
    "Please provide the ratings of Text Alignment: <|TA_reward|>",
    "END",
    "",
]
PROMPT_TEMPLATE = "\n".join(_PROMPT_LINES)
# What Qwen2-VL-Instruct's chat template renders for [{'role': 'user', 'content': [video, text]}] with
# add_generation_prompt=True (used when the tokenizer carries no chat template).
CHAT_FORMAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|video_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
VIDEO_PAD = "<|video_pad|>"


def build_prompt(prompt: str) -> str:
    """VideoAlign's build_prompt(prompt, ['VQ', 'MQ', 'TA'], 'detailed_special')."""
    return PROMPT_TEMPLATE.replace("{text_prompt}", prompt)


# ---------------------------------------------------------------------------------------------
# frames


def _round(x: float, f: int) -> int:
    return round(x / f) * f


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's smart_resize (sides multiples of `factor`, pixels within [min_pixels, max_pixels])."""
    if max(height, width) / min(height, width) > 200:
        raise VaderError(f"VideoReward: frame aspect ratio {width}x{height} is over 200")
    h_bar, w_bar = max(factor, _round(height, factor)), max(factor, _round(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_indices(total: int, video_fps: float, fps: float = FPS) -> list[int]:
    """VideoAlign's 'uniform' frame sampling of a `total`-frame clip played at `video_fps`."""
    min_frames = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = _round(min(max(total / video_fps * fps, min_frames), max_frames), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise VaderError(f"VideoReward {NEEDS_CLIP}, but got a clip of {total} frame(s); decode at least 2 frames")
    return _linspace_round(total - 1, n)


def _linspace_round(end: int, steps: int) -> list[int]:
    """torch.linspace(0, end, steps).round().long().tolist() (float32, torch's CPU formula, round half to
    even), in numpy: no tensor, so a plan's fake tensor mode does not see it."""
    import numpy as np

    if steps == 1:
        return [0]
    step = np.float32(end) / np.float32(steps - 1)
    values = [np.float32(step * np.float32(i)) if i < steps // 2 else np.float32(np.float32(end) - step * np.float32(steps - 1 - i))
              for i in range(steps)]
    return [int(np.round(v)) for v in values]


def resize_bicubic(x: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bicubic resize as torchvision does it on uint8 frames (VideoAlign's fetch_video, and the
    Qwen2-VL video processor): two passes, width then height, each clamped to [0, 1] (a uint8 image
    saturates between the passes); only the rounding to uint8 levels is left out."""
    h, w = x.shape[-2:]
    if width != w:
        x = F.interpolate(x, size=(h, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if height != h:
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x


@dataclass(frozen=True)
class VideoTransform:
    """The processor's numbers: patch 14, temporal patch 2, merge 2, mean/std, pixel budget."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    fps: float = FPS

    @classmethod
    def from_processor(cls, processor: Any, **overrides: Any) -> VideoTransform:
        vp = getattr(processor, "video_processor", processor)
        return cls(patch_size=int(vp.patch_size), temporal_patch_size=int(vp.temporal_patch_size),
                   merge_size=int(vp.merge_size), mean=tuple(float(v) for v in vp.image_mean),
                   std=tuple(float(v) for v in vp.image_std), **overrides)

    def size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def __call__(self, frames: Tensor, video_fps: float) -> tuple[Tensor, Tensor]:
        """[B, 3, K, H, W] in [-1, 1] -> (pixel_values_videos [B·N, 3·2·14·14] in float32 (float64 frames stay
        float64), video_grid_thw [B, 3]). Frames are clamped to [-1, 1] as every vader reward does."""
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames [B, 3, K, H, W], got {tuple(frames.shape)}")
        b, c, k, h, w = frames.shape
        idx = sample_indices(k, video_fps, self.fps)
        x = frames.to(torch.promote_types(frames.dtype, torch.float32))  # float32, or float64 as given
        x = (x / 2 + 0.5).clamp(0, 1)[:, :, idx].permute(0, 2, 1, 3, 4).reshape(b * len(idx), c, h, w)
        rh, rw = self.size(h, w)
        x = resize_bicubic(x, rh, rw)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = ((x - mean) / std).view(b, len(idx), c, rh, rw)
        t, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(idx) % t:  # the processor repeats the last frame (sampling gives even counts anyway)
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        gt, gh, gw = x.shape[1] // t, rh // p, rw // p
        x = x.reshape(b, gt, t, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        pixels = x.reshape(b * gt * gh * gw, c * t * p * p)
        grid = torch.tensor([[gt, gh, gw]] * b, dtype=torch.long, device=frames.device)
        return pixels, grid


# ---------------------------------------------------------------------------------------------
# the model


def reward_model_class():
    """Qwen2VLForConditionalGeneration + VideoAlign's reward head (transformers imported on first use)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        from transformers import Qwen2VLForConditionalGeneration

        class Qwen2VLRewardModel(Qwen2VLForConditionalGeneration):
            """VideoAlign's Qwen2VLRewardModelBT with output_dim 1 and reward_token 'special'."""

            def __init__(self, config):
                super().__init__(config)
                text = getattr(config, "text_config", config)
                self.rm_head = nn.Linear(text.hidden_size, 1, bias=False)

        _MODEL_CLASS = Qwen2VLRewardModel
    return _MODEL_CLASS


_MODEL_CLASS = None

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def published_key(key: str) -> str:
    """A published (peft-wrapped, transformers-4.4x layout) key -> this module's state-dict key."""
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key.removeprefix("model.")
    return key


def convert_checkpoint(non_lora: dict[str, Tensor], lora: dict[str, Tensor] | None, scale: float,
                       tie_word_embeddings: bool = True) -> dict[str, Tensor]:
    """The published state dicts as this module's state dict, with the LoRA merged (W += scale · B·A)."""
    state = {published_key(k): v for k, v in non_lora.items() if ".lora_" not in k}
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in {**non_lora, **(lora or {})}.items():
        match = _LORA.match(k)
        if match:
            pairs.setdefault(published_key(match["module"]) + ".weight", {})[match["ab"]] = v
    for key, ab in pairs.items():
        if key not in state or set(ab) != {"A", "B"}:
            raise VaderError(f"VideoReward checkpoint: LoRA for {key} without its base weight or A/B pair")
        base = state[key]
        state[key] = (base.float() + scale * (ab["B"].float() @ ab["A"].float())).to(base.dtype)
    if tie_word_embeddings and "lm_head.weight" not in state and "model.language_model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    return state


class VideoReward(Reward):
    """VideoReward's VQ / MQ / TA scores as a differentiable reward (see the module docstring).

    dims: the normalised dimensions summed into the reward (one for 'videoreward_vq', all three for
    'videoreward'). `scores(frames, prompts)` gives all three raw scores [B, 3] from one forward pass.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, transform: VideoTransform | None = None, *,
                 dims: tuple[str, ...] = DIMENSIONS, norm: dict[str, tuple[float, float]] | None = None,
                 video_fps: float | None = None, grad_checkpoint: bool = False, name: str = "videoreward"):
        super().__init__()
        unknown = [d for d in dims if d not in DIMENSIONS]
        if unknown or not dims:
            raise VaderError(f"VideoReward dims={dims!r}: choose from {', '.join(DIMENSIONS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform or VideoTransform()
        self.dims = tuple(dims)
        self.norm = dict(norm or NORM)
        self.video_fps = float(video_fps or DEFAULT_VIDEO_FPS)
        self.name = name
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        if any(i is None or i == getattr(tokenizer, "unk_token_id", -1) for i in ids):
            raise VaderError(f"the VideoReward tokenizer lacks the special tokens {', '.join(SPECIAL_TOKENS)}")
        self.special_ids = tuple(int(i) for i in ids)
        self.grad_checkpoint = bool(grad_checkpoint)
        if self.grad_checkpoint:  # Qwen2-VL's own checkpointing (vision blocks and decoder layers)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:  # transformers < 5
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._text: dict[tuple[str, int], list[int]] = {}
        self.plan_constants = False  # the skeleton sets it: see _fake_constants
        self._mm_types = "mm_token_type_ids" in inspect.signature(model.model.forward).parameters
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VideoReward:
        """Always eval; with grad_checkpoint the checkpointed modules alone are flagged as training
        (transformers checkpoints only in training mode; Qwen2-VL has no dropout at inference settings)."""
        super().train(False)
        if self.grad_checkpoint:
            flag_checkpointed_as_training(self.model)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def chat_text(self, prompt: str) -> str:
        """The text VideoAlign's processor.apply_chat_template gives for one clip and its prompt."""
        text = build_prompt(prompt)
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return CHAT_FORMAT.format(text=text)

    def token_ids(self, prompts: list[str], n_video: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask [B, L] (right padding, as VideoAlign), the video placeholder
        expanded to `n_video` tokens as the processor does. Cached per (prompt, n_video)."""
        rows = []
        for p in prompts:
            if (p, n_video) not in self._text:
                text = self.chat_text(p).replace(VIDEO_PAD, VIDEO_PAD * n_video)
                self._text[(p, n_video)] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            rows.append(self._text[(p, n_video)])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return ids, mask

    def scores(self, frames: Tensor, prompts: list[str]) -> Tensor:
        """Raw VQ, MQ, TA scores [B, 3] (float32), differentiable with respect to `frames`."""
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} clips")
        pixels, grid = self.transform(frames, self.video_fps)
        merge = self.transform.merge_size ** 2
        n_video = int(grid[0].prod()) // merge
        ids, mask = self.token_ids(prompts, n_video, frames.device)
        extra = {}
        if self._mm_types:  # transformers >= 5 wants each token's modality for Qwen2-VL's 3D rope (2 = video)
            extra["mm_token_type_ids"] = (ids == int(self.model.config.video_token_id)).long() * 2
        if self.plan_constants:  # a plan: the 3D rope positions computed for real (see _fake_constants)
            extra["position_ids"] = self._real_positions(ids, mask, grid)
        out = self.model.model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels.to(self.dtype),
                               video_grid_thw=grid, use_cache=False, return_dict=True, **extra)
        logits = self.model.rm_head(out.last_hidden_state)  # [B, L, 1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        special = torch.zeros_like(ids, dtype=torch.bool)
        for i in self.special_ids:
            special |= ids == i
        if not bool((special.sum(1) == 3).all()):
            raise VaderError("VideoReward: each prompt must hold each reward token once (a prompt containing "
                             f"{', '.join(SPECIAL_TOKENS)} cannot be scored)")
        return logits[special].view(ids.shape[0], 3)

    def _real_positions(self, ids: Tensor, mask: Tensor, grid: Tensor) -> Tensor:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        rows, widths, thw = ids.tolist(), mask.tolist(), grid.tolist()
        with unset_fake_temporarily():
            ids_r, mask_r, grid_r = torch.tensor(rows), torch.tensor(widths), torch.tensor(thw)
            kwargs = {"mm_token_type_ids": (ids_r == int(self.model.config.video_token_id)).long() * 2} \
                if self._mm_types else {}
            return self.model.model.get_rope_index(ids_r, video_grid_thw=grid_r, attention_mask=mask_r, **kwargs)[0]

    def normalise(self, raw: Tensor) -> Tensor:
        mean = torch.tensor([self.norm[d][0] for d in DIMENSIONS], device=raw.device, dtype=raw.dtype)
        std = torch.tensor([self.norm[d][1] for d in DIMENSIONS], device=raw.device, dtype=raw.dtype)
        return (raw - mean) / std

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        """frames: [B, 3, K, H, W] in [-1, 1] (K >= 2). reward = Σ normalised scores of `dims`."""
        with _fake_constants(self.plan_constants):
            normed = self.normalise(self.scores(frames, prompts))
        reward = normed[:, [DIMENSIONS.index(d) for d in self.dims]].sum(1)
        return RewardOutput(reward=reward, loss=-reward)


_CONSTANT_DEPTH = [0, 1]  # [nesting depth, fake_tensor.CONSTANT_NUMEL_LIMIT before the outermost entry]


def _enter_constants() -> None:
    from torch._subclasses import fake_tensor

    if _CONSTANT_DEPTH[0] == 0:
        _CONSTANT_DEPTH[1] = fake_tensor.CONSTANT_NUMEL_LIMIT
        fake_tensor.CONSTANT_NUMEL_LIMIT = 1 << 22
    _CONSTANT_DEPTH[0] += 1


def _exit_constants() -> None:
    from torch._subclasses import fake_tensor

    _CONSTANT_DEPTH[0] -= 1
    if _CONSTANT_DEPTH[0] == 0:
        fake_tensor.CONSTANT_NUMEL_LIMIT = _CONSTANT_DEPTH[1]


@contextlib.contextmanager
def _fake_constants(enabled: bool):
    """For `vader plan` (fake tensors): Qwen2-VL derives its 3D rope positions, vision attention segments and
    placeholder masks from the values of input_ids / video_grid_thw (.tolist(), .item()). Under torch's
    FakeTensorMode those small integer tensors, built from Python data, stay real 'constants' when their
    size is under fake_tensor.CONSTANT_NUMEL_LIMIT (1 by default), so the limit is raised while the reward
    runs (and while its checkpointed layers recompute in backward: `_plan_hooks`): the integer bookkeeping
    is computed for real (a few KB), every activation stays fake."""
    if not enabled:
        yield
        return
    _enter_constants()
    try:
        yield
    finally:
        _exit_constants()


def _plan_hooks(model: nn.Module) -> None:
    """The raised constant limit around every vision block's and decoder layer's forward and their attention's,
    so activation checkpointing's recomputation in backward, outside the reward's forward, sees it too."""
    inner = getattr(model, "model", model)
    layers = [*getattr(getattr(inner, "visual", None), "blocks", []),
              *getattr(getattr(inner, "language_model", None), "layers", [])]
    # transformers checkpoints a layer's class-level forward, so the recompute in backward bypasses a wrapper on
    # the layer itself; its attention submodule is still called through its (wrapped) instance forward.
    attentions = [m for layer in layers for m in (getattr(layer, "attn", None), getattr(layer, "self_attn", None)) if m]
    for layer in [*layers, *attentions]:
        def forward(*args, _original=layer.forward, **kwargs):
            _enter_constants()
            try:
                return _original(*args, **kwargs)
            finally:
                _exit_constants()

        layer.forward = forward


# ---------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class RepoSource(WeightSource):
    """A whole hub repository (the VideoReward folder); `filename` is the file whose presence in the cache
    says it was downloaded (model_config.json)."""

    def download_command(self) -> str:
        return download_command(self.repo)

    def describe(self) -> str:
        return f"local path {self.local}" if self.local else f"{self.repo} (checkpoint folder)"


def videoreward_sources(sources: dict | None = None, **_: Any) -> tuple[WeightSource, WeightSource]:
    """The VideoReward folder and its base Qwen2-VL model (the registry's `weights`)."""
    sources = sources or {}
    spec = sources.get("videoreward")
    if spec is None or (not Path(spec).expanduser().exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        reward = RepoSource("videoreward", "VideoReward checkpoint", repo=spec or VIDEOREWARD_REPO,
                            filename="model_config.json")
    else:
        reward = RepoSource("videoreward", "VideoReward checkpoint", local=str(Path(spec).expanduser()))
    base = folder_source("videoreward_base", "VideoReward base model (Qwen2-VL-2B-Instruct)",
                         sources.get("videoreward_base"), BASE_MODEL)
    return reward, base


def _reward_folder(src: WeightSource) -> Path:
    if src.local:
        if not Path(src.local).is_dir():
            raise VaderError(f"{src.what}: local path {src.local} is not a folder (fix reward_sources['videoreward'])")
        return Path(src.local)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.repo, local_files_only=offline()))
    except (OSError, ValueError, ConnectionError) as exc:
        raise load_error(src, exc) from exc


def checkpoint_folder(folder: Path) -> Path:
    """The newest checkpoint-* folder (as VideoAlign's load_model_from_checkpoint), or `folder` itself."""
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return found[-1] if found else folder


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(non-LoRA state dict, LoRA state dict or None) from a published checkpoint folder."""
    full, adapter, rest = ckpt / "model.pth", ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    if full.is_file():
        return torch.load(full, map_location="cpu", weights_only=True), None
    if adapter.is_file() and rest.is_file():
        from safetensors.torch import load_file

        return torch.load(rest, map_location="cpu", weights_only=True), load_file(str(adapter))
    raise VaderError(f"VideoReward checkpoint folder {ckpt} holds neither model.pth nor adapter_model.safetensors + "
                     "non_lora_state_dict.pth")


def lora_scale(model_config: dict, ckpt: Path) -> float:
    peft = dict(model_config.get("peft_lora_config") or {})
    adapter = ckpt / "adapter_config.json"
    if adapter.is_file():
        a = json.loads(adapter.read_text())
        peft.setdefault("lora_r", a.get("r"))
        peft.setdefault("lora_alpha", a.get("lora_alpha"))
        peft.setdefault("use_rslora", a.get("use_rslora", False))
    r, alpha = float(peft.get("lora_r") or 64), float(peft.get("lora_alpha") or 128)
    return alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r


def load_videoreward(reward_src: WeightSource, base_src: WeightSource, *, dtype: torch.dtype = torch.float32,
                     attn_implementation: str = "sdpa") -> tuple[nn.Module, Any, VideoTransform, dict]:
    """(model with the LoRA merged, tokenizer, transform, norm) from the published folders."""
    from transformers import AutoTokenizer, Qwen2VLConfig

    folder = _reward_folder(reward_src)
    config_file = folder / "model_config.json"
    model_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    data, inference = model_config.get("data_config") or {}, model_config.get("inference_config") or {}
    ckpt = checkpoint_folder(folder)
    base = pretrained_path(base_src)
    try:
        tokenizer_dir = ckpt / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir) if tokenizer_dir.is_dir() else base,
                                                  padding_side="right")
        if tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0]) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        config = Qwen2VLConfig.from_pretrained(base)
        transform = _transform(base, data)
    except (OSError, ValueError) as exc:
        raise load_error(base_src, exc) from exc
    non_lora, lora = read_checkpoint(ckpt)
    text = getattr(config, "text_config", config)
    state = convert_checkpoint(non_lora, lora, lora_scale(model_config, ckpt),
                               bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True))))
    cls = reward_model_class()
    with quiet_transformers():
        model = cls.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
    model.resize_token_embeddings(len(tokenizer))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or mismatched or "rm_head.weight" not in state:
        raise VaderError(f"VideoReward checkpoint {ckpt} does not fit Qwen2-VL from {base}: "
                         f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(mismatched)} of another shape "
                         f"{mismatched[:3]}{'' if 'rm_head.weight' in state else ', no rm_head.weight'}")
    model.load_state_dict({**own, **state}, strict=True)
    norm = {d: (float(inference.get(f"{d}_mean", NORM[d][0])), float(inference.get(f"{d}_std", NORM[d][1])))
            for d in DIMENSIONS} if inference else dict(NORM)
    return model.to(dtype=dtype), tokenizer, transform, norm


def _transform(base: str, data: dict) -> VideoTransform:
    overrides = dict(max_pixels=int(data.get("max_frame_pixels") or MAX_PIXELS), fps=float(data.get("fps") or FPS))
    try:
        from transformers import Qwen2VLVideoProcessor

        return VideoTransform.from_processor(Qwen2VLVideoProcessor.from_pretrained(base), **overrides)
    except (OSError, ValueError):
        return VideoTransform(**overrides)


def drop_lm_head(model: nn.Module) -> nn.Module:
    """The reward reads hidden states, never next-token logits: the language-model head (tied to the token
    embeddings in Qwen2-VL-2B, so it costs no memory in a real run) is replaced by an Identity, so that a plan,
    which gives every module its own fake storage, does not count the 0.43 GiB table twice."""
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = nn.Identity()
    return model


def set_video_fps(reward: Any, fps: float | None) -> None:
    """Tell every part of `reward` that samples the clip in time (a `video_fps` attribute: VideoReward) the
    decoded clip's frame rate (the run's save_fps, or a scored file's rate). Other rewards are left alone."""
    if not fps or not hasattr(reward, "modules"):
        return
    for module in reward.modules():
        if hasattr(module, "video_fps"):
            module.video_fps = float(fps)


DIMS_OF = {"videoreward": DIMENSIONS, "videoreward_vq": ("VQ",), "videoreward_mq": ("MQ",), "videoreward_ta": ("TA",)}


# A weighted dict of dimensions ({'videoreward_vq': 1.0, 'videoreward_ta': 0.5}) builds one reward per
# entry: while one is alive the others take its loaded model (4.1 GiB in bf16) instead of loading their own.
_LOADED: weakref.WeakValueDictionary[tuple, nn.Module] = weakref.WeakValueDictionary()


def build_videoreward(name: str = "videoreward", *, device=None, dtype: torch.dtype | str = torch.float32,
                      sources: dict | None = None, grad_checkpoint: bool = False, video_fps: float | None = None,
                      **_: Any) -> VideoReward:
    """The registry's factory for `name` (one of DIMS_OF). Rewards built from the same folders, dtype and
    device share one model (each keeps its own dimensions, frame rate and text cache)."""
    reward_src, base_src = videoreward_sources(sources)
    key = (repr(reward_src), repr(base_src), as_dtype(dtype), str(device), bool(grad_checkpoint))
    model = _LOADED.get(key)
    if model is None:
        model, tokenizer, transform, norm = load_videoreward(reward_src, base_src, dtype=as_dtype(dtype))
        model = drop_lm_head(model)
        if device is not None:
            model.to(device=device)
        model._vader_videoreward = (tokenizer, transform, norm)  # what a second reward needs beside it
        _LOADED[key] = model
    tokenizer, transform, norm = model._vader_videoreward
    reward = VideoReward(model, tokenizer, transform, dims=DIMS_OF[name], norm=norm, video_fps=video_fps,
                         grad_checkpoint=grad_checkpoint, name=name)
    return reward.to(device=device) if device is not None else reward


def factory(name: str):
    def build(**options: Any) -> VideoReward:
        return build_videoreward(name, **options)

    def skeleton(**options: Any) -> VideoReward:
        return videoreward_skeleton(name, **options)

    return build, skeleton


# ---------------------------------------------------------------------------------------------
# the weightless skeleton for `vader plan`

# Qwen/Qwen2-VL-2B-Instruct config.json, with the embeddings resized to VideoReward's tokenizer (151657 + 3).
QWEN2_VL_2B_CONFIG: dict[str, Any] = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
    video_token_id=151656, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=1536,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
)
VIDEOREWARD_VOCAB = 151660


class OfflineQwenTokenizer:
    """For plans only: token ids of the right count and the three reward tokens (a Qwen2 BPE sequence is
    ~4 characters a token; ids only index the embedding table, so no memory figure depends on them)."""

    chat_template = None
    pad_token_id = 151643
    unk_token_id = None

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        table = {**dict(zip(SPECIAL_TOKENS, range(151657, 151660))), VIDEO_PAD: 151656}
        return [table.get(t, 0) for t in tokens]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids: list[int] = []
        for part in re.split(r"(<\|[^|]+\|>)", text):
            if part.startswith("<|") and part.endswith("|>"):
                ids.append(self.convert_tokens_to_ids([part])[0] or 151644)
            elif part:
                ids.extend([1000] * max(1, len(part) // 4))
        return {"input_ids": ids}


def videoreward_skeleton(name: str = "videoreward", *, dtype: torch.dtype, grad_checkpoint: bool = False,
                         **_: Any) -> VideoReward:
    from transformers import Qwen2VLConfig

    cls = reward_model_class()
    config = Qwen2VLConfig(**{**QWEN2_VL_2B_CONFIG, "vocab_size": VIDEOREWARD_VOCAB})
    config._attn_implementation = "sdpa"
    with quiet_transformers(), torch.device("meta"):
        model = cls(config)
    _plan_hooks(model)
    reward = VideoReward(drop_lm_head(model).to(dtype=dtype), OfflineQwenTokenizer(), dims=DIMS_OF[name],
                         grad_checkpoint=grad_checkpoint, name=name)
    reward.plan_constants = True
    return reward


__all__ = [
    "BASE_MODEL", "DIMENSIONS", "DIMS_OF", "NEEDS_CLIP", "NORM", "PROMPT_TEMPLATE", "QWEN2_VL_2B_CONFIG",
    "SOURCE_DOCS", "SPECIAL_TOKENS", "VIDEOREWARD_REPO", "VideoReward", "VideoTransform", "build_prompt",
    "build_videoreward", "convert_checkpoint", "factory", "load_videoreward", "published_key", "sample_indices",
    "set_video_fps", "smart_resize", "videoreward_skeleton", "videoreward_sources",
]
