"""vader.rewards.skeleton: every registered reward as the real class and published architecture on the
meta device (no weights, no files, no network), and a full-size forward + backward of each on fake
tensors under the live-bytes meter, as `vader plan` runs it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from vader.errors import VaderError
from vader.memory import LiveBytes, fake_mode, materialise
from vader.rewards import REWARDS, WeightedReward, build_reward, reward_names, reward_skeleton
from vader.rewards.actpred import ActPred, ClipTransform
from vader.rewards.aesthetic import AestheticMLP, AestheticReward
from vader.rewards.base import CLIP_MEAN, CLIP_STD, ImageTransform
from vader.rewards.builtin import Brightness, Colorfulness
from vader.rewards.hps import AestheticHPSReward, HPSReward
from vader.rewards.kinetics import KINETICS_400
from vader.rewards.pickscore import PickScoreReward
from vader.rewards.skeleton import PICK_SCORE_PROCESSOR, OfflineClipTokenizer
from vader.rewards.toy import ToyAlignment, ToyFrame, ToyJudgeReward, ToySize
from vader.rewards.videoreward import VideoReward
from vader.rewards.xclip import XCLIPReward

CLASSES = {
    "colorfulness": Colorfulness, "brightness": Brightness, "aesthetic": AestheticReward, "hps": HPSReward,
    "aesthetic_hps": AestheticHPSReward, "pick_score": PickScoreReward, "actpred": ActPred,
    "toy_alignment": ToyAlignment, "toy_size": ToySize, "toy_frame": ToyFrame, "xclip": XCLIPReward,
    "toy_judge": ToyJudgeReward,
    **dict.fromkeys(("videoreward", "videoreward_vq", "videoreward_mq", "videoreward_ta"), VideoReward),
}
MODEL_REWARDS = ["aesthetic", "hps", "aesthetic_hps", "pick_score", "actpred"]
TINY_HPS = "vader-skeleton-tiny-hps"  # open_clip config name registered by the fixture

# Published parameter counts of the default weights' architectures (model cards / open_clip's model
# profile): CLIP ViT-L/14 vision tower + visual projection (openai/clip-vit-large-patch14) 303.97M;
# open_clip ViT-H-14 (HPS v2 / v2.1) 986.11M; PickScore_v1 = laion CLIP-ViT-H-14 in transformers'
# layout, the same 986.11M; VideoMAE-base fine-tuned on Kinetics-400 86.53M (86.5M on its card);
# the toy classifier 158,705 (159k in the README).
CLIP_L14_VISION_WITH_PROJECTION = 303_966_208
VIT_H_14 = 986_109_441
# microsoft/xclip-base-patch32 (transformers' XCLIPConfig defaults; "197M" on its card with 127 position ids);
# VideoReward: Qwen2-VL-2B-Instruct (2,208,985,600) with VideoAlign's 151,660-row vocabulary and its reward head
XCLIP_BASE_PATCH32 = 196_585_729
VIDEOREWARD_2B = 2_208_563_200
VIDEOMAE_BASE_K400 = 86_534_800
AESTHETIC_MLP_768 = (768 * 1024 + 1024) + (1024 * 128 + 128) + (128 * 64 + 64) + (64 * 16 + 16) + (16 + 1)
TOY_CLASSIFIER = 158_705
TOY_JUDGE = 222_040  # vader.toyworld.judge's default architecture
PARAMS = {
    "aesthetic": CLIP_L14_VISION_WITH_PROJECTION + AESTHETIC_MLP_768,
    "hps": VIT_H_14,
    "aesthetic_hps": CLIP_L14_VISION_WITH_PROJECTION + AESTHETIC_MLP_768 + VIT_H_14,
    "pick_score": VIT_H_14,
    "actpred": VIDEOMAE_BASE_K400,
    "toy_alignment": TOY_CLASSIFIER,
    "toy_size": TOY_CLASSIFIER,
    "toy_frame": TOY_CLASSIFIER,
    "toy_judge": TOY_JUDGE,
    "colorfulness": 0,
    "brightness": 0,
    "xclip": XCLIP_BASE_PATCH32,
    **dict.fromkeys(("videoreward", "videoreward_vq", "videoreward_mq", "videoreward_ta"), VIDEOREWARD_2B),
}
# prompts each reward accepts (ActPred needs a Kinetics action, toy_alignment a toy caption)
PROMPTS = {
    "actpred": ["a man playing guitar on a stage", "a kid riding a bike in the park"],
    "toy_alignment": ["a small red circle moving left on a dark background",
                      "a large blue square moving up on a light background"],
}
PROMPTS["toy_frame"] = PROMPTS["toy_judge"] = PROMPTS["toy_alignment"]
DEFAULT_PROMPTS = ["a red fox jumping over a fence", "a city street at night in the rain"]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def layer_pattern(state: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys with layer indices folded, so models of different depth compare by structure."""
    return {re.sub(r"\.\d+\.", ".N.", k) for k in state}


