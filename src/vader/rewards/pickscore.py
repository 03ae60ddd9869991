"""PickScore v1: a CLIP-H fine-tuned on Pick-a-Pic human preferences; each image is scored against
its own prompt (the original scored every image against the first prompt only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.rewards.aesthetic import check_loading_info, clip_image_embeds, quiet_transformers
from vader.rewards.base import (
    ImageTransform,
    Reward,
    RewardOutput,
    TextEmbeddingCache,
    as_dtype,
    checkpoint_layers,
    freeze,
    module_dtype,
)
from vader.rewards.hub import WeightSource, folder_source, given_sources, load_error, pretrained_path

PICK_MODEL = "yuvalkirstain/PickScore_v1"
PICK_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# the `sources` keys it reads -> what they override (documented in the config reference)
SOURCE_DOCS = {
    "pick_score": "PickScore CLIPModel: hub id or local folder (default yuvalkirstain/PickScore_v1)",
    "pick_score_processor": "PickScore tokenizer + image processor: hub id or local folder "
                            "(default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
}


def pick_sources(sources: dict | None = None, **_: object) -> tuple[WeightSource, WeightSource]:
    """The model and processor folders, with `sources` overrides (the registry's `weights`)."""
    sources = sources or {}
    model = folder_source("pick_score", "PickScore model", sources.get("pick_score"), PICK_MODEL)
    processor = folder_source("pick_score_processor", "PickScore processor (tokenizer, image settings)",
                              sources.get("pick_score_processor"), PICK_PROCESSOR, kind="processor")
    return model, processor


class PickScoreReward(Reward):
    """PickScore v1 (transformers CLIPModel).

    Range: score = logit_scale.exp() · cosine(image, its own prompt) = 100 · cosine for PickScore_v1,
    typically ≈ 18–24 for generated images; reward = score. Loss as the original: |1 − score/100|
    (≈ 0.76–0.82). Preprocessing: the processor's (default 'crop': shortest side 224 bicubic, centre
    crop 224, CLIP mean/std), on tensors so gradients reach the frames; 'squash' resizes the whole
    frame instead. Text embeddings are encoded once per prompt and cached.
    """

    name = "pick_score"

    def __init__(self, model: nn.Module, tokenizer, image_processor=None, *, resize: str = "crop",
                 grad_checkpoint: bool = False, max_length: int = 77):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        if image_processor is None:
            size = int(getattr(getattr(model.config, "vision_config", None), "image_size", 224))
            self.transform = ImageTransform(size=size, mode=resize)
        else:
            self.transform = ImageTransform.from_hf_processor(image_processor, mode=resize)
        if grad_checkpoint:
            checkpoint_layers(model.vision_model.encoder.layers)
        self.text = TextEmbeddingCache(self._encode_text)
        freeze(self)

    @classmethod
    def from_pretrained(cls, model: str | WeightSource | None = None, processor: str | WeightSource | None = None,
                        *, device=None, dtype: torch.dtype | str = torch.float32, **kwargs) -> PickScoreReward:
        """model: hub id / local folder of the CLIPModel (default yuvalkirstain/PickScore_v1);
        processor: hub id / local folder with the tokenizer and image processor config
        (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        dtype = as_dtype(dtype)
        model_src, proc_src = given_sources((model, processor), ("pick_score", "pick_score_processor"), pick_sources)
        try:
            proc_path = pretrained_path(proc_src)
            tokenizer = AutoTokenizer.from_pretrained(proc_path)
            image_processor = CLIPImageProcessor.from_pretrained(proc_path)
        except (OSError, ValueError) as exc:
            raise load_error(proc_src, exc) from exc
        try:
            model_path = pretrained_path(model_src)
            with quiet_transformers():
                clip, info = CLIPModel.from_pretrained(model_path, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise load_error(model_src, exc) from exc
        check_loading_info(model_src, model_path, info)
        return cls(clip, tokenizer, image_processor, **kwargs).to(device=device, dtype=dtype)

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        self.text.add(prompts)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        device = self.model.text_projection.weight.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"),
                                    return_dict=True)
        return self.model.text_projection(out.pooler_output)

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.transform(self.to_unit(images)).to(module_dtype(self.model.vision_model))
        image = clip_image_embeds(self.model.vision_model, self.model.visual_projection, pixels).float()
        image = F.normalize(image, dim=-1)
        text = self.text.get(prompts, image.device)
        return self.model.logit_scale.float().exp() * (image * text).sum(-1)

    def score_images(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        score = self.scores(images, prompts)
        return RewardOutput(reward=score, loss=(1.0 - score / 100.0).abs())


def build_pick_score(*, device=None, dtype: torch.dtype | str = torch.float32, sources: dict | None = None,
                     resize: str, grad_checkpoint: bool = False, **_: object) -> PickScoreReward:
    """The registry's factory, as `aesthetic.build_aesthetic`."""
    model, processor = pick_sources(sources)
    return PickScoreReward.from_pretrained(model, processor, device=device, dtype=dtype, resize=resize,
                                           grad_checkpoint=grad_checkpoint)
