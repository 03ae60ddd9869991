"""Open-Sora v1.2 video VAE: sizes, chunking, frame-selective decode, gradients, checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vader.errors import VaderError
from vader.models.vae import (
    SPATIAL_LATENT_SCALE,
    TemporalVAEConfig,
    VideoVAE,
    VideoVAEConfig,
    opensora_vae_v1_2_config,
    tiny_vae_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vae"

# 16 x 24 pixels -> 2 x 3 latents: small enough to keep every test well under a second or two,
# and non-square so an H/W mix-up shows.
H, W = 16, 24


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(tiny_vae_config()).eval()


def latents(vae: VideoVAE, num_frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    t, h, w = vae.get_latent_size(num_frames, H, W)
    return torch.randn(batch, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


def video(num_frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, num_frames, H, W, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# sizes and shapes


@pytest.mark.parametrize(
    ("frames", "latent"), [(1, 1), (4, 1), (5, 2), (16, 4), (17, 5), (18, 6), (51, 15), (102, 30), (204, 60)]
)
def test_latent_frames_follow_17_to_5_rule(vae: VideoVAE, frames: int, latent: int) -> None:
    assert vae.get_latent_size(frames, 276, 368) == (latent, 34, 46)


@pytest.mark.parametrize("micro_frame_size", [17, 8])
def test_config_geometry_is_what_the_encoder_makes(micro_frame_size: int) -> None:
    """The config's latent_size (used before any model exists, e.g. by config checks) equals the
    latent the real encoder produces, also with another chunk length."""
    torch.manual_seed(0)
    config = tiny_vae_config()
    config.micro_frame_size = micro_frame_size
    model = VideoVAE(config).eval()
    for num_frames in (1, 5, 16, 17, 23):
        with torch.no_grad():
            z = model.encode(video(num_frames), torch.Generator().manual_seed(0))
        assert tuple(z.shape[2:]) == config.latent_size(num_frames, H, W) == model.get_latent_size(num_frames, H, W)


def test_spatial_size_uses_floor(vae: VideoVAE) -> None:
    assert vae.get_latent_size(17, 276, 370)[1:] == (34, 46)


@pytest.mark.parametrize("num_frames", [16, 17, 19, 51])
def test_encode_decode_shapes(vae: VideoVAE, num_frames: int) -> None:
    with torch.no_grad():
        z = vae.encode(video(num_frames), torch.Generator().manual_seed(0))
        assert tuple(z.shape) == (1, 4, *vae.get_latent_size(num_frames, H, W))
        x = vae.decode(z, num_frames)
    assert tuple(x.shape) == (1, 3, num_frames, H, W)
    assert torch.isfinite(x).all()


def test_temporal_encode_front_pads_with_zero_frames(vae: VideoVAE) -> None:
    """17 frames are encoded as 3 zero frames followed by the 17 (causal padding at the front)."""
    x = torch.randn(1, 4, 17, 2, 3)
    padded = torch.cat([torch.zeros(1, 4, 3, 2, 3), x], dim=2)
    with torch.no_grad():
        a = vae.temporal_vae.encode(x, torch.Generator().manual_seed(1))
        b = vae.temporal_vae.encode(padded, torch.Generator().manual_seed(1))
    assert a.shape[2] == 5
    torch.testing.assert_close(a, b)


def test_temporal_decode_drops_leading_padded_frames(vae: VideoVAE) -> None:
    z = torch.randn(1, 4, 5, 2, 3)
    with torch.no_grad():
        full = vae.temporal_vae.decode(z, num_frames=20)
        trimmed = vae.temporal_vae.decode(z, num_frames=17)
    assert full.shape[2] == 20 and trimmed.shape[2] == 17
    torch.testing.assert_close(trimmed, full[:, :, 3:])


def test_encode_is_reproducible_with_a_generator(vae: VideoVAE) -> None:
    x = video(5)
    with torch.no_grad():
        a = vae.encode(x, torch.Generator().manual_seed(3))
        b = vae.encode(x, torch.Generator().manual_seed(3))
        c = vae.encode(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# normalisation and the hard-coded spatial scale


def test_encode_normalises_with_shift_and_scale(vae: VideoVAE) -> None:
    x = video(5)
    with torch.no_grad():
        z = vae.encode(x, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        raw = vae.temporal_vae.encode(vae.spatial_vae.encode(x, g), g)
    shift = torch.tensor([-0.10, 0.34, 0.27, 0.98]).view(1, 4, 1, 1, 1)
    scale = torch.tensor([3.85, 2.32, 2.33, 3.06]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, (raw - shift) / scale)


def test_decode_denormalises_before_temporal_decode(vae: VideoVAE) -> None:
    z = latents(vae, 5)
    with torch.no_grad():
        x = vae.decode(z, 5)
        manual = vae.spatial_vae.decode(vae.temporal_vae.decode(z * vae.scale + vae.shift, 5))
    torch.testing.assert_close(x, manual)


def test_spatial_vae_uses_018215_not_scaling_factor(vae: VideoVAE) -> None:
    module = vae.spatial_vae.module
    assert module.config.scaling_factor == pytest.approx(0.13025)
    images = video(3)
    frames = images[0].permute(1, 0, 2, 3)
    with torch.no_grad():
        z = vae.spatial_vae.encode(images, torch.Generator().manual_seed(2))
        dist = module.encode(frames).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(2))
        expected = (dist.mean + dist.std * noise) * 0.18215
        torch.testing.assert_close(z[0].permute(1, 0, 2, 3), expected)
        decoded = vae.spatial_vae.decode(z)
        expected_x = module.decode(z[0].permute(1, 0, 2, 3) / 0.18215).sample
    assert SPATIAL_LATENT_SCALE == 0.18215
    torch.testing.assert_close(decoded[0].permute(1, 0, 2, 3), expected_x)


def test_buffers_are_persistent_and_shaped(vae: VideoVAE) -> None:
    state = vae.state_dict()
    assert tuple(state["scale"].shape) == (1, 4, 1, 1, 1)
    assert tuple(state["shift"].shape) == (1, 4, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# frame-selective decode

# 40 frames -> chunks of 17, 17 and a partial 6 (latent frames 5 + 5 + 2).
FRAME_SETS = [[0], [16], [16, 17], [3, 20, 39], [34], [38, 39], [0, 16, 33, 34, 39], list(range(40))]


@pytest.fixture(scope="module")
def full_decode(vae: VideoVAE) -> tuple[torch.Tensor, torch.Tensor]:
    z = latents(vae, 40, batch=2)
    with torch.no_grad():
        return z, vae.decode(z, 40)


@pytest.mark.parametrize("frames", FRAME_SETS)
def test_decode_selected_frames_equals_full_decode_sliced(
    vae: VideoVAE, full_decode: tuple[torch.Tensor, torch.Tensor], frames: list[int]
) -> None:
    z, full = full_decode
    with torch.no_grad():
        part = vae.decode(z, 40, frames=frames)
    assert part.shape == (2, 3, len(frames), H, W)
    torch.testing.assert_close(part, full[:, :, frames], atol=1e-5, rtol=1e-5)


def test_decode_selected_runs_decoders_only_where_needed(vae: VideoVAE) -> None:
    seen = {"spatial": 0, "temporal": 0}

    def count(name: str):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] += args[0].shape[0] if name == "spatial" else 1

        return hook

    handles = [
        vae.spatial_vae.module.decoder.register_forward_pre_hook(count("spatial")),
        vae.temporal_vae.decoder.register_forward_pre_hook(count("temporal")),
    ]
    try:
        with torch.no_grad():
            vae.decode(latents(vae, 40, batch=2), 40, frames=[3, 5, 39])
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"spatial": 2 * 3, "temporal": 2}  # 6 images; chunks 0 and 2, not chunk 1


def test_decode_rejects_bad_frames_and_frame_counts(vae: VideoVAE) -> None:
    z = latents(vae, 40)
    for frames in ([], [3, 2], [2, 2], [40], [-1]):
        with pytest.raises(VaderError):
            vae.decode(z, 40, frames=frames)
    with pytest.raises(VaderError):
        vae.decode(z, 51)


def test_decode_latent_frame_is_the_single_latent_shortcut(vae: VideoVAE) -> None:
    z = latents(vae, 51)
    with torch.no_grad():
        one = vae.decode_latent_frame(z, 7)
        expected = vae.decode(z[:, :, 7:8], num_frames=1)
        last = vae.decode_latent_frame(z, -1)
    assert one.shape == (1, 3, 1, H, W)
    torch.testing.assert_close(one, expected)
    torch.testing.assert_close(last, vae.decode_latent_frame(z, 14))
    with pytest.raises(VaderError):
        vae.decode_latent_frame(z, 15)


def test_spatial_micro_batch_size_does_not_change_results(vae: VideoVAE) -> None:
    z = latents(vae, 17)[:, :, :3]
    with torch.no_grad():
        batched = vae.spatial_vae.decode(z)
        vae.spatial_vae.micro_batch_size = 1
        try:
            single = vae.spatial_vae.decode(z)
        finally:
            vae.spatial_vae.micro_batch_size = 4
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradients


def _grad_of_frames(vae: VideoVAE, z: torch.Tensor, frames: list[int]) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    vae.decode(z, 40, frames=frames).square().mean().backward()
    assert z.grad is not None
    return z.grad


def test_gradient_flows_from_selected_frames_to_their_chunk_only(vae: VideoVAE) -> None:
    grad = _grad_of_frames(vae, latents(vae, 40), [20])
    assert grad[:, :, 5:10].abs().sum() > 0  # chunk 1 holds frame 20
    assert grad[:, :, :5].abs().sum() == 0 and grad[:, :, 10:].abs().sum() == 0


def _decoder_calls_and_grad(vae: VideoVAE, z: torch.Tensor, frames: list[int]) -> tuple[dict[str, int], torch.Tensor]:
    """Forward calls of the temporal and spatial decoders over decode + backward (pre-hooks: a
    checkpoint's recomputation stops once it has what backward needs, so post-hooks may not fire)."""
    calls = {"temporal": 0, "spatial": 0}
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in (("temporal", vae.temporal_vae.decoder), ("spatial", vae.spatial_vae.module.decoder))
    ]
    try:
        grad = _grad_of_frames(vae, z, frames)
    finally:
        for handle in handles:
            handle.remove()
    return calls, grad


