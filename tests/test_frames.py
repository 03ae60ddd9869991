"""`decode_frame` selection and decoding only the chosen frames (exact and the original's latent shortcut)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from vader.frames import decode_selected, latent_index_of_frame, select_frames
from vader.models.vae import VideoVAE, tiny_vae_config

# 8 x 16 pixels -> 1 x 2 latents: non-square so an H/W mix-up shows, and cheap to decode.
H, W = 8, 16


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(tiny_vae_config()).eval()


@pytest.fixture(scope="module")
def full_decode(vae: VideoVAE):
    """num_frames -> (latents [2, 4, T, h, w], their full decode), computed once per length."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_frames not in cache:
            z = latents(vae, num_frames, batch=2)
            with torch.no_grad():
                cache[num_frames] = z, vae.decode(z, num_frames)
        return cache[num_frames]

    return get


def latents(vae: VideoVAE, num_frames: int, batch: int = 1, seed: int = 0, h: int = H, w: int = W) -> torch.Tensor:
    t, lh, lw = vae.get_latent_size(num_frames, h, w)
    return torch.randn(batch, 4, t, lh, lw, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# select_frames


def test_random_frame_is_seeded_and_in_range() -> None:
    for seed in range(20):
        first = select_frames("-1", 17, random.Random(seed))
        assert first == select_frames("-1", 17, random.Random(seed))
        assert len(first) == 1 and 0 <= first[0] < 17
    seen = {select_frames("-1", 17, random.Random(seed))[0] for seed in range(50)}
    assert len(seen) > 5  # different seeds pick different frames


def test_random_frame_consumes_the_given_rng() -> None:
    rng = random.Random(0)
    picks = [select_frames("-1", 51, rng)[0] for _ in range(20)]
    assert len(set(picks)) > 5 and all(0 <= p < 51 for p in picks)


def test_random_frame_of_a_one_frame_video() -> None:
    assert select_frames("-1", 1, random.Random(3)) == [0]


@pytest.mark.parametrize(("mode", "expected"), [("0", [0]), ("7", [7]), ("16", [16])])
def test_fixed_frame(mode: str, expected: list[int]) -> None:
    assert select_frames(mode, 17, random.Random(0)) == expected


@pytest.mark.parametrize("mode", ["17", "40"])
def test_fixed_frame_out_of_range_raises(mode: str) -> None:
    with pytest.raises(ValueError, match="outside 0..16"):
        select_frames(mode, 17, random.Random(0))


@pytest.mark.parametrize(
    ("num_frames", "expected"),
    [(17, [0, 8, 16]), (16, [0, 8, 15]), (51, [0, 25, 50]), (3, [0, 1, 2]), (2, [0, 1]), (1, [0])],
)
def test_first_middle_last(num_frames: int, expected: list[int]) -> None:
    assert select_frames("fml", num_frames, random.Random(0)) == expected


def test_all_and_alt() -> None:
    rng = random.Random(0)
    assert select_frames("all", 5, rng) == [0, 1, 2, 3, 4]
    assert select_frames("alt", 5, rng) == [0, 2, 4]
    assert select_frames("alt", 6, rng) == [0, 2, 4]
    assert select_frames("alt", 1, rng) == [0]
    assert select_frames("all", 17, rng) == list(range(17))


# ---------------------------------------------------------------------------------------------
# latent_index_of_frame


def test_latent_index_for_whole_chunks() -> None:
    expected = {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 8: 2, 9: 3, 12: 3, 13: 4, 16: 4, 17: 5, 18: 6, 21: 6, 33: 9, 34: 10}
    for frame, latent in expected.items():
        assert latent_index_of_frame(frame, 17) == latent, frame
        assert latent_index_of_frame(frame) == latent, frame  # 17 is the default
        assert latent_index_of_frame(frame, 17, num_frames=51) == latent, frame


def test_latent_index_for_a_short_last_chunk() -> None:
    # 16 frames (the Open-Sora config's default) -> 4 latents, no front padding: frame f comes from f // 4
    assert [latent_index_of_frame(f, 17, num_frames=16) for f in range(16)] == [f // 4 for f in range(16)]
    # 23 frames: a whole chunk (latents 0-4) + 6 frames padded by 2 -> latents 5 (frames 17, 18) and 6
    assert [latent_index_of_frame(f, 17, num_frames=23) for f in range(17, 23)] == [5, 5, 6, 6, 6, 6]


@pytest.fixture(scope="module")
def causal_vae() -> VideoVAE:
    """The tiny VAE's temporal path alone, made strictly causal.

    GroupNorm mixes all frames of a chunk, so it is removed; the spatial decoder works frame by
    frame, so it is skipped (decode then returns the temporal VAE's output).
    """
    torch.manual_seed(1)
    vae = VideoVAE(tiny_vae_config()).eval()
    for module in list(vae.temporal_vae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    vae.spatial_vae.decode = lambda x: x
    return vae


@pytest.mark.parametrize("num_frames", [5, 16, 17, 23, 34])
def test_latent_index_is_the_causal_right_edge_of_the_real_decoder(causal_vae: VideoVAE, num_frames: int) -> None:
    """Perturb one latent frame at a time; the last latent that changes output frame f is f's latent."""
    z = latents(causal_vae, num_frames, h=8, w=8, seed=2)
    with torch.no_grad():
        base = causal_vae.decode(z, num_frames)
        assert base.shape[2] == num_frames
        edge = [-1] * num_frames
        for j in range(z.shape[2]):
            bumped = z.clone()
            bumped[:, :, j] += 1.0
            changed = (causal_vae.decode(bumped, num_frames) - base).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
            for f in changed.nonzero().flatten().tolist():
                edge[f] = max(edge[f], j)
    assert edge == [latent_index_of_frame(f, 17, num_frames) for f in range(num_frames)]


# ---------------------------------------------------------------------------------------------
# decode_selected


@pytest.mark.parametrize(
    ("num_frames", "frames"),
    [(17, [0, 8, 16]), (17, [5]), (34, [3, 16, 17, 30]), (34, [20, 33]), (34, list(range(0, 34, 3)))],
)
def test_exact_decode_equals_full_decode_indexed(vae: VideoVAE, full_decode, num_frames: int, frames: list[int]) -> None:
    z, full = full_decode(num_frames)
    with torch.no_grad():
        picked = decode_selected(vae, z, num_frames, frames, "exact")
    assert picked.shape == (2, 3, len(frames), H, W)
    torch.testing.assert_close(picked, full[:, :, frames], atol=1e-5, rtol=1e-5)


def test_exact_decode_gradient_reaches_only_the_chunks_used(vae: VideoVAE) -> None:
    z = latents(vae, 34).requires_grad_(True)
    decode_selected(vae, z, 34, [20, 33], "exact").square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad[:, :, :5].abs().sum() == 0  # the first chunk holds none of the frames
    assert (z.grad[:, :, 5:].abs().sum(dim=(0, 1, 3, 4)) > 0).all()


def test_exact_decode_gradient_across_chunks(vae: VideoVAE) -> None:
    z = latents(vae, 34).requires_grad_(True)
    decode_selected(vae, z, 34, [0, 16, 17], "exact").sum().backward()
    assert z.grad[:, :, :5].abs().sum() > 0 and z.grad[:, :, 5:].abs().sum() > 0


@pytest.mark.parametrize(("num_frames", "frames"), [(17, [0, 8, 16]), (16, [0, 5, 15]), (34, [2, 17, 33])])
def test_latent_decode_is_one_latent_per_frame(vae: VideoVAE, num_frames: int, frames: list[int]) -> None:
    z = latents(vae, num_frames).requires_grad_(True)
    out = decode_selected(vae, z, num_frames, frames, "latent")
    assert out.shape == (1, 3, len(frames), H, W)
    with torch.no_grad():
        for k, f in enumerate(frames):
            i = latent_index_of_frame(f, 17, num_frames)
            assert i < z.shape[2]
            torch.testing.assert_close(out[:, :, k : k + 1], vae.decode_latent_frame(z, i), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    used = {latent_index_of_frame(f, 17, num_frames) for f in frames}
    per_latent = z.grad.abs().sum(dim=(0, 1, 3, 4))
    assert {int(i) for i in per_latent.nonzero().flatten()} == used  # only the chosen latents get gradient


def test_latent_decode_picks_the_documented_latents(vae: VideoVAE) -> None:
    z = latents(vae, 17)
    with torch.no_grad():
        out = decode_selected(vae, z, 17, [0, 4, 5, 16], "latent")
        expected = torch.cat([vae.decode_latent_frame(z, i) for i in (0, 1, 2, 4)], dim=2)
    torch.testing.assert_close(out, expected)
