"""Where reward weights come from, and the offline check that runs before any generation.

Every model a reward needs is a `WeightSource`: a file in a hub repository (the HPS checkpoint, the
aesthetic MLP), a whole model folder of a hub repository (`from_pretrained` style), or a local path.
Users override the defaults per model with `sources` ({key: value}, keys in `SOURCE_KEYS`):

- a local file or folder path (used as is; it must exist);
- a hub repository id `owner/name` (the default file name is kept for single-file weights);
- `owner/name/path/in/repo.pt` for a specific file of a hub repository.

Resolution goes through huggingface_hub (its cache, `HF_HUB_OFFLINE`, `HF_HOME`); no cache path is
hard-coded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vader.errors import VaderError
from vader.weights import (
    MissingWeight,
    cached_file,
    download_command,
    download_hint,
    is_repo_id,
    looks_local,
    offline,
)

# sources keys -> what they override (documented in the config reference)
SOURCE_KEYS: dict[str, str] = {
    "aesthetic_clip": "CLIP ViT-L/14 for 'aesthetic': hub id or local save_pretrained folder "
                      "(default openai/clip-vit-large-patch14; only the vision tower is loaded)",
    "aesthetic_head": "LAION aesthetic MLP state dict (.pth): local file, hub repo or repo/file "
                      "(default trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth = sac+logos+ava1-l14-linearMSE)",
    "hps": "HPS checkpoint ({'state_dict': ...}): local file, hub repo or repo/file "
           "(default xswu/HPSv2/HPS_v2.1_compressed.pt, or HPS_v2_compressed.pt for hps_version v2.0)",
    "hps_arch": "open_clip model name the HPS checkpoint fits, or a path to an open_clip model-config .json "
                "(default ViT-H-14)",
    "pick_score": "PickScore CLIPModel: hub id or local folder (default yuvalkirstain/PickScore_v1)",
    "pick_score_processor": "PickScore tokenizer + image processor: hub id or local folder "
                            "(default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "actpred": "ActPred video classifier: hub id or local folder (default MCG-NJU/videomae-base-finetuned-kinetics)",
}

# what a cached model folder must hold: every group needs one of its names
MODEL_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                  "pytorch_model.bin.index.json"))
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
PROCESSOR_FILES = (("tokenizer_config.json",), ("tokenizer.json", "vocab.json"),
                   ("preprocessor_config.json", "processor_config.json"))


@dataclass(frozen=True)
class WeightSource:
    """One thing to load. Exactly one of `local` / `repo` is set.

    filename: the file in `repo` (single-file weights); None for a model folder (`kind` says which
    files a folder must have: 'model' or 'processor').
    """

    key: str  # the `sources` key that overrides it
    what: str  # for messages, e.g. "HPS v2.1 checkpoint"
    repo: str | None = None
    filename: str | None = None
    local: str | None = None
    kind: str = "file"  # 'file', 'model' or 'processor'

    @property
    def pair(self) -> tuple[str, str | None]:
        return (self.local, None) if self.local else (self.repo, self.filename)

    def download_command(self) -> str:
        if self.kind == "file":
            return download_command(self.repo, self.filename)
        if self.kind == "processor":
            return download_command(self.repo, "--include", '"*.json"', '"*.txt"')
        return download_command(self.repo, "--exclude", '"*.h5"', '"*.msgpack"', '"*.onnx"')

    def describe(self) -> str:
        if self.local:
            return f"local path {self.local}"
        if self.filename:
            return f"{self.repo} file {self.filename}"
        return f"{self.repo} ({'tokenizer/processor files' if self.kind == 'processor' else 'model folder'})"


def file_source(key: str, what: str, spec: str | os.PathLike | None, default_repo: str, default_file: str) -> WeightSource:
    """A single weights file: local path, `owner/name` (default file) or `owner/name/file`."""
    if spec is None:
        return WeightSource(key, what, repo=default_repo, filename=default_file)
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_file() or looks_local(spec) or (spec.count("/") < 2 and spec.endswith(WEIGHT_SUFFIXES)):
        return WeightSource(key, what, local=str(path))
    parts = spec.strip("/").split("/")
    if len(parts) == 2:
        return WeightSource(key, what, repo=spec.strip("/"), filename=default_file)
    if len(parts) > 2:
        return WeightSource(key, what, repo="/".join(parts[:2]), filename="/".join(parts[2:]))
    raise VaderError(f"reward source {key}={spec!r} is neither an existing file nor a hub repo id (owner/name)")


def folder_source(key: str, what: str, spec: str | os.PathLike | None, default_repo: str,
                  kind: str = "model") -> WeightSource:
    """A `from_pretrained` folder: local directory or hub repo id."""
    if spec is None:
        return WeightSource(key, what, repo=default_repo, kind=kind)
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir() or looks_local(spec) or not is_repo_id(spec):
        return WeightSource(key, what, local=str(path), kind=kind)
    return WeightSource(key, what, repo=spec, kind=kind)


def is_available(src: WeightSource, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when `src` loads without network: a local path that exists, or files in the hub cache."""
    if src.local:
        return Path(src.local).exists()
    if src.kind == "file":
        return cached_file(src.repo, src.filename, cache_dir=cache_dir) is not None
    groups = MODEL_FILES if src.kind == "model" else PROCESSOR_FILES
    return all(any(cached_file(src.repo, name, cache_dir=cache_dir) for name in group) for group in groups)