def test_vae_grad_checkpoint_recomputes_chunks(vae: VideoVAE) -> None:
    """Checkpointed decode must recompute each temporal chunk and each spatial micro-batch in backward,
    and give the same gradient. Frames 2, 20, 39 lie in the three chunks of a 40-frame video; with
    micro_batch_size 2 the three frames make two spatial micro-batches."""
    z = latents(vae, 40)
    vae.spatial_vae.micro_batch_size = 2
    try:
        plain_calls, plain = _decoder_calls_and_grad(vae, z, [2, 20, 39])
        vae.enable_gradient_checkpointing()
        calls, checkpointed = _decoder_calls_and_grad(vae, z, [2, 20, 39])
    finally:
        vae.enable_gradient_checkpointing(False)
        vae.spatial_vae.micro_batch_size = 4
    assert plain_calls == {"temporal": 3, "spatial": 2}
    assert calls == {"temporal": 6, "spatial": 4}
    torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)


def test_vae_parameters_can_stay_frozen_while_z_gets_gradient(vae: VideoVAE) -> None:
    vae.requires_grad_(False)
    try:
        grad = _grad_of_frames(vae, latents(vae, 40), [0])
    finally:
        vae.requires_grad_(True)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# full-size layout (on meta: no memory, no weights)


@pytest.fixture(scope="module")
def full_size() -> VideoVAE:
    with torch.device("meta"):
        return VideoVAE(opensora_vae_v1_2_config())


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_matches_published_checkpoint_counts(full_size: VideoVAE) -> None:
    state = full_size.state_dict()
    assert len(state) == 517
    assert _count(full_size) == 393_341_007
    assert _count(full_size.spatial_vae) == 83_653_863
    assert _count(full_size.temporal_vae) == 309_687_144
    assert len(list(full_size.spatial_vae.parameters())) == 248
    assert len(list(full_size.temporal_vae.parameters())) == 267
    prefixes = {k.split(".")[0] if "." in k else k for k in state}
    assert prefixes == {"scale", "shift", "spatial_vae", "temporal_vae"}
    assert all(k.startswith("spatial_vae.module.") for k in state if k.startswith("spatial_vae"))


