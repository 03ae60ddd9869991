"""VideoReward (VideoAlign's Qwen2-VL reward model) on a tiny random Qwen2-VL: preprocessing parity with
transformers' Qwen2-VL video processor, reward parity with VideoAlign's forward on the processor's inputs,
gradients, the published checkpoint layout, the meta skeleton and the offline preflight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vader.errors import VaderError
from vader.rewards import videoreward as vr

pytest.importorskip("transformers")

WORDS = "a cat dog runs the video of in on".split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (tokenizer_config.json / chat_template.json of Qwen/Qwen2-VL-2B-Instruct)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = QWEN2_VL_CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS, padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS + list(vr.SPECIAL_TOKENS)})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    return Qwen2VLConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_config=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=4, in_chans=3, hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    )


MAX_PIXELS = 56 * 84  # a tiny pixel budget: frames become 56x84 (2x3 merged patches)
MIN_PIXELS = 28 * 28


def tiny_transform():
    return vr.VideoTransform(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer)
    config._attn_implementation = "eager"
    model = vr.reward_model_class()(config).eval()
    with torch.no_grad():
        model.rm_head.weight.normal_(0, 1.0)
    return model, tokenizer


def video_processor():
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                                 merge_size=2, do_sample_frames=False)


# -- (a) preprocessing parity ------------------------------------------------------------------


def test_sampling_and_smart_resize():
    assert vr.sample_indices(33, 16) == [0, 11, 21, 32]  # Wan2.1 33 frames at 16 fps: 4 frames
    assert len(vr.sample_indices(81, 16)) == 10
    assert vr.sample_indices(3, 16) == [0, 2] and vr.sample_indices(2, 24) == [0, 1]
    with pytest.raises(VaderError, match="at least 2"):
        vr.sample_indices(1, 16)
    assert vr.smart_resize(480, 832) == (336, 588)  # 448·448 budget, multiples of 28
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    for h, w in [(480, 832), (256, 256), (720, 1280), (60, 90)]:
        assert vr.smart_resize(h, w) == smart_resize(h, w, 28, vr.MIN_PIXELS, vr.MAX_PIXELS)


@pytest.mark.parametrize("size", [(56, 84), (70, 100), (480, 832)])
def test_preprocessing_matches_qwen2vl_video_processor(size):
    """pixel_values_videos and video_grid_thw as transformers' Qwen2VLVideoProcessor emits them for the uint8
    frames VideoAlign samples (it resizes uint8 frames): the same grid and patch order; values within ~1.4
    uint8 levels (vader resizes the float frames, the processor their uint8 rounding); equal to float
    precision on uint8-level frames that need no resize. 480x832 uses the published 448·448 budget."""
    from transformers import Qwen2VLVideoProcessor

    torch.manual_seed(1)
    h, w = size
    published = h > 100
    transform = vr.VideoTransform() if published else tiny_transform()
    processor = (Qwen2VLVideoProcessor(min_pixels=vr.MIN_PIXELS, max_pixels=vr.MAX_PIXELS, do_sample_frames=False)
                 if published else video_processor())
    frames = torch.rand(2, 3, 9, h, w) * 2 - 1
    pixels, grid = transform(frames, video_fps=8.0)
    idx = vr.sample_indices(9, 8.0)
    assert idx == [0, 3, 5, 8]
    uint8 = ((frames / 2 + 0.5).clamp(0, 1)[:, :, idx].permute(0, 2, 1, 3, 4) * 255).round().to(torch.uint8)
    out = processor(videos=[v for v in uint8], return_tensors="pt", do_rescale=True)
    assert torch.equal(out["video_grid_thw"], grid)
    assert out["pixel_values_videos"].shape == pixels.shape
    diff = (out["pixel_values_videos"] - pixels).abs()
    print(f"size {h}x{w} grid {grid[0].tolist()}: |vader - processor| max {diff.max():.4g} mean {diff.mean():.4g}")
    assert diff.max() < 0.025 and diff.mean() < 0.006  # 1 uint8 level = 1/255/0.26 ≈ 0.015 after normalising
    if (h, w) == (56, 84):  # no resize: on the processor's own uint8-level frames the two agree exactly
        q = (uint8.float() / 255).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, 4, H, W]
        pq, _ = transform(q, video_fps=1.0)  # 4 frames at 1 fps: all 4 sampled
        assert (out["pixel_values_videos"] - pq).abs().max().item() < 1e-5


# -- (b) reward parity with VideoAlign's forward ---------------------------------------------------


def videoalign_reference(model, special_ids, input_ids, **batch):
    """Qwen2VLRewardModelBT.forward (reward_token 'special', output_dim 1) on the processor's batch: the reward
    head on the last hidden state, the logits at the special tokens, viewed [B, 3]."""
    out = model.model(input_ids=input_ids, use_cache=False, return_dict=True, **batch)
    logits = model.rm_head(out[0])
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in special_ids:
        mask |= input_ids == i
    return logits[mask, ...].view(input_ids.shape[0], 3, -1).view(input_ids.shape[0], -1)


def test_rewards_match_videoalign_forward_on_processor_inputs(tiny):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    model, tokenizer = tiny
    reward = vr.VideoReward(model, tokenizer, tiny_transform(), video_fps=8.0)
    torch.manual_seed(2)
    frames = torch.rand(2, 3, 9, 56, 84) * 2 - 1  # already at the budget's size: no resize difference
    prompts = ["a cat runs", "the dog in a video of a cat on the dog"]
    with torch.no_grad():
        raw = reward.scores(frames, prompts)
        out = reward(frames, prompts)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=video_processor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    chats = [[{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                           {"type": "text", "text": vr.build_prompt(p)}]}] for p in prompts]
    idx = vr.sample_indices(9, 8.0)
    videos = [v for v in (frames / 2 + 0.5)[:, :, idx].permute(0, 2, 1, 3, 4)]
    batch = processor(text=processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True),
                      videos=videos, padding=True, return_tensors="pt", videos_kwargs={"do_rescale": False})
    with torch.no_grad():
        ref = videoalign_reference(model, reward.special_ids, **batch)
    diff = (raw - ref).abs().max().item()
    print(f"raw scores vader vs VideoAlign reference: max diff {diff:.3g}; scores {raw.tolist()}")
    assert diff < 1e-5
    normed = (ref - torch.tensor([vr.NORM[d][0] for d in vr.DIMENSIONS])) / torch.tensor([vr.NORM[d][1] for d in vr.DIMENSIONS])
    torch.testing.assert_close(out.reward, normed.sum(1), atol=1e-5, rtol=1e-5)  # 'Overall' = VQ + MQ + TA
    torch.testing.assert_close(out.loss, -out.reward)
    # one dimension each; the tokenizer's own chat template and the fixed format agree
    for i, d in enumerate(vr.DIMENSIONS):
        single = vr.VideoReward(model, tokenizer, tiny_transform(), dims=(d,), video_fps=8.0)
        with torch.no_grad():
            torch.testing.assert_close(single(frames, prompts).reward, normed[:, i], atol=1e-5, rtol=1e-5)
    plain = vr.VideoReward(model, tiny_tokenizer(chat_template=None), tiny_transform(), video_fps=8.0)
    assert plain.chat_text("a cat") == reward.chat_text("a cat")


# -- (c) gradients ------------------------------------------------------------------------------


def test_gradient_matches_finite_difference(tiny):
    model, tokenizer = tiny
    model64 = vr.reward_model_class()(model.config).eval()
    model64.load_state_dict(model.state_dict())
    model64 = model64.double()
    reward = vr.VideoReward(model64, tokenizer, tiny_transform(), video_fps=8.0, grad_checkpoint=True)
    torch.manual_seed(3)
    frames = (torch.rand(1, 3, 4, 60, 90, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    f = lambda x: reward(x, ["a cat runs"]).reward.sum()  # noqa: E731
    grad, = torch.autograd.grad(f(frames), frames)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # 4-point central differences. Qwen2-VL applies its vision rotary embedding in float32 even in a float64
    # model (relative noise ~1e-7 on f ≈ -7), which rules out tiny steps: eps 1e-2 (absolute FD noise ~3e-5).
    eps = 1e-2

    def fd(direction):
        with torch.no_grad():
            return (-f(frames + 2 * eps * direction) + 8 * f(frames + eps * direction)
                    - 8 * f(frames - eps * direction) + f(frames - 2 * eps * direction)) / (12 * eps)

    along = grad / grad.norm()  # along the gradient: the derivative is |grad|
    random = torch.randn_like(frames)
    random = random / random.norm() * 10
    for name, direction in (("gradient", along), ("random", random)):
        analytic, numeric = (grad * direction).sum(), fd(direction)
        print(f"directional derivative along {name}: autograd {analytic.item():.6g}, finite difference {numeric.item():.6g}")
        torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=1e-4)


# -- (d) the published checkpoint layout ---------------------------------------------------------


def published_state(model, lora_r=4, alpha=8, seed=4):
    """The model's weights as VideoAlign's trainer saves them: non_lora_state_dict.pth (peft names,
    transformers-4.4x Qwen2-VL layout, `.base_layer.` on LoRA-wrapped linears, tied lm_head absent) and
    adapter_model.safetensors (lora_A / lora_B of every language-model linear)."""
    g = torch.Generator().manual_seed(seed)
    non_lora, lora = {}, {}
    linear = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key.startswith("model.visual."):
            old = "base_model.model.visual." + key.removeprefix("model.visual.")
        elif key.startswith("model.language_model."):
            old = "base_model.model.model." + key.removeprefix("model.language_model.")
        else:
            old = "base_model.model." + key
        if any(s in old for s in linear) and ".model.layers." in old:
            module, leaf = old.rsplit(".", 1)
            old = f"{module}.base_layer.{leaf}"
            if leaf == "weight":
                out_f, in_f = value.shape
                lora[f"{module}.lora_A.weight"] = torch.randn(lora_r, in_f, generator=g) * 0.1
                lora[f"{module}.lora_B.weight"] = torch.randn(out_f, lora_r, generator=g) * 0.1
        non_lora[old] = value.clone()
    return non_lora, lora


def test_published_checkpoint_loads_strictly_and_merges_like_peft(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    non_lora, lora = published_state(model)
    state = vr.convert_checkpoint(non_lora, lora, scale=8 / 4)
    fresh = vr.reward_model_class()(model.config).eval()
    fresh.load_state_dict(state, strict=True)  # every key, no extra
    # the merge equals peft's LoRA on the same weights (VideoAlign applies the adapter through peft)
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora})
    targets = [published_key_to_module(t) for t in targets]
    peft_model = get_peft_model(vr.reward_model_class()(model.config).eval(),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    peft_sd = peft_model.state_dict()
    for k, v in lora.items():
        name = "base_model.model." + published_key_to_module(k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0])
        peft_sd[f"{name}.lora_{k.rsplit('.lora_', 1)[1].split('.')[0]}.default.weight"] = v
    for k in list(peft_sd):
        plain = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".lora_" not in k and plain in model.state_dict():
            peft_sd[k] = model.state_dict()[plain]
    peft_model.load_state_dict(peft_sd, strict=True)
    merged = peft_model.merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)
    # and through the loader, from folders laid out as the hub repos
    reward_dir, base_dir = write_published(tmp_path, model, tokenizer, non_lora, lora)
    loaded = vr.build_videoreward("videoreward_vq", sources={"videoreward": str(reward_dir),
                                                             "videoreward_base": str(base_dir)})
    assert loaded.dims == ("VQ",) and loaded.transform.max_pixels == MAX_PIXELS
    assert isinstance(loaded.model.lm_head, torch.nn.Identity)  # the reward reads hidden states only
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    # a weighted dict's second dimension takes the loaded model rather than loading another copy
    sources = {"videoreward": str(reward_dir), "videoreward_base": str(base_dir)}
    ta = vr.build_videoreward("videoreward_ta", sources=sources)
    assert ta.model is loaded.model and ta.dims == ("TA",) and loaded.dims == ("VQ",)
    assert vr.build_videoreward("videoreward_ta", sources=sources, dtype=torch.bfloat16).model is not loaded.model


def published_key_to_module(old: str) -> str:
    return vr.published_key(old)


def write_published(tmp_path: Path, model, tokenizer, non_lora, lora):
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    base_dir = tmp_path / "Qwen2-VL-tiny"
    base = Qwen2VLForConditionalGeneration(model.config)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    video_processor().save_pretrained(base_dir)
    reward_dir = tmp_path / "VideoReward"
    ckpt = reward_dir / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (reward_dir / "checkpoint-3").mkdir()  # an older one: the newest is used, as VideoAlign does
    torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
    save_file({k: v.contiguous() for k, v in lora.items()}, str(ckpt / "adapter_model.safetensors"))
    tokenizer.save_pretrained(ckpt / "tokenizer")
    (reward_dir / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": MAX_PIXELS, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                         "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": {f"{d}_{s}": v for d in vr.DIMENSIONS for s, v in zip(("mean", "std"), vr.NORM[d])},
    }))
    return reward_dir, base_dir


def test_skeleton_is_published_size_and_takes_the_published_keys():
    skeleton = vr.videoreward_skeleton("videoreward", dtype=torch.bfloat16, grad_checkpoint=True)
    params = sum(p.numel() for p in skeleton.model.parameters())
    # Qwen2-VL-2B-Instruct: 2,208,985,600 parameters; VideoReward's vocabulary is 151660 rows, not 151936,
    # and it adds rm_head (1536)
    assert params == 2_208_985_600 - (151936 - 151660) * 1536 + 1536 == 2_208_563_200
    assert all(p.is_meta for p in skeleton.parameters())
    keys = set(skeleton.model.state_dict()) | {"lm_head.weight"}  # tied, and dropped by the reward
    old = {("base_model.model.visual." + k.removeprefix("model.visual.")) if k.startswith("model.visual.")
           else ("base_model.model.model." + k.removeprefix("model.language_model."))
           if k.startswith("model.language_model.") else "base_model.model." + k for k in keys}
    assert {vr.published_key(k) for k in old} == keys
    assert any(getattr(m, "gradient_checkpointing", False) for m in skeleton.model.modules())


# -- (e) registry, preflight --------------------------------------------------------------------


def test_registry_and_offline_preflight(monkeypatch, tmp_path):
    from vader import rewards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("videoreward", "videoreward_vq", "videoreward_mq", "videoreward_ta"):
        assert name in rewards.reward_names() and rewards.is_differentiable(name)
        assert rewards.reward_spec(name).needs_clip
    with pytest.raises(VaderError, match="decodes one frame"):
        rewards.check_decode_frame("videoreward_vq", "-1")
    rewards.check_decode_frame("videoreward", "all")
    with pytest.raises(VaderError) as info:
        rewards.check_reward_weights({"videoreward_vq": 1.0, "videoreward_ta": 1.0}, cache_dir=tmp_path / "empty-cache")
    text = str(info.value)
    print(text)
    assert "hf download KwaiVGI/VideoReward" in text and "hf download Qwen/Qwen2-VL-2B-Instruct" in text
    assert "reward_sources['videoreward']" in text and text.count("KwaiVGI/VideoReward") == 2  # once per source
    missing = tmp_path / "nowhere"
    with pytest.raises(VaderError, match="nowhere"):
        rewards.check_reward_weights("videoreward", sources={"videoreward": str(missing)})


# -- vader score / vader eval ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory):
    model, tokenizer = tiny
    non_lora, lora = published_state(model)
    reward_dir, base_dir = write_published(tmp_path_factory.mktemp("videoreward"), model, tokenizer, non_lora, lora)
    return {"videoreward": str(reward_dir), "videoreward_base": str(base_dir)}


def test_score_reads_the_files_frame_rate(published, tmp_path):
    from vader import rewards
    from vader.media import read_video, write_video
    from vader.score import format_table, score_rows

    torch.manual_seed(5)
    path = write_video(tmp_path / "clip.mp4", torch.rand(3, 9, 56, 84) * 2 - 1, fps=8, quality="lossless")
    mix = rewards.build_reward({"videoreward_vq": 1.0, "videoreward_ta": 0.5}, sources=published)
    rows = score_rows(mix, [path], ["a cat runs"])
    vq = mix.parts["videoreward_vq"]
    assert vq.video_fps == 8.0  # from the file: 9 frames at 8 fps -> 4 frames sampled, not 2 (16 fps default)
    with torch.no_grad():
        normed = vq.normalise(vq.scores(read_video(path)[None], ["a cat runs"]))[0]
    assert rows[0].reward == pytest.approx(float(normed[0] + 0.5 * normed[2]), abs=1e-5)
    assert "clip.mp4" in format_table(rows, reward_name="videoreward_vq+videoreward_ta")


def test_score_cli_takes_the_reward_sources(published, tmp_path, capsys):
    from vader.media import write_video
    from vader.score import score_main

    torch.manual_seed(6)
    path = write_video(tmp_path / "clip.mp4", torch.rand(3, 9, 56, 84) * 2 - 1, fps=8, quality="lossless")
    assert score_main([str(path), "--reward", "videoreward_vq", "--prompt", "a cat runs",
                       "--reward-sources", repr(published), "--device", "cpu"]) == 0
    assert "clip.mp4" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_lists_the_three_dimensions(published, tmp_path, capsys):
    """`vader eval --rewards videoreward_vq,videoreward_mq,videoreward_ta` with the tiny checkpoint via
    reward_sources: one table row per dimension (the eval table lists each reward)."""
    from conftest import FAST, TINY_TRAIN

    from vader.config import load_config
    from vader.evaluate import eval_main
    from vader.train import train

    sources = repr(published)
    lora = train(load_config(TINY_TRAIN, [*FAST, "--project_dir", str(tmp_path / "train"), "--run_name", "run",
                                          "--max_train_steps", "1", "--validation_steps", "0"])) / "lora"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat runs\n")
    args = [str(TINY_TRAIN), "--lora", str(lora), "--seeds", "1", *FAST, "--project_dir", str(tmp_path),
            "--prompts", str(prompts), "--rewards", "videoreward_vq,videoreward_mq,videoreward_ta",
            "--reward_sources", sources, "--run_name", "vr"]
    assert eval_main(args) == 0
    table = capsys.readouterr().out
    print(table)
    data = json.loads((tmp_path / "eval" / "vr" / "eval.json").read_text())
    assert set(data["rewards"]) == {"videoreward_vq", "videoreward_mq", "videoreward_ta"}
    for name in data["rewards"]:
        assert name in table
