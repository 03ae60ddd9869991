"""Open-Sora v1.2 video sizes: resolution x aspect-ratio tables, frame counts, latent shapes.

Aspect ratios are written **height:width**, as Open-Sora does: "9:16" is the landscape 240x426
frame and "16:9" the portrait 426x240. The pixel sizes are the exact values of Open-Sora v1.2's
`datasets/aspect.py` (they are hand-tuned in places, e.g. 480p, so they are data, not a formula).
"""

from __future__ import annotations

import math

from vader.errors import VaderError

FPS = 24  # the fps VADER's configs condition on and save at
IMG_FPS = 120  # Open-Sora conditions single images (num_frames == 1) on this fps instead

# Order of the ratio columns in the table below (H:W, narrowest/landscape first).
_RATIO_NAMES: tuple[str, ...] = (
    "3:8", "9:21", "12:25", "1:2", "9:17", "27:50", "9:16", "5:8", "2:3",
    "3:4", "1:1", "4:3", "3:2", "16:9", "17:9", "2:1", "50:27",
)  # fmt: skip

# resolution -> (height, width) per ratio in _RATIO_NAMES order.
# Only Open-Sora's own "<n>p"/"2k"/"4k" tables are kept: aspect.py's PixArt tables ("256", "512",
# ...) use other ratio keys, so `get_image_size` fails on them for all but one ratio.
_TABLE: dict[str, tuple[tuple[int, int], ...]] = {
    "144p": (
        (117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256),
        (151, 241), (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144),
        (263, 139), (271, 135), (277, 132),
    ),
    "240p": (
        (196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426),
        (252, 404), (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240),
        (440, 232), (452, 226), (462, 222),
    ),
    "360p": (
        (294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640),
        (380, 608), (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360),
        (660, 350), (678, 340), (692, 332),
    ),
    "480p": (
        (392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854),
        (506, 810), (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480),
        (880, 466), (906, 454), (924, 444),
    ),
    "720p": (
        (588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306),
        (720, 1280), (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832),
        (1176, 784), (1280, 720), (1320, 698), (1358, 680), (1386, 666),
    ),
    "1080p": (
        (882, 2352), (942, 2198), (998, 2080), (1018, 2036), (1048, 1980), (1058, 1958),
        (1080, 1920), (1138, 1820), (1176, 1764), (1248, 1664), (1440, 1440), (1662, 1246),
        (1764, 1176), (1920, 1080), (1980, 1048), (2036, 1018), (2078, 998),
    ),
    "2k": (
        (1176, 3136), (1256, 2930), (1330, 2770), (1358, 2716), (1398, 2640), (1412, 2612),
        (1440, 2560), (1518, 2428), (1568, 2352), (1662, 2216), (1920, 1920), (2218, 1664),
        (2352, 1568), (2560, 1440), (2638, 1396), (2716, 1358), (2772, 1330),
    ),
    "4k": (
        (1764, 4704), (1886, 4400), (1996, 4158), (2036, 4072), (2096, 3960), (2118, 3918),
        (2160, 3840), (2276, 3642), (2352, 3528), (2494, 3326), (2880, 2880), (3326, 2494),
        (3528, 2352), (3840, 2160), (3958, 2096), (4072, 2036), (4156, 1994),
    ),
}  # fmt: skip

RESOLUTIONS: list[str] = list(_TABLE)
ASPECT_RATIOS: dict[str, dict[str, tuple[int, int]]] = {
    res: dict(zip(_RATIO_NAMES, sizes, strict=True)) for res, sizes in _TABLE.items()
}

# Open-Sora's named clip lengths (`get_num_frames`); "Ns" assumes 25.5 frames per second of video.
NUM_FRAMES_NAMES: dict[str, int] = {
    "1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816,
}  # fmt: skip

# VAE v1.2 geometry: 8x spatial (SDXL VAE) and 4x temporal compression per 17-frame chunk.
SPATIAL_COMPRESSION = 8
MICRO_FRAME_SIZE = 17
TIME_COMPRESSION = 4


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in pixels for an Open-Sora resolution name and H:W aspect ratio."""
    table = ASPECT_RATIOS.get(resolution)
    if table is None:
        choices = ", ".join(RESOLUTIONS)
        raise VaderError(f"resolution={resolution!r} is not known; choose one of {choices}")
    size = table.get(aspect_ratio)
    if size is None:
        choices = ", ".join(table)
        raise VaderError(
            f"aspect_ratio={aspect_ratio!r} is not known (height:width); choose one of {choices}"
        )
    return size


def parse_num_frames(value: str | int) -> int:
    """Frame count from an int, a digit string ("51") or a named length ("2s" -> 51)."""
    # bool is an int subclass; `num_frames=True` is a config mistake, not 1 frame.
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip() in NUM_FRAMES_NAMES:
        count = NUM_FRAMES_NAMES[value.strip()]
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    else:
        count = 0
    if count <= 0:
        names = ", ".join(NUM_FRAMES_NAMES)
        raise VaderError(f"num_frames={value!r} is not valid; use a positive integer or one of {names}")
    return count


def latent_num_frames(
    num_frames: int,
    micro_frame_size: int = MICRO_FRAME_SIZE,
    time_compression: int = TIME_COMPRESSION,
) -> int:
    """Latent frames the VAE makes from `num_frames` pixel frames (1->1, 16->4, 17->5, 51->15).

    The temporal VAE encodes each `micro_frame_size` chunk separately, front-padding it to a
    multiple of `time_compression`, so a full 17-frame chunk costs ceil(17/4) = 5 latent frames.
    """
    if num_frames <= 0:
        raise VaderError(f"num_frames={num_frames!r} is not valid; use a positive integer")
    full_chunks, remainder = divmod(num_frames, micro_frame_size)
    per_chunk = math.ceil(micro_frame_size / time_compression)
    return full_chunks * per_chunk + math.ceil(remainder / time_compression)


def latent_size(
    num_frames: int,
    height: int,
    width: int,
    micro_frame_size: int = MICRO_FRAME_SIZE,
    time_compression: int = TIME_COMPRESSION,
    spatial_compression: int = SPATIAL_COMPRESSION,
) -> tuple[int, int, int]:
    """(T, H, W) of the VAE latent for a clip; spatial sizes floor (276 px -> 34 latent rows)."""
    frames = latent_num_frames(num_frames, micro_frame_size, time_compression)
    return frames, height // spatial_compression, width // spatial_compression


def conditioning_fps(num_frames: int, fps: int = FPS) -> int:
    """The fps STDiT3 is conditioned on: Open-Sora swaps in IMG_FPS for single images."""
    return fps if num_frames > 1 else IMG_FPS
