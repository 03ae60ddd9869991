"""The text side of Open-Sora v1.2: prompt cleaning, the T5 encoder and an embedding cache.

Prompts reach T5 exactly as Open-Sora's inference does it: append the conditioning suffix
(" aesthetic score: 6.5."), then run PixArt's caption cleaner twice. The STDiT3 weights were
trained on captions cleaned this way, so the cleaner is reproduced rule for rule, quirks included.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import html
import io
import json
import os
import re
import shutil
import string
import tempfile
import urllib.parse
import warnings
from collections.abc import Sequence
from pathlib import Path

import ftfy
import torch
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from vader.errors import VaderError
from vader.weights import download_command, download_hint

# ---------------------------------------------------------------------------------------------
# Caption cleaning (PixArt / Open-Sora `clean_caption`)
# ---------------------------------------------------------------------------------------------

_TLDS = "com|co|ru|net|org|edu|gov|it"
# Two URL passes: one for scheme-prefixed links ("https:"), one keyed on "www:"; both also drop
# bare domains such as "example.com/path".
_URL_RULES = [
    re.compile(
        rf"\b((?:{scheme}:(?:\/{{1,3}}|[a-zA-Z0-9%])"
        rf"|[a-zA-Z0-9.\-]+[.](?:{_TLDS})[\w/-]*\b\/?(?!@)))"
    )
    for scheme in ("https?", "www")
]

_FILE_EXTS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
# Every dash-like code point (hyphen, Armenian/Hebrew/Canadian dashes, en/em dashes, wave dash,
# fullwidth hyphen, ...) is folded into "-".
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
)
# Runs of symbols and brackets become a single space, which is why "(poker)" loses its brackets.
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+"

Rule = tuple[re.Pattern[str], str]


def _rules(pairs: Sequence[tuple[str, str]]) -> list[Rule]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


# Applied after the HTML is stripped, in this order (order matters: e.g. quotes are unified
# before runs of quotes collapse, and "..." must become a space before the punctuation pass).
_SYMBOL_RULES = _rules(
    [
        (r"@[\w\d]+\b", ""),  # @nicknames
        (r"[\u31c0-\u9fff]+", ""),  # CJK strokes ... CJK unified ideographs (one contiguous range)
        (rf"[{_DASHES}]+", "-"),
        (r"[`´«»“”¨]", '"'),
        (r"[‘’]", "'"),
        (r"&quot;?", ""),
        (r"&amp", ""),
        (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
        (r"\d:\d\d\s+$", ""),  # trailing "article ids"
        (r"\\n", " "),  # a literal backslash-n left over from scraped text
        (r"#\d{1,3}\b", ""),
        (r"#\d{5,}\b", ""),
        (r"\b\d{6,}\b", ""),  # long numbers (ids, phone numbers)
        (rf"[\S]+\.(?:{_FILE_EXTS})", ""),  # file names
        (r"[\"']{2,}", '"'),
        (r"[\.]{2,}", " "),
        (_BAD_PUNCT, " "),
        (r"\s+\.\s+", " "),  # a lone " . "
    ]
)

# snake_case / kebab-case slugs: only split when there are more than 3 separators, so ordinary
# hyphenated words survive.
_SLUG_SEPARATOR = re.compile(r"[-_]")

# Applied after ftfy/html unescaping: product codes, shop spam, dimensions, spacing.
_WORD_RULES = _rules(
    [
        (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
        (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
        (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
        (r"(worldwide\s+)?(free\s+)?shipping", ""),
        (r"(free\s)?download(\sfree)?", ""),
        (r"\bclick\b\s(?:for|on)\s\w+", ""),
        (rf"\b(?:{_FILE_EXTS})(\simage[s]?)?", ""),
        (r"\bpage\s+\d+\b", ""),
        (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
        (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (latin x, cyrillic х, ×)
        (r"\b\s+\:\s+", ": "),
        (r"(\D[,\./])\b", r"\1 "),  # a space after punctuation glued to the next word
        (r"\s+", " "),
    ]
)

# Trim wrapping quotes and stray leading/trailing separators.
_EDGE_RULES = _rules(
    [
        (r"^[\"']([\w\W]+)[\"']$", r"\1"),
        (r"^['_,\-:;]", ""),
        (r"['_,\-:+]$", ""),
        (r"^\.\S+$", ""),
    ]
)


def _apply(rules: Sequence[Rule], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def _fix_text(text: str) -> str:
    # Mojibake repair plus double unescaping, for captions that were HTML-escaped twice.
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_caption(text: str) -> str:
    """One pass of Open-Sora/PixArt's caption cleaner (lowercases; drops URLs, HTML, brackets)."""
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = text.replace("<person>", "person")
    for pattern in _URL_RULES:
        text = pattern.sub("", text)
    with warnings.catch_warnings():
        # Captions like "file.png" look like paths to bs4; parsing them as text is the intent.
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_SYMBOL_RULES, text)
    if len(_SLUG_SEPARATOR.findall(text)) > 3:
        text = _SLUG_SEPARATOR.sub(" ", text)
    text = _apply(_WORD_RULES, _fix_text(text))
    return _apply(_EDGE_RULES, text).strip()


