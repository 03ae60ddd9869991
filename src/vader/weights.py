"""Published weights on this machine, for models and rewards alike: the hub repo-id rule, the offline
check, the local-folder / Hugging Face cache lookup (never a download), the short probe of the hub,
and the one-line fix a missing-weights message gives.

Bottom layer: nothing from vader but `vader.errors`, and huggingface_hub only inside the functions
(`vader --help` and `vader config` never import it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# A path the user wrote, never a hub id, even when nothing is there yet.
LOCAL_PREFIXES = ("/", "./", "../", "~")
OLDER_CLI = "huggingface-cli download on huggingface_hub < 1.0"  # `hf` replaced it in huggingface_hub 1.0
OFFLINE = "offline: HF_HUB_OFFLINE is set"
HUB_PROBE_TIMEOUT = 3.0  # seconds; huggingface_hub itself retries for about a minute before giving up
PROBE_REPO = "openai/clip-vit-large-patch14"  # any public repo answers the probe


# ---- names -----------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """A path: it exists, or it is written as one (absolute, ./, ../, ~)."""
    return name.startswith(LOCAL_PREFIXES) or os.path.exists(name)


def is_repo_id(name: str) -> bool:
    """A hub repo id is exactly 'org/name' (one slash) that huggingface_hub accepts, and not written as
    a path. A bare 'name' is not one: `from_pretrained='weights'` means a folder that is missing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(LOCAL_PREFIXES) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---- the hub's settings ----------------------------------------------------------------------------


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it at import, or as the
    environment says now: a test or a wrapper may set it after huggingface_hub was imported."""
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_cache_dir() -> str:
    """The Hugging Face cache huggingface_hub uses (HF_HUB_CACHE, HF_HOME, ...); no path is hard-coded."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# ---- on this machine -------------------------------------------------------------------------------


def cached_file(repo: str, filename: str, subfolder: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """`filename` (in `subfolder`) of the hub repo's cached snapshot, or None. No network call."""
    from huggingface_hub import try_to_load_from_cache

    name = f"{subfolder}/{filename}" if subfolder else filename
    found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) else None  # else None or "known to be absent"


def local_file(name_or_path: str | None, filename: str, subfolder: str | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """`filename` of a local folder, or of a hub repo in the Hugging Face cache, when it is on this
    machine; None otherwise (also for a path that is not a folder). Never downloads."""
    if not name_or_path:
        return None
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = (local / subfolder if subfolder else local) / filename
        return path if path.is_file() else None
    if local.exists() or not is_repo_id(name_or_path):
        return None
    return cached_file(name_or_path, filename, subfolder, cache_dir)


# ---- what is missing, and the fix ------------------------------------------------------------------


@dataclass(frozen=True)
class MissingWeight:
    """One model file or folder a run needs that is not on this machine.

    `fetch` is the command that gets it from the hub; None when it cannot be fetched (a local path
    that does not exist, a folder without weights), and `problem` then says what is wrong.
    """

    key: str  # the config key that names it, e.g. "model.from_pretrained" or "reward_sources['hps']"
    name: str  # hub repo id, repo/file, or the local path
    fetch: str | None = None
    problem: str | None = None


def download_command(repo: str, *args: str) -> str:
    """The command that puts `repo` (or what `args` select: a file, --include ...) in the HF cache."""
    return " ".join(("hf download", repo, *args))


def download_hint(*commands: str) -> str:
    """The fix every missing-weights message gives: the commands once each, joined with &&, and the
    older CLI's name."""
    return f"`{' && '.join(dict.fromkeys(commands))}` ({OLDER_CLI})"


def missing_message(names: Iterable[str], commands: Iterable[str], remedy: str, why: str = OFFLINE) -> str:
    """One line naming every missing repo once, the commands that fetch them, and the other way out
    (`remedy`, e.g. "point the settings at local folders")."""
    return (f"missing weights ({why}): {', '.join(dict.fromkeys(names))}; fetch with: "
            f"{download_hint(*commands)}, or {remedy}")


# ---- the hub's answer ------------------------------------------------------------------------------


def hub_endpoint() -> str:
    """The hub URL downloads would use: HF_ENDPOINT as the environment says now, else the library's."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def probe_hub(repo: str | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when the hub answers as the hub within `timeout` seconds, else why not (a few words).

    Asks `HEAD <endpoint>/api/models/<repo>`: the hub (or a mirror) answers 200, a redirect, or
    401/403 for a gated or private repo. No answer, a refused connection, a 404 (what an intercepting
    proxy or captive portal says to any URL) or a 5xx mean downloads would fail, after huggingface_hub's
    own retries. Runs in a daemon thread joined with the timeout: a socket timeout does not bound a
    DNS lookup, which can block far longer on a machine without network.
    """
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"{hub_endpoint()}/api/models/{urllib.parse.quote(repo or PROBE_REPO)}"
    result: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(None)
        except urllib.error.HTTPError as exc:
            result.append(None if exc.code in (401, 403) else f"{url} answered HTTP {exc.code}")
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result.append(f"{url}: {getattr(reason, 'strerror', None) or reason}")

    thread = threading.Thread(target=probe, name="vader-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{url} did not answer within {timeout:g} s"


def hub_reachable(repo: str | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """True when the hub answers as the hub within `timeout` seconds (see `probe_hub`)."""
    return probe_hub(repo, timeout) is None


def quiet_loading_bars() -> None:
    """Switch off transformers' and diffusers' weight-loading bars ("Loading weights", "Loading
    checkpoint shards") for the commands that load models: vader reports its own progress, and such a
    bar left on the terminal precedes (or swallows the start of) an error line that follows.
    huggingface_hub's download bars keep their state (transformers' switch turns them off too): a
    multi-GB download without progress looks like a hang. diffusers is only switched when already
    imported (importing it costs seconds; vader's backends import it before they load anything)."""
    import contextlib
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    downloads_shown = not are_progress_bars_disabled()
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        with contextlib.suppress(ImportError):
            import diffusers.utils.logging

            diffusers.utils.logging.disable_progress_bar()
    if downloads_shown and are_progress_bars_disabled():
        enable_progress_bars()
