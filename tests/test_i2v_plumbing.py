"""Image-to-video plumbing, on the tiny Open-Sora model standing in for an image-to-video backend (its
module's `image_input` patched, its generator given a `set_images` that records the calls):

- bad image prompts through the real CLI (train, infer, run, eval): one `vader: error:` line, exit status
  2, nothing created (the preflight names them before a run folder exists);
- train setup, validation, infer and eval hand the generator the prompts' images (`set_images`) before
  anything is sampled, keyed by prompt, RGB as in the files;
- `vader plan` reads no image file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, TINY_INFER, TINY_TRAIN
from one_line import assert_one_line_error, tree
from PIL import Image

import vader.backends.opensora as opensora
from vader.cli import main
from vader.config import load_config

TRAIN, INFER = str(TINY_TRAIN), str(TINY_INFER)
BASE = [*FAST, "--max_train_steps", "1", "--project_dir", "{pd}"]
COLORS = {"a red fox": (220, 40, 30), "a blue cube": (20, 60, 230)}


def png(path: Path, width: int = 32, height: int = 32, color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


class Recorded:
    """What the stand-in image-to-video generator saw: set_images calls, in order with its sampling."""

    def __init__(self):
        self.events: list[str] = []
        self.images: list[dict] = []


@pytest.fixture
def i2v(monkeypatch):
    """i2v(mode): the tiny Open-Sora backend takes images as `mode` says; returns the recorder."""
    seen = Recorded()

    def set_images(self, images):
        seen.events.append("set_images")
        seen.images.append(dict(images))

    sample = opensora.OpenSoraGenerator.sample_latents

    def sample_latents(self, prompts, *args, **kwargs):
        seen.events.append("sample")
        return sample(self, prompts, *args, **kwargs)

    monkeypatch.setattr(opensora.OpenSoraGenerator, "set_images", set_images, raising=False)
    monkeypatch.setattr(opensora.OpenSoraGenerator, "sample_latents", sample_latents)

    def take(mode: str) -> Recorded:
        monkeypatch.setattr(opensora, "image_input", lambda cfg: mode)
        return seen

    return take


def _inputs(folder: Path) -> None:
    """Prompts files and images the rows name ({in}/...)."""
    png(folder / "frames" / "cat.png")
    png(folder / "frames" / "wide.png", 64, 32)
    png(folder / "frames" / "tiny.png", 4, 4)
    (folder / "frames" / "text.png").write_text("not an image")
    files = {
        "t2v_image.txt": "a cat\tframes/cat.png\n",
        "one_missing.txt": "a cat\tframes/cat.png\na dog\n",
        "no_file.txt": "a cat\tframes/none.png\n",
        "not_image.txt": "a cat\tframes/text.png\n",
        "wide.txt": "a cat\tframes/wide.png\n",
        "tiny.txt": "a cat\tframes/tiny.png\n",
        "ok.txt": "a cat\tframes/cat.png\n",
        "two_images.txt": "a cat\tframes/cat.png\na cat\tframes/wide.png\n",
        "plain.txt": "a cat\na dog\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)


# (id, what the model takes, argv, needles); train/infer/run rows get BASE before their own arguments
CASES: list[tuple[str, str, list[str], list[str]]] = [
    ("images for a text-to-video model", "none", ["train", TRAIN, "--prompt_path", "{in}/t2v_image.txt"],
     ["t2v_image.txt' line 1 gives a first-frame image ('frames/cat.png')", "is a text-to-video model",
      "Wan2.1-I2V", "CogVideoX-5b-I2V"]),
    ("required image missing", "required", ["infer", INFER, "--prompt_path", "{in}/one_missing.txt"],
     ["is image-to-video: every prompt needs a first frame", "one_missing.txt' line 2 has none"]),
    ("optional images on some lines", "optional", ["run", TRAIN, "--prompt_path", "{in}/one_missing.txt"],
     ["gives a first-frame image for 1 of 2 prompts", "for every prompt or for none", "line 2"]),
    ("image file missing", "optional", ["train", TRAIN, "--prompt_path", "{in}/no_file.txt"],
     ["no_file.txt' line 1: image 'frames/none.png' not found", "{in}/frames/none.png"]),
    ("not an image", "required", ["infer", INFER, "--prompt_path", "{in}/not_image.txt"],
     ["line 1", "frames/text.png is not a readable image"]),
    ("wrong shape", "required", ["run", INFER, "--prompt_path", "{in}/wide.txt"],
     ["image 'frames/wide.png' is 64x32", "the video is 32x32", "crop it to 32x32"]),
    ("too small", "optional", ["train", TRAIN, "--prompt_path", "{in}/tiny.txt"],
     ["image 'frames/tiny.png' is 4x4", "smaller than a quarter", "at least 8x8"]),
    ("decode_frame 0", "optional", ["train", TRAIN, "--prompt_path", "{in}/ok.txt", "--decode_frame", "0"],
     ["decode_frame='0'", "reproduces the given image", "'fml'"]),
    ("two images for one prompt", "optional", ["infer", INFER, "--prompt_path", "{in}/two_images.txt"],
     ["'a cat' is given two different images", "line 1", "line 2"]),
    ("a config prompt list", "required", ["train", TRAIN, "--prompt", "['a cat', 'a dog\\tnone.png']"],
     ["every prompt needs a first frame", "prompt[0] has none", "prompt[1]: image 'none.png' not found", "relative to the working directory"]),
    ("eval: images for a text-to-video model", "none",
     ["eval", TRAIN, "--lora", "{lora}", "--seeds", "1", "--prompts", "{in}/t2v_image.txt", *FAST,
      "--project_dir", "{pd}"], ["gives a first-frame image", "is a text-to-video model"]),
    ("eval: required image missing", "required",
     ["eval", TRAIN, "--lora", "{lora}", "--seeds", "1", "--prompts", "{in}/one_missing.txt", *FAST,
      "--project_dir", "{pd}"], ["every prompt needs a first frame", "one_missing.txt' line 2 has none"]),
    ("eval: the config's prompts", "required",
     ["eval", TRAIN, "--lora", "{lora}", "--seeds", "1", *FAST, "--project_dir", "{pd}"],
     ["every prompt needs a first frame", "prompts.txt' lines 1, 2, 3, 4 and 5 (and", "more) have none"]),
]


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A 1-step tiny text-to-video run's lora/ folder (eval's rows load it)."""
    from vader.train import train

    root = tmp_path_factory.mktemp("i2vlora")
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(root), "--run_name", "run", "--max_train_steps", "1"])
    return train(cfg) / "lora"


