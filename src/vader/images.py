"""First-frame images for image-to-video models: what a backend takes, reading the files a prompts file
names, checking them against the model and the video size, and handing them to the generator.

A backend module says what it takes with `image_input(cfg)`: "none" (text-to-video), "optional" (a
prompts file gives a first frame for every prompt or for none: Wan2.2-TI2V-5B) or "required" (every
prompt needs one: Wan2.1-I2V, CogVideoX-5B-I2V). `image_problems` is the preflight's part (train, infer,
run, eval): every mistake one line, before a run folder or a model exists. `give_images` hands the
images to a built generator (`set_images`), which resizes and encodes them as its pipeline does.

An image's size must fit the video's: its aspect ratio within 10% of the video's height:width (the
pipelines resize to the video size, so a different shape is stretched), and each side at least a quarter
of the video's (a smaller image is mostly upsampling blur).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vader.backends import backend_module
from vader.errors import VaderError
from vader.prompts import FORMAT_HINT, ImageRef, PromptList

if TYPE_CHECKING:
    from PIL import Image

IMAGE_INPUTS = ("none", "optional", "required")
ASPECT_TOLERANCE = 0.10  # an image's width/height may differ from the video's by this fraction
MIN_SIDE_FRACTION = 4  # each side at least 1/4 of the video's
I2V_CHOICES = ("model.type='wan' with model.from_pretrained='Wan-AI/Wan2.1-I2V-14B-480P-Diffusers' (or -720P) or "
               "'Wan-AI/Wan2.2-TI2V-5B-Diffusers', model.type='cogvideox' with model.from_pretrained="
               "'THUDM/CogVideoX-5b-I2V', or model.type='ltx' (LTX-Video 2B)")
SCORED_CHOICES = "'-1' (a random frame), an index from 1, 'fml', 'all' or 'alt'"
MOST_LISTED = 5  # image problems named one by one in a message; the rest are counted


def image_input(cfg) -> str:  # type: ignore[no-untyped-def]
    """What the config's model takes: 'none', 'optional' or 'required' (a backend module without
    `image_input` is text-to-video)."""
    ask = getattr(backend_module(cfg.backend), "image_input", None)
    mode = "none" if ask is None else ask(cfg)
    if mode not in IMAGE_INPUTS:
        raise ValueError(f"backend {cfg.backend!r}: image_input returned {mode!r}, not one of {IMAGE_INPUTS}")
    return mode


def model_name(cfg) -> str:  # type: ignore[no-untyped-def]
    return f"model.type={cfg.model.type!r} with model.from_pretrained={cfg.model.from_pretrained!r}"


# ---- one image --------------------------------------------------------------------------------------


def read_image(ref: ImageRef, where: str, relative_to: str = "the prompts file's folder") -> Image.Image:
    """The file as an RGB image; one-line VaderError for a missing, folder, unreadable or non-image file.
    `where` names the prompts-file line ("prompt_path='p.txt' line 3"), `relative_to` what a relative
    path is relative to."""
    from PIL import Image

    path = ref.path
    if path.is_dir():
        raise VaderError(f"{where}: image {ref.written!r} is a folder ({path}), not an image file")
    if not path.is_file():
        hint = "" if ref.written.startswith(("/", "~")) else f"; a relative path is relative to {relative_to}"
        raise VaderError(f"{where}: image {ref.written!r} not found (looked for {path}{hint})")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.replace(f" {str(path)!r}", "").replace(str(path), "the file")[:120]
        raise VaderError(f"{where}: {path} is not a readable image ({first}); give a .png, .jpg, .webp or .bmp "
                         "file") from None


def size_problem(width: int, height: int, video_height: int, video_width: int) -> str | None:
    """Why a `width`x`height` image does not fit a video of `video_height`x`video_width` pixels (see the
    module docstring), with the size that would; None when it fits."""
    video = f"{video_width}x{video_height}"
    least_w, least_h = math.ceil(video_width / MIN_SIDE_FRACTION), math.ceil(video_height / MIN_SIDE_FRACTION)
    if width < least_w or height < least_h:
        return (f"is {width}x{height} (width x height), smaller than a quarter of the video's {video} on a side: "
                f"give at least {least_w}x{least_h}, best {video}")
    shape, want = width / height, video_width / video_height
    if abs(shape / want - 1) <= ASPECT_TOLERANCE:
        return None
    if shape > want:  # too wide: keep the height
        crop_w, crop_h = max(1, round(height * want)), height
    else:
        crop_w, crop_h = width, max(1, round(width / want))
    fix = f"crop it to {video}" if (crop_w, crop_h) == (video_width, video_height) else \
        f"crop it to {crop_w}x{crop_h} (the video's shape) or make it {video}"
    return (f"is {width}x{height} (width x height, aspect {shape:.2f}) but the video is {video} (aspect {want:.2f}), "
            f"more than {ASPECT_TOLERANCE:.0%} apart: the pipeline would stretch it; {fix}")


# ---- a prompt list against the model ------------------------------------------------------------------


def _relative_to(found: PromptList) -> str:
    return "the prompts file's folder" if found.in_file else "the working directory"


def _have(lines: list[int]) -> str:
    return "has" if len(lines) == 1 else "have"


def _unique(found: PromptList) -> list[str]:
    return list(dict.fromkeys(found.prompts))


def image_problems(cfg, found: PromptList, command: str = "infer") -> list[str]:  # type: ignore[no-untyped-def]
    """Every problem of `found`'s images for the config's model, each one line: images for a
    text-to-video model, a required image missing, images for only some prompts of an 'optional'
    model, each image file (missing, unreadable, wrongly sized) and, for `train`, a decode_frame that
    scores only frame 0 (the given image). Reads the images; creates nothing."""
    mode = image_input(cfg)
    prompts = _unique(found)
    given = [p for p in prompts if p in found.images]
    missing = sorted(found.lines[p] for p in prompts if p not in found.images)
    if mode == "none":
        if not given:
            return []
        first = found.images[given[0]]
        return [f"{found.where(first.line)} gives a first-frame image ({first.written!r}) but {model_name(cfg)} is "
                f"a text-to-video model and takes no image; for image-to-video choose {I2V_CHOICES}, or remove the "
                "images from the prompts"]
    problems = []
    if mode == "required" and missing:
        problems.append(f"{model_name(cfg)} is image-to-video: every prompt needs a first frame "
                        f"(prompt<TAB>image path), but {found.where_lines(missing)} {_have(missing)} none")
    if mode == "optional" and given and missing:
        problems.append(f"{found.source} gives a first-frame image for {len(given)} of {len(prompts)} prompts but "
                        f"{model_name(cfg)} takes an image for every prompt or for none; "
                        f"{found.where_lines(missing)} {_have(missing)} none (add images there, or remove them all "
                        "for text-to-video)")
    height, width = cfg.height_width
    files = []
    for prompt in given:
        ref = found.images[prompt]
        where = found.where(ref.line)
        try:
            image = read_image(ref, where, _relative_to(found))
        except VaderError as exc:
            files.append(str(exc))
            continue
        problem = size_problem(image.width, image.height, height, width)
        if problem:
            files.append(f"{where}: image {ref.written!r} {problem}")
    if len(files) > MOST_LISTED:
        files = [*files[:MOST_LISTED], f"{len(files) - MOST_LISTED} more image(s) with problems"]
    problems += files
    if command == "train" and given:
        problems += decode_frame_problems(cfg, found)
    return problems


def decode_frame_problems(cfg, found: PromptList) -> list[str]:  # type: ignore[no-untyped-def]
    """Training on image prompts with a decode_frame that only ever scores frame 0 where frame 0 is the given
    image's latent (Wan2.2-TI2V, LTX-Video): the reward would see no generated frame and give no gradient.
    A backend whose frame 0 is generated says so with `first_frame_generated(cfg)` (Wan2.1-I2V, CogVideoX-I2V)."""
    from vader.frames import max_decode_index

    ask = getattr(backend_module(cfg.backend), "first_frame_generated", None)
    if ask is not None and ask(cfg):  # frame 0 is sampled (conditioned on the image): scoring it trains the model
        return []
    last = max_decode_index(cfg.decode_strategy, cfg.frames, cfg.vae.micro_frame_size)
    if last == 0:
        unit = "frame" if cfg.decode_strategy != "latent" else "latent frame (decode_strategy='latent')"
        return [f"num_frames={cfg.frames} with first-frame images ({found.source}): the video's only {unit} "
                "reproduces the given image, so the reward would see no generated frame; generate more frames"]
    if cfg.decode_frame == "0":
        return [f"decode_frame='0' with first-frame images ({found.source}): frame 0 reproduces the given image, "
                f"so the reward would score no generated frame; choose {SCORED_CHOICES}"]
    return []


def check_images(cfg, found: PromptList, command: str = "infer") -> None:  # type: ignore[no-untyped-def]
    """`image_problems` as one VaderError line (none: returns)."""
    problems = image_problems(cfg, found, command)
    if problems:
        raise VaderError("; also: ".join(" ".join(p.split()) for p in problems))


# ---- to the generator -----------------------------------------------------------------------------------


def load_images(found: PromptList) -> dict[str, Image.Image]:
    """{prompt: RGB image} for every prompt of `found` that gives one."""
    return {prompt: read_image(ref, found.where(ref.line), _relative_to(found)) for prompt, ref in found.images.items()}


def give_images(gen, cfg, found: PromptList) -> dict[str, Image.Image]:  # type: ignore[no-untyped-def]
    """Hand `found`'s first-frame images to a built generator (`set_images`, before any prompt with an
    image is sampled); nothing when the prompts give none. Returns what was handed over."""
    if not found.images:
        return {}
    set_images = getattr(gen, "set_images", None)
    if set_images is None:
        raise VaderError(f"{found.source} gives first-frame images but this version's generator for {model_name(cfg)} "
                         f"cannot take them (it has no set_images); the format is {FORMAT_HINT}")
    images = load_images(found)
    set_images(images)
    return images


__all__ = ["ASPECT_TOLERANCE", "I2V_CHOICES", "IMAGE_INPUTS", "check_images", "decode_frame_problems", "give_images",
           "image_input", "image_problems", "load_images", "read_image", "size_problem"]