def test_full_size_temporal_keys_skip_identity_conv_block(full_size: VideoVAE) -> None:
    keys = set(full_size.state_dict())
    for side in ("encoder", "decoder"):
        assert not any(k.startswith(f"temporal_vae.{side}.conv_blocks.0.") for k in keys)
        assert f"temporal_vae.{side}.conv_blocks.1.conv.weight" in keys
        assert f"temporal_vae.{side}.conv_blocks.2.conv.bias" in keys
    assert "temporal_vae.encoder.conv_in.conv.weight" in keys
    assert "temporal_vae.encoder.conv_in.conv.bias" not in keys
    assert tuple(full_size.state_dict()["temporal_vae.decoder.conv_blocks.2.conv.weight"].shape) == (
        1024,
        512,
        3,
        3,
        3,
    )


# ---------------------------------------------------------------------------------------------
# config


def test_config_round_trips_through_dict() -> None:
    for cfg in (opensora_vae_v1_2_config(), tiny_vae_config()):
        assert VideoVAEConfig.from_dict(cfg.to_dict()) == cfg


def test_config_ignores_unknown_keys() -> None:
    data = tiny_vae_config().to_dict()
    data.update(type="OpenSoraVAE_V1_2", from_pretrained="x", architectures=["VideoAutoencoderPipeline"])
    data["temporal"]["from_pretrained"] = None
    assert VideoVAEConfig.from_dict(data) == tiny_vae_config()


