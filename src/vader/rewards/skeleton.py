"""Every registered reward as its real class and published architecture, with no weights: for `vader plan`.

`reward_skeleton(name)` returns what `vader.rewards.build_reward(name)` returns (same classes, same
module tree, same state-dict keys and shapes, same preprocessing and attention implementation), but
every parameter and buffer is on the meta device and nothing is downloaded or read from the Hugging
Face cache: the architectures are written below as data, copied from the published configs of the
default weights. `vader.memory.materialise(reward, dtype)` inside `with fake_mode():` then gives it
fake storage, so a plan can run the reward's forward and backward at full size on shapes alone.

Each `*_skeleton` function below is the `skeleton` of its reward's record in `vader.rewards.REWARDS`
(a weight-free reward's skeleton is its own build); `reward_skeleton` reads the records.

The only files read are package data: open_clip's bundled CLIP BPE vocabulary (HPS's tokenizer, and
PickScore's offline stand-in below) and the toy classifier's shipped config.json.

Where the real reward needs downloaded files that are not weights, the skeleton uses stand-ins that
give the model the same tensor shapes and dtypes:
- PickScore's tokenizer (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer files) -> `OfflineClipTokenizer`,
  the same CLIP BPE vocabulary from open_clip, padded to the longest prompt like the real call. Token
  ids only index the embedding table: they change no tensor's size, so no memory figure.
- PickScore's and ActPred's image processors (preprocessor_config.json) -> the published settings as
  data, going through the same `from_hf_processor` / `from_processor` paths as the loaded files.

A 'module:function' reward (`vader.rewards.callable.CallableReward`) has no model: `callable_skeleton`
stands in for it with what vader's wrapper itself does on the device, and never calls the function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vader.rewards.actpred import ActPred, ClipTransform, sinusoid_positions
from vader.rewards.aesthetic import AestheticMLP, AestheticReward, quiet_transformers
from vader.rewards.base import Reward, RewardOutput
from vader.rewards.hps import AestheticHPSReward, HPSReward, hps_version_file, quiet_root_warnings
from vader.rewards.kinetics import KINETICS_400
from vader.rewards.pickscore import PickScoreReward
from vader.rewards.toy import DEFAULT_FOLDER, ToyAlignment, ToyFrame, ToyJudgeReward, ToySize
from vader.toyworld.classifier import ToyClassifier, ToyClassifierConfig

__all__ = [
    "AESTHETIC_VISION_CONFIG", "HPS_OPEN_CLIP_ARCH", "OfflineClipTokenizer", "PICK_SCORE_CONFIG",
    "PICK_SCORE_PROCESSOR", "VIDEOMAE_CONFIG", "VIDEOMAE_PROCESSOR", "actpred_skeleton", "aesthetic_hps_skeleton",
    "aesthetic_skeleton", "callable_skeleton", "hps_skeleton", "pick_score_skeleton", "toy_alignment_skeleton",
    "toy_size_skeleton",
]

# openai/clip-vit-large-patch14 config.json, vision_config (+ the top-level projection_dim): the CLIP
# ViT-L/14 vision tower and projection the aesthetic reward loads.
AESTHETIC_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
# The LAION improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE.pth) reads ViT-L/14's 768-d embedding.
AESTHETIC_HEAD_IN = 768

# The open_clip model name HPS v2 and v2.1 were trained on (xswu/HPSv2: open_clip ViT-H-14); its config
# ships inside open_clip (model_configs/ViT-H-14.json).
HPS_OPEN_CLIP_ARCH = "ViT-H-14"

# yuvalkirstain/PickScore_v1 config.json (= laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, which it fine-tunes):
# CLIP ViT-H/14 in transformers' CLIPModel layout, plain GELU (not OpenAI's quick_gelu).
PICK_SCORE_CONFIG: dict[str, Any] = dict(
    projection_dim=1024,
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5),
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json (PickScore's processor).
PICK_SCORE_PROCESSOR: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
PICK_SCORE_MAX_LENGTH = 77

# MCG-NJU/videomae-base-finetuned-kinetics config.json (id2label: the 400 Kinetics-400 names, in
# vader.rewards.kinetics.KINETICS_400 in the same alphabetical class order).
VIDEOMAE_CONFIG: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    image_size=224, patch_size=16, num_channels=3, num_frames=16, tubelet_size=2, qkv_bias=True,
    use_mean_pooling=True, layer_norm_eps=1e-12,
)
# MCG-NJU/videomae-base-finetuned-kinetics preprocessor_config.json (VideoMAEImageProcessor).
VIDEOMAE_PROCESSOR: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=2, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
)


class OfflineClipTokenizer:
    """A stand-in for the transformers CLIP tokenizer PickScore loads from its processor folder: the
    same call (`tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")`)
    and the same outputs' shapes and dtypes (int64 input_ids and attention_mask [N, longest prompt]),
    from the CLIP BPE vocabulary bundled with open_clip. Padding uses the end-of-text id. For memory
    plans only: it does not promise the real tokenizer's exact ids."""

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer()

    def __call__(self, prompts: list[str], *, padding: bool = True, truncation: bool = True,
                 max_length: int = PICK_SCORE_MAX_LENGTH, return_tensors: str = "pt") -> Any:
        from transformers import BatchEncoding

        if return_tensors != "pt":
            raise ValueError(f"OfflineClipTokenizer returns torch tensors only, not return_tensors={return_tensors!r}")
        sot, eot = self._bpe.sot_token_id, self._bpe.eot_token_id
        rows = []
        for prompt in prompts:
            ids = [sot, *self._bpe.encode(prompt), eot]
            if truncation and len(ids) > max_length:
                ids = [*ids[: max_length - 1], eot]
            rows.append(ids)
        width = max(len(r) for r in rows) if padding else None
        if width is None and len({len(r) for r in rows}) > 1:
            raise ValueError("prompts of different lengths need padding=True")
        width = width or len(rows[0])
        ids = [r + [eot] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        return BatchEncoding({"input_ids": torch.tensor(ids, dtype=torch.long),
                              "attention_mask": torch.tensor(mask, dtype=torch.long)})


def aesthetic_skeleton(*, dtype: torch.dtype, resize: str, grad_checkpoint: bool, **_: Any) -> Reward:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with quiet_transformers(), torch.device("meta"):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**AESTHETIC_VISION_CONFIG))
        head = AestheticMLP(in_dim=AESTHETIC_HEAD_IN)
    return AestheticReward(vision.to(dtype=dtype), head, resize=resize, grad_checkpoint=grad_checkpoint)