# ---------------------------------------------------------------------------------------------
# Prompt pipeline
# ---------------------------------------------------------------------------------------------

# The conditioning suffixes Open-Sora v1.2 appends; each is added only if the prompt lacks it.
_AES_MARKER = "aesthetic score:"
_FLOW_MARKER = "motion score:"
_CAMERA_MARKER = "camera motion:"


def build_prompt(
    prompt: str,
    aes: float | None = 6.5,
    flow: float | None = None,
    camera_motion: str | None = None,
) -> str:
    """The text T5 sees: conditioning suffixes appended first, then `clean_caption` twice."""
    text = prompt
    if aes is not None and _AES_MARKER not in text:
        text = f"{text} {_AES_MARKER} {aes:.1f}."
    if flow is not None and _FLOW_MARKER not in text:
        text = f"{text} {_FLOW_MARKER} {flow:.1f}."
    if camera_motion is not None and _CAMERA_MARKER not in text:
        text = f"{text} {_CAMERA_MARKER} {camera_motion}."
    # Twice, because that is what Open-Sora trained on; one pass is not idempotent.
    return clean_caption(clean_caption(text))


def strip_conditioning(prompt: str) -> str:
    """The prompt without its conditioning suffixes, as reward models should see it."""
    cut = len(prompt)
    for marker in (_AES_MARKER, _FLOW_MARKER, _CAMERA_MARKER):
        index = prompt.find(marker)
        if index != -1:
            cut = min(cut, index)
    return prompt[:cut].strip()


# ---------------------------------------------------------------------------------------------
# T5 encoder
# ---------------------------------------------------------------------------------------------


def _missing_model_message(name_or_path: str, exc: Exception) -> str:
    if os.path.isdir(name_or_path):
        return (
            f"text encoder folder {name_or_path!r} could not be loaded ({type(exc).__name__}); "
            "it needs config.json, the tokenizer files (spiece.model or tokenizer.json) and the "
            f"weights, e.g. from `{download_command('DeepFloyd/t5-v1_1-xxl', '--local-dir', '<folder>')}`"
        )
    return (
        f"text encoder {name_or_path!r} could not be loaded offline ({type(exc).__name__}); "
        f"download it with {download_hint(download_command(name_or_path))} "
        "or point from_pretrained at a local folder with its config, tokenizer and weights"
    )


class T5TextEncoder:
    """A frozen T5 encoder plus its tokenizer, producing STDiT3's caption inputs (y, mask)."""

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        model_max_length: int = 300,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        # The encoder is never trained here; freezing once avoids building graphs by accident.
        self.model = model.eval().requires_grad_(False)
        if dtype is not None or device is not None:
            self.model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.name = name or str(model.config.name_or_path or "t5")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        model_max_length: int = 300,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        local_files_only: bool | None = None,
    ) -> T5TextEncoder:
        """Load tokenizer and encoder from a hub id or a folder (e.g. DeepFloyd/t5-v1_1-xxl)."""
        # None defers to HF_HUB_OFFLINE / the library default instead of forcing either way.
        kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:  # missing files surface as either, by loader
            raise VaderError(_missing_model_message(name_or_path, exc)) from exc
        return cls(model, tokenizer, model_max_length, device=device, name=name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def output_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def cache_id(self) -> str:
        """What distinguishes this encoder's embeddings in a cache (weights name and dtype)."""
        return f"{self.name}|{self.dtype}"

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, L]: EOS appended, padded with 0 to L, truncated."""
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"].long(), tokens["attention_mask"].long()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """y [B, 1, L, d_model] and mask [B, L] (long), on the encoder's device.

        no_grad rather than inference_mode: y later meets LoRA weights that need gradients, and
        inference tensors cannot be saved for backward.
        """
        if not prompts:
            empty = torch.zeros(0, 1, self.model_max_length, self.output_dim, dtype=self.dtype)
            return empty, torch.zeros(0, self.model_max_length, dtype=torch.long)
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[:, None], mask

    def offload(self) -> None:
        """Move the encoder to CPU so its GPU memory (~19 GB for XXL in fp32) goes to training."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Embedding cache
