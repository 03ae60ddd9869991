"""Open-Sora v1.2 video VAE (`OpenSoraVAE_V1_2`, checkpoint `hpcai-tech/OpenSora-VAE-v1.2`).

A video is encoded in two stages and decoded in reverse:

    pixels [B,3,F,H,W] --spatial (diffusers AutoencoderKL, frame by frame, 8x smaller H/W)-->
    [B,4,F,H/8,W/8] --temporal (causal 3D conv VAE, 4x fewer frames, in 17-frame chunks)-->
    latents [B,4,T,H/8,W/8], normalised per channel with `shift` / `scale`.

Module and buffer names mirror the reference (`spatial_vae.module.*`, `temporal_vae.*`, `scale`,
`shift`) so the published state dict loads with strict key matching. Beyond the reference,
`decode(..., frames=[...])` decodes only what the chosen pixel frames need, which is what makes
rewards on a few frames cheap to backpropagate through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vader.errors import VaderError
from vader.sizes import latent_num_frames

# The reference multiplies spatial latents by SD1.x's constant, not by the SDXL VAE's own
# `scaling_factor` (0.13025). The published temporal VAE was trained on latents scaled this way.
SPATIAL_LATENT_SCALE = 0.18215


def sdxl_vae_config() -> dict[str, Any]:
    """AutoencoderKL kwargs of `PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers` (subfolder vae)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