def test_config_reads_published_config_json() -> None:
    published = {
        "architectures": ["VideoAutoencoderPipeline"],
        "model_type": "VideoAutoencoderPipeline",
        "micro_frame_size": 17,
        "shift": [-0.1, 0.34, 0.27, 0.98],
        "scale": [3.85, 2.32, 2.33, 3.06],
        "vae_2d": {"type": "VideoAutoencoderKL", "micro_batch_size": 4, "subfolder": "vae"},
        "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
    }
    assert VideoVAEConfig.from_dict(published) == opensora_vae_v1_2_config()


def test_temporal_config_defaults_are_vae_temporal_sd() -> None:
    cfg = TemporalVAEConfig()
    assert (cfg.filters, cfg.num_res_blocks, cfg.channel_multipliers) == (128, 4, (1, 2, 2, 4))
    assert cfg.temporal_downsample == (False, True, True)
    assert cfg.time_downsample_factor == 4


def test_unknown_activation_is_a_user_error() -> None:
    cfg = tiny_vae_config()
    cfg.temporal.activation_fn = "gelu"
    with pytest.raises(VaderError):
        VideoVAE(cfg)


# ---------------------------------------------------------------------------------------------
# parity with the original Open-Sora code (fixtures written by tools/make_vae_fixtures.py)


def test_full_size_state_dict_equals_reference_listing(full_size: VideoVAE) -> None:
    lines = (FIXTURES / "vae_v1_2_keys.tsv").read_text().splitlines()
    reference = [tuple(line.split("\t")) for line in lines]
    ours = [(k, ",".join(str(d) for d in v.shape)) for k, v in full_size.state_dict().items()]
    assert ours == reference  # same keys, shapes and even order


@pytest.fixture(scope="module")
def parity() -> tuple[VideoVAE, dict[str, torch.Tensor], dict[str, str]]:
    path = FIXTURES / "tiny_parity.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model = VideoVAE(VideoVAEConfig.from_dict(json.loads(metadata["config"]))).eval()
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model, tensors, metadata


# Bit-identical on the machine that wrote the fixtures; the margin is for other CPUs' kernels
# (conv results here move by ~2e-5 with memory layout alone). Outputs reach |x| ~ 3.6.
PARITY = {"atol": 1e-4, "rtol": 1e-5}


def test_tiny_encode_matches_reference(parity: tuple[VideoVAE, dict, dict]) -> None:
    model, tensors, metadata = parity
    generator = torch.Generator().manual_seed(int(metadata["noise_seed"]))
    with torch.no_grad():
        z = model.encode(tensors["input.video"], generator)
    torch.testing.assert_close(z, tensors["output.z"], **PARITY)


def test_tiny_decode_matches_reference(parity: tuple[VideoVAE, dict, dict]) -> None:
    model, tensors, metadata = parity
    num_frames = int(metadata["num_frames"])
    with torch.no_grad():
        video = model.decode(tensors["output.z"], num_frames)
        chosen = model.decode(tensors["output.z"], num_frames, frames=[0, 16, 17, 18])
    torch.testing.assert_close(video, tensors["output.video"], **PARITY)
    torch.testing.assert_close(chosen, tensors["output.video"][:, :, [0, 16, 17, 18]], **PARITY)


def test_tiny_latent_frame_shortcut_matches_reference(parity: tuple[VideoVAE, dict, dict]) -> None:
    model, tensors, metadata = parity
    with torch.no_grad():
        frame = model.decode_latent_frame(tensors["output.z"], int(metadata["latent_frame"]))
    torch.testing.assert_close(frame, tensors["output.latent_frame"], **PARITY)