def module_tree(module: torch.nn.Module) -> dict[str, type]:
    """Submodule name (layer indices folded) -> class."""
    return {re.sub(r"\.\d+(\.|$)", r".N\1", name): type(m) for name, m in module.named_modules()}


class RealBytes(LiveBytes):
    """The live-bytes meter restricted to tensors with storage (not meta): what building really allocates."""

    def add(self, tensor: torch.Tensor, label: str | None = None) -> None:
        if tensor.device.type != "meta":
            super().add(tensor, label)


# ---------------------------------------------------------------------------------------------
# the real loaders on tiny models of the same classes, in the published formats


def clip_bpe_tokenizer():  # type: ignore[no-untyped-def]
    """A transformers CLIPTokenizer on the CLIP BPE vocabulary and merges open_clip ships (the vocabulary
    of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K), built without files."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [tuple(m) for m in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> dict[str, str]:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        VideoMAEConfig,
        VideoMAEForVideoClassification,
    )

    root = tmp_path_factory.mktemp("tiny-reward-weights")
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32)
    # OpenAI's CLIP (aesthetic) uses quick_gelu, laion's ViT-H-14 (PickScore) plain gelu
    for folder, act in (("clip", "quick_gelu"), ("pick", "gelu")):
        CLIPModel(CLIPConfig(text_config={**text, "hidden_act": act}, vision_config={**vision, "hidden_act": act},
                             projection_dim=768)).save_pretrained(root / folder)
    torch.save(AestheticMLP(in_dim=768).state_dict(), root / "aesthetic.pth")
    CLIPProcessor(image_processor=CLIPImageProcessor(**PICK_SCORE_PROCESSOR),
                  tokenizer=clip_bpe_tokenizer()).save_pretrained(root / "processor")
    config = {"embed_dim": 8,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (root / f"{TINY_HPS}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_HPS}.json")
    torch.save({"state_dict": open_clip.create_model(TINY_HPS, pretrained=None).state_dict()},
               root / "HPS_v2.1_compressed.pt")
    labels = dict(enumerate(KINETICS_400[:3]))
    VideoMAEForVideoClassification(VideoMAEConfig(
        image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, use_mean_pooling=True, id2label=labels,
        label2id={v: k for k, v in labels.items()})).save_pretrained(root / "videomae")
    return {"aesthetic_clip": str(root / "clip"), "aesthetic_head": str(root / "aesthetic.pth"),
            "hps": str(root / "HPS_v2.1_compressed.pt"), "hps_arch": TINY_HPS, "pick_score": str(root / "pick"),
            "pick_score_processor": str(root / "processor"), "actpred": str(root / "videomae")}


# ---------------------------------------------------------------------------------------------
# building


@pytest.mark.parametrize("name", reward_names())
def test_skeleton_is_the_real_class_on_meta_with_the_published_size(name: str) -> None:
    allocated = RealBytes()
    with allocated:
        reward = reward_skeleton(name, dtype=torch.bfloat16)
    assert type(reward) is CLASSES[name]
    assert all(t.device.type == "meta" for t in tensors(reward))
    assert all(p.dtype == torch.bfloat16 for p in reward.parameters())
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    assert n_params(reward) == PARAMS[name]
    # the record's flags are the class's: differentiable, and the resize used when the run sets none
    spec = REWARDS[name]
    assert getattr(reward, "differentiable", True) is spec.differentiable
    modes = {m.transform.mode for m in reward.modules() if isinstance(getattr(m, "transform", None), ImageTransform)}
    assert modes == ({spec.resize} if spec.resize else set())
    # Nothing of the weights' size is allocated (bf16 HPS alone is 1.97 GB, ActPred 173 MB): the only
    # real tensor is VideoMAE's fixed position table, 1568 x 768 (4.8 MB fp32, made in float64;
    # measured peak 27.6 MiB); every other reward allocates nothing.
    assert allocated.peak < 40 * 2**20, allocated.peak


def test_architectures_agree_with_open_clips_bundled_configs() -> None:
    """The transformers configs written in skeleton.py and open_clip's own ViT-L-14 / ViT-H-14 configs
    are two independent descriptions of the same networks: their sizes must agree."""
    with torch.device("meta"):
        vit_l = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    aesthetic = reward_skeleton("aesthetic", dtype=torch.float32)
    assert n_params(aesthetic.vision_model) + n_params(aesthetic.visual_projection) == n_params(vit_l.visual)
    assert n_params(vit_l.visual) == CLIP_L14_VISION_WITH_PROJECTION
    assert n_params(reward_skeleton("pick_score", dtype=torch.float32)) == n_params(
        reward_skeleton("hps", dtype=torch.float32)) == VIT_H_14


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pick_score", "actpred"])
def test_module_tree_matches_the_real_loader(name: str, tiny_sources) -> None:
    """The real loader on tiny weights of the same classes has the same state-dict keys (layer indices
    folded: depth differs), the same preprocessing and the same attention implementation."""
    real = build_reward(name, sources=tiny_sources)
    skeleton = reward_skeleton(name, dtype=torch.float32)
    assert type(skeleton) is type(real)
    assert layer_pattern(skeleton.state_dict()) == layer_pattern(real.state_dict())
    assert module_tree(skeleton) == module_tree(real)
    hf_model = {"aesthetic": "vision_model", "pick_score": "model", "actpred": "model"}.get(name)
    if hf_model:
        attention = getattr(real, hf_model).config._attn_implementation
        assert getattr(skeleton, hf_model).config._attn_implementation == attention == "sdpa"
    if name != "actpred":
        assert skeleton.transform == real.transform


def test_published_preprocessing_and_labels() -> None:
    squash = ImageTransform(size=224, mode="squash", interpolation="bilinear", mean=CLIP_MEAN, std=CLIP_STD)
    assert reward_skeleton("aesthetic", dtype=torch.float32).transform == squash
    assert reward_skeleton("hps", dtype=torch.float32).transform == squash
    # PickScore: its processor's settings (shortest side 224 bicubic, centre crop 224, CLIP mean/std)
    assert reward_skeleton("pick_score", dtype=torch.float32).transform == ImageTransform(
        size=224, mode="crop", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    assert reward_skeleton("hps", dtype=torch.float32, resize="crop").transform.mode == "crop"
    actpred = reward_skeleton("actpred", dtype=torch.float32)
    assert actpred.label_names == list(KINETICS_400) and len(actpred.label_names) == 400
    assert actpred.num_frames == 16 and actpred.frames == "decoded"
    assert actpred.transform == ClipTransform(shortest_edge=224, crop=(224, 224), mean=(0.485, 0.456, 0.406),
                                              std=(0.229, 0.224, 0.225), interpolation="bilinear")


def test_toy_skeleton_has_exactly_the_shipped_classifiers_weights() -> None:
    real = build_reward("toy_alignment")
    skeleton = reward_skeleton("toy_alignment", dtype=torch.float32)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert skeleton.model.config == real.model.config


def test_mix_options_and_errors() -> None:
    mix = reward_skeleton({"hps": 1.0, "aesthetic": 0.5}, dtype=torch.bfloat16)
    assert isinstance(mix, WeightedReward) and mix.weights == {"hps": 1.0, "aesthetic": 0.5}
    assert isinstance(mix.parts["hps"], HPSReward) and isinstance(mix.parts["aesthetic"], AestheticReward)
    assert isinstance(reward_skeleton({"colorfulness": 2.0}, dtype=torch.float32), WeightedReward)
    assert n_params(reward_skeleton("hps", dtype=torch.float32, hps_version="v2.0")) == VIT_H_14
    assert reward_skeleton("actpred", dtype=torch.float32, actpred_frames="resample").frames == "resample"
    with pytest.raises(VaderError, match=r"hps_version='v3'.*v2\.0, v2\.1"):
        reward_skeleton("hps", dtype=torch.float32, hps_version="v3")
    with pytest.raises(VaderError, match=r"resize='stretch'.*squash, crop"):
        reward_skeleton("hps", dtype=torch.float32, resize="stretch")
    with pytest.raises(VaderError, match=r"unknown reward 'clipscore'; available: colorfulness"):
        reward_skeleton("clipscore", dtype=torch.float32)
    with pytest.raises(VaderError, match=r"actpred frames='all'.*decoded, resample"):
        reward_skeleton("actpred", dtype=torch.float32, actpred_frames="all")


_OPENED: list[str] = []
_AUDITING: list[bool] = []
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _AUDITING and event == "open" and isinstance(args[0], str):
        _OPENED.append(args[0])


def test_builds_read_no_file_but_package_data(monkeypatch) -> None:
    """No hub call and no file outside the packages: open_clip's BPE vocabulary and the toy classifier's and
    judge's config.json are the only files read (imports warmed up first: their .py files do not count)."""
    import huggingface_hub
    import transformers

    def no_hub(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError(f"hub access: {args} {kwargs}")

    for module, name in [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (transformers.utils.hub, "cached_file"), (transformers.utils.hub, "cached_files")]:
        monkeypatch.setattr(module, name, no_hub)
    for name in reward_names():
        reward_skeleton(name, dtype=torch.bfloat16)
    if not _HOOKED:
        sys.addaudithook(_audit)  # hooks cannot be removed; it records only while _AUDITING is set
        _HOOKED.append(True)
    _OPENED.clear()
    _AUDITING.append(True)
    try:
        for name in reward_names():
            reward_skeleton(name, dtype=torch.bfloat16, hps_version="v2.0", actpred_frames="resample")
    finally:
        _AUDITING.clear()
    open_clip_dir = Path(open_clip.__file__).parent
    from vader.rewards.toy import DEFAULT_FOLDER
    from vader.toyworld.judge import FOLDER as JUDGE_FOLDER

    allowed = {str(Path(DEFAULT_FOLDER) / "config.json"), str(Path(JUDGE_FOLDER) / "config.json")}
    assert _OPENED, "the audit hook saw nothing"
    assert {p for p in _OPENED if p not in allowed and not Path(p).is_relative_to(open_clip_dir)} == set()


def test_offline_tokenizer_gives_the_clip_tokenizers_ids() -> None:
    prompts = ["a red fox jumping over a fence", "A city street at night, in the rain!", "two cats", "word " * 100]
    real = clip_bpe_tokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ours = OfflineClipTokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert ours["input_ids"].shape == (4, 77) and ours["input_ids"].dtype == torch.long
    assert torch.equal(ours["input_ids"], real["input_ids"])
    assert torch.equal(ours["attention_mask"], real["attention_mask"])
    short = OfflineClipTokenizer()(prompts[:3])
    assert short["input_ids"].shape == (3, 12) and torch.equal(short["attention_mask"], real["attention_mask"][:3, :12])


# ---------------------------------------------------------------------------------------------
# a full-size step on fake tensors, as vader plan runs it


def fake_step(name: str, dtype: torch.dtype, autocast: bool, frames: int = 2, **options) -> tuple[LiveBytes, int]:
    """materialise, prepare, forward (bf16 autocast: the default mixed_precision) and backward under
    the meter; returns the meter and the weights' bytes."""
    reward = reward_skeleton(name, dtype=dtype, **options)
    prompts = PROMPTS.get(name, DEFAULT_PROMPTS)
    with fake_mode(), LiveBytes() as meter:
        materialise(reward, dtype)
        weights = sum(t.numel() * t.element_size() for t in tensors(reward))
        with torch.no_grad():
            reward.prepare(prompts)
        differentiable = REWARDS[name].differentiable  # toy_judge: a gold reward, scored without gradient
        video = torch.randn(len(prompts), 3, frames, 240, 426, requires_grad=differentiable)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = reward(video, prompts)
        assert out.loss.shape == out.reward.shape == (len(prompts),)
        if differentiable:
            out.loss.mean().backward()
            assert video.grad is not None and video.grad.shape == video.shape
    return meter, weights


# VideoReward's single dimensions are its one model read at one token: the mix `videoreward` stands for them
SAME_MODEL = ("videoreward_vq", "videoreward_mq", "videoreward_ta")


@pytest.mark.parametrize("name", [n for n in reward_names() if n not in SAME_MODEL])
def test_full_size_forward_and_backward_on_fake_tensors(name: str) -> None:
    meter, weights = fake_step(name, torch.bfloat16, autocast=True)
    assert weights >= 2 * PARAMS[name]  # bf16 weights of the published size (+ buffers)
    assert meter.peak > weights


@pytest.mark.parametrize("name", [n for n in reward_names() if n != "aesthetic_hps" and n not in SAME_MODEL])
def test_fp32_weights_without_autocast(name: str) -> None:
    """The original's weights precision (fp32) with autocast off also runs end to end."""
    meter, weights = fake_step(name, torch.float32, autocast=False)
    assert weights >= 4 * PARAMS[name] and meter.peak > weights
    assert all(p.dtype == torch.float32 for p in reward_skeleton(name, dtype="fp32").parameters())


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pick_score", "actpred"])
def test_grad_checkpoint_lowers_the_measured_peak(name: str) -> None:
    plain, _ = fake_step(name, torch.bfloat16, autocast=True, frames=4)
    checkpointed, _ = fake_step(name, torch.bfloat16, autocast=True, frames=4, grad_checkpoint=True)
    assert checkpointed.peak < plain.peak


def test_actpred_position_table_for_the_planned_clip_is_real_and_reused() -> None:
    reward = reward_skeleton("actpred", dtype=torch.bfloat16, num_frames=3)  # 'fml': 3 frames, shown as 4
    (table,) = reward._positions.values()
    assert table.device.type == "cpu" and table.shape == (1, 2 * 196, 768)
    with fake_mode(), LiveBytes():
        materialise(reward, torch.bfloat16)
        reward.prepare(PROMPTS["actpred"])
        video = torch.randn(2, 3, 3, 240, 426, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reward(video, PROMPTS["actpred"]).loss.mean().backward()
    assert len(reward._positions) == 1 and next(iter(reward._positions.values())) is table
    resample = reward_skeleton("actpred", dtype=torch.bfloat16, actpred_frames="resample")
    assert resample._embeddings.position_embeddings.device.type == "cpu"
    assert resample._embeddings.position_embeddings.shape == (1, 8 * 196, 768)


def test_videomae_position_table_is_the_one_transformers_builds() -> None:
    """The skeleton builds VideoMAE with vader's torch sinusoid table in place of transformers' numpy
    loop (1.8 s for 1568 x 768): the two must be the same tensor."""
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    from vader.rewards.skeleton import _cpu_positions

    ours, theirs = _cpu_positions(392, 768), get_sinusoid_encoding_table(392, 768)
    assert ours.dtype == theirs.dtype and ours.device == theirs.device and torch.equal(ours, theirs)
