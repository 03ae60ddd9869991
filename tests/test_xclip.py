"""The X-CLIP reward (vader.rewards.xclip) with a tiny random XCLIPModel saved by save_pretrained:
preprocessing and score parity with transformers' XCLIPProcessor / XCLIPModel, gradients, the
published key layout, the offline preflight, `vader score` and the `vader eval` builder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer, VideoMAEImageProcessor, XCLIPConfig, XCLIPModel, XCLIPProcessor

from vader import evaluate, rewards  # noqa: F401  (evaluate binds build_reward before a test patches it)
from vader.errors import VaderError
from vader.rewards.xclip import XCLIP_CONFIG, XCLIP_PROCESSOR, XCLIPReward, build_xclip, xclip_skeleton

PROMPTS = ["a dog running on the beach", "a red car"]


def tiny_config() -> XCLIPConfig:
    """Published geometry where the processor sees it (224 px, patch 32, 8 frames); tiny widths."""
    text = dict(vocab_size=520, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32, num_frames=8, mit_hidden_size=8, mit_intermediate_size=16,
                  mit_num_hidden_layers=1, mit_num_attention_heads=2)
    return XCLIPConfig(text_config=text, vision_config=vision, projection_dim=8, prompt_num_attention_heads=2)


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (ids 0..513), built in memory."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("xclip") / "tiny-xclip"
    torch.manual_seed(0)
    model = XCLIPModel(tiny_config())
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    model.save_pretrained(root)
    XCLIPProcessor(image_processor=VideoMAEImageProcessor(**XCLIP_PROCESSOR), tokenizer=tiny_tokenizer()).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def reward(folder) -> XCLIPReward:
    return rewards.build_reward("xclip", sources={"xclip": str(folder)})


def uint8_clip(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random clip [T, H, W, 3] uint8 (what a decoded video file holds)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (frames, 3, h // 8 + 1, w // 8 + 1)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").numpy()
    return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def as_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T, H, W] in [-1, 1], as vader.media.read_video gives it."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# (a) preprocessing = XCLIPProcessor's pixel_values (up to the processor's uint8 rounding)


@pytest.mark.parametrize("shape", [(240, 320), (300, 200)])
def test_preprocessing_matches_xclip_processor(folder, reward, shape) -> None:
    """The processor resizes uint8 frames (bilinear, antialiased) and rounds to uint8; we resize floats.
    Tolerance: 1.05 grey levels (of 255) max, 0.35 mean. Measured: see the printed line."""
    frames = uint8_clip(8, *shape)
    processor = XCLIPProcessor.from_pretrained(folder)
    ref = processor(videos=list(frames), return_tensors="pt").pixel_values  # [1, 8, 3, 224, 224]
    ours = reward.preprocess(as_video(frames)[None])
    assert ours.shape == ref.shape == (1, 8, 3, 224, 224)
    levels = (ours - ref).abs() * torch.tensor(XCLIP_PROCESSOR["image_std"]).view(1, 1, 3, 1, 1) * 255
    print(f"xclip preprocessing {shape}: max {levels.max():.3f}, mean {levels.mean():.3f} grey levels; "
          f"normalised max {(ours - ref).abs().max():.4f}")
    assert levels.max() <= 1.05 and levels.mean() <= 0.35


# ---------------------------------------------------------------------------------------------
# (b) the score = XCLIPModel's logits_per_video on the processor's inputs


def test_score_equals_xclip_model_logits(folder, reward) -> None:
    processor = XCLIPProcessor.from_pretrained(folder)
    model = XCLIPModel.from_pretrained(folder).eval()
    clips = [list(uint8_clip(8, 240, 320, seed=s)) for s in (1, 2)]
    inputs = processor(text=PROMPTS, videos=clips, return_tensors="pt", padding=True)
    assert inputs.pixel_values.shape == (2, 8, 3, 224, 224)
    with torch.no_grad():
        expected = model(**inputs).logits_per_video  # [2 clips, 2 prompts]
        score, cosine = reward.similarity(inputs.pixel_values, PROMPTS)
        one = reward.similarity(inputs.pixel_values[1:], PROMPTS[:1])[0]
    diff = (score - expected.diagonal()).abs().max().item()
    print(f"xclip score vs XCLIPModel logits_per_video: max abs diff {diff:.2e}")
    torch.testing.assert_close(score, expected.diagonal(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, expected[1:, 0], rtol=1e-5, atol=1e-5)  # clip 2 against prompt 1
    torch.testing.assert_close(score, 100 * cosine, rtol=1e-5, atol=1e-5)
    # the forward on frames: reward = score, loss = 1 - cosine
    out = reward(torch.stack([as_video(np.stack(c)) for c in clips]), PROMPTS)
    assert out.reward.shape == out.loss.shape == (2,)
    torch.testing.assert_close(out.loss, 1 - out.reward / 100, rtol=1e-5, atol=1e-5)
    assert len(reward.text) == 2  # the video-independent text embeddings are cached per prompt


# ---------------------------------------------------------------------------------------------
# (c) gradients reach the frames and match finite differences


def test_gradient_matches_finite_difference(reward) -> None:
    torch.manual_seed(1)
    frames = (0.6 * torch.rand(1, 3, 6, 40, 56) - 0.3).requires_grad_(True)  # 6 decoded frames: indices repeat
    out = reward(frames, PROMPTS[:1])
    (grad,) = torch.autograd.grad(out.reward.sum(), frames)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn_like(frames)
    direction /= direction.norm()
    eps = 1e-2
    with torch.no_grad():
        plus = reward(frames + eps * direction, PROMPTS[:1]).reward
        minus = reward(frames - eps * direction, PROMPTS[:1]).reward
    fd = ((plus - minus) / (2 * eps)).item()
    analytic = (grad * direction).sum().item()
    print(f"xclip directional derivative: autograd {analytic:.6f}, finite difference {fd:.6f}")
    assert analytic == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_grad_checkpoint_gives_the_same_gradient(folder, reward) -> None:
    checkpointed = build_xclip(sources={"xclip": str(folder)}, grad_checkpoint=True)
    torch.manual_seed(2)
    frames = (torch.rand(1, 3, 8, 32, 48) * 1.6 - 0.8).requires_grad_(True)
    (g1,) = torch.autograd.grad(reward(frames, PROMPTS[:1]).reward.sum(), frames)
    (g2,) = torch.autograd.grad(checkpointed(frames, PROMPTS[:1]).reward.sum(), frames)
    print(f"grad checkpoint: max |g| {g1.abs().max():.3e}, max diff {(g1 - g2).abs().max():.3e}")
    # the recomputed forward may sum in another order: float32 noise, ~1e-7 of the largest gradient
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5 * g1.abs().max().item())


# ---------------------------------------------------------------------------------------------
# frame counts


def test_frames_sampled_to_eight(reward) -> None:
    frames = torch.rand(1, 3, 16, 32, 48) * 2 - 1
    with torch.no_grad():
        every_other = reward(frames[:, :, 1::2], PROMPTS[:1]).reward  # 1, 3, ..., 15
        sixteen = reward(frames, PROMPTS[:1]).reward  # segment centres of 16 = the same 8 frames
        three = reward(frames[:, :, [0, 7, 15]], PROMPTS[:1]).reward  # 'fml': repeated frames, still runs
    torch.testing.assert_close(sixteen, every_other)
    assert torch.isfinite(three).all()
    with pytest.raises(VaderError, match="decodes one frame"):
        reward(frames[:, :, :1], PROMPTS[:1])


def test_registry_record_and_decode_frame(monkeypatch, tmp_path) -> None:
    assert "xclip" in rewards.reward_names() and rewards.is_differentiable("xclip")
    assert rewards.reward_spec("xclip").needs_clip
    with pytest.raises(VaderError, match="decodes one frame"):
        rewards.check_decode_frame("xclip", "-1")
    for mode in ("all", "alt", "fml"):
        rewards.check_decode_frame("xclip", mode)


# ---------------------------------------------------------------------------------------------
# (d) the published key layout, strict loading


def test_skeleton_is_the_published_model_on_meta(folder) -> None:
    skeleton = rewards.reward_skeleton("xclip", dtype=torch.bfloat16, grad_checkpoint=True)
    assert isinstance(skeleton, XCLIPReward)
    params = list(skeleton.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    count = sum(p.numel() for p in params)
    print(f"xclip skeleton (microsoft/xclip-base-patch32): {count:,} parameters")
    assert count == 196_585_729  # + 127 int64 position ids = the model card's "197M params"
    assert skeleton.num_frames == 8 and skeleton.transform.crop == (224, 224)
    # the key layout of a checkpoint save_pretrained writes (tiny: fewer layers, same names per layer)
    from safetensors import safe_open

    def layout(keys):
        return {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in keys}

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    assert layout(skeleton.model.state_dict()) == layout(saved)
    m = skeleton.model
    assert (len(m.text_model.encoder.layers), len(m.vision_model.encoder.layers), len(m.mit.encoder.layers),
            len(m.prompts_generator.decoder)) == (12, 12, 1, 2)
    assert m.vision_model.embeddings.patch_embedding.weight.shape == (768, 3, 32, 32)
    assert m.mit.position_embedding.shape == (1, 8, 512) and m.prompts_visual_projection.shape == (768, 512)
    config = XCLIPConfig(**XCLIP_CONFIG)
    assert config.vision_config.num_frames == 8 and config.vision_config.patch_size == 32
    assert XCLIPModel.supports_gradient_checkpointing


def test_checkpoint_loads_strictly(folder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    reward = build_xclip(sources={"xclip": str(folder)}, dtype="bf16")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    del state["prompts_visual_projection"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VaderError, match="missing keys.*prompts_visual_projection.*unexpected keys"):
        build_xclip(sources={"xclip": str(broken)})


# ---------------------------------------------------------------------------------------------
# (e) the offline one-line preflight


def test_offline_preflight_names_the_download(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VaderError) as info:
        rewards.check_reward_weights("xclip", cache_dir=tmp_path / "empty-cache")
    text = str(info.value)
    assert "hf download microsoft/xclip-base-patch32" in text and "reward_sources['xclip']" in text
    assert "X-CLIP model" in text
    with pytest.raises(VaderError, match="nowhere"):
        rewards.check_reward_weights("xclip", sources={"xclip": str(tmp_path / "nowhere")})


# ---------------------------------------------------------------------------------------------
# vader score / vader eval


def test_vader_score(folder, tmp_path, capsys) -> None:
    from vader.media import write_video
    from vader.score import score_main

    video = write_video(tmp_path / "clip.mp4", as_video(uint8_clip(10, 48, 64)))
    assert score_main(["--reward", "xclip", "--prompt", PROMPTS[0], "--device", "cpu", str(video),
                       "--reward-sources", repr({"xclip": str(folder)})]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["video", "prompt", "xclip", "loss"]
    row = out.splitlines()[2].split()
    assert -100 <= float(row[-2]) <= 100 and 0 <= float(row[-1]) <= 2


def test_skeleton_factory_directly() -> None:
    reward = xclip_skeleton(dtype=torch.float32)
    assert reward.model.vision_model.embeddings.patch_embedding.weight.device.type == "meta"


def test_tiny_training_and_vader_eval_end_to_end(folder, tmp_path, capsys) -> None:
    """VADER trains through the VAE decode into X-CLIP (decode_frame 'all'), and `vader eval --rewards
    xclip` scores base and LoRA with the tiny checkpoint given through reward_sources."""
    from conftest import FAST, TINY_TRAIN

    from vader.config import load_config
    from vader.evaluate import eval_main, parse_rewards
    from vader.train import train

    assert parse_rewards("xclip,colorfulness") == ["xclip", "colorfulness"]

    sources = f"{{'xclip': {str(folder)!r}}}"
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(tmp_path), "--run_name", "run", "--max_train_steps",
                                   "2", "--validation_steps", "0", "--reward_fn", "xclip", "--decode_frame", "all",
                                   "--reward_sources", sources])
    run = train(cfg)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(np.isfinite(s["reward"]) and s["grad_norm"] > 0 for s in steps)
    capsys.readouterr()
    assert eval_main([str(TINY_TRAIN), "--lora", str(run / "lora"), "--seeds", "1", *FAST, "--project_dir",
                      str(tmp_path), "--rewards", "xclip", "--reward_sources", sources]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("xclip ")]
    assert len(rows) == 1 and np.isfinite(float(rows[0][1]))
