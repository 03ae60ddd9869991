"""ActPred: Kinetics label matching, the tiny-VideoMAE reward through the real loading path,
gradients, batching, frame-count rules and preprocessing parity with VideoMAEImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vader.errors import VaderError
from vader.prompts import read_prompt_lines, split_prompt_label
from vader.rewards.actpred import (
    ACTPRED_MODEL,
    ACTPRED_WEIGHTS,
    ClipTransform,
    build_actpred,
    preprocess_clip,
    sample_indices,
)
from vader.rewards.kinetics import (
    KINETICS_400,
    canonical_label,
    find_labels,
    match_label,
    resolve_label,
    suggest_labels,
)

TINY_LABELS = {0: "playing guitar", 1: "riding a bike", 2: "dancing"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tiny_videomae(labels: dict[int, str] = TINY_LABELS):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(
        image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, use_mean_pooling=True,
        id2label=dict(labels), label2id={v: k for k, v in labels.items()},
    )
    return VideoMAEForVideoClassification(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random VideoMAE classifier saved like a hub snapshot (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("tiny_videomae")
    tiny_videomae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return build_actpred(model=str(tiny_dir))


def clip(batch: int = 1, frames: int = 4, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# label matching (pure text, the real Kinetics-400 names)


def test_kinetics_400_names() -> None:
    assert len(KINETICS_400) == 400 == len(set(KINETICS_400))
    assert KINETICS_400[0] == "abseiling" and KINETICS_400[-1] == "zumba"
    for name in ("playing guitar", "riding a bike", "eating doughnuts", "dancing ballet", "flipping pancake",
                 "passing American football (not in game)", "massaging person's head"):
        assert name in KINETICS_400
    assert ACTPRED_WEIGHTS == [(ACTPRED_MODEL, None)] and ACTPRED_MODEL == "MCG-NJU/videomae-base-finetuned-kinetics"


@pytest.mark.parametrize("prompt, label", [
    ("a man playing guitar on stage", "playing guitar"),
    ("A MAN PLAYING GUITAR", "playing guitar"),
    ("A young girl playing the piano in a cozy living room.", "playing piano"),  # article ignored
    ("a boy riding his bike to school", "riding a bike"),  # possessive and the label's own article
    ("a man playing bass guitar", "playing bass guitar"),  # longest wins over "playing guitar"
    ("two friends drinking beer at a bar", "drinking beer"),  # over "drinking"
    ("kids eating doughnut in a cafe", "eating doughnuts"),  # plural folded
    ("a man jetskiing on a lake", "jetskiing"),  # whole words: not "skiing"
    ("a woman skiing down a slope", "skiing (not slalom or crosscountry)"),  # bracketed qualifier optional
    ("a family eating cake at the dining table", "eating cake"),
    ("A woman chopping wood in a forest.", "chopping wood"),
])
def test_label_found_in_prompt(prompt: str, label: str) -> None:
    assert match_label(prompt) == label


@pytest.mark.parametrize("prompt", ["a man displaying guitar", "a bowl of soup", "a cat sleeping on a sofa", ""])
def test_no_label_in_prompt(prompt: str) -> None:
    assert match_label(prompt) is None


def test_longest_match_listed_first() -> None:
    found = find_labels("a man playing bass guitar and singing")
    assert [m.label for m in found] == ["playing bass guitar", "singing"]


def test_equally_long_actions_are_ambiguous() -> None:
    with pytest.raises(VaderError, match=r"several actions.*'jogging'.*'texting'.*TAB"):
        match_label("a man jogging and texting")
    with pytest.raises(VaderError, match="passing American football"):
        match_label("passing American football on a field")


def test_explicit_label_wins_and_is_case_insensitive() -> None:
    assert resolve_label("a man playing guitar", explicit="Dancing  Ballet") == "dancing ballet"
    assert resolve_label("a man rocking out on stage", explicit="playing guitar") == "playing guitar"
    assert canonical_label("hurling") == "hurling (sport)"  # unique without its qualifier


def test_unknown_explicit_label_lists_close_matches() -> None:
    with pytest.raises(VaderError, match=r"'play guitar'.*not one of.*400 classes.*close matches: 'playing guitar'"):
        resolve_label("a man on stage", explicit="play guitar")


def test_prompt_without_action_says_how_to_give_one() -> None:
    with pytest.raises(VaderError) as info:
        resolve_label("a man plays the guitar")
    msg = str(info.value)
    assert "'a man plays the guitar'" in msg and "<TAB>" in msg and "'playing guitar'" in msg
    assert "\n" not in msg
    assert suggest_labels("a man plays the guitar")[0] == "playing guitar"


def test_prompts_file_lines_with_labels() -> None:
    assert split_prompt_label("a man on stage\tplaying guitar") == ("a man on stage", "playing guitar")
    assert split_prompt_label("  a man playing guitar  ") == ("a man playing guitar", None)
    prompts, labels, *_ = read_prompt_lines(["a man on stage\tplaying guitar", "", "a kid riding a bike"])
    assert prompts == ["a man on stage", "a kid riding a bike"]
    assert labels == {"a man on stage": "playing guitar"}
    with pytest.raises(VaderError, match="no prompt"):
        read_prompt_lines(["\tplaying guitar"])


def test_check_decode_frame() -> None:
    from vader.rewards import check_decode_frame as check_rewards

    def check_decode_frame(mode: str) -> None:
        check_rewards("actpred", mode)

    for mode in ("all", "alt", "fml"):
        check_decode_frame(mode)
    for mode in ("-1", "0", "5"):
        with pytest.raises(VaderError, match="'all', 'alt', 'fml'"):
            check_decode_frame(mode)


# ---------------------------------------------------------------------------------------------
# the reward with a tiny VideoMAE (same loading path as the hub model: a saved folder)


def test_tiny_model_loads_from_folder(tiny) -> None:
    assert tiny.num_frames == 4
    assert tiny.label_names == ["playing guitar", "riding a bike", "dancing"]
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    # no preprocessor saved: shortest edge = crop = the model's image size, ImageNet mean/std
    assert tiny.transform == ClipTransform(shortest_edge=32, crop=(32, 32))


def test_prepare_matches_against_the_models_labels(tiny) -> None:
    tiny.prepare(["a kid riding a bike", "people dancing", "a man playing guitar while dancing"])
    assert tiny.target_label("a kid riding a bike") == "riding a bike"
    assert tiny.target_label("people dancing") == "dancing"
    assert tiny.target_label("a man playing guitar while dancing") == "playing guitar"
    # a Kinetics name this model does not have is no match
    with pytest.raises(VaderError, match=r"'a girl playing piano'.*3 classes.*<TAB>"):
        tiny.prepare(["a girl playing piano"])


def test_prepare_errors_before_training(tiny) -> None:
    with pytest.raises(VaderError, match=r"'a cat sleeping'.*\(1 more prompts"):
        tiny.prepare(["a man playing guitar", "a cat sleeping", "a quiet lake"])
    # an explicit label fixes it; keys match the cleaned (lower-case, no punctuation) prompt too
    tiny.prepare(["a cat sleeping"], labels={"A cat sleeping.": "dancing"})
    assert tiny.target_label("a cat sleeping") == "dancing"
    tiny.prepare(["a woman playing guitar"], labels={"a woman playing guitar": "dancing"})  # explicit wins
    assert tiny.target_label("a woman playing guitar") == "dancing"
    with pytest.raises(VaderError, match=r"'playing piano'.*close matches: 'playing guitar'"):
        tiny.prepare(["a man on stage"], labels={"a man on stage": "playing piano"})
    with pytest.raises(VaderError, match="not among"):
        tiny.prepare(["a man playing guitar"], labels={"another prompt": "dancing"})


def test_reward_is_probability_loss_is_cross_entropy(tiny) -> None:
    frames = clip(batch=2)
    prompts = ["a man playing guitar on stage", "a kid riding a bike"]
    out = tiny(frames, prompts)
    pixel = tiny.preprocess(frames)
    assert pixel.shape == (2, 4, 3, 32, 32)
    logits = tiny.model(pixel_values=pixel).logits
    expect = logits.softmax(-1)[torch.arange(2), torch.tensor([0, 1])]
    torch.testing.assert_close(out.reward, expect)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    torch.testing.assert_close(out.loss, ce)
    assert ((out.reward > 0) & (out.reward < 1)).all()


def test_gradients_reach_frames(tiny) -> None:
    frames = clip(frames=3).requires_grad_(True)
    tiny(frames, ["a man playing guitar"]).loss.sum().backward()
    assert frames.grad is not None and torch.isfinite(frames.grad).all()
    assert all(frames.grad[:, :, k].abs().sum() > 0 for k in range(3))  # every decoded frame is used


def test_batch_equals_one_by_one(tiny) -> None:
    frames = clip(batch=3, frames=6, seed=1)
    prompts = ["a man playing guitar", "a kid riding a bike", "people dancing"]
    together = tiny(frames, prompts)
    for i in range(3):
        alone = tiny(frames[i:i + 1], prompts[i:i + 1])
        torch.testing.assert_close(together.reward[i:i + 1], alone.reward, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.loss[i:i + 1], alone.loss, atol=1e-6, rtol=1e-5)


def test_one_frame_is_a_clear_error(tiny) -> None:
    with pytest.raises(VaderError, match=r"1 decoded frame.*decode_frame 'all', 'alt', 'fml'"):
        tiny(clip(frames=1), ["a man playing guitar"])


def test_frames_resampled_to_model_length() -> None:
    assert sample_indices(4, 4) == [0, 1, 2, 3]
    assert sample_indices(16, 16) == list(range(16))
    assert sample_indices(8, 16) == [i // 2 for i in range(16)]  # 'alt' on 16 frames: each twice
    assert sample_indices(3, 16) == [0] * 5 + [1] * 6 + [2] * 5  # 'fml'
    spread = sample_indices(51, 16)  # 'all' on a 2 s video: 16 evenly spaced frames
    assert spread[0] == 1 and spread[-1] == 49 and {b - a for a, b in zip(spread, spread[1:])} <= {3, 4}
    assert sample_indices(2, 4) == [0, 0, 1, 1]


def test_grad_checkpoint_recomputes_with_equal_gradients(tiny_dir) -> None:
    plain = build_actpred(model=str(tiny_dir))
    ckpt = build_actpred(model=str(tiny_dir), grad_checkpoint=True)
    ckpt.eval()  # what build_reward does; the checkpointed layers must stay armed
    calls = []
    ckpt.model.videomae.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    grads = []
    for reward in (plain, ckpt):
        frames = clip(seed=2).requires_grad_(True)
        reward(frames, ["a man playing guitar"]).loss.sum().backward()
        grads.append(frames.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert len(calls) == 2  # forward, then the recompute in backward
    assert not any(m.training for m in ckpt.model.modules() if not getattr(m, "gradient_checkpointing", False))


def test_built_module_dtype_and_processor(tiny_dir) -> None:
    from transformers import VideoMAEImageProcessor

    processor = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    reward = build_actpred(model=tiny_videomae(), dtype=torch.bfloat16, processor=processor)
    assert reward.dtype == torch.bfloat16 and reward.transform.mean == (0.5, 0.5, 0.5)
    out = reward(clip(), ["people dancing"])
    assert out.reward.dtype == torch.float32 and torch.isfinite(out.loss).all()
    # a processor saved beside the model is picked up by the folder path
    folder = tiny_dir.parent / "tiny_with_processor"
    tiny_videomae().save_pretrained(folder)
    processor.save_pretrained(folder)
    assert build_actpred(model=str(folder)).transform.mean == (0.5, 0.5, 0.5)
    with pytest.raises(VaderError, match="64x64 frames but the ActPred model takes 32x32"):
        build_actpred(model=tiny_videomae(), processor={"size": {"shortest_edge": 64}, "crop_size": 64})


def test_missing_model_is_a_vader_error(tmp_path) -> None:
    with pytest.raises(VaderError, match="could not be loaded"):
        build_actpred(model=str(tmp_path))  # an empty folder


# ---------------------------------------------------------------------------------------------
# preprocessing parity with transformers' VideoMAEImageProcessor


@pytest.mark.parametrize("shape, size", [((48, 72), 32), ((20, 28), 32), ((240, 320), 224), ((300, 200), 224)])
def test_preprocessing_matches_videomae_image_processor(shape, size) -> None:
    """Same uint8 clip through both. The processor resizes uint8 images and rounds the result to
    uint8; we resize floats. Tolerance: at most 1.05 grey levels (of 255) per pixel, 0.35 on average."""
    from transformers import VideoMAEImageProcessor

    rng = np.random.default_rng(0)
    h, w = shape
    coarse = torch.from_numpy(rng.uniform(0, 255, (4, 3, h // 4 + 1, w // 4 + 1)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").numpy()
    frames = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    processor = VideoMAEImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    ref = processor(list(frames), return_tensors="pt").pixel_values  # [1, 4, 3, size, size]
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # what read_video gives
    ours = preprocess_clip(video[None], ClipTransform.from_processor(processor), num_frames=4)
    assert ours.shape == ref.shape == (1, 4, 3, size, size)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    levels = (ours - ref).abs() * std * 255
    assert levels.max() <= 1.05 and levels.mean() <= 0.35


def test_registry_builds_actpred_from_a_local_folder(tiny_dir) -> None:
    """`build_reward('actpred', sources={'actpred': folder})`: the name the config uses; mixes forward
    `prepare` (labels included) to ActPred."""
    from vader.rewards import build_reward

    reward = build_reward("actpred", sources={"actpred": str(tiny_dir)}, grad_checkpoint=True)
    assert reward.name == "actpred" and not any(p.requires_grad for p in reward.parameters())
    reward.prepare(["a man on stage"], {"a man on stage": "playing guitar"})
    assert reward.target_label("a man on stage") == "playing guitar"
    mix = build_reward({"actpred": 1.0, "colorfulness": 0.5}, sources={"actpred": str(tiny_dir)})
    mix.prepare(["a man on stage"], {"a man on stage": "riding a bike"})
    assert mix.parts["actpred"].target_label("a man on stage") == "riding a bike"
    out = mix(clip(), ["a man on stage"])
    assert out.reward.shape == (1,) and torch.isfinite(out.loss).all()


# ---------------------------------------------------------------------------------------------
# faithful to the original: the classifier sees the decoded frames; strict loading


@pytest.mark.parametrize("decoded", [8, 6, 2])
def test_actpred_sees_the_decoded_frames_like_the_original(tiny_dir, decoded: int) -> None:
    """The original built VideoMAE with num_frames = the decoded frame count ('alt' on 16 frames: 8)
    and fed it those frames; the default 'decoded' mode must give exactly its logits."""
    from transformers import VideoMAEForVideoClassification

    original = VideoMAEForVideoClassification.from_pretrained(str(tiny_dir), num_frames=decoded).eval()
    reward = build_actpred(model=str(tiny_dir))
    assert reward.frames == "decoded" and reward.num_frames == 4  # the checkpoint's own length
    frames = clip(batch=2, frames=decoded, seed=decoded)
    pixels = preprocess_clip(frames, reward.transform, decoded)  # every decoded frame, in order
    with torch.no_grad():
        expected = original(pixel_values=pixels).logits
        ours = reward.logits(frames)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # the resampling mode (vader's earlier default) shows the 4-frame model 4 resampled frames instead
    resampled = build_actpred(model=str(tiny_dir), frames="resample")
    with torch.no_grad():
        other = resampled.logits(frames)
        model_length = resampled.model(pixel_values=preprocess_clip(frames, resampled.transform, 4)).logits
    torch.testing.assert_close(other, model_length, rtol=1e-5, atol=1e-6)
    if decoded != 4:
        assert not torch.allclose(ours, other, atol=1e-4)
    with torch.no_grad():  # the position table follows each clip: a 4-frame clip right after is unchanged
        torch.testing.assert_close(reward.logits(clip(frames=4)), resampled.logits(clip(frames=4)))


def test_actpred_odd_frame_counts_use_every_frame(tiny_dir) -> None:
    reward = build_actpred(model=str(tiny_dir))
    assert [reward.clip_length(k) for k in (2, 3, 8, 51)] == [2, 4, 8, 52]
    assert build_actpred(model=str(tiny_dir), frames="resample").clip_length(51) == 4
    with pytest.raises(VaderError, match=r"actpred frames='all' must be one of decoded, resample"):
        build_actpred(model=str(tiny_dir), frames="all")


def _resave(src, dst, edit) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


def test_actpred_missing_classifier_weights_are_an_error(tiny_dir, tmp_path) -> None:
    """A user-supplied classifier without its head would otherwise run with random head weights."""
    folder = tmp_path / "headless"
    _resave(tiny_dir, folder, lambda sd: [sd.pop(k) for k in ("classifier.weight", "classifier.bias")])
    with pytest.raises(VaderError, match=r"2 missing keys \(classifier\.bias, classifier\.weight\)") as info:
        build_actpred(model=str(folder))
    assert "\n" not in str(info.value)


def test_actpred_unexpected_weights_are_an_error(tiny_dir, tmp_path) -> None:
    folder = tmp_path / "extra"
    _resave(tiny_dir, folder, lambda sd: sd.__setitem__("videomae.extra_head.weight", torch.zeros(3)))
    with pytest.raises(VaderError, match=r"1 unexpected keys \(videomae\.extra_head\.weight\)"):
        build_actpred(model=str(folder))
