"""vader.backends.wan_decode on a tiny random AutoencoderKLWan: the checkpointed decode gives the plain
decode's values and gradients, keeps much less memory, and still stops after the chunks it needs."""

from __future__ import annotations

import pytest
import torch

from vader.backends import common, wan_decode
from vader.memory import LiveBytes

pytest.importorskip("diffusers")

H = W = 4  # latent size: 32 x 32 pixels


def tiny_vae(wan22: bool = False):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    # Wan2.1: the tiny backend's VAE (tests/backend_tiny.py). Wan2.2's layout: residual up blocks, whose
    # shortcut drops frames on the first chunk, and 2 x 2 patches (16x spatial)
    wan22_layout = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
                    "scale_factor_spatial": 16}
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], **(wan22_layout if wan22 else {}))
    return vae.eval().requires_grad_(False)  # frozen, as the generator holds it


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def frames_of(latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1


def latents(latent_frames: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, latent_frames, H, W, generator=gen).requires_grad_(True)


def decode(vae, z: torch.Tensor, frames: list[int] | None, grad_checkpoint: bool, host=None) -> torch.Tensor:
    chunks = wan_decode.decode_chunks(vae, z, grad_checkpoint=grad_checkpoint, host=host)
    return common.decode_until(chunks, frames, frames_of(z.shape[2]))


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2-layout"])
def test_checkpointed_values_and_gradients_equal_the_plain_decode(wan22):
    # 5 latent frames: the caches of chunks 0, 1 and 3 are replayed in backward (from none and from
    # the one kept after chunk 2), so every path of the checkpointed decode is taken
    vae = tiny_vae(wan22)
    late = frames_of(5) - 1
    size = vae.config.scale_factor_spatial
    weight = torch.randn(1, 3, 1, size * H, size * W, generator=torch.Generator().manual_seed(2))
    results = {}
    for grad_checkpoint in (False, True):
        z = latents(5)
        video = decode(vae, z, None, grad_checkpoint)
        (video[:, :, late: late + 1] * weight).sum().backward()
        results[grad_checkpoint] = video.detach(), z.grad

    (plain, plain_grad), (video, grad) = results[False], results[True]
    torch.testing.assert_close(video, plain, atol=0, rtol=0)  # the forward is the same operations
    # the whole decode is still diffusers' own, on latents denormalised as WanPipeline does it
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        reference = vae.decode(latents(5) / inv_std + mean).sample
    torch.testing.assert_close(video, reference, atol=0, rtol=0)
    # the last frame reaches the first latent frame only through the feature caches: a gradient lost
    # on the way through a checkpoint, or computed from a wrongly replayed cache, shows here
    assert plain_grad[:, :, 0].abs().max() > 1e-3
    torch.testing.assert_close(grad, plain_grad, atol=1e-6, rtol=1e-5)


def test_replayed_caches_are_decoded_under_the_forwards_autocast(vae):
    # training decodes inside accelerator.autocast() and back-propagates outside it; a cache replayed
    # in fp32 for a bf16 forward would give other gradients (4 latent frames: chunks 0 and 2 replayed)
    grads = {}
    for grad_checkpoint in (False, True):
        z = latents(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            video = decode(vae, z, [frames_of(4) - 1], grad_checkpoint)
        video.float().square().sum().backward()
        grads[grad_checkpoint] = z.grad
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)


def peak_bytes(vae, latent_frames: int, grad_checkpoint: bool) -> int:
    """Peak live tensor bytes of decoding up to the last frame and back-propagating a loss on it."""
    z = latents(latent_frames)
    meter = LiveBytes()
    with meter:
        video = decode(vae, z, [frames_of(latent_frames) - 1], grad_checkpoint)
        video.square().sum().backward()
    return meter.peak


def test_checkpointing_keeps_memory_nearly_flat_in_the_number_of_chunks(vae):
    plain = {n: peak_bytes(vae, n, False) for n in (3, 5)}
    ckpt = {n: peak_bytes(vae, n, True) for n in (3, 5)}
    # measured: plain 15.6 -> 27.7 MiB, checkpointed 5.6 -> 6.2 MiB. Without the checkpoints both
    # grow alike; with chunks checkpointed but every cache kept, the checkpointed one grows by 15%
    # of the plain growth; without the residual blocks' checkpoints its peak is 2.4x lower, not 4.5x.
    assert ckpt[5] * 3 < plain[5]
    assert ckpt[5] - ckpt[3] < 0.1 * (plain[5] - plain[3])


class CountingHost(wan_decode.HostMemory):
    """CPU "host memory" that counts its copies (and hands out new tensors, as a copy to a card would)."""

    def __init__(self) -> None:
        self.put_ids: set[int] = set()
        self.gets = 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = super().put(tensor)
        self.put_ids.add(id(copy))
        return copy

    def get(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert id(tensor) in self.put_ids  # only what was put comes back
        self.gets += 1
        return tensor.clone()


def test_caches_kept_in_host_memory_give_the_same_values_and_gradients(vae):
    # 5 latent frames: the cache after chunk 2 is kept (in host memory), those of chunks 0, 1 and 3
    # replayed, chunk 3's from the kept one brought back
    results = {}
    for host in (None, CountingHost()):
        z = latents(5)
        video = decode(vae, z, None, True, host)
        (video[:, :, -1:] * video.detach()[:, :, -1:]).sum().backward()
        results[host is None] = video.detach(), z.grad, host
    (plain, plain_grad, _), (video, grad, host) = results[True], results[False]
    torch.testing.assert_close(video, plain, atol=0, rtol=0)
    torch.testing.assert_close(grad, plain_grad, atol=1e-6, rtol=1e-5)
    assert plain_grad[:, :, 0].abs().max() > 1e-3
    # its tensors went to the host and came back: for chunk 3's checkpoint and for chunk 3's replay
    assert host.put_ids and host.gets == 2 * len(host.put_ids)


def test_caches_in_host_memory_leave_the_card(vae):
    from vader.memory import PlannedHostMemory

    peaks = {}
    for offload in (False, True):
        z = latents(9)  # every 3rd cache kept: after chunks 2 and 5
        meter = LiveBytes()
        with meter:
            host = PlannedHostMemory(meter) if offload else None
            video = decode(vae, z, [frames_of(9) - 1], True, host)
            kept_after_forward = meter.total
            video.square().sum().backward()
        peaks[offload] = meter.peak, kept_after_forward
    # measured on this VAE: kept after forward 1.87 -> 0.42 MiB, peak 7.36 -> 5.90 MiB (the two kept
    # caches are on the card again only one at a time, when backward reaches them)
    (peak_card, kept_card), (peak_host, kept_host) = peaks[False], peaks[True]
    assert kept_host < 0.5 * kept_card
    assert peak_card - peak_host > 0.5 * (kept_card - kept_host)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_a_first_frame_decodes_and_recomputes_one_chunk(vae, grad_checkpoint):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[2]))
    try:
        z = latents(4)
        video = decode(vae, z, [0], grad_checkpoint)
        assert video.shape == (1, 3, 1, 8 * H, 8 * W)
        assert calls == [1]  # one chunk decoded, of one latent frame
        video.sum().backward()
    finally:
        hook.remove()
    assert calls == ([1, 1] if grad_checkpoint else [1])  # and, checkpointed, recomputed once
    assert z.grad[:, :, 0].abs().max() > 0 and z.grad[:, :, 1:].abs().max() == 0
    assert all(entry is None for entry in vae._feat_map)  # the generator closed early cleaned up
    assert not any("forward" in m.__dict__ for m in vae.decoder.modules() if isinstance(m, WanResidualBlock))


def test_without_autograd_the_checkpointed_decode_is_the_plain_one(vae):
    z = latents(3).detach()
    with torch.no_grad():
        plain = decode(vae, z, None, False)
        calls = []
        hook = vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            video = decode(vae, z, None, True)
        finally:
            hook.remove()
    torch.testing.assert_close(video, plain, atol=0, rtol=0)
    assert len(calls) == 3  # nothing replayed or recomputed
