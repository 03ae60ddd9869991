"""Open-Sora v1.2 size tables, frame-count parsing and latent shapes."""

import pytest

from vader import sizes
from vader.errors import VaderError

RATIOS = [
    "3:8", "9:21", "12:25", "1:2", "9:17", "27:50", "9:16", "5:8", "2:3",
    "3:4", "1:1", "4:3", "3:2", "16:9", "17:9", "2:1", "50:27",
]  # fmt: skip


def test_resolutions_are_open_soras_own_tables() -> None:
    assert sizes.RESOLUTIONS == ["144p", "240p", "360p", "480p", "720p", "1080p", "2k", "4k"]
    for resolution in sizes.RESOLUTIONS:
        assert list(sizes.ASPECT_RATIOS[resolution]) == RATIOS


@pytest.mark.parametrize(
    ("resolution", "ratio", "expected"),
    [
        # the sizes VADER runs (design doc section 6); ratios are height:width
        ("240p", "3:4", (276, 368)),
        ("240p", "9:16", (240, 426)),
        ("240p", "1:1", (320, 320)),
        ("240p", "16:9", (426, 240)),
        # one spot check per table, plus the hand-tuned odd entries of aspect.py
        ("144p", "3:8", (117, 312)),
        ("144p", "50:27", (277, 132)),
        ("240p", "2:3", (262, 393)),
        ("240p", "4:3", (370, 278)),
        ("360p", "9:16", (360, 640)),
        ("360p", "27:50", (352, 652)),
        ("480p", "12:25", (444, 925)),
        ("480p", "4:3", (740, 555)),
        ("480p", "9:16", (480, 854)),
        ("720p", "9:16", (720, 1280)),
        ("720p", "2:1", (1358, 680)),
        ("1080p", "9:16", (1080, 1920)),
        ("1080p", "4:3", (1662, 1246)),
        ("2k", "9:21", (1256, 2930)),
        ("4k", "50:27", (4156, 1994)),
    ],
)
def test_image_size_matches_reference(resolution: str, ratio: str, expected: tuple) -> None:
    assert sizes.image_size(resolution, ratio) == expected


def test_full_240p_row_matches_reference() -> None:
    heights_widths = [sizes.image_size("240p", r) for r in RATIOS]
    assert heights_widths == [
        (196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426),
        (252, 404), (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240),
        (440, 232), (452, 226), (462, 222),
    ]  # fmt: skip


def test_bad_resolution_names_the_choices() -> None:
    with pytest.raises(VaderError) as info:
        sizes.image_size("999p", "3:4")
    message = str(info.value)
    assert "resolution" in message and "'999p'" in message
    assert "240p" in message and "1080p" in message
    assert "\n" not in message


def test_bad_aspect_ratio_names_the_choices() -> None:
    with pytest.raises(VaderError) as info:
        sizes.image_size("240p", "4:5")
    message = str(info.value)
    assert "aspect_ratio" in message and "'4:5'" in message
    assert "9:16" in message and "3:4" in message
    assert "\n" not in message


def test_resolution_as_hxw_is_not_accepted() -> None:
    # Open-Sora takes explicit sizes through a separate image_size key, never as a resolution.
    with pytest.raises(VaderError):
        sizes.image_size("276x368", "3:4")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2s", 51), ("4s", 102), ("8s", 204), ("16s", 408), ("32s", 816),
        ("1x", 51), ("2x", 102), ("16x", 816),
        (51, 51), ("51", 51), (1, 1), ("16", 16), (" 4s ", 102),
    ],
)  # fmt: skip
def test_parse_num_frames(value: str | int, expected: int) -> None:
    assert sizes.parse_num_frames(value) == expected


@pytest.mark.parametrize("value", ["3s", "abc", "", "0", 0, -5, "-5", "2.5", 2.5, True, None])
def test_bad_num_frames_names_the_choices(value: object) -> None:
    with pytest.raises(VaderError) as info:
        sizes.parse_num_frames(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert "num_frames" in message and repr(value) in message
    assert "2s" in message and "16s" in message and "positive integer" in message


@pytest.mark.parametrize(
    ("frames", "latent"),
    [(1, 1), (2, 1), (4, 1), (5, 2), (16, 4), (17, 5), (18, 6), (34, 10), (51, 15), (102, 30),
     (204, 60), (408, 120)],
)  # fmt: skip
def test_latent_num_frames(frames: int, latent: int) -> None:
    assert sizes.latent_num_frames(frames) == latent


def test_latent_num_frames_rejects_nonpositive() -> None:
    with pytest.raises(VaderError):
        sizes.latent_num_frames(0)


def test_latent_size_vader_default() -> None:
    height, width = sizes.image_size("240p", "3:4")
    assert sizes.latent_size(51, height, width) == (15, 34, 46)
    assert sizes.latent_size(51, *sizes.image_size("240p", "9:16")) == (15, 30, 53)
    assert sizes.latent_size(1, 320, 320) == (1, 40, 40)


def test_conditioning_fps() -> None:
    assert sizes.conditioning_fps(51) == sizes.FPS == 24
    assert sizes.conditioning_fps(1) == sizes.IMG_FPS == 120


@pytest.mark.parametrize("vae_type", ["OpenSoraVAE_V1_2", "OpenSoraVAE_V1_2-tiny"])
def test_spatial_compression_is_the_vae_presets_own_downsampling(vae_type: str) -> None:
    """config.py refuses image sizes that are not multiples of SPATIAL_COMPRESSION: it must be what
    the VAE really does, for every VAE preset."""
    from vader.config import VAEConfig
    from vader.models.loading import build_on_meta
    from vader.models.presets import vae_config
    from vader.models.vae import VideoVAE

    config = vae_config(VAEConfig(type=vae_type, from_pretrained=None))
    vae = build_on_meta(lambda: VideoVAE(config))
    assert vae.spatial_vae.downsample_factor == config.spatial_factor == sizes.SPATIAL_COMPRESSION
    assert vae.get_latent_size(17, 64, 72)[1:] == (64 // sizes.SPATIAL_COMPRESSION, 72 // sizes.SPATIAL_COMPRESSION)
