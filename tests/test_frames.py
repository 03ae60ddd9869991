"""`decode_frame` selection and decoding only the chosen frames (exact and the original's latent shortcut).

With decode_strategy 'exact' indices are output frames; with 'latent' they are latent frames, as in the
original (its decode_frame='N' sliced latent frame N)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from vader.frames import decode_choices, decode_selected, max_decode_index, select_frames
from vader.models.vae import VideoVAE, VideoVAEConfig, tiny_vae_config

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
    with pytest.raises(ValueError, match=r"outside the frames 0\.\.16"):
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
# latent_index_of_frame (the VAE's geometry)

GEOMETRY = VideoVAEConfig()  # chunks of 17 frames, 4x time compression


def test_latent_index_for_whole_chunks() -> None:
    expected = {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 8: 2, 9: 3, 12: 3, 13: 4, 16: 4, 17: 5, 18: 6, 21: 6, 33: 9, 34: 10}
    for frame, latent in expected.items():
        assert GEOMETRY.latent_index_of_frame(frame, 51) == latent, frame
        if frame < 34:
            assert GEOMETRY.latent_index_of_frame(frame, 34) == latent, frame


def test_latent_index_for_a_short_last_chunk() -> None:
    # 16 frames (the Open-Sora config's default) -> 4 latents, no front padding: frame f comes from f // 4
    assert [GEOMETRY.latent_index_of_frame(f, 16) for f in range(16)] == [f // 4 for f in range(16)]
    # 23 frames: a whole chunk (latents 0-4) + 6 frames padded by 2 -> latents 5 (frames 17, 18) and 6
    assert [GEOMETRY.latent_index_of_frame(f, 23) for f in range(17, 23)] == [5, 5, 6, 6, 6, 6]


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
    assert edge == [causal_vae.latent_index_of_frame(f, num_frames) for f in range(num_frames)]


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


@pytest.mark.parametrize(("num_frames", "latents_used"), [(17, [0, 2, 4]), (16, [0, 3]), (34, [2, 5, 9])])
def test_latent_decode_is_each_latent_alone(vae: VideoVAE, num_frames: int, latents_used: list[int]) -> None:
    z = latents(vae, num_frames).requires_grad_(True)
    out = decode_selected(vae, z, num_frames, latents_used, "latent")
    assert out.shape == (1, 3, len(latents_used), H, W)
    with torch.no_grad():
        for k, i in enumerate(latents_used):
            torch.testing.assert_close(out[:, :, k : k + 1], vae.decode(z[:, :, i : i + 1], 1), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    per_latent = z.grad.abs().sum(dim=(0, 1, 3, 4))
    assert {int(i) for i in per_latent.nonzero().flatten()} == set(latents_used)  # only those latents get gradient


# ---------------------------------------------------------------------------------------------
# 'latent' strategy: indices are latent frames, as in the original


@pytest.mark.parametrize(("num_frames", "latent_frames"), [(1, 1), (16, 4), (17, 5), (23, 7), (51, 15), (102, 30)])
def test_latent_strategy_chooses_among_latent_frames(vae: VideoVAE, num_frames: int, latent_frames: int) -> None:
    assert decode_choices("latent", num_frames, vae) == latent_frames == vae.latent_frames(num_frames)
    assert decode_choices("latent", num_frames) == latent_frames  # the published VAE's geometry
    assert decode_choices("exact", num_frames, vae) == num_frames
    assert max_decode_index("latent", num_frames) == latent_frames - 1
    assert max_decode_index("exact", num_frames) == num_frames - 1
    rng = random.Random(0)
    assert select_frames("all", num_frames, rng, "latent", vae) == list(range(latent_frames))
    assert select_frames("alt", num_frames, rng, "latent", vae) == list(range(0, latent_frames, 2))
    assert select_frames("fml", num_frames, rng, "latent", vae) == sorted({0, latent_frames // 2, latent_frames - 1})
    assert select_frames(str(latent_frames - 1), num_frames, rng, "latent", vae) == [latent_frames - 1]


def test_max_decode_index_follows_the_chunk_length() -> None:
    assert max_decode_index("latent", 51, micro_frame_size=17) == 14
    assert max_decode_index("latent", 51, micro_frame_size=51) == 12  # one chunk: ceil(51 / 4) = 13 latents
    assert max_decode_index("latent", 51, micro_frame_size=51) == VideoVAEConfig(micro_frame_size=51).latent_frames(51) - 1


def test_latent_strategy_index_past_the_latents_is_rejected(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match=r"outside the latent frames 0\.\.14"):
        select_frames("15", 51, random.Random(0), "latent", vae)
    with pytest.raises(ValueError, match="decode_strategy"):
        select_frames("1", 51, random.Random(0), "pixels", vae)


def test_latent_strategy_random_frame_is_uniform_over_latents(vae: VideoVAE) -> None:
    """The original drew `random.randint(0, T - 1)` over the T latent frames: every latent equally often."""
    rng = random.Random(0)
    picks = [select_frames("-1", 51, rng, "latent", vae)[0] for _ in range(3000)]
    counts = [picks.count(i) for i in range(15)]
    assert min(counts) > 130 and max(counts) < 270  # 200 expected each; an output frame mapped to its
    # latent would give latent 0 only 1/51 of the picks (about 59)


# ---------------------------------------------------------------------------------------------
# the chosen frame is the frame decoded (not always frame 0)


def frame_dependent_latents(vae: VideoVAE, num_frames: int) -> torch.Tensor:
    """Latents whose every latent frame is clearly different (a ramp along time plus noise)."""
    z = latents(vae, num_frames, seed=5)
    ramp = torch.linspace(-2.0, 2.0, z.shape[2])[None, None, :, None, None]
    return z + ramp


@pytest.mark.parametrize("index", [0, 7, 16, 20, 33])
def test_exact_decode_frame_n_is_output_frame_n(vae: VideoVAE, index: int) -> None:
    z = frame_dependent_latents(vae, 34)
    with torch.no_grad():
        full = vae.decode(z, 34)
        frames = select_frames(str(index), 34, random.Random(0), "exact", vae)
        picked = decode_selected(vae, z, 34, frames, "exact")
    assert frames == [index]
    torch.testing.assert_close(picked, full[:, :, index : index + 1], atol=1e-5, rtol=1e-5)
    others = [f for f in range(34) if f != index]
    distance = (full[:, :, others] - picked).abs().amax(dim=(0, 1, 3, 4))
    assert distance.min() > 1e-3  # no other frame would have passed


@pytest.mark.parametrize("index", [0, 3, 5, 9])
def test_latent_decode_frame_n_is_latent_frame_n(vae: VideoVAE, index: int) -> None:
    z = frame_dependent_latents(vae, 34)
    with torch.no_grad():
        alone = [vae.decode_latent_frame(z, i) for i in range(z.shape[2])]
        frames = select_frames(str(index), 34, random.Random(0), "latent", vae)
        picked = decode_selected(vae, z, 34, frames, "latent")
    assert frames == [index]
    torch.testing.assert_close(picked, alone[index])
    assert min((a - picked).abs().max() for i, a in enumerate(alone) if i != index) > 1e-3