def hps_skeleton(*, dtype: torch.dtype, resize: str, grad_checkpoint: bool, hps_version: str, **_: Any) -> Reward:
    import open_clip

    hps_version_file(hps_version)  # the same check (and one-line error) as the real loader
    # built on meta from the start: device="meta" alone first initialises 986M parameters on the CPU
    with quiet_root_warnings(), torch.device("meta"):  # "No pretrained weights loaded": none are wanted
        model = open_clip.create_model(HPS_OPEN_CLIP_ARCH, pretrained=None, device="meta")
    return HPSReward(model.to(dtype=dtype), open_clip.get_tokenizer(HPS_OPEN_CLIP_ARCH),
                     resize=resize, grad_checkpoint=grad_checkpoint)


def aesthetic_hps_skeleton(**options: Any) -> Reward:
    return AestheticHPSReward(aesthetic_skeleton(**options), hps_skeleton(**options))


def pick_score_skeleton(*, dtype: torch.dtype, resize: str, grad_checkpoint: bool, **_: Any) -> Reward:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel


    with quiet_transformers(), torch.device("meta"):
        model = CLIPModel(CLIPConfig(**PICK_SCORE_CONFIG))
    return PickScoreReward(model.to(dtype=dtype), OfflineClipTokenizer(), CLIPImageProcessor(**PICK_SCORE_PROCESSOR),
                           resize=resize, grad_checkpoint=grad_checkpoint, max_length=PICK_SCORE_MAX_LENGTH)


