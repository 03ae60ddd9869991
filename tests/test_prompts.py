"""The one prompts-file parser (vader.prompts): prompts, ActPred labels and first-frame images, and its
one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vader.errors import VaderError
from vader.prompts import PromptList, is_image_name, read_prompt_file, read_prompt_lines, split_prompt_line


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_second_field_is_an_image_by_its_suffix_else_a_label():
    assert split_prompt_line("a cat") == ("a cat", None, None)
    assert split_prompt_line("a cat\tplaying guitar") == ("a cat", None, "playing guitar")
    for name in ("cat.png", "cat.JPG", "c/cat.jpeg", "cat.WebP", "cat.bmp"):
        assert split_prompt_line(f"a cat\t{name}") == ("a cat", name, None)
    assert split_prompt_line(" a cat \t cat.png \t playing guitar ") == ("a cat", "cat.png", "playing guitar")
    assert split_prompt_line("a cat\t\tplaying guitar") == ("a cat", None, "playing guitar")
    assert split_prompt_line("a cat\tcat.png\t") == ("a cat", "cat.png", None)
    assert split_prompt_line("a cat\t") == ("a cat", None, None)
    assert not is_image_name("cat.gif") and not is_image_name("png") and is_image_name("x.PNG")


def test_image_paths_resolve_against_the_prompts_files_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "b.jpg"
    (folder / "p.txt").write_text(f"a cat\tframes/cat.png\n\na dog\tplaying fetch\na bird\t{absolute}\tflying\n"
                                  "a cat\tframes/cat.png\n")
    found = read_prompt_file(folder / "p.txt")
    assert isinstance(found, PromptList)
    assert found.prompts == ["a cat", "a dog", "a bird", "a cat"]
    assert found.labels == {"a dog": "playing fetch", "a bird": "flying"}
    assert {p: r.path for p, r in found.images.items()} == {"a cat": folder.absolute() / "frames" / "cat.png",
                                                            "a bird": absolute}
    assert found.images["a cat"].written == "frames/cat.png" and found.images["a cat"].line == 1
    assert found.lines == {"a cat": 1, "a dog": 3, "a bird": 4}
    assert found.where(3) == f"prompt_path={str(folder / 'p.txt')!r} line 3"
    prompts, labels, images, lines, *_ = found  # a tuple: an old `prompts, labels = ...` fails loudly
    assert prompts == found.prompts


def test_a_config_prompt_list_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = read_prompt_lines(["a cat\tcat.png", "a dog"])
    assert found.images["a cat"].path == tmp_path / "cat.png"
    assert found.where(2) == "prompt[1]"
    assert found.where_lines([1, 2]) == "prompt items [0] and [1]"


def test_where_lines_names_the_first_lines_and_counts_the_rest(tmp_path):
    found = read_prompt_lines(["a"], source="prompt_path='p.txt'", in_file=True)
    assert found.where_lines([4]) == "prompt_path='p.txt' line 4"
    assert found.where_lines([2, 4, 6]) == "prompt_path='p.txt' lines 2, 4 and 6"
    assert found.where_lines(list(range(1, 9))) == "prompt_path='p.txt' lines 1, 2, 3, 4 and 5 (and 3 more)"


def test_one_prompt_with_an_image_once_and_without_it_later_keeps_the_image(tmp_path):
    found = read_prompt_lines(["a cat", "a cat\tcat.png"], base=tmp_path)
    assert found.images["a cat"].path == tmp_path / "cat.png" and found.images["a cat"].line == 2
    assert found.lines["a cat"] == 1


def test_subset_keeps_only_the_kept_prompts_images_and_labels(tmp_path):
    found = read_prompt_lines(["a\ta.png", "b\tb.png\tx", "c\ty"], base=tmp_path)
    part = found.subset(["b", "c"])
    assert part.prompts == ["b", "c"] and set(part.images) == {"b"} and part.labels == {"b": "x", "c": "y"}
    assert part.lines == {"b": 2, "c": 3}


@pytest.mark.parametrize(("lines", "needles"), [
    (["a cat\tcat.png", "a cat\tother.png"], ["'a cat' is given two different images", "'cat.png'", "'other.png'",
                                              "line 1", "line 2"]),
    (["a cat\tplaying\tjumping"], ["line 1", "more than one TAB but 'playing' is not an image file name", "prompt<TAB>image path<TAB>label"]),
    (["a cat\tcat.png\tx\ty"], ["line 1", "has 3 TABs", "prompt<TAB>image path"]),
    (["\tcat.png"], ["line 1", "no prompt"]),
    (["a cat\tx", "a cat\ty"], ["two different labels", "'x' and 'y'", "line 2"]),
])
def test_bad_lines_are_one_line_errors_naming_the_file_and_line(lines, needles, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VaderError) as exc:
        read_prompt_file(path, key="--prompts")
    msg = _one_line(exc)
    assert f"--prompts={str(path)!r}" in msg
    for needle in needles:
        assert needle in msg, msg


def test_the_same_image_twice_is_no_conflict(tmp_path):
    found = read_prompt_lines(["a cat\tcat.png", "a cat\t./cat.png"], base=tmp_path)
    assert found.images["a cat"].path == tmp_path / "cat.png"


def test_load_prompts_slices_and_keeps_images(tmp_path, tiny_cfg):
    from vader.run import load_prompts

    path = tmp_path / "p.txt"
    path.write_text("a\ta.png\nb\tb.png\nc\n")
    found = load_prompts(tiny_cfg("--prompt_path", str(path), "--start_index", "1"))
    assert found.prompts == ["b", "c"] and set(found.images) == {"b"}
    assert found.images["b"].path == Path(tmp_path).absolute() / "b.png"
