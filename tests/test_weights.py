"""vader.weights: the hub repo-id rule, the offline check, the local / HF-cache lookup and the one-line
fix every missing-weights message gives. Nothing touches the network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vader.weights import (
    MissingWeight,
    cached_file,
    download_command,
    download_hint,
    is_repo_id,
    local_file,
    looks_local,
    missing_message,
    offline,
)

REV = "0" * 40


def cache(root: Path, repo: str, *files: str) -> Path:
    """Lay out `files` (empty) as huggingface_hub's cache holds a snapshot of `repo`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REV)
    for name in files:
        path = folder / "snapshots" / REV / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    return folder / "snapshots" / REV


# ---- the repo-id rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hpcai-tech/OpenSora-STDiT-v3", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                  "openai/clip-vit-large-patch14", "a/b", "org/name_with.dots-and_underscores"])
def test_org_slash_name_is_a_repo_id(name: str) -> None:
    assert is_repo_id(name)


@pytest.mark.parametrize("name", [
    "gpt2",  # no org: a missing local folder, not a hub id
    "org/name/file.pt",  # a file in a repo, not a repo
    "org/name/",
    "/abs/path",
    "./org/name",
    "../org/name",
    "~/org",
    "org/name with space",
    "org/na--me",  # huggingface_hub refuses '--' and '..'
    "org/na..me",
    "",
])
def test_anything_else_is_not(name: str) -> None:
    assert not is_repo_id(name)


def test_paths_look_local_before_anything_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("/nowhere/x", "./x", "../x", "~/x"):
        assert looks_local(name)
    assert not looks_local("org/name")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert looks_local("org/name")  # an existing folder wins over the hub id it resembles


# ---- offline ---------------------------------------------------------------------------------------


def test_offline_follows_the_environment_now(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not offline()
    for value in ("1", "ON", "yes", " true "):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # either variable is enough
    assert offline()
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub read it at import
    assert offline()


# ---- on this machine -------------------------------------------------------------------------------


def test_cached_file_finds_only_what_the_cache_holds(tmp_path: Path) -> None:
    snapshot = cache(tmp_path, "org/name", "config.json", "vae/config.json")
    assert cached_file("org/name", "config.json", cache_dir=tmp_path) == snapshot / "config.json"
    assert cached_file("org/name", "config.json", "vae", tmp_path) == snapshot / "vae" / "config.json"
    assert cached_file("org/name", "model.safetensors", cache_dir=tmp_path) is None
    assert cached_file("org/other", "config.json", cache_dir=tmp_path) is None


def test_local_file_reads_a_folder_or_the_cache_and_never_downloads(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = cache(hub, "org/name", "config.json")
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "config.json").write_text("{}")
    assert local_file(str(folder), "config.json", "sub") == folder / "sub" / "config.json"
    assert local_file(str(folder), "config.json") is None
    assert local_file("org/name", "config.json", cache_dir=hub) == snapshot / "config.json"
    assert local_file("org/absent", "config.json", cache_dir=hub) is None  # offline or not: no download
    assert local_file(str(folder / "sub" / "config.json"), "config.json") is None  # a file, not a folder
    assert local_file("name", "config.json", cache_dir=hub) is None
    assert local_file(None, "config.json") is None and local_file("", "config.json") is None


# ---- the fix ---------------------------------------------------------------------------------------


def test_download_command_and_hint_text() -> None:
    assert download_command("org/name") == "hf download org/name"
    assert download_command("org/name", "file.pt") == "hf download org/name file.pt"
    assert download_command("org/name", "--include", "'vae/*.json'") == "hf download org/name --include 'vae/*.json'"
    assert download_hint("hf download a/b") == "`hf download a/b` (huggingface-cli download on huggingface_hub < 1.0)"
    assert download_hint("hf download a/b", "hf download c/d", "hf download a/b") == (
        "`hf download a/b && hf download c/d` (huggingface-cli download on huggingface_hub < 1.0)")


def test_offline_missing_message_names_every_missing_repo_once() -> None:
    repos = ["org/denoiser", "org/vae", "org/denoiser", "org/t5"]
    message = missing_message(repos, map(download_command, repos), "point the settings at local folders")
    assert "\n" not in message
    assert message.startswith("missing weights (offline: HF_HUB_OFFLINE is set): org/denoiser, org/vae, org/t5;")
    for repo in ("org/denoiser", "org/vae", "org/t5"):
        assert message.count(f"{repo},") + message.count(f"{repo};") == 1  # named once in the list
        assert message.count(f"hf download {repo}") == 1  # fetched once
    assert "`hf download org/denoiser && hf download org/vae && hf download org/t5`" in message
    assert message.endswith("(huggingface-cli download on huggingface_hub < 1.0), or point the settings at local "
                            "folders")
    why = missing_message(["a/b"], ["hf download a/b"], "x", why="the hub cannot be reached")
    assert why.startswith("missing weights (the hub cannot be reached): a/b;")


def test_missing_weight_records_the_fetch_or_the_problem() -> None:
    fetchable = MissingWeight("model.from_pretrained", "org/name", fetch=download_command("org/name"))
    broken = MissingWeight("vae.from_pretrained", "/x", problem="no such folder")
    assert (fetchable.fetch, fetchable.problem) == ("hf download org/name", None)
    assert (broken.fetch, broken.problem) == (None, "no such folder")


# ---- the layer -------------------------------------------------------------------------------------


def test_it_sits_at_the_bottom_layer() -> None:
    """vader.weights and vader.dtypes import neither huggingface_hub nor torch (`vader --help` stays fast),
    and nothing from vader but vader.errors; vader.config takes its dtype names without torch."""
    def imported(module: str) -> tuple[list[str], list[str]]:
        code = (f"import sys, {module}; print(sorted(m for m in ('huggingface_hub', 'torch') if m in sys.modules)); "
                "print(sorted(m for m in sys.modules if m.startswith('vader.')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        heavy, ours = out.splitlines()
        return eval(heavy), eval(ours)

    heavy, ours = imported("vader.weights, vader.dtypes")
    assert heavy == [] and set(ours) <= {"vader.weights", "vader.dtypes", "vader.errors"}
    assert "torch" not in imported("vader.config")[0]