@pytest.mark.parametrize(("mode", "argv", "needles"), [pytest.param(m, a, n, id=i) for i, m, a, n in CASES])
def test_bad_image_prompts_are_one_line_exit_2_and_create_nothing(mode, argv, needles, i2v, lora, tmp_path, capsys):
    seen = i2v(mode)
    inputs, project = tmp_path / "in", tmp_path / "pd"
    _inputs(inputs)

    def fill(a: str) -> str:
        return a.replace("{in}", str(inputs)).replace("{pd}", str(project)).replace("{lora}", str(lora))

    argv = [fill(a) for a in argv]
    if argv[0] != "eval":
        argv = [argv[0], argv[1], *map(fill, BASE), *argv[2:]]
    before = tree(tmp_path)
    code = main(argv)
    assert_one_line_error(code, capsys.readouterr().err, [fill(n) for n in needles])
    assert tree(tmp_path) == before, "a refused start left files behind"
    assert seen.events == []


def _same_image(a: Image.Image, color) -> bool:
    return a.mode == "RGB" and a.size == (32, 32) and a.getpixel((5, 5)) == color


def test_train_validation_and_eval_give_the_generator_its_images_first(i2v, tmp_path, capsys):
    """Training 2 steps on an image prompts file (validation on), then `vader eval` of its LoRA on held-out
    image prompts: each builds the generator once and hands it the images before the first sample."""
    from vader.train import train

    seen = i2v("optional")
    for i, color in enumerate(COLORS.values()):
        png(tmp_path / "frames" / f"{i}.png", color=color)
    (tmp_path / "train.txt").write_text("a red fox\tframes/0.png\na blue cube\tframes/1.png\tplaying\n")
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(tmp_path / "runs"), "--run_name", "r",
                                   "--prompt_path", str(tmp_path / "train.txt"), "--max_train_steps", "2",
                                   "--is_sample_preview", "True", "--num_val_runs", "1"])
    run = train(cfg)
    assert (run / "lora").is_dir() and any((run / "samples").rglob("*.mp4"))
    assert seen.events[0] == "set_images" and seen.events.count("set_images") == 1 and "sample" in seen.events
    [images] = seen.images
    assert set(images) == set(COLORS) and all(_same_image(images[p], c) for p, c in COLORS.items())

    seen.events.clear()
    seen.images.clear()
    png(tmp_path / "held" / "green.png", color=(10, 200, 20))
    (tmp_path / "held" / "heldout.txt").write_text("a green frog\tgreen.png\n")
    code = main(["eval", TRAIN, "--lora", str(run / "lora"), "--seeds", "1", "--prompts",
                 str(tmp_path / "held" / "heldout.txt"), *FAST, "--project_dir", str(tmp_path / "ev"),
                 "--run_name", "e"])
    out = capsys.readouterr().out
    assert code == 0
    assert seen.events[0] == "set_images" and seen.events.count("set_images") == 1
    [images] = seen.images
    assert list(images) == ["a green frog"] and _same_image(images["a green frog"], (10, 200, 20))
    assert "1 of 1 prompt(s) with a first-frame image" in out
    folder = tmp_path / "ev" / "eval" / "e"
    data = json.loads((folder / "eval.json").read_text())
    image = str(tmp_path / "held" / "green.png")
    assert data["images"] == {"a green frog": image} and data["per_prompt"][0]["image"] == image
    assert "with a first-frame image" in (folder / "report.html").read_text()


