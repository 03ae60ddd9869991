"""What every bad-input table asserts (tests/test_bad_inputs*.py): one `vader: error:` line, exit 2, no
traceback, and, for inputs refused before anything starts, an unchanged folder tree."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def tree(root: Path) -> set[str]:
    """Every path under `root`, relative to it (compared before and after a refused command)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line_error(code: int, err: str, needles: Iterable[str]) -> str:
    """Exit status 2 and exactly one stderr line, `vader: error: ...`, holding every needle; returns it."""
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("vader: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def sigterm_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240.0) -> str:
    """Wait until `ready()` (failing if `proc` ends first, or `what` has not happened within `timeout`
    seconds), send SIGTERM, and return its stderr; it is killed if it outlives the signal by a minute."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{what} never happened"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err
