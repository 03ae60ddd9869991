"""Prompt cleaning, the T5 encoder wrapper, the embedding cache and the offline tiny T5."""

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from vader.errors import VaderError
from vader.models.text import (
    EmbeddingCache,
    T5TextEncoder,
    build_prompt,
    clean_caption,
    strip_conditioning,
    tiny_t5,
)

# ---------------------------------------------------------------- clean_caption / build_prompt

# Expected outputs were checked against Open-Sora v1.2's own clean_caption.
CLEAN_CASES = [
    ("Two Dogs playing (poker)", "two dogs playing poker"),
    ("A fox [jumps] {over} |the| *lazy* dog ~ ® © ™", "a fox jumps over the lazy dog"),
    ("A cat <b>bold</b> &amp; friends at https://example.com/x visit", "a cat bold friends at visit"),
    ("see www.foo.org/bar now", "see now"),
    ("“Quoted” ‘single’ — dash – en", "\"quoted\" 'single' - dash - en"),
    ("this-is-my-cute-cat_and_more", "this is my cute cat and more"),
    ("a well-known dog", "a well-known dog"),
    ("你好 world 中文", "world"),
    ("A%20url+encoded <person> talks.", "a url encoded person talks."),
    ("rabbit in a dress,dancing.under the moon/ok", "rabbit in a dress, dancing. under the moon ok"),
    ("  Multiple   spaces\tand\ttabs  ", "multiple spaces and tabs"),
    ("wait... what", "wait what"),
    ('"wrapped"', "wrapped"),
    ("@someone hello", "hello"),
    ("image 1920x1080 of a cat", "image of a cat"),
    ("ip 192.168.0.1 here", "ip here"),
]


@pytest.mark.parametrize(("raw", "expected"), CLEAN_CASES)
def test_clean_caption(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_build_prompt_design_example() -> None:
    # design doc section 5: score appended first, then cleaned twice
    assert build_prompt("Two Dogs playing (poker)") == "two dogs playing poker aesthetic score: 6.5."
    # the unicode ellipsis survives as its own token (Open-Sora does the same)
    assert build_prompt("Two Dogs playing (poker)…") == "two dogs playing poker … aesthetic score: 6.5."
    assert build_prompt("Two Dogs playing (poker)...") == "two dogs playing poker aesthetic score: 6.5."


def test_build_prompt_suffixes() -> None:
    assert build_prompt("a cat", aes=None) == "a cat"
    assert build_prompt("a cat", aes=7) == "a cat aesthetic score: 7.0."
    full = build_prompt("a cat", aes=6.5, flow=4, camera_motion="pan right")
    assert full == "a cat aesthetic score: 6.5. motion score: 4.0. camera motion: pan right."
    # a prompt that already carries the score is not given a second one
    assert build_prompt("a cat aesthetic score: 5.0.") == "a cat aesthetic score: 5.0."


def test_build_prompt_cleans_after_appending() -> None:
    # Cleaning runs on the whole string, so the suffix is lower-cased/cleaned too.
    assert build_prompt("A CAT", camera_motion="Pan Right", aes=None) == "a cat camera motion: pan right."


def test_strip_conditioning() -> None:
    assert strip_conditioning("rabbit in a black dress aesthetic score: 6.5.") == "rabbit in a black dress"
    assert strip_conditioning("a cat motion score: 4.0. camera motion: pan.") == "a cat"
    assert strip_conditioning("a cat") == "a cat"
    assert strip_conditioning(build_prompt("Two Dogs playing (poker)")) == "two dogs playing poker"


# ---------------------------------------------------------------- tiny T5 / encode


@pytest.fixture(scope="module")
def encoder() -> T5TextEncoder:
    return tiny_t5(d_model=32, model_max_length=24)


def test_tiny_t5_is_fast_and_deterministic() -> None:
    tiny_t5()  # the sentencepiece model is trained once per process
    start = time.perf_counter()
    first, second, other = tiny_t5(seed=0), tiny_t5(seed=0), tiny_t5(seed=1)
    assert time.perf_counter() - start < 2.0
    a, b, c = first.model.state_dict(), second.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_t5_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_t5(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_has_t5_special_ids(encoder: T5TextEncoder) -> None:
    tokenizer = encoder.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("two dogs playing poker aesthetic score: 6.5.").input_ids
    assert ids[-1] == 1 and 2 not in ids  # EOS appended; ordinary text needs no <unk>
    assert encoder.model.config.vocab_size == len(tokenizer)


def test_encode_shapes_and_mask(encoder: T5TextEncoder) -> None:
    prompts = ["two dogs playing poker", "a cat"]
    y, mask = encoder.encode(prompts)
    assert y.shape == (2, 1, 24, 32) and y.dtype == torch.float32
    assert mask.shape == (2, 24) and mask.dtype == torch.long
    assert not y.requires_grad

    ids, tok_mask = encoder.tokenize(prompts)
    assert torch.equal(mask, tok_mask)
    for row_ids, row_mask in zip(ids, mask, strict=True):
        length = int(row_mask.sum())
        assert torch.all(row_mask[:length] == 1) and torch.all(row_mask[length:] == 0)
        assert row_ids[length - 1] == encoder.tokenizer.eos_token_id  # EOS is a valid token
        assert torch.all(row_ids[length:] == 0)  # padded with pad id 0
    assert int(mask[0].sum()) > int(mask[1].sum())


def test_encode_truncates_and_keeps_eos(encoder: T5TextEncoder) -> None:
    ids, mask = encoder.tokenize(["a very long prompt " * 40])
    assert mask.shape == (1, 24) and int(mask.sum()) == 24
    assert ids[0, -1] == encoder.tokenizer.eos_token_id


def test_encode_is_batch_independent(encoder: T5TextEncoder) -> None:
    y_pair, _ = encoder.encode(["two dogs playing poker", "a cat"])
    y_one, _ = encoder.encode(["a cat"])
    torch.testing.assert_close(y_pair[1], y_one[0])


def test_encode_empty(encoder: T5TextEncoder) -> None:
    y, mask = encoder.encode([])
    assert y.shape == (0, 1, 24, 32) and mask.shape == (0, 24)


def test_constructor_dtype_and_offload() -> None:
    base = tiny_t5()
    half = T5TextEncoder(base.model, base.tokenizer, 16, dtype=torch.bfloat16, name="x")
    assert half.dtype == torch.bfloat16 and half.cache_id == "x|torch.bfloat16"
    y, _ = half.encode(["a cat"])
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 16, 32)
    half.offload()
    assert half.device.type == "cpu"


# ---------------------------------------------------------------- cache


class CountingEncoder(T5TextEncoder):
    """Records every prompt that reaches the model."""

    def __init__(self, base: T5TextEncoder) -> None:
        super().__init__(base.model, base.tokenizer, base.model_max_length, name=base.name)
        self.calls: list[list[str]] = []

    def encode(self, prompts):  # type: ignore[no-untyped-def]
        self.calls.append(list(prompts))
        return super().encode(prompts)


def test_cache_hits_avoid_reencoding(encoder: T5TextEncoder) -> None:
    counting = CountingEncoder(encoder)
    cache = EmbeddingCache()
    y1, m1 = cache.get_or_encode(counting, ["a cat", "a dog", "a cat"])
    assert counting.calls == [["a cat", "a dog"]]  # duplicates encoded once
    assert y1.shape == (3, 1, 24, 32) and m1.shape == (3, 24)
    assert torch.equal(y1[0], y1[2])

    y2, m2 = cache.get_or_encode(counting, ["a dog", "a fish"])
    assert counting.calls == [["a cat", "a dog"], ["a fish"]]
    assert torch.equal(y2[0], y1[1]) and torch.equal(m2[0], m1[1])

    cache.get_or_encode(counting, ["a fish", "a cat"])
    assert len(counting.calls) == 2 and len(cache) == 3

    direct, direct_mask = encoder.encode(["a dog", "a fish"])
    torch.testing.assert_close(y2, direct)
    assert torch.equal(m2, direct_mask)


def test_cache_key_depends_on_encoder_and_length(encoder: T5TextEncoder) -> None:
    other = tiny_t5(d_model=32, model_max_length=16)
    reseeded = tiny_t5(d_model=32, model_max_length=24, seed=5)
    keys = {EmbeddingCache.key(e, "a cat") for e in (encoder, other, reseeded)}
    assert len(keys) == 3


def test_disk_cache_round_trip(encoder: T5TextEncoder, tmp_path: Path) -> None:
    first = CountingEncoder(encoder)
    y1, m1 = EmbeddingCache(tmp_path / "emb").get_or_encode(first, ["a cat", "a dog"])
    files = sorted((tmp_path / "emb").glob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "emb").glob("*.tmp"))

    second = CountingEncoder(encoder)
    cache = EmbeddingCache(tmp_path / "emb")  # a fresh process's view: memory empty
    y2, m2 = cache.get_or_encode(second, ["a dog", "a cat"])
    assert second.calls == []
    assert torch.equal(y2, y1.flip(0)) and torch.equal(m2, m1.flip(0))
    assert cache.hits == 2 and cache.misses == 0


