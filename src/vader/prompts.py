"""The one prompts-file parser, used by train, infer, run, eval and score.

A prompts file is UTF-8 text with one prompt per line; blank lines are skipped. After a TAB a line may
give a first-frame image for an image-to-video model and/or an explicit label (ActPred's target action):

    prompt
    prompt<TAB>label                  a second field that is not an image file name is a label
    prompt<TAB>image path             .png .jpg .jpeg .webp .bmp (any case): an image
    prompt<TAB>image path<TAB>label   both

An image path is relative to the prompts file's folder (or absolute; `~` expands); in a config's
`prompt=[...]` list it is relative to the working directory. The parser only resolves the path: whether
the file is there, is an image, and fits the video is `vader.images`' job (in the preflight). Every
mistake is one `VaderError` line naming the file (and the line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vader.errors import VaderError

TAB_HINT = "prompt<TAB>label"
FORMAT_HINT = "prompt, prompt<TAB>label, prompt<TAB>image path or prompt<TAB>image path<TAB>label"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_name(text: str) -> bool:
    """Whether a prompts-file field names an image file (by its suffix, any case)."""
    return text.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ImageRef:
    """A first-frame image a prompts file gives: the path as written, where it resolves to, and the
    line it is on (1-based; in a `prompt=[...]` list, the item's index + 1)."""

    written: str
    path: Path
    line: int


class PromptList(NamedTuple):
    """What a prompts file (or a config's `prompt=[...]`) gives: the prompts in order (repeats kept),
    {prompt: label} and {prompt: image} for the prompts that give one, {prompt: the line it is first
    on} and what to call the source in messages (e.g. "prompt_path='p.txt'")."""

    prompts: list[str]
    labels: dict[str, str]
    images: dict[str, ImageRef]
    lines: dict[str, int]
    source: str = "prompt"
    in_file: bool = False  # numbered as file lines ('line 3'), else as list items ('prompt[2]')
    file: str | None = None  # the prompts file read, as it was given

    def where(self, line: int) -> str:
        """One line's name in a message: "prompt_path='p.txt' line 3" or "prompt[2]"."""
        return f"{self.source} line {line}" if self.in_file else f"{self.source}[{line - 1}]"

    def where_lines(self, lines: Sequence[int], most: int = 5) -> str:
        """Several lines' names: "prompt_path='p.txt' lines 2, 5 and 7 (and 3 more)"."""
        shown = [str(n) if self.in_file else f"[{n - 1}]" for n in lines[:most]]
        more = f" (and {len(lines) - most} more)" if len(lines) > most else ""
        listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
        if self.in_file:
            return f"{self.source} line{'s' if len(lines) > 1 else ''} {listed}{more}"
        return f"{self.source}{listed}{more}" if len(shown) == 1 else f"{self.source} items {listed}{more}"

    def subset(self, prompts: list[str]) -> PromptList:
        """The same source restricted to `prompts` (e.g. after start_index/end_index)."""
        keep = set(prompts)
        return self._replace(prompts=list(prompts), labels={p: v for p, v in self.labels.items() if p in keep},
                             images={p: v for p, v in self.images.items() if p in keep},
                             lines={p: v for p, v in self.lines.items() if p in keep})


def split_prompt_line(line: str, where: str = "prompts file line") -> tuple[str, str | None, str | None]:
    """One line -> (prompt, image as written or None, label or None); see the module docstring. `where`
    names the line in error messages."""
    prompt, *rest = line.split("\t")
    fields = [f.strip() for f in rest]
    if len(fields) > 2:
        raise VaderError(f"{where} {line!r} has {len(fields)} TABs; the format is {FORMAT_HINT}")
    image = label = None
    if len(fields) == 2:
        image, label = fields
        if image and not is_image_name(image):
            raise VaderError(f"{where} {line!r} has more than one TAB but {image!r} is not an image file name "
                             f"({', '.join(IMAGE_SUFFIXES)}); with two TABs the format is prompt<TAB>image path<TAB>label")
    elif fields:
        if is_image_name(fields[0]):
            image = fields[0]
        else:
            label = fields[0]
    return prompt.strip(), image or None, label or None


def split_prompt_label(line: str) -> tuple[str, str | None]:
    """`prompt<TAB>label` -> (prompt, label); a line without a label -> (line, None) (an image is skipped)."""
    prompt, _, label = split_prompt_line(line)
    return prompt, label


def read_prompt_lines(lines: Sequence[str], base: str | Path | None = None, source: str = "prompt",
                      in_file: bool = False) -> PromptList:
    """Prompts (blank lines skipped), their labels and images; image paths resolve against `base`
    (the prompts file's folder; None: the working directory)."""
    folder = Path.cwd() if base is None else Path(base)
    out = PromptList([], {}, {}, {}, source, in_file)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompt, image, label = split_prompt_line(line, out.where(number))
        if not prompt:
            raise VaderError(f"{out.where(number)} {line!r} has a label or image but no prompt; the format is "
                             f"{FORMAT_HINT}")
        out.prompts.append(prompt)
        out.lines.setdefault(prompt, number)
        if label is not None:
            if out.labels.get(prompt, label) != label:
                raise VaderError(f"prompt {prompt!r} is given two different labels: {out.labels[prompt]!r} and "
                                 f"{label!r} ({out.where(number)})")
            out.labels[prompt] = label
        if image is not None:
            path = Path(image).expanduser()
            ref = ImageRef(image, Path(os.path.normpath(path if path.is_absolute() else folder / path)), number)
            known = out.images.get(prompt)
            if known is not None and known.path != ref.path:
                raise VaderError(f"prompt {prompt!r} is given two different images: {known.written!r} "
                                 f"({out.where(known.line)}) and {image!r} ({out.where(number)}); one prompt has one "
                                 "first frame")
            out.images.setdefault(prompt, ref)
    return out


def read_prompt_file(path: str | Path, key: str = "prompt_path") -> PromptList:
    """Prompts, labels and images of a prompts file; `key` names the setting in error messages."""
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
    found = read_prompt_lines(text.splitlines(), base=path.absolute().parent, source=f"{key}={str(path)!r}",
                              in_file=True)._replace(file=str(path))
    if not found.prompts:
        raise VaderError(f"{key}={str(path)!r} is empty: it needs one prompt per line")
    return found


__all__ = ["FORMAT_HINT", "IMAGE_SUFFIXES", "TAB_HINT", "ImageRef", "PromptList", "is_image_name",
           "read_prompt_file", "read_prompt_lines", "split_prompt_label", "split_prompt_line"]