@dataclass
class TemporalVAEConfig:
    """Temporal VAE hyper-parameters; the defaults are the published `VAE_Temporal_SD`."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    activation_fn: str = "swish"

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemporalVAEConfig:
        kwargs = _known_fields(cls, data)
        for key in ("channel_multipliers", "temporal_downsample"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass
class VideoVAEConfig:
    """The whole pipeline: spatial AutoencoderKL kwargs, temporal VAE and chunking/normalisation."""

    spatial: dict[str, Any] = field(default_factory=sdxl_vae_config)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17
    micro_batch_size: int | None = 4
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoVAEConfig:
        """Read our own `to_dict` output or the published `config.json`; unknown keys are ignored."""
        data = _from_published(data) if "vae_2d" in data or "vae_temporal" in data else data
        kwargs = _known_fields(cls, data)
        if "spatial" in kwargs:
            kwargs["spatial"] = dict(kwargs["spatial"])
        if "temporal" in kwargs:
            kwargs["temporal"] = TemporalVAEConfig.from_dict(kwargs["temporal"])
        for key in ("shift", "scale"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    # Frame/latent geometry: VideoVAE asks its config, and the config applies the chunk rule of
    # vader.sizes (which config validation uses without importing torch) to its own chunk length
    # and time factor, so the model and the config checks cannot disagree.

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.spatial["block_out_channels"]) - 1)

    @property
    def latents_per_chunk(self) -> int:
        return math.ceil(self.micro_frame_size / self.temporal.time_downsample_factor)

    def latent_frames(self, num_frames: int) -> int:
        """Whole `micro_frame_size` chunks give ceil(17 / 4) = 5 latent frames each; the rest ceil(r / 4)."""
        return latent_num_frames(num_frames, self.micro_frame_size, self.temporal.time_downsample_factor)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) of the latent of a clip; spatial sizes floor (276 px -> 34 rows)."""
        factor = self.spatial_factor
        return self.latent_frames(num_frames), height // factor, width // factor

    def latent_index_of_frame(self, frame: int, num_frames: int) -> int:
        """The latent frame whose decoding produces output `frame` of a `num_frames` video: its causal
        right edge. A chunk shorter than `micro_frame_size` (the last) is front-padded to a multiple of
        the time factor by its own length, which shifts its frames."""
        if not 0 <= frame < num_frames:
            raise VaderError(f"frame {frame} out of range for a {num_frames}-frame video")
        factor = self.temporal.time_downsample_factor
        chunk, within = divmod(frame, self.micro_frame_size)
        length = min(self.micro_frame_size, num_frames - chunk * self.micro_frame_size)
        padding = (factor - length % factor) % factor
        return chunk * self.latents_per_chunk + (within + padding) // factor


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _jsonable(value: Any) -> Any:
    """Tuples become lists so `to_dict` output survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _from_published(data: dict[str, Any]) -> dict[str, Any]:
    """Map the hub `config.json` (VideoAutoencoderPipelineConfig) onto our field names.

    Its `vae_2d` / `vae_temporal` only name registry types whose architecture is fixed, so the
    architecture comes from our defaults; only the chunking and normalisation are read.
    """
    out = {k: data[k] for k in ("micro_frame_size", "shift", "scale") if k in data}
    vae_2d = data.get("vae_2d") or {}
    if "micro_batch_size" in vae_2d:
        out["micro_batch_size"] = vae_2d["micro_batch_size"]
    return out


def opensora_vae_v1_2_config() -> VideoVAEConfig:
    """The published `hpcai-tech/OpenSora-VAE-v1.2` architecture."""
    return VideoVAEConfig()


def tiny_vae_config() -> VideoVAEConfig:
    """Same structure (8x spatial, 4x temporal, 17-frame chunks), a few thousand parameters."""
    spatial = sdxl_vae_config()
    # One norm group: with per-group GroupNorm over only 2 channels, a random decoder's output
    # statistics barely depend on the latents, and no reward gradient could change them.
    spatial.update(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=1, sample_size=64)
    temporal = TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=1)
    return VideoVAEConfig(spatial=spatial, temporal=temporal)


# ----------------------------------------------------------------------------------------------
# Temporal VAE (VAE_Temporal_SD)
# ----------------------------------------------------------------------------------------------


def _activation(name: str) -> type[nn.Module]:
    activations: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu": nn.ReLU}
    if name not in activations:
        raise VaderError(
            f"unknown temporal VAE activation_fn {name!r}; expected one of {sorted(activations)}"
        )
    return activations[name]


class CausalConv3d(nn.Module):
    """3D conv that never looks at future frames: time is zero-padded at the front only.

    The front pad is k - 1 + (1 - stride), so a stride-2 conv halves an even frame count exactly.
    H and W get symmetric k // 2 padding. The Conv3d sits at `.conv` to match checkpoint keys.
    """

    def __init__(
        self, chan_in: int, chan_out: int, kernel_size: int, time_stride: int = 1, bias: bool = True
    ):
        super().__init__()
        time_pad = kernel_size - 1 + (1 - time_stride)
        space_pad = kernel_size // 2
        # F.pad order is (W_left, W_right, H_top, H_bottom, T_front, T_back).
        self.padding = (space_pad, space_pad, space_pad, space_pad, time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, kernel_size, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GroupNorm-act-conv twice plus a residual (1x1x1 conv when the width changes)."""

    def __init__(self, chan_in: int, chan_out: int, num_groups: int, activation: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, chan_in)
        self.conv1 = CausalConv3d(chan_in, chan_out, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, chan_out)
        self.conv2 = CausalConv3d(chan_out, chan_out, 3, bias=False)
        self.activate = activation()
        if chan_in != chan_out:
            self.conv3 = CausalConv3d(chan_in, chan_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.conv3(x) if hasattr(self, "conv3") else x
        x = self.conv1(self.activate(self.norm1(x)))
        x = self.conv2(self.activate(self.norm2(x)))
        return x + residual


def _res_stack(chan_in: int, chan_out: int, count: int, cfg: TemporalVAEConfig) -> nn.ModuleList:
    """`count` ResBlocks; only the first may change the width."""
    act = _activation(cfg.activation_fn)
    return nn.ModuleList(
        ResBlock(chan_in if i == 0 else chan_out, chan_out, cfg.num_groups, act) for i in range(count)
    )


def _depth_to_time(x: Tensor, factor: int) -> Tensor:
    """[B, C*f, T, H, W] -> [B, C, T*f, H, W]; channel index c*f + t (time fastest), as trained."""
    b, cf, t, h, w = x.shape
    x = x.reshape(b, cf // factor, factor, t, h, w)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, cf // factor, t * factor, h, w)


class TemporalEncoder(nn.Module):
    """conv_in, per-level ResBlocks with optional time-stride-2 convs, tail ResBlocks, 1x1x1 to 2*latent."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = cfg.filters
        for level, width in enumerate(widths):
            self.block_res_blocks.append(_res_stack(prev, width, cfg.num_res_blocks, cfg))
            prev = width
            if level < len(widths) - 1:
                # Identity keeps list indices (and so checkpoint keys) aligned with levels.
                down = cfg.temporal_downsample[level]
                self.conv_blocks.append(
                    CausalConv3d(width, width, 3, time_stride=2) if down else nn.Identity()
                )
        self.res_blocks = _res_stack(prev, prev, cfg.num_res_blocks, cfg)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.activate = _activation(cfg.activation_fn)()
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.activate(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """Mirror of the encoder; time is upsampled by a conv to 2x width followed by depth-to-time."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        self.upsample = [2 if down else 1 for down in cfg.temporal_downsample]
        prev = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, prev, 3)
        self.res_blocks = _res_stack(prev, prev, cfg.num_res_blocks, cfg)
        # Built deepest level first (that fixes each level's input width), stored shallow first
        # because the checkpoint indexes block_res_blocks[i] / conv_blocks[i - 1] by level i.
        res_by_level: list[nn.ModuleList] = []
        ups_by_level: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            res_by_level.insert(0, _res_stack(prev, widths[level], cfg.num_res_blocks, cfg))
            prev = widths[level]
            if level > 0:
                factor = self.upsample[level - 1]
                ups_by_level.insert(0, CausalConv3d(prev, prev * factor, 3) if factor > 1 else nn.Identity())
        self.block_res_blocks = nn.ModuleList(res_by_level)
        self.conv_blocks = nn.ModuleList(ups_by_level)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.activate = _activation(cfg.activation_fn)()
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0:
                x = _depth_to_time(self.conv_blocks[level - 1](x), self.upsample[level - 1])
        return self.conv_out(self.activate(self.norm1(x)))


def _gaussian_sample(moments: Tensor, generator: torch.Generator | None, noise_dtype: torch.dtype) -> Tensor:
    """Sample the diagonal Gaussian whose mean and log-variance are stacked along channels.

    Like the reference, noise is drawn on the CPU (or on the generator's device) and then moved,
    so a seeded CPU generator gives the same latents on any device.
    """
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=noise_dtype)
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