def test_disk_cache_ignores_corrupt_file(encoder: T5TextEncoder, tmp_path: Path) -> None:
    EmbeddingCache(tmp_path).get_or_encode(encoder, ["a cat"])
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    counting = CountingEncoder(encoder)
    y, _ = EmbeddingCache(tmp_path).get_or_encode(counting, ["a cat"])
    assert counting.calls == [["a cat"]] and y.shape == (1, 1, 24, 32)


def test_cache_moves_to_device(encoder: T5TextEncoder) -> None:
    y, mask = EmbeddingCache().get_or_encode(encoder, ["a cat"], device="meta")
    assert y.device.type == "meta" and mask.device.type == "meta"


# ---------------------------------------------------------------- from_pretrained


def test_from_pretrained_local_folder_offline(encoder: T5TextEncoder, tmp_path: Path) -> None:
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    loaded = T5TextEncoder.from_pretrained(str(tmp_path), model_max_length=24, local_files_only=True)
    assert loaded.name == str(tmp_path) and loaded.output_dim == 32
    assert not any(p.requires_grad for p in loaded.model.parameters())
    prompts = ["two dogs playing poker", "a cat"]
    y_ref, m_ref = encoder.encode(prompts)
    y, m = loaded.encode(prompts)
    assert torch.equal(m, m_ref)
    torch.testing.assert_close(y, y_ref)


def test_from_pretrained_missing_repo_names_repo_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub reads HF_HUB_OFFLINE once at import; patch the parsed flag so the test is offline
    # (and fast) even when the suite was started without the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = "vader-tests/definitely-not-downloaded-t5"
    with pytest.raises(VaderError) as info:
        T5TextEncoder.from_pretrained(repo)
    message = str(info.value)
    assert repo in message and f"hf download {repo}" in message and "local folder" in message
    assert "\n" not in message


def test_from_pretrained_missing_repo_local_files_only() -> None:
    with pytest.raises(VaderError, match="hf download vader-tests/nope"):
        T5TextEncoder.from_pretrained("vader-tests/nope", local_files_only=True)


def test_from_pretrained_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(VaderError) as info:
        T5TextEncoder.from_pretrained(str(tmp_path), local_files_only=True)
    message = str(info.value)
    assert str(tmp_path) in message and "config.json" in message and "\n" not in message
