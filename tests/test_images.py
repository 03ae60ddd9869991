"""First-frame images (vader.images): reading a file, its size against the video's, a prompt list against
what the model takes, and handing the images to the generator; every refusal one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import vader.backends.opensora as opensora
from vader.errors import VaderError
from vader.images import give_images, image_input, image_problems, read_image, size_problem
from vader.prompts import ImageRef, read_prompt_file


def png(path: Path, width: int = 32, height: int = 32, color=(200, 30, 60), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), color if mode == "RGB" else 128).save(path)
    return path


@pytest.fixture
def model_takes(monkeypatch):
    """The tiny Open-Sora backend as a stand-in model that takes images as asked ("none", "optional",
    "required")."""
    def take(mode: str) -> None:
        monkeypatch.setattr(opensora, "image_input", lambda cfg: mode)

    return take


def _prompts(tmp_path: Path, text: str):
    path = tmp_path / "p.txt"
    path.write_text(text)
    return read_prompt_file(path)


def test_a_backend_without_image_input_is_text_to_video(monkeypatch, tiny_cfg):
    assert image_input(tiny_cfg()) == "none"  # Open-Sora says so
    monkeypatch.delattr(opensora, "image_input")
    assert image_input(tiny_cfg()) == "none"  # a backend that does not say yet


def test_read_image_gives_rgb(tmp_path):
    path = png(tmp_path / "grey.png", mode="L")
    image = read_image(ImageRef("grey.png", path, 1), "p line 1")
    assert image.mode == "RGB" and image.size == (32, 32)


@pytest.mark.parametrize(("make", "needles"), [
    (lambda p: None, ["p.txt' line 3", "image 'x.png' not found", "looked for {path}"]),
    (lambda p: p.mkdir(), ["p.txt' line 3", "is a folder"]),
    (lambda p: p.write_text("not an image"), ["p.txt' line 3", "{path} is not a readable image"]),
    (lambda p: p.write_bytes(png(p.with_name("ok.png"), 64, 64).read_bytes()[:60]),
     ["p.txt' line 3", "{path} is not a readable image"]),
])
def test_read_image_refusals_are_one_line(make, needles, tmp_path):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(VaderError) as exc:
        read_image(ImageRef("x.png", path, 3), "prompt_path='p.txt' line 3")
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle.format(path=path) in msg, msg


def test_size_fits_within_ten_percent_of_the_videos_shape():
    assert size_problem(832, 480, 480, 832) is None
    assert size_problem(1280, 720, 480, 832) is None  # 16:9 vs 832:480 (1.78 vs 1.73): within 10%
    assert size_problem(208, 120, 480, 832) is None  # a quarter on each side
    square = size_problem(640, 640, 480, 832)
    assert "640x640" in square and "832x480" in square and "stretch" in square
    assert "crop it to 640x369 (the video's shape) or make it 832x480" in square
    tall = size_problem(480, 832, 480, 832)
    assert "crop it to 480x277" in tall
    small = size_problem(100, 58, 480, 832)
    assert "smaller than a quarter" in small and "at least 208x120" in small


def test_a_text_to_video_model_refuses_images(tmp_path, tiny_cfg):
    found = _prompts(tmp_path, "a cat\tcat.png\n")  # the file need not exist: refused first
    [msg] = image_problems(tiny_cfg(), found)
    assert "line 1 gives a first-frame image ('cat.png')" in msg
    assert "model.type='STDiT3-tiny' with model.from_pretrained=None is a text-to-video model" in msg
    assert "Wan2.1-I2V" in msg and "Wan2.2-TI2V-5B" in msg and "CogVideoX-5b-I2V" in msg
    assert image_problems(tiny_cfg(), _prompts(tmp_path, "a cat\tplaying\n")) == []  # a label is no image


def test_required_images_name_the_lines_without_one(tmp_path, tiny_cfg, model_takes):
    model_takes("required")
    png(tmp_path / "cat.png")
    found = _prompts(tmp_path, "a cat\tcat.png\na dog\n\na bird\n")
    [msg] = image_problems(tiny_cfg(), found)
    assert "is image-to-video: every prompt needs a first frame" in msg and "lines 2 and 4 have none" in msg
    assert image_problems(tiny_cfg(), _prompts(tmp_path, "a cat\tcat.png\na dog\tcat.png\n")) == []


def test_optional_images_are_for_every_prompt_or_none(tmp_path, tiny_cfg, model_takes):
    model_takes("optional")
    png(tmp_path / "cat.png")
    [msg] = image_problems(tiny_cfg(), _prompts(tmp_path, "a cat\tcat.png\na dog\n"))
    assert "gives a first-frame image for 1 of 2 prompts" in msg and "for every prompt or for none" in msg
    assert "line 2 has none" in msg
    assert image_problems(tiny_cfg(), _prompts(tmp_path, "a cat\na dog\n")) == []
    assert image_problems(tiny_cfg(), _prompts(tmp_path, "a cat\tcat.png\n")) == []


def test_every_bad_file_is_named(tmp_path, tiny_cfg, model_takes):
    model_takes("required")
    png(tmp_path / "wide.png", 64, 32)
    png(tmp_path / "tiny.png", 4, 4)
    (tmp_path / "text.png").write_text("no")
    found = _prompts(tmp_path, "a\tnone.png\nb\twide.png\nc\ttiny.png\nd\ttext.png\n")
    problems = image_problems(tiny_cfg(), found)  # the FAST video: 32x32
    assert len(problems) == 4
    assert "line 1: image 'none.png' not found" in problems[0]
    assert "line 2: image 'wide.png' is 64x32" in problems[1] and "stretch it; crop it to 32x32" in problems[1]
    assert "line 3: image 'tiny.png' is 4x4" in problems[2] and "at least 8x8" in problems[2]
    assert "line 4" in problems[3] and "not a readable image" in problems[3]


def test_training_on_frame_0_only_is_refused(tmp_path, tiny_cfg, model_takes):
    model_takes("optional")
    png(tmp_path / "cat.png")
    found = _prompts(tmp_path, "a cat\tcat.png\n")
    cfg = tiny_cfg("--decode_frame", "0")
    [msg] = image_problems(cfg, found, "train")
    assert "decode_frame='0'" in msg and "reproduces the given image" in msg and "'fml'" in msg and "'-1'" in msg
    assert image_problems(cfg, found, "infer") == []  # inference scores nothing
    assert image_problems(tiny_cfg("--decode_frame", "1"), found, "train") == []
    assert image_problems(tiny_cfg("--decode_frame", "0", "--decode_strategy", "latent"), found, "train")
    assert image_problems(cfg, _prompts(tmp_path, "a cat\n"), "train") == []  # no image: frame 0 is generated


class Recorder:
    def __init__(self):
        self.calls: list[dict] = []

    def set_images(self, images):
        self.calls.append(images)


def test_give_images_hands_rgb_images_keyed_by_prompt(tmp_path, tiny_cfg):
    png(tmp_path / "cat.png", color=(1, 2, 3))
    png(tmp_path / "grey.png", mode="L")
    gen = Recorder()
    images = give_images(gen, tiny_cfg(), _prompts(tmp_path, "a cat\tcat.png\na dog\tgrey.png\tbarking\n"))
    assert gen.calls == [images] and set(images) == {"a cat", "a dog"}
    assert images["a cat"].getpixel((0, 0)) == (1, 2, 3) and images["a dog"].mode == "RGB"
    assert give_images(gen, tiny_cfg(), _prompts(tmp_path, "a cat\n")) == {} and len(gen.calls) == 1
    with pytest.raises(VaderError, match="has no set_images"):
        give_images(object(), tiny_cfg(), _prompts(tmp_path, "a cat\tcat.png\n"))