class TemporalVAE(nn.Module):
    """Causal temporal VAE: 4 frames -> 1 latent frame, no spatial change."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.time_factor = cfg.time_downsample_factor
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def front_padding(self, num_frames: int) -> int:
        """Zero frames put in front so the frame count divides by the time factor."""
        return (self.time_factor - num_frames % self.time_factor) % self.time_factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, C, F, h, w] -> sampled latents [B, C', ceil(F / 4), h, w]."""
        x = F.pad(x, (0, 0, 0, 0, self.front_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        # The reference draws this noise with torch.randn's default dtype (float32).
        return _gaussian_sample(moments, generator, torch.float32)

    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """Latents -> `num_frames` frames; the padded frames the encoder added are dropped."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.front_padding(num_frames) :]


# ----------------------------------------------------------------------------------------------
# Spatial VAE (diffusers AutoencoderKL applied frame by frame)
# ----------------------------------------------------------------------------------------------


class SpatialVAE(nn.Module):
    """Runs an image AutoencoderKL on every frame, `micro_batch_size` frames at a time."""

    def __init__(self, config: dict[str, Any], micro_batch_size: int | None):
        super().__init__()
        self.module = AutoencoderKL.from_config(config)
        self.micro_batch_size = micro_batch_size
        self.gradient_checkpointing = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, F, H, W] -> sampled, 0.18215-scaled latents [B, 4, F, H/8, W/8]."""
        return self._per_frame(x, lambda frames: self._encode_frames(frames, generator), checkpointed=False)

    def decode(self, z: Tensor) -> Tensor:
        """[B, 4, F, h, w] -> [B, 3, F, 8h, 8w]."""
        return self._per_frame(z, self._decode_frames, checkpointed=self.gradient_checkpointing)

    def _encode_frames(self, frames: Tensor, generator: torch.Generator | None) -> Tensor:
        dist = self.module.encode(frames).latent_dist
        # As diffusers' DiagonalGaussianDistribution.sample: noise in the model dtype. Drawn on the
        # CPU (not the model's device) so a seeded CPU generator reproduces on any device.
        noise_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(dist.mean.shape, generator=generator, device=noise_device, dtype=dist.mean.dtype)
        return (dist.mean + dist.std * noise.to(dist.mean.device)) * SPATIAL_LATENT_SCALE

    def _decode_frames(self, latents: Tensor) -> Tensor:
        return self.module.decode(latents / SPATIAL_LATENT_SCALE).sample

    def _per_frame(self, x: Tensor, fn: Callable[[Tensor], Tensor], checkpointed: bool) -> Tensor:
        b, _, t, _, _ = x.shape
        images = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B T) C H W, batch-major like the reference
        step = self.micro_batch_size or images.shape[0]
        outs = [
            _maybe_checkpoint(fn, images[i : i + step], checkpointed) for i in range(0, images.shape[0], step)
        ]
        out = torch.cat(outs, dim=0)
        return out.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)


def _maybe_checkpoint(fn: Callable[[Tensor], Tensor], x: Tensor, enabled: bool) -> Tensor:
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """One temporal micro chunk: latent frames [latent_start, latent_end) -> output frames."""

    latent_start: int
    latent_end: int
    frame_start: int
    num_frames: int


