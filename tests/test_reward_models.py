"""Model-based rewards (aesthetic, hps, aesthetic_hps, pick_score) with tiny random models of the real
classes, written to disk in the published formats and loaded back through the real loaders; the
differentiable preprocessing against the official processors; the offline weights check. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import bytes_to_unicode
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from vader.errors import VaderError
from vader.rewards import build_reward, check_reward_weights, required_weights
from vader.rewards.aesthetic import AestheticMLP, AestheticReward
from vader.rewards.base import ImageTransform
from vader.rewards.hps import AestheticHPSReward, HPSReward
from vader.rewards.pickscore import PickScoreReward

TINY_HPS = "vader-tiny-hps"  # open_clip config name registered below
MODEL_REWARDS = ["aesthetic", "hps", "aesthetic_hps", "pick_score"]
PROMPTS = ["a red fox jumping over a fence", "a city street at night in the rain", "two cats asleep on a sofa"]

# Published preprocessing settings (preprocessor_config.json of openai/clip-vit-large-patch14 and of
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K are the same: shortest edge 224, bicubic, centre crop 224).
OFFICIAL_CLIP_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
# Our tensor path vs the official processors on the same uint8 image, in normalised units: the
# processors round to uint8 after resizing (1 level = 1/255/std ≈ 0.015); measured max 0.0164,
# mean 0.0046 with antialias=True and the two-pass (width, then height) resize.
PARITY_MAX, PARITY_MEAN = 0.02, 0.006
SHAPES = [(240, 426), (426, 240), (144, 256)]


# ---------------------------------------------------------------------------------------------
# tiny models in the published formats


def tiny_clip_config() -> CLIPConfig:
    text = dict(vocab_size=520, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (ids 0..513), built in memory."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reward-weights")
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config())
    with torch.no_grad():
        clip.logit_scale.fill_(np.log(100.0))  # PickScore's learned scale sits at CLIP's cap
    clip.save_pretrained(root / "clip")  # a CLIPModel folder, as openai/clip-vit-large-patch14 and PickScore_v1
    torch.save(AestheticMLP(in_dim=8).state_dict(), root / "aesthetic.pth")  # state dict, as the LAION .pth
    CLIPProcessor(image_processor=CLIPImageProcessor(**OFFICIAL_CLIP_PROCESSOR),
                  tokenizer=tiny_tokenizer()).save_pretrained(root / "processor")
    config = {"embed_dim": 8,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (root / f"{TINY_HPS}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_HPS}.json")
    hps = open_clip.create_model(TINY_HPS, pretrained=None)
    torch.save({"state_dict": hps.state_dict()}, root / "HPS_v2.1_compressed.pt")  # as xswu/HPSv2 ships it
    return {"aesthetic_clip": str(root / "clip"), "aesthetic_head": str(root / "aesthetic.pth"),
            "hps": str(root / "HPS_v2.1_compressed.pt"), "hps_arch": TINY_HPS,
            "pick_score": str(root / "clip"), "pick_score_processor": str(root / "processor")}


@pytest.fixture(scope="module")
def built(sources) -> dict:
    return {name: build_reward(name, sources=sources) for name in MODEL_REWARDS}


def video(batch: int = 1, frames: int = 1, h: int = 40, w: int = 72, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, h, w, generator=g) * 2 - 1


def uint8_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint8 test image: smooth colour fields plus moderate noise (content at every scale)."""
    g = np.random.default_rng(seed)
    base = Image.fromarray((g.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(base, dtype=np.float64) + g.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def as_unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    assert diff.max() <= PARITY_MAX and diff.mean() <= PARITY_MEAN, (diff.max().item(), diff.mean().item())


# ---------------------------------------------------------------------------------------------
# loading: published formats, frozen, only what is needed


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_built_rewards_are_frozen_eval_and_typed(built, name: str) -> None:
    reward = built[name]
    params = list(reward.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for m in reward.modules())
    assert {p.dtype for p in params} == {torch.float32}
    expected = {"aesthetic": AestheticReward, "hps": HPSReward, "aesthetic_hps": AestheticHPSReward,
                "pick_score": PickScoreReward}[name]
    assert type(reward) is expected


def test_aesthetic_mlp_has_the_published_layout() -> None:
    keys = set(AestheticMLP().state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    shapes = [m.weight.shape for m in AestheticMLP().layers if isinstance(m, torch.nn.Linear)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    dropouts = [m.p for m in AestheticMLP().layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]


def test_aesthetic_loads_only_the_vision_tower(built) -> None:
    names = [n for n, _ in built["aesthetic"].named_parameters()]
    assert any(n.startswith("vision_model.") for n in names) and "visual_projection.weight" in names
    assert not any("text" in n for n in names)


def test_aesthetic_matches_clip_and_mlp_computed_by_hand(built, sources) -> None:
    reward = built["aesthetic"]
    clip = CLIPModel.from_pretrained(sources["aesthetic_clip"]).eval()
    head = AestheticMLP(8)
    head.load_state_dict(torch.load(sources["aesthetic_head"], weights_only=True))
    head.eval()
    x = video(batch=2, seed=1)
    images = x[:, :, 0]
    with torch.no_grad():
        pixels = reward.transform((images / 2 + 0.5).clamp(0, 1))
        embeds = clip.get_image_features(pixel_values=pixels).pooler_output  # transformers 5 API
        expected = head(F.normalize(embeds, dim=-1)).squeeze(-1)
        out = reward(x, PROMPTS[:2])
    torch.testing.assert_close(out.reward, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, (expected - 10).abs() * 0.1, rtol=1e-5, atol=1e-5)


def test_hps_matches_open_clip_computed_by_hand(built, sources) -> None:
    reward = built["hps"]
    model = open_clip.create_model(TINY_HPS, pretrained=None)
    model.load_state_dict(torch.load(sources["hps"], weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_HPS)
    x = video(batch=3, seed=2)
    with torch.no_grad():
        pixels = reward.transform((x[:, :, 0] / 2 + 0.5).clamp(0, 1))
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokenizer(PROMPTS), normalize=True)
        expected = torch.diagonal(image @ text.T)  # the original: diag of image x text logits
        out = reward(x, PROMPTS)
    torch.testing.assert_close(out.reward, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, 1 - expected, rtol=1e-5, atol=1e-5)


def test_pick_score_matches_clip_computed_by_hand(built, sources) -> None:
    reward = built["pick_score"]
    model = CLIPModel.from_pretrained(sources["pick_score"]).eval()
    processor = CLIPProcessor.from_pretrained(sources["pick_score_processor"])
    x = video(batch=3, seed=3)
    with torch.no_grad():
        pixels = reward.transform((x[:, :, 0] / 2 + 0.5).clamp(0, 1))
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        tokens = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        expected = model.logit_scale.exp() * torch.diagonal(image @ text.T)
        out = reward(x, PROMPTS)
    torch.testing.assert_close(out.reward, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, (1 - expected / 100).abs(), rtol=1e-5, atol=1e-5)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


@pytest.mark.parametrize("name", ["hps", "pick_score", "aesthetic_hps"])
def test_each_sample_is_scored_against_its_own_prompt(built, name: str) -> None:
    """Batch of 2 clips of 3 frames with 2 different prompts: each row equals that clip scored alone
    with its own prompt, and clearly differs from it scored with the other prompt (the original
    scored every PickScore sample against the first prompt)."""
    reward = built[name]
    x = video(batch=2, frames=3, seed=4)
    prompts = ["a red fox", "a blue whale under water"]
    with torch.no_grad():
        both = reward(x, prompts).reward
        own = torch.cat([reward(x[i: i + 1], [prompts[i]]).reward for i in range(2)])
        swapped = torch.cat([reward(x[i: i + 1], [prompts[1 - i]]).reward for i in range(2)])
    torch.testing.assert_close(both, own, rtol=1e-5, atol=1e-6)
    # the prompt matters in these tiny models far beyond the tolerance above
    assert ((own - swapped).abs() > 1e-3 * own.abs().clamp(min=1)).all(), (own, swapped)


def test_aesthetic_hps_is_the_original_combination(built, sources) -> None:
    x = video(batch=2, frames=2, seed=5)
    with torch.no_grad():
        combined = built["aesthetic_hps"](x, PROMPTS[:2])
        a = built["aesthetic"](x, PROMPTS[:2])
        h = built["hps"](x, PROMPTS[:2])
    torch.testing.assert_close(combined.loss, (1.5 * a.loss + h.loss) / 2)
    torch.testing.assert_close(combined.reward, (a.reward + 15 * h.reward) / 2)


def test_mix_of_model_rewards_is_the_weighted_sum(built, sources) -> None:
    mix = build_reward({"aesthetic": 1.0, "pick_score": 0.5, "brightness": 2.0}, sources=sources)
    x = video(batch=2, seed=6)
    mix.prepare(PROMPTS[:2])
    with torch.no_grad():
        out = mix(x, PROMPTS[:2])
        parts = [built["aesthetic"](x, PROMPTS[:2]), built["pick_score"](x, PROMPTS[:2]),
                 build_reward("brightness")(x, PROMPTS[:2])]
    torch.testing.assert_close(out.reward, parts[0].reward + 0.5 * parts[1].reward + 2 * parts[2].reward)
    torch.testing.assert_close(out.loss, parts[0].loss + 0.5 * parts[1].loss + 2 * parts[2].loss)
    assert len(mix.parts["pick_score"].text) == 2  # prepare reached the parts


def test_hps_checkpoint_versions_and_wrapped_keys(sources, tmp_path) -> None:
    state = torch.load(sources["hps"], weights_only=True)["state_dict"]
    path = tmp_path / "HPS_v2_compressed.pt"
    extra = {"score_predictor.weight": torch.zeros(1)}  # entries open_clip does not use: warned, not fatal
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in {**state, **extra}.items()}, "epoch": 3}, path)
    with pytest.warns(UserWarning, match="1 entries not used"):
        reward = HPSReward.from_pretrained(str(path), hps_version="v2.0", arch=TINY_HPS)
    for key, value in state.items():  # fp16 on disk ('compressed'), float32 in the model
        torch.testing.assert_close(reward.model.state_dict()[key], value.half().float())


def test_hps_checkpoint_that_does_not_fit_is_a_clear_error(sources, tmp_path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, path)
    with pytest.raises(VaderError, match="does not fit open_clip"):
        HPSReward.from_pretrained(str(path), arch=TINY_HPS)
    state = torch.load(sources["hps"], weights_only=True)["state_dict"]
    del state["visual.proj"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(VaderError, match="1 weights missing .visual.proj"):
        HPSReward.from_pretrained(str(path), arch=TINY_HPS)


def test_hps_arch_may_be_an_open_clip_config_file(sources) -> None:
    config = Path(sources["hps"]).parent / f"{TINY_HPS}.json"
    reward = build_reward("hps", sources={**sources, "hps_arch": str(config)})
    assert isinstance(reward, HPSReward) and reward.model.visual.transformer.width == 16


def test_bf16_reward_is_built_in_bf16_and_scores_in_fp32(sources) -> None:
    reward = build_reward("pick_score", sources=sources, dtype="bf16")
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}
    x = video(seed=7).requires_grad_(True)
    out = reward(x, PROMPTS[:1])
    assert out.reward.dtype == torch.float32 and torch.isfinite(out.reward).all()
    out.loss.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the interface: gradients, batches, frames, text cache


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gradient_reaches_every_frame(built, name: str) -> None:
    x = (video(batch=2, frames=2, seed=8) * 0.9).requires_grad_(True)
    out = built[name](x, PROMPTS[:2])
    assert out.reward.shape == out.loss.shape == (2,)
    out.loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=(1, 3, 4)) > 0).all()
    assert all(p.grad is None for p in built[name].parameters())


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_batch_gives_the_per_sample_scores(built, name: str) -> None:
    x = video(batch=3, frames=2, seed=9)
    with torch.no_grad():
        batched = built[name](x, PROMPTS)
        single = [built[name](x[i: i + 1], [PROMPTS[i]]) for i in range(3)]
    torch.testing.assert_close(batched.reward, torch.cat([s.reward for s in single]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.loss, torch.cat([s.loss for s in single]), rtol=1e-5, atol=1e-5)
    assert len(set(batched.reward.tolist())) == 3


@pytest.mark.parametrize("name", MODEL_REWARDS)
@pytest.mark.parametrize("frames", [1, 3, 17])  # decode_frame '-1' / an index, 'fml', 'all' of one chunk
def test_decode_frame_shapes(built, name: str, frames: int) -> None:
    x = video(frames=frames, h=24, w=40, seed=frames).requires_grad_(True)
    out = built[name](x, PROMPTS[:1])
    assert out.reward.shape == out.loss.shape == (1,)
    assert torch.isfinite(out.reward).all() and torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["hps", "pick_score"])