def problem(src: WeightSource) -> str:
    """What is wrong with an unavailable source, and the fix."""
    if src.local:
        return f"local path {src.local} does not exist (fix the path in reward_sources[{src.key!r}])"
    return (f"{src.describe()} is not in the Hugging Face cache; run {download_hint(src.download_command())}, "
            f"or set reward_sources[{src.key!r}] to a local path")


def missing_line(reward: str, src: WeightSource) -> str:
    return f"- {reward}: {src.what}: {problem(src)}"


def check_sources(needed: Iterable[tuple[str, WeightSource]], cache_dir: str | os.PathLike | None = None) -> None:
    """Raise one VaderError listing every source that cannot load: missing local paths always,
    hub files not in the cache only when offline (online they download when the reward is built)."""
    off = offline()
    lines = []
    for reward, src in needed:
        if is_available(src, cache_dir):
            continue
        if src.local or off:
            lines.append(missing_line(reward, src))
    if lines:
        why = " (HF_HUB_OFFLINE is set, so nothing can be downloaded)" if off else ""
        raise VaderError(f"reward weights are missing{why}; nothing was generated:\n" + "\n".join(lines))


def given_sources(values: tuple, keys: tuple[str, ...], sources: Callable[..., tuple]) -> tuple:
    """Each of a reward's `values` as a WeightSource: one given as such, the default for None, else what
    `sources({key: value})` (the reward's own override rule) makes of it."""
    defaults = sources()
    return tuple(v if isinstance(v, WeightSource) else (d if v is None else sources({k: v})[i])
                 for i, (v, k, d) in enumerate(zip(values, keys, defaults, strict=True)))


def resolve_file(src: WeightSource) -> str:
    """A local path to the weights file (downloading it into the hub cache when online)."""
    if src.local:
        if not Path(src.local).is_file():
            raise VaderError(f"{src.what}: {problem(src)}")
        return src.local
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(src.repo, src.filename, local_files_only=offline())
    except (OSError, ValueError, ConnectionError) as exc:
        raise VaderError(f"could not get {src.what} ({type(exc).__name__}): {problem(src)}") from exc


def pretrained_path(src: WeightSource) -> str:
    """What `from_pretrained` gets: the local folder or the hub id."""
    if src.local and not Path(src.local).is_dir():
        raise VaderError(f"{src.what}: local path {src.local} is not a folder (fix reward_sources[{src.key!r}])")
    return src.local or src.repo


def loading_problems(info: dict) -> list[str]:
    """from_pretrained(..., output_loading_info=True)'s missing / unexpected / mismatched keys, one phrase per
    kind that has any (the first four keys named): what a strict load refuses."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(kind) or []))
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    return problems


def load_error(src: WeightSource, exc: BaseException) -> VaderError:
    """A one-paragraph VaderError for a `from_pretrained` failure."""
    if src.local:
        return VaderError(f"could not load {src.what} from {src.local} ({type(exc).__name__}: {exc})")
    return VaderError(f"could not load {src.what} ({type(exc).__name__}): {problem(src)}")


def validate_sources(sources: dict | None) -> dict[str, str]:
    """The `sources` mapping with its keys checked (VaderError naming the valid keys)."""
    if not sources:
        return {}
    if not isinstance(sources, dict):
        raise VaderError(f"reward sources={sources!r} must be a dict {{key: path or hub id}}")
    unknown = sorted(set(sources) - set(SOURCE_KEYS))
    if unknown:
        raise VaderError(f"unknown reward source key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         + ", ".join(SOURCE_KEYS))
    return {k: os.fspath(v) for k, v in sources.items() if v is not None}


def missing(needed: Iterable[tuple[str, WeightSource]],
            cache_dir: str | os.PathLike | None = None) -> list[MissingWeight]:
    """Every reward source in `needed` that cannot load without network (no network call)."""
    out: list[MissingWeight] = []
    for _reward, src in needed:
        if is_available(src, cache_dir):
            continue
        key = f"reward_sources[{src.key!r}]"
        if src.local:
            out.append(MissingWeight(key, src.local, problem=f"{src.what}: no such file or folder"))
        else:
            name = f"{src.repo}/{src.filename}" if src.filename else src.repo
            out.append(MissingWeight(key, name, fetch=src.download_command()))
    return out