class VideoVAE(nn.Module):
    """`VideoAutoencoderPipeline` with micro chunks; state-dict compatible with the published VAE."""

    def __init__(self, config: VideoVAEConfig | None = None):
        super().__init__()
        self.config = config or opensora_vae_v1_2_config()
        self.spatial_vae = SpatialVAE(self.config.spatial, self.config.micro_batch_size)
        self.temporal_vae = TemporalVAE(self.config.temporal)
        self.micro_frame_size = self.config.micro_frame_size
        self.micro_latent_size = self.config.latents_per_chunk
        self.gradient_checkpointing = False
        # Shaped [1, C, 1, 1, 1] to broadcast over [B, C, T, H, W]; persistent: they are in the checkpoint.
        self.register_buffer("scale", torch.tensor(self.config.scale)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(self.config.shift)[None, :, None, None, None])

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each temporal chunk / spatial micro-batch of `decode` in backward to save memory."""
        self.gradient_checkpointing = enabled
        self.spatial_vae.gradient_checkpointing = enabled

    # -- sizes (the config owns the geometry) ----------------------------------------------------

    def latent_frames(self, num_frames: int) -> int:
        return self.config.latent_frames(num_frames)

    def get_latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.config.latent_size(num_frames, height, width)

    def latent_index_of_frame(self, frame: int, num_frames: int) -> int:
        return self.config.latent_index_of_frame(frame, num_frames)

    # -- encode --------------------------------------------------------------------------------

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 4, T, H/8, W/8] (sampled)."""
        x_z = self.spatial_vae.encode(x, generator)
        chunks = [
            self.temporal_vae.encode(x_z[:, :, i : i + self.micro_frame_size], generator)
            for i in range(0, x_z.shape[2], self.micro_frame_size)
        ]
        return (torch.cat(chunks, dim=2) - self.shift) / self.scale

    # -- decode --------------------------------------------------------------------------------

    def decode(self, z: Tensor, num_frames: int, frames: Sequence[int] | None = None) -> Tensor:
        """Latents [B, 4, T, h, w] -> video [B, 3, F, 8h, 8w] (F = num_frames, or len(frames)).

        With `frames`, only the temporal chunks holding those frames are decoded and only those
        frames go through the (expensive) spatial decoder; the result equals the full decode
        indexed with `frames`.
        """
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        chunks = self._chunks(z.shape[2], num_frames)
        wanted = list(range(num_frames)) if frames is None else _check_frames(frames, num_frames)
        parts = [self._decode_chunk(z, chunk, wanted) for chunk in chunks]
        x_z = torch.cat([p for p in parts if p is not None], dim=2)
        return self.spatial_vae.decode(x_z)

    def decode_latent_frame(self, z: Tensor, index: int) -> Tensor:
        """The original VADER shortcut: latent frame `index` decoded on its own -> [B, 3, 1, H, W].

        Not the same pixels as any frame of the full decode (the temporal VAE sees one latent frame).
        """
        if not -z.shape[2] <= index < z.shape[2]:
            raise VaderError(f"latent frame index {index} out of range for {z.shape[2]} latent frames")
        index %= z.shape[2]
        return self.decode(z[:, :, index : index + 1], num_frames=1)

    def _chunks(self, latent_frames: int, num_frames: int) -> list[_Chunk]:
        """Split like the reference: 5 latent frames -> min(17, frames left) output frames."""
        if num_frames < 1:
            raise VaderError(f"num_frames={num_frames} is not valid; a video has at least 1 frame")
        if self.latent_frames(num_frames) != latent_frames:
            raise VaderError(
                f"num_frames={num_frames} does not match {latent_frames} latent frames "
                f"(num_frames={num_frames} encodes to {self.latent_frames(num_frames)})"
            )
        chunks = []
        for n, start in enumerate(range(0, latent_frames, self.micro_latent_size)):
            frame_start = n * self.micro_frame_size
            chunks.append(
                _Chunk(
                    latent_start=start,
                    latent_end=min(start + self.micro_latent_size, latent_frames),
                    frame_start=frame_start,
                    num_frames=min(self.micro_frame_size, num_frames - frame_start),
                )
            )
        return chunks

    def _decode_chunk(self, z: Tensor, chunk: _Chunk, wanted: list[int]) -> Tensor | None:
        """Temporal-decode one chunk if any wanted frame lies in it; keep only the wanted frames."""
        local = [
            f - chunk.frame_start
            for f in wanted
            if chunk.frame_start <= f < chunk.frame_start + chunk.num_frames
        ]
        if not local:
            return None
        z_chunk = z[:, :, chunk.latent_start : chunk.latent_end]

        def run(latents: Tensor) -> Tensor:
            return self.temporal_vae.decode(latents, num_frames=chunk.num_frames)

        x = _maybe_checkpoint(run, z_chunk, self.gradient_checkpointing)
        return x if len(local) == chunk.num_frames else x[:, :, local]


def _check_frames(frames: Sequence[int], num_frames: int) -> list[int]:
    wanted = [int(f) for f in frames]
    if not wanted:
        raise VaderError("frames must name at least one frame to decode")
    if wanted != sorted(set(wanted)):
        raise VaderError(f"frames must be sorted and unique, got {wanted}")
    if wanted[0] < 0 or wanted[-1] >= num_frames:
        raise VaderError(f"frames {wanted} out of range for a {num_frames}-frame video")
    return wanted