def _cpu_positions(n_position: int, dim: int) -> torch.Tensor:
    with torch.device("cpu"):  # a real tensor, as transformers makes it, even while the model is built on meta
        return sinusoid_positions(n_position, dim)


def actpred_skeleton(*, dtype: torch.dtype, grad_checkpoint: bool, actpred_frames: str, num_frames: int | None,
                     **_: Any) -> Reward:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification
    from transformers.models.videomae import modeling_videomae


    config = VideoMAEConfig(**VIDEOMAE_CONFIG, id2label=dict(enumerate(KINETICS_400)),
                            label2id={name: i for i, name in enumerate(KINETICS_400)})
    # transformers builds VideoMAE's fixed position table (a plain CPU tensor, not a parameter) with a
    # Python loop over 1568 x 768 entries (1.8 s measured); vader's torch version gives the same table at once.
    original = modeling_videomae.get_sinusoid_encoding_table
    modeling_videomae.get_sinusoid_encoding_table = _cpu_positions
    try:
        with quiet_transformers(), torch.device("meta"):
            model = VideoMAEForVideoClassification(config)
    finally:
        modeling_videomae.get_sinusoid_encoding_table = original
    reward = ActPred(model.to(dtype=dtype), ClipTransform.from_processor(VIDEOMAE_PROCESSOR),
                     grad_checkpoint=grad_checkpoint, frames=actpred_frames)
    if num_frames is not None:
        # The real run keeps the position table for its clip length on the CPU (copied to the device
        # inside each forward); building it here, outside any fake mode, keeps it off a plan's meter too.
        reward._use_positions(reward.clip_length(int(num_frames)))
    return reward


def _toy_classifier() -> nn.Module:
    path = Path(DEFAULT_FOLDER) / "config.json"
    config = ToyClassifierConfig.from_dict(json.loads(path.read_text()), where=str(path))
    with torch.device("meta"):
        return ToyClassifier(config).eval()


def toy_alignment_skeleton(*, dtype: torch.dtype, **_: Any) -> Reward:
    return ToyAlignment(_toy_classifier().to(dtype=dtype))


def toy_frame_skeleton(*, dtype: torch.dtype, **_: Any) -> Reward:
    return ToyFrame(_toy_classifier().to(dtype=dtype))


def toy_judge_skeleton(**_: Any) -> Reward:
    from vader.toyworld.judge import FOLDER, ToyJudge, ToyJudgeConfig

    path = Path(FOLDER) / "config.json"
    config = ToyJudgeConfig.from_dict(json.loads(path.read_text()), where=str(path))
    with torch.device("meta"):
        return ToyJudgeReward(ToyJudge(config).eval().requires_grad_(False))


def toy_size_skeleton(*, dtype: torch.dtype, **_: Any) -> Reward:
    return ToySize(_toy_classifier().to(dtype=dtype))


class CallableSkeleton(Reward):
    """A 'module:function' reward in a plan: CallableReward's own work on the device (the fp32 copy of the
    frames it hands the function, under no_grad) and a [B] float32 score of zeros; no weights, no FLOPs
    beyond that copy, no gradient. The user's function is not called: it would see fake tensors, and
    its own memory (on the CPU or the GPU) is its business."""

    differentiable = False

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = self.name = spec

    def forward(self, frames: torch.Tensor, prompts: list[str]) -> RewardOutput:
        with torch.no_grad():
            frames.detach().float().clamp(-1, 1)  # what CallableReward passes the function, freed after it
        reward = torch.zeros(frames.shape[0], device=frames.device)
        return RewardOutput(reward=reward, loss=-reward)


def callable_skeleton(spec: str) -> Reward:
    """The weightless stand-in for reward_fn='module:function' (see CallableSkeleton)."""
    return CallableSkeleton(spec).eval()