def test_infer_gives_the_generator_its_images_first(i2v, tmp_path):
    from vader.infer import infer

    seen = i2v("required")
    png(tmp_path / "cat.png", color=(1, 2, 3))
    (tmp_path / "p.txt").write_text("a cat\tcat.png\n")
    cfg = load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path / "runs"), "--prompt_path",
                                   str(tmp_path / "p.txt"), "--num_val_runs", "1", "--val_batch_size", "1"])
    paths = infer(cfg)
    assert len(paths) == 1 and paths[0].is_file()
    assert seen.events == ["set_images", "sample"]
    assert list(seen.images[0]) == ["a cat"] and seen.images[0]["a cat"].getpixel((0, 0)) == (1, 2, 3)


def test_text_prompts_give_no_images(i2v, tmp_path):
    from vader.infer import infer

    seen = i2v("optional")
    cfg = load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path / "runs"), "--num_val_runs", "1",
                                   "--val_batch_size", "1"])
    infer(cfg)
    assert seen.events == ["sample"]


def test_plan_reads_no_image_file(i2v, tmp_path):
    from vader.plan import _plan_prompts

    i2v("required")
    (tmp_path / "p.txt").write_text("a cat\tnowhere/cat.png\na dog\tnowhere/dog.png\n")
    cfg = load_config(TINY_TRAIN, [*FAST, "--prompt_path", str(tmp_path / "p.txt"), "--train_batch_size", "2"])
    assert _plan_prompts(cfg) == (["a cat", "a dog"], {})


def test_wan_ti2v_trains_on_image_prompts_and_evaluates_end_to_end(tmp_path, capsys):
    """The real thing on a tiny random Wan2.2-TI2V-5B folder (tests/wan_i2v_tiny.py): `vader train` 2 steps on
    an image prompts file (every prompt with its first frame), then `vader eval` of its LoRA on them."""
    pytest.importorskip("diffusers")
    from backend_tiny import PROMPTS, tiny_config_text
    from wan_i2v_tiny import save_tiny_wan_ti2v, tiny_images

    folder = save_tiny_wan_ti2v(tmp_path / "ti2v")
    lines = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, tiny_images(len(PROMPTS), size=(40, 40)))):
        image.save(tmp_path / f"first{i}.png")
        lines.append(f"{prompt}\tfirst{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    config = tmp_path / "ti2v.py"
    config.write_text(tiny_config_text("wan", folder, project_dir=str(tmp_path / "runs"), prompt=None,
                                       prompt_path=str(tmp_path / "prompts.txt"), max_train_steps=2,
                                       checkpointing_steps=0, is_sample_preview=False))
    assert main(["train", str(config), "--run_name", "r", "--verbose", "0"]) == 0
    lora = tmp_path / "runs" / "r" / "lora"
    assert (lora / "adapter_model.safetensors").is_file()
    assert main(["eval", str(config), "--lora", str(lora), "--seeds", "1", "--run_name", "e",
                 "--rewards", "brightness"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 prompt(s) with a first-frame image" in out
    data = json.loads((tmp_path / "runs" / "eval" / "e" / "eval.json").read_text())
    assert set(data["images"]) == set(PROMPTS) and data["rewards"]["brightness"]["n"] == 2
    # a prompt without its image is refused before anything is made (optional: every prompt or none)
    (tmp_path / "mixed.txt").write_text(f"{lines[0]}\n{PROMPTS[1]}\n")
    before = tree(tmp_path)
    code = main(["infer", str(config), "--prompt_path", str(tmp_path / "mixed.txt"), "--run_name", "i"])
    assert_one_line_error(code, capsys.readouterr().err, ["takes an image for every prompt or for none",
                                                          "mixed.txt' line 2 has none"])
    assert tree(tmp_path) == before