# ---------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Per-prompt (y, mask) kept in memory and, given a directory, as one safetensors file each.

    VADER trains on a handful of prompts, so encoding each once lets T5 leave the GPU.
    Stored tensors live on CPU; `get_or_encode(..., device=)` moves the batch where it is needed.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, tuple[Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    @staticmethod
    def key(encoder: T5TextEncoder, prompt: str) -> str:
        payload = json.dumps([encoder.cache_id, encoder.model_max_length, prompt])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get_or_encode(
        self,
        encoder: T5TextEncoder,
        prompts: Sequence[str],
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Batched y [B, 1, L, d] and mask [B, L]; only prompts seen nowhere are encoded."""
        if not prompts:
            return encoder.encode([])
        keys = [self.key(encoder, p) for p in prompts]
        missing = self._fill_from_disk(keys, prompts)
        if missing:
            self._encode_into(encoder, missing)
        y = torch.stack([self._memory[k][0] for k in keys])
        mask = torch.stack([self._memory[k][1] for k in keys])
        return (y.to(device), mask.to(device)) if device is not None else (y, mask)

    def _fill_from_disk(self, keys: list[str], prompts: Sequence[str]) -> dict[str, str]:
        """Load what the disk has; return key -> prompt for the rest, first occurrence kept."""
        missing: dict[str, str] = {}
        for key, prompt in zip(keys, prompts, strict=True):
            if key in self._memory:
                self.hits += 1
            elif (entry := self._read(key, prompt)) is not None:
                self._memory[key] = entry
                self.hits += 1
            elif key not in missing:
                missing[key] = prompt
                self.misses += 1
        return missing

    def _encode_into(self, encoder: T5TextEncoder, missing: dict[str, str]) -> None:
        y, mask = encoder.encode(list(missing.values()))
        for i, (key, prompt) in enumerate(missing.items()):
            # clone: a row view would keep the whole batch tensor alive.
            entry = (y[i].detach().cpu().clone(), mask[i].detach().cpu().clone())
            self._memory[key] = entry
            self._write(key, prompt, encoder, entry)

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    def _read(self, key: str, prompt: str) -> tuple[Tensor, Tensor] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None  # a hash collision or a foreign file: re-encode
                return f.get_tensor("y"), f.get_tensor("mask")
        except Exception:  # noqa: BLE001 - a truncated/corrupt cache file is just a miss
            return None

    def _write(self, key: str, prompt: str, encoder: T5TextEncoder, entry: tuple[Tensor, Tensor]) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "prompt": prompt,
            "encoder": encoder.cache_id,
            "max_length": str(encoder.model_max_length),
        }
        # Write then rename, so a crash or a parallel rank never leaves a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"y": entry[0].contiguous(), "mask": entry[1]}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# Tiny offline T5 for tests and the "tiny" preset
# ---------------------------------------------------------------------------------------------

# Prompt-like sentences plus every printable ASCII character, so a small unigram vocabulary still
# covers arbitrary lower-cased prompts without <unk> for ordinary text.
_TINY_CORPUS = (
    "a cat playing piano on a stage aesthetic score: 6.5.",
    "two dogs playing poker in a smoky room, cinematic lighting",
    "a rabbit in a black dress dancing under the full moon",
    "waves crashing on a rocky beach at sunset, drone shot",
    "a teddy bear washing dishes in a kitchen, 4k, high detail",
    "an astronaut riding a horse across the surface of mars",
    "a panda eating bamboo in a misty forest, slow motion",
    "time lapse of clouds moving over snowy mountains",
    "a red sports car driving through a neon city at night",
    "a chef cooking pasta, steam rising from the pot",
    "close up of a hummingbird drinking nectar from a flower",
    "an old man reading a newspaper on a park bench in autumn",
    "fireworks exploding over a river with reflections in the water",
    "a robot walking down a busy street in the rain",
    "a golden retriever running through a field of sunflowers",
    "motion score: 4.0. camera motion: pan right. camera motion: zoom in.",
    string.ascii_lowercase + " " + string.digits + " " + string.punctuation,
    string.ascii_uppercase,
)


@functools.lru_cache(maxsize=1)
def _tiny_spiece_dir() -> str:
    """Train the tiny sentencepiece model once per process (~0.1 s) and keep it in a temp dir."""
    import sentencepiece as spm  # local: only the tiny path needs the trainer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 4),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=256,
        hard_vocab_limit=False,  # the corpus is small; take what it supports
        character_coverage=1.0,
        # T5's special ids: pad 0, eos 1, unk 2, no bos.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # single-threaded training is deterministic
        minloglevel=2,
    )
    directory = tempfile.mkdtemp(prefix="vader-tiny-t5-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    Path(directory, "spiece.model").write_bytes(buffer.getvalue())
    return directory


def tiny_t5_tokenizer(model_max_length: int = 300) -> PreTrainedTokenizerBase:
    """A small T5 sentencepiece tokenizer (pad 0, eos 1, unk 2) that needs no download."""
    from transformers import T5Tokenizer

    if not Path(_tiny_spiece_dir(), "spiece.model").is_file():
        _tiny_spiece_dir.cache_clear()  # a tmp cleaner removed it; train again
    # extra_ids=0: no <extra_id_*> sentinels; they only matter for span-corruption pretraining.
    return T5Tokenizer.from_pretrained(_tiny_spiece_dir(), extra_ids=0, model_max_length=model_max_length)


def tiny_t5(
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    model_max_length: int = 300,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> T5TextEncoder:
    """A randomly initialised T5 encoder (v1.1 style: gated-GELU) with the tiny tokenizer."""
    tokenizer = tiny_t5_tokenizer(model_max_length)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    # Seed a forked RNG so the weights depend only on `seed`, not on the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    name = f"tiny-t5-d{d_model}-l{num_layers}-h{num_heads}-f{d_ff}-s{seed}"
    return T5TextEncoder(model, tokenizer, model_max_length, device=device, dtype=dtype, name=name)
