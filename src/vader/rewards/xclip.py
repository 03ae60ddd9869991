"""X-CLIP: text-video similarity of the prompt and the decoded clip (a differentiable video reward).

Model: `microsoft/xclip-base-patch32` through transformers' `XCLIPModel` (CLIP ViT-B/32 with cross-frame
attention, a multi-frame integration transformer (MIT) and a video-specific prompt generator; 8 frames
at 224x224, trained on Kinetics-400). The issue names ViCLIP (InternVid) first and allows X-CLIP where
ViCLIP cannot be matched: ViCLIP's weights load only through InternVid's own model code (its
`viclip.py`, not in transformers or any package vader depends on), so a parity test against its
reference implementation is not possible here; X-CLIP ships inside transformers (model, tokenizer,
processor), so the reward below is tested to equal `XCLIPModel(**XCLIPProcessor(...))` exactly.

Score: `logits_per_video` of the clip against its own prompt, i.e. logit_scale.exp() · cosine(video
embedding, video-conditioned text embedding), as XCLIPModel reports it and as the CLIP rewards here
(PickScore) score; logit_scale.exp() is a constant of the checkpoint, so the reward ranks and trains
exactly as the raw cosine would, on the scale the model's own softmax over prompts uses. Reward =
that score; loss = 1 - cosine (= 1 - score / logit_scale.exp(), in [0, 2]; minimising it maximises
the reward).

Frames: X-CLIP's cross-frame attention and MIT position table are built for exactly
`config.vision_config.num_frames` (8) frames, so the decoded frames are sampled to 8 indices spread
evenly in time (segment centres, `vader.rewards.actpred.sample_indices`): 16 decoded frames give
1, 3, ..., 15; 81 give 5, 15, ..., 75. With 2-7 decoded frames indices repeat (nearest frame, no
interpolation): 'fml' (3 frames) shows first x3, middle x2, last x3. One decoded frame
(decode_frame '-1' or an index) is not a clip: config validation refuses it (the record's
`needs_clip`), and the forward raises VaderError. Sensible decode_frame settings: 'all' (every frame,
the closest to what the model was trained on), 'alt' (every other frame: half the VAE decode, still
>= 8 frames for clips of >= 16 frames) and 'fml' (3 frames, the cheapest; the clip the model sees
is then mostly repeated frames).

Preprocessing: XCLIPProcessor's image processor (VideoMAEImageProcessor with the published settings:
shortest edge 224, bilinear, centre crop 224, rescale 1/255, CLIP mean/std) done on tensors so
gradients reach the frames (`vader.rewards.actpred.preprocess_clip`, antialiased bilinear). The
processor resizes uint8 and rounds; the float resize differs from it by about one grey level.

Text: X-CLIP's text features depend on the video (the prompt generator cross-attends from the text
embedding to the clip's patch tokens), so only the video-independent part is cached per prompt: the
projected text-encoder output `text_projection(text_model(prompt).pooler_output)`, unnormalised. The
prompt generator, the normalisation and the similarity run in every forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vader.errors import VaderError
from vader.frames import CLIP_DECODE_FRAMES
from vader.rewards.actpred import ClipTransform, preprocess_clip
from vader.rewards.aesthetic import quiet_transformers
from vader.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    RewardOutput,
    TextEmbeddingCache,
    as_dtype,
    checkpoint_layers,
    freeze,
    module_dtype,
)
from vader.rewards.hub import WeightSource, folder_source, load_error, loading_problems, pretrained_path

XCLIP_MODEL = "microsoft/xclip-base-patch32"
SOURCE_DOCS = {
    "xclip": "X-CLIP model folder (XCLIPModel + its tokenizer and preprocessor_config.json): hub id or local "
             "save_pretrained folder (default microsoft/xclip-base-patch32)",
}
NEEDS_CLIP = "scores a clip against the prompt (X-CLIP reads 8 frames)"  # the record's `needs_clip`
MAX_LENGTH = 77

# microsoft/xclip-base-patch32 config.json: every size is transformers' XCLIPConfig default (the config
# classes' docstrings say their defaults are this checkpoint; its config.json sets no size): CLIP
# ViT-B/32 vision (768 wide, 12 layers, 12 heads, patch 32, 224 px, 8 frames), 512-wide 12-layer text
# tower, projection 512, MIT 1 layer 512 wide, prompt generator 2 layers, 8 heads, alpha 0.1.
XCLIP_CONFIG: dict[str, Any] = dict(
    projection_dim=512, prompt_layers=2, prompt_alpha=0.1, prompt_hidden_act="quick_gelu",
    prompt_num_attention_heads=8, logit_scale_init_value=2.6592,
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       mit_hidden_size=512, mit_intermediate_size=2048, mit_num_hidden_layers=1,
                       mit_num_attention_heads=8, image_size=224, patch_size=32, num_frames=8,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
)
# microsoft/xclip-base-patch32 preprocessor_config.json (VideoMAEFeatureExtractor: size 224 = shortest edge).
XCLIP_PROCESSOR: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=2, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
)


def xclip_sources(sources: dict | None = None, **_: Any) -> tuple[WeightSource]:
    """The model folder (weights, tokenizer, preprocessor config), `sources['xclip']` overriding it."""
    return (folder_source("xclip", "X-CLIP model", (sources or {}).get("xclip"), XCLIP_MODEL),)


class RawTextCache(TextEmbeddingCache):
    """TextEmbeddingCache without the normalisation: X-CLIP adds the prompt generator's output to the
    projected text embedding before normalising, so the cache keeps it as the text tower gives it."""

    def add(self, prompts, batch_size: int = 32) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i: i + batch_size]
            with torch.no_grad():
                embeds = self._encode(chunk).float()
            for prompt, emb in zip(chunk, embeds):
                self._cache[prompt] = emb.detach().clone()


class XCLIPReward(Reward):
    """Reward = X-CLIP logits_per_video of each clip and its own prompt (logit_scale · cosine; about
    100 · cosine for the published model); loss = 1 - cosine. See the module docstring."""

    name = "xclip"

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, *, grad_checkpoint: bool = False,
                 max_length: int = MAX_LENGTH):
        super().__init__()
        vision = model.config.vision_config
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_frames = int(vision.num_frames)
        size = int(vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0])
        if processor is None:
            processor = {**XCLIP_PROCESSOR, "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
        self.transform = ClipTransform.from_processor(getattr(processor, "image_processor", processor))
        if tuple(self.transform.crop or ()) != (size, size):
            raise VaderError(f"the X-CLIP image processor makes {self.transform.crop} frames but the model takes "
                             f"{size}x{size}")
        if grad_checkpoint:  # XCLIP supports it, but transformers checkpoints only in training mode
            checkpoint_layers(model.vision_model.encoder.layers)
        self.text = RawTextCache(self._encode_text)
        freeze(self)

    def prepare(self, prompts: list[str], labels: dict[str, str] | None = None) -> None:
        self.text.add(prompts)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        """text_projection(pooled text tower output) [N, projection_dim]: what XCLIPModel.forward computes
        before the prompt generator (video-independent)."""
        device = self.model.text_projection.weight.device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"),
                                    return_dict=True)
        return self.model.text_projection(out.pooler_output)

    def preprocess(self, frames: Tensor) -> Tensor:
        """[B, 3, K, H, W] in [-1, 1] (K >= 2) -> pixel_values [B, num_frames, 3, 224, 224] (float32)."""
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames [B, 3, K, H, W], got {tuple(frames.shape)}")
        if frames.shape[2] < 2:
            raise VaderError(
                f"reward_fn 'xclip' {NEEDS_CLIP} but got {frames.shape[2]} decoded frame; decode_frame '-1' or a "
                f"frame index decodes one frame: use decode_frame {', '.join(repr(m) for m in CLIP_DECODE_FRAMES)}")
        return preprocess_clip(frames, self.transform, self.num_frames)

    def similarity(self, pixel_values: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(logit_scale · cosine, cosine) [B] for pixel_values [B, num_frames, 3, h, w] (the processor's
        layout) and one prompt per clip: XCLIPModel.forward's diagonal, step by step."""
        m = self.model
        b, t = pixel_values.shape[:2]
        if t != self.num_frames:
            raise ValueError(f"X-CLIP takes {self.num_frames} frames per clip, got {t}")
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} clips")
        pixel_values = pixel_values.to(module_dtype(m.vision_model))
        vision = m.vision_model(pixel_values=pixel_values.reshape(b * t, *pixel_values.shape[2:]))
        cls_features = m.visual_projection(vision.pooler_output).view(b, t, -1)
        video = m.mit(cls_features).pooler_output
        img = m.prompts_visual_layernorm(vision.last_hidden_state[:, 1:, :]) @ m.prompts_visual_projection
        img = img.view(b, t, -1, video.shape[-1]).mean(dim=1)
        text = self.text.get(prompts, video.device).to(video.dtype)[:, None]  # [B, 1, D]
        text = (text + m.prompts_generator(text, img))[:, 0]
        cosine = (F.normalize(video.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        return m.logit_scale.float().exp() * cosine, cosine

    def forward(self, frames: Tensor, prompts: list[str]) -> RewardOutput:
        """frames: [B, 3, K, H, W] in [-1, 1], K >= 2; one prompt per clip."""
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {frames.shape[0]} clips")
        score, cosine = self.similarity(self.preprocess(frames), prompts)
        return RewardOutput(reward=score, loss=1.0 - cosine)


def check_strict(src: WeightSource, path: str, info: dict) -> None:
    """VaderError unless the checkpoint filled exactly XCLIPModel's weights (none missing, which would run
    with random init; none unexpected or mismatched, which means another architecture or size)."""
    problems = loading_problems(info)
    if problems:
        raise VaderError(f"{src.what} at {path} is not an XCLIPModel checkpoint of its config: {'; '.join(problems)}")


def load_xclip(src: WeightSource, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(XCLIPModel, XCLIPProcessor) from a hub id or local folder, loaded strictly."""
    from transformers import XCLIPModel, XCLIPProcessor

    path = pretrained_path(src)
    try:
        processor = XCLIPProcessor.from_pretrained(path)
        with quiet_transformers():
            model, info = XCLIPModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, TypeError) as exc:
        raise load_error(src, exc) from exc
    check_strict(src, path, info)
    return model, processor


def build_xclip(*, device=None, dtype: torch.dtype | str = torch.float32, sources: dict | None = None,
                grad_checkpoint: bool = False, **_: Any) -> XCLIPReward:
    """The registry's factory: the model and processor from `sources['xclip']` (default
    microsoft/xclip-base-patch32), frozen, eval mode, in `dtype` on `device`."""
    dtype = as_dtype(dtype)
    (src,) = xclip_sources(sources)
    model, processor = load_xclip(src, dtype=dtype)
    reward = XCLIPReward(model, processor.tokenizer, processor.image_processor, grad_checkpoint=grad_checkpoint)
    return reward.to(device=device, dtype=dtype)


def xclip_skeleton(*, dtype: torch.dtype, grad_checkpoint: bool = False, **_: Any) -> XCLIPReward:
    """The published model's architecture on the meta device (for `vader plan`): XCLIP_CONFIG, the published
    processor settings, and open_clip's CLIP BPE vocabulary as tokenizer stand-in (same shapes)."""
    from transformers import XCLIPConfig, XCLIPModel

    from vader.rewards.skeleton import OfflineClipTokenizer

    with quiet_transformers(), torch.device("meta"):
        model = XCLIPModel(XCLIPConfig(**XCLIP_CONFIG))
    return XCLIPReward(model.to(dtype=dtype), OfflineClipTokenizer(), XCLIP_PROCESSOR, grad_checkpoint=grad_checkpoint)


__all__ = ["NEEDS_CLIP", "SOURCE_DOCS", "XCLIP_CONFIG", "XCLIP_MODEL", "XCLIP_PROCESSOR", "RawTextCache",
           "XCLIPReward", "build_xclip", "check_strict", "load_xclip", "xclip_skeleton", "xclip_sources"]