def test_frames_are_averaged(built, name: str) -> None:
    x = video(frames=3, seed=10)
    with torch.no_grad():
        whole = built[name](x, PROMPTS[:1])
        per_frame = torch.stack([built[name](x[:, :, k: k + 1], PROMPTS[:1]).reward for k in range(3)])
    torch.testing.assert_close(whole.reward, per_frame.mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hps", "pick_score"])
def test_prepare_encodes_each_prompt_once(sources, name: str) -> None:
    reward = build_reward(name, sources=sources)
    calls: list[int] = []
    tokenize = reward.tokenizer
    reward.tokenizer = lambda texts, *a, **k: (calls.append(len(texts)), tokenize(texts, *a, **k))[1]
    reward.prepare(PROMPTS + PROMPTS[:1])
    assert sum(calls) == 3
    with torch.no_grad():
        reward(video(batch=3), PROMPTS)
    assert sum(calls) == 3  # cached: no text encoding in the forward pass
    with torch.no_grad():
        reward(video(batch=1), ["a prompt nobody prepared"])
    assert sum(calls) == 4 and len(reward.text) == 4  # lazily encoded, then cached


def test_prompt_count_must_match_the_batch(built) -> None:
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        built["hps"](video(), PROMPTS[:2])


# ---------------------------------------------------------------------------------------------
# preprocessing parity with the official processors (same uint8 image)


@pytest.mark.parametrize("shape", SHAPES)
def test_crop_matches_the_clip_image_processor(built, shape) -> None:
    """aesthetic (resize='crop') and pick_score: transformers CLIPImageProcessor, published settings."""
    img = uint8_image(*shape)
    ref = CLIPImageProcessor(**OFFICIAL_CLIP_PROCESSOR)(images=Image.fromarray(img), return_tensors="pt").pixel_values
    aesthetic = AestheticReward(_clip_vision(built), built["aesthetic"].head, resize="crop")
    assert_parity(aesthetic.transform(as_unit(img)), ref)
    assert_parity(built["pick_score"].transform(as_unit(img)), ref)  # settings read from the saved processor


def _clip_vision(built):
    """The aesthetic reward's vision parts re-wrapped (no reload) for a second preprocessing mode."""
    reward = built["aesthetic"]
    holder = torch.nn.Module()
    holder.vision_model, holder.visual_projection = reward.vision_model, reward.visual_projection
    return holder


@pytest.mark.parametrize("shape", SHAPES)
def test_squash_matches_the_processor_in_squash_mode_and_the_original(built, shape) -> None:
    """aesthetic and hps default ('squash', the original VADER: Resize((224, 224)), bilinear)."""
    import torchvision

    img = uint8_image(*shape, seed=1)
    squash = dict(OFFICIAL_CLIP_PROCESSOR, size={"height": 224, "width": 224}, do_center_crop=False, resample=2)
    ref = CLIPImageProcessor(**squash)(images=Image.fromarray(img), return_tensors="pt").pixel_values
    open_clip_ref = open_clip.image_transform(224, is_train=False, resize_mode="squash",
                                              interpolation="bilinear")(Image.fromarray(img))[None]
    normalize = torchvision.transforms.Normalize(OFFICIAL_CLIP_PROCESSOR["image_mean"], OFFICIAL_CLIP_PROCESSOR["image_std"])
    original = normalize(torchvision.transforms.Resize((224, 224))(as_unit(img)))  # on float tensors, as VADER
    for reward in (built["aesthetic"], built["hps"]):
        ours = reward.transform(as_unit(img))
        assert_parity(ours, ref)
        assert_parity(ours, open_clip_ref)
        torch.testing.assert_close(ours, original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_hps_crop_matches_open_clip_image_transform(built, shape) -> None:
    img = uint8_image(*shape, seed=2)
    ref = open_clip.image_transform(224, is_train=False)(Image.fromarray(img))[None]  # ViT-H-14 eval transform
    hps = HPSReward(built["hps"].model, built["hps"].tokenizer, resize="crop")
    assert_parity(hps.transform(as_unit(img)), ref)


def test_transform_rejects_unknown_modes() -> None:
    with pytest.raises(VaderError, match="squash, crop"):
        ImageTransform(mode="pad")


# ---------------------------------------------------------------------------------------------
# weights: required list, offline check, sources


def test_required_weights_name_the_published_files() -> None:
    assert required_weights("aesthetic") == [("openai/clip-vit-large-patch14", None),
                                             ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")]
    assert required_weights("hps") == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    assert required_weights("hps", hps_version="v2.0") == [("xswu/HPSv2", "HPS_v2_compressed.pt")]
    assert required_weights("pick_score") == [("yuvalkirstain/PickScore_v1", None),
                                              ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None)]
    assert len(required_weights({"aesthetic": 1.0, "aesthetic_hps": 1.0})) == 3  # shared models listed once
    assert required_weights("colorfulness") == []
    assert required_weights("hps", sources={"hps": "/some/where/hps.pt"}) == [("/some/where/hps.pt", None)]
    assert required_weights("hps", sources={"hps": "me/my-hps/v3/model.pt"}) == [("me/my-hps", "v3/model.pt")]


def test_offline_check_lists_every_missing_model_once(tmp_path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(VaderError) as info:
        check_reward_weights({"aesthetic_hps": 1.0, "pick_score": 1.0}, "v2.1", None, cache_dir=tmp_path)
    lines = str(info.value).splitlines()
    assert "HF_HUB_OFFLINE" in lines[0]
    missing = lines[1:]
    assert len(missing) == 5
    expected = [("openai/clip-vit-large-patch14", "hf download openai/clip-vit-large-patch14"),
                ("aesthetic-model.pth", "hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth"),
                ("HPS_v2.1_compressed.pt", "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
                ("yuvalkirstain/PickScore_v1", "hf download yuvalkirstain/PickScore_v1"),
                ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K")]
    for line, (name, command) in zip(missing, expected):
        assert name in line and command in line and "sources[" in line


def test_offline_check_passes_for_cached_files_and_local_paths(tmp_path, sources) -> None:
    def cache(repo: str, *files: str) -> None:
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text("0" * 40)
        for name in files:
            path = folder / "snapshots" / ("0" * 40) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")

    with pytest.raises(VaderError):
        check_reward_weights("aesthetic", cache_dir=tmp_path)
    cache("openai/clip-vit-large-patch14", "config.json", "model.safetensors")
    cache("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
    check_reward_weights("aesthetic", cache_dir=tmp_path)
    with pytest.raises(VaderError) as info:  # v2.1 is cached, v2.0 is not
        cache("xswu/HPSv2", "HPS_v2.1_compressed.pt")
        check_reward_weights("hps", "v2.1", cache_dir=tmp_path)
        check_reward_weights("hps", "v2.0", cache_dir=tmp_path)
    assert "HPS_v2_compressed.pt" in str(info.value) and len(str(info.value).splitlines()) == 2
    check_reward_weights("pick_score", sources=sources, cache_dir=tmp_path)  # local folders
    check_reward_weights("aesthetic_hps", sources=sources, cache_dir=tmp_path)


def test_missing_local_path_is_reported_online_too(monkeypatch, tmp_path) -> None:
    from vader.rewards import hub

    monkeypatch.setattr(hub, "offline", lambda: False)
    check_reward_weights("hps", cache_dir=tmp_path)  # online: the hub file downloads when built
    with pytest.raises(VaderError) as info:
        check_reward_weights("hps", sources={"hps": str(tmp_path / "nope.pt")}, cache_dir=tmp_path)
    assert "nope.pt does not exist" in str(info.value) and "sources['hps']" in str(info.value)


def test_building_offline_without_weights_fails_fast(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for build in (lambda: build_reward("hps"), lambda: build_reward("aesthetic")):
        with pytest.raises(VaderError, match="hf download"):
            build()


def test_sources_and_options_are_validated(sources) -> None:
    with pytest.raises(VaderError, match="valid keys: aesthetic_clip"):
        build_reward("hps", sources={"hsp": "x"})
    with pytest.raises(VaderError, match="resize"):
        build_reward("hps", sources=sources, resize="stretch")
    with pytest.raises(VaderError, match="unknown reward 'nope'"):
        build_reward("nope")
    with pytest.raises(VaderError, match="hps_version"):
        required_weights("hps", hps_version="v3")


def test_local_sources_may_be_pathlike(sources) -> None:
    reward = build_reward("aesthetic", sources={**sources, "aesthetic_head": Path(sources["aesthetic_head"])})
    assert isinstance(reward, AestheticReward)


def _checkpointed_blocks(reward) -> list[torch.nn.Module]:
    """The first submodule inside every layer that grad_checkpoint wraps (each vision block's first norm).

    Pre-hooks sit on a child, not on the layer itself: the recomputation in backward calls the layer's
    original forward, which runs its children through __call__ (and their hooks) again; the first
    child, because torch stops a recomputation early once the tensors backward needs are rebuilt."""
    model = getattr(reward, "model", reward)
    if hasattr(model, "visual"):  # open_clip (HPS)
        return [block.ln_1 for block in model.visual.transformer.resblocks]
    return [layer.layer_norm1 for layer in model.vision_model.encoder.layers]


@pytest.mark.parametrize("name", ["aesthetic", "hps", "pick_score"])
def test_reward_grad_checkpoint_recomputes_layers_in_backward(sources, name: str) -> None:
    """With grad_checkpoint each vision layer runs twice per forward + backward (the forward, then the
    recomputation in backward); without it once. The gradients are the same either way."""
    results = {}
    for ckpt in (False, True):
        reward = build_reward(name, sources=sources, grad_checkpoint=ckpt)
        blocks = _checkpointed_blocks(reward)
        assert len(blocks) == 2
        calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1))
        x = video(batch=2, seed=11).requires_grad_(True)
        out = reward(x, PROMPTS[:2])
        forward_calls = list(calls)
        out.loss.sum().backward()
        results[ckpt] = (forward_calls, list(calls), out.reward.detach(), x.grad)
        with torch.no_grad():  # nothing to recompute without autograd
            calls[:] = [0] * len(blocks)
            reward(x, PROMPTS[:2])
            assert calls == [1] * len(blocks)
    assert results[False][:2] == ([1, 1], [1, 1])
    assert results[True][:2] == ([1, 1], [2, 2]), "grad_checkpoint did not recompute the layers in backward"
    torch.testing.assert_close(results[False][2], results[True][2])
    torch.testing.assert_close(results[False][3], results[True][3], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# pinned weight files


def test_pins_are_the_published_lfs_oids() -> None:
    from vader.rewards import base
    from vader.rewards.aesthetic import AESTHETIC_HEAD
    from vader.rewards.hps import HPS_FILES, HPS_REPO

    assert set(base.PINNED_FILES) == {AESTHETIC_HEAD, *((HPS_REPO, f) for f in HPS_FILES.values())}
    assert base.PINNED_FILES[AESTHETIC_HEAD] == (
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", 3714759)


def _pin(monkeypatch, path: Path, sha256: str | None = None, size: int | None = None) -> None:
    import hashlib

    from vader.rewards import base
    from vader.rewards.aesthetic import AESTHETIC_HEAD

    sha256 = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(base.PINNED_FILES, AESTHETIC_HEAD, (sha256, size or path.stat().st_size))


def test_aesthetic_head_with_the_pinned_sha256_loads(sources, monkeypatch, tmp_path) -> None:
    import shutil

    from vader.rewards import aesthetic

    head = tmp_path / "aesthetic-model.pth"  # the hub file, as the cache would hold it
    shutil.copy(sources["aesthetic_head"], head)
    monkeypatch.setattr(aesthetic, "resolve_file", lambda src: str(head))
    _pin(monkeypatch, head)
    reward = AestheticReward.from_pretrained(sources["aesthetic_clip"])  # head: the default hub source
    assert isinstance(reward.head, AestheticMLP)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_aesthetic_head_that_differs_from_the_pin_is_refused(sources, monkeypatch, tmp_path, damage: str) -> None:
    import shutil

    from vader.rewards import aesthetic, base

    head = tmp_path / "aesthetic-model.pth"
    shutil.copy(sources["aesthetic_head"], head)
    _pin(monkeypatch, head)
    pinned = base.PINNED_FILES[aesthetic.AESTHETIC_HEAD]
    data = bytearray(head.read_bytes())
    if damage == "flip":  # same size, one byte changed
        data[-20] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    head.write_bytes(bytes(data))
    monkeypatch.setattr(aesthetic, "resolve_file", lambda src: str(head))
    with pytest.raises(VaderError) as info:
        AestheticReward.from_pretrained(sources["aesthetic_clip"])
    message = str(info.value)
    assert "\n" not in message and "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth" in message
    assert f"expected sha256 {pinned[0]}, got " in message
    if damage == "flip":
        import hashlib

        assert f"got {hashlib.sha256(bytes(data)).hexdigest()}" in message
    else:
        assert f"got a file of {len(data)} bytes, not {pinned[1]}" in message


def test_big_pinned_files_use_the_hub_cache_content_address(monkeypatch, tmp_path) -> None:
    from vader.rewards import base
    from vader.rewards.hub import WeightSource

    src = WeightSource("hps", "HPS v2.1 checkpoint", repo="xswu/HPSv2", filename="HPS_v2.1_compressed.pt")
    blob = tmp_path / ("ab" * 32)  # a cache blob is named by its sha256
    blob.write_bytes(b"x" * 10)
    monkeypatch.setitem(base.PINNED_FILES, ("xswu/HPSv2", "HPS_v2.1_compressed.pt"), ("ab" * 32, 10))
    monkeypatch.setattr(base, "FULL_HASH_LIMIT", 5)
    link = tmp_path / "HPS_v2.1_compressed.pt"  # the snapshot symlink huggingface_hub returns
    link.symlink_to(blob)
    base.check_pinned(src, link)  # not hashed: the blob's name is the published oid
    monkeypatch.setitem(base.PINNED_FILES, ("xswu/HPSv2", "HPS_v2.1_compressed.pt"), ("cd" * 32, 10))
    with pytest.raises(VaderError, match=f"expected sha256 {'cd' * 32}, got {'ab' * 32}"):
        base.check_pinned(src, link)
    # a local file the user chose is theirs: not pinned
    base.check_pinned(WeightSource("hps", "HPS", local=str(blob)), blob)
