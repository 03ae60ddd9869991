"""The one prompts-file parser, used by train, infer and score.

A prompts file is UTF-8 text with one prompt per line; blank lines are skipped; a line
`prompt<TAB>label` also gives an explicit label (ActPred's target action). Every mistake is one
`VaderError` line naming the file (and the line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vader.errors import VaderError

TAB_HINT = "prompt<TAB>label"


def split_prompt_label(line: str) -> tuple[str, str | None]:
    """`prompt<TAB>label` -> (prompt, label); a line without a TAB -> (line, None)."""
    prompt, tab, label = line.partition("\t")
    label = label.strip()
    if "\t" in label:
        raise VaderError(f"prompts file line {line!r} has more than one TAB; the format is {TAB_HINT}")
    return prompt.strip(), (label or None) if tab else None


def read_prompt_lines(lines: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Prompts (blank lines skipped) and {prompt: label} for the lines that give a label after a TAB."""
    prompts: list[str] = []
    labels: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        prompt, label = split_prompt_label(line)
        if not prompt:
            raise VaderError(f"prompts file line {line!r} has a label but no prompt; the format is {TAB_HINT}")
        prompts.append(prompt)
        if label is not None:
            if labels.get(prompt, label) != label:
                raise VaderError(f"prompt {prompt!r} is given two different labels: {labels[prompt]!r} and {label!r}")
            labels[prompt] = label
    return prompts, labels


def read_prompt_file(path: str | Path, key: str = "prompt_path") -> tuple[list[str], dict[str, str]]:
    """Prompts and labels of a prompts file; `key` names the setting in error messages."""
    path = Path(path)
    if path.is_dir():
        raise VaderError(f"{key}={str(path)!r} is a folder, not a prompts file: give a text file with one prompt "
                         "per line")
    if path.exists() and not path.is_file():
        raise VaderError(f"{key}={str(path)!r} is not a regular file (a device, pipe or socket): give a text file "
                         "with one prompt per line")
    if not path.is_file():
        raise VaderError(f"{key}={str(path)!r}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise VaderError(f"{key}={str(path)!r} is not UTF-8 text (bad byte at line {line}); save it as UTF-8, "
                         "one prompt per line") from None
    except OSError as exc:
        raise VaderError(f"{key}={str(path)!r} cannot be read: {exc.strerror or exc}") from None
    prompts, labels = read_prompt_lines(text.splitlines())
    if not prompts:
        raise VaderError(f"{key}={str(path)!r} is empty: it needs one prompt per line")
    return prompts, labels


__all__ = ["TAB_HINT", "read_prompt_file", "read_prompt_lines", "split_prompt_label"]
