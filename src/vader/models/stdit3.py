"""STDiT3: the Open-Sora v1.2 spatial-temporal diffusion transformer (the VADER denoiser).

A re-implementation that loads the published `hpcai-tech/OpenSora-STDiT-v3` weights with strict
key matching: every module and parameter name below mirrors the reference (`opensora/models/
stdit/stdit3.py` and `opensora/models/layers/blocks.py` at Open-Sora v1.2.0). Numerics follow
the reference op for op, including its quirks (cos-first timestep embedding, column-first 2-D
position embedding, interleaved-pair RoPE after the qk-norm, fp32 softmax, and the final layer's
double normalisation on the `x_mask` path) because the checkpoint was trained with them.

Shapes used throughout: B batch, T/S latent frames / patches per frame after patching,
N = T*S tokens, C hidden size, L text tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vader.errors import VaderError

__all__ = ["ATTENTION_BACKENDS", "STDiT3", "STDiT3Config", "pos_embed_2d", "stdit3_xl_2_config",
           "timestep_embedding"]

ATTENTION_BACKENDS = ("sdpa", "math")

# (shift, scale, gate) rows of a block's modulation table, in the reference's order.
_MSA, _MLP = 0, 3


@dataclass
class STDiT3Config:
    """Architecture of an STDiT3. The defaults are the published XL/2 model."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True
    class_dropout_prob: float = 0.1
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise VaderError(f"STDiT3 patch_size must be 3 positive ints, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise VaderError(
                f"STDiT3 hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        # The 2-D sin-cos embedding splits C into four equal parts; RoPE rotates pairs.
        if self.hidden_size % 4 or self.head_dim % 2:
            raise VaderError(
                f"STDiT3 needs hidden_size % 4 == 0 and an even head_dim, got {self.hidden_size}"
                f" with {self.num_heads} heads"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STDiT3Config:
        """Build from e.g. the hub's config.json; keys this class does not know are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)  # JSON-shaped, like the hub config
        return d


def stdit3_xl_2_config() -> STDiT3Config:
    """The config of `hpcai-tech/OpenSora-STDiT-v3` (STDiT3-XL/2)."""
    return STDiT3Config()


# ---------------------------------------------------------------------------------------------
# Stateless helpers
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of scalar t [B] -> [B, dim], laid out [cos | sin] (GLIDE order)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(exponent).to(t.device)  # built on CPU like the reference, for equal bits
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sin_cos(pos: Tensor, inv_freq: Tensor) -> Tensor:
    angles = pos[:, None] * inv_freq[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def pos_embed_2d(
    dim: int, h: int, w: int, scale: float, base_size: int | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Fixed 2-D sin-cos position embedding [1, h*w, dim], rows (H) outer, columns (W) inner.

    Channels are [sin(col), cos(col), sin(row), cos(row)], each dim/4 wide: the reference's
    meshgrid puts the column coordinate first. Coordinates are index / scale * base_size / size,
    so a grid is stretched to `base_size` patches and shrunk by the resolution `scale`.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    # The reference keeps these frequencies in a buffer, which model.to(bf16) rounds; mirror
    # that rounding (a no-op in fp32) while the products stay fp32 as in its einsum.
    inv_freq = inv_freq.to(dtype).to(device=device, dtype=torch.float32)
    rows = torch.arange(h, device=device) / scale
    cols = torch.arange(w, device=device) / scale
    if base_size is not None:
        rows = rows * (base_size / h)
        cols = cols * (base_size / w)
    rows = rows[:, None].expand(h, w).reshape(-1)
    cols = cols[None, :].expand(h, w).reshape(-1)
    emb = torch.cat([_sin_cos(cols, inv_freq), _sin_cos(rows, inv_freq)], dim=-1)
    return emb[None].to(dtype)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def _tile_batch(t: Tensor, batch: int, name: str) -> Tensor:
    """Repeat a batch-n tensor to `batch` rows as [a, b, a, b] (torch.repeat, as the reference
    does for the CFG batch [cond; uncond] built from per-prompt conditioning)."""
    if t.ndim == 0:
        t = t[None]
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"{name} has batch {t.shape[0]}, which does not divide the model batch {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def _per_frame(x_mask: Tensor | None, kept: Tensor, masked: Tensor, num_frames: int) -> Tensor:
    """Per latent frame, take `kept` where x_mask is True and `masked` (the t0 path) elsewhere."""
    if x_mask is None:
        return kept
    b, n, c = kept.shape
    keep = x_mask[:, :, None, None]
    out = torch.where(keep, kept.view(b, num_frames, -1, c), masked.view(b, num_frames, -1, c))
    return out.view(b, n, c)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, sdpa: bool = False) -> Tensor:
    """Softmax attention over [..., heads, seq, head_dim]; key_mask [B, 1, 1, L] is True = attend.

    The default path is the reference's: q pre-scaled, logits upcast to fp32 for the softmax,
    probabilities cast back to q's dtype; it keeps every [seq, seq] probability matrix for
    backward. `sdpa=True` uses PyTorch's fused kernels instead (flash / memory-efficient on GPUs,
    fp32 accumulation inside, no attention matrix kept; not bit-identical: the denoiser's output
    moves by about 1e-6 of its scale in fp32 and 1% in bf16, as far from fp32 as math's own bf16
    rounding; tests/test_attention.py).
    """
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    dtype = q.dtype
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    logits = logits.to(torch.float32)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return logits.softmax(dim=-1).to(dtype) @ v


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    """RMS norm computed in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE as rotary_embedding_torch 0.5.3 computes it for `rotate_queries_or_keys`.

    Positions 0..n-1 along dim -2; angles repeat each frequency for an adjacent pair
    (f0, f0, f1, f1, ...) and rotate interleaved pairs (2i, 2i+1), GPT-J style. `freqs` is a
    frozen Parameter because the checkpoint stores it as one (`rope.freqs`).
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)
        angles = pos.to(self.freqs.dtype)[:, None] * self.freqs[None]
        angles = angles.repeat_interleave(2, dim=-1)
        return x * angles.cos() + _rotate_pairs(x) * angles.sin()


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class Mlp(nn.Module):
    """timm's Mlp without dropout: fc1 -> GELU(tanh) -> fc2 (same parameter names)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-head RMS qk-norm and optional RoPE (after the norm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sdpa = False
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm: nn.Module = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RotaryEmbedding | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = attention(q, k, v, sdpa=self.sdpa)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Each sample's tokens attend to that sample's valid text tokens only.

    The reference packs valid tokens of all samples into one sequence and uses an xformers
    block-diagonal mask; a boolean key mask over the padded [B, L] text is the same computation.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sdpa = False
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(y).view(b, y.shape[1], 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if y_mask is None:
            out = attention(q, k, v, sdpa=self.sdpa)
        else:
            # A sample with no valid text token attends to nothing and gets 0. Its row is
            # unmasked first so the softmax never sees only -inf (NaN, also in backward).
            has_text = y_mask.any(dim=1)
            key_mask = (y_mask | ~has_text[:, None])[:, None, None, :]
            out = attention(q, k, v, key_mask, sdpa=self.sdpa) * has_text[:, None, None, None].to(q.dtype)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class PatchEmbed3D(nn.Module):
    """Zero-pad T, H, W at the end to a patch multiple, then a strided Conv3d; -> [B, N, C]."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = (-size % p for size, p in zip(x.shape[2:], self.patch_size, strict=True))
        if pt or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pt))
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding then Linear-SiLU-Linear; used for the timestep and for fps."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 states [B, 1, L, 4096] to [B, 1, L, C].

    `y_embedding` is the learned null caption in T5 space (a buffer in the checkpoint). In
    training mode each caption is replaced by it with probability `uncond_prob`.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.uncond_prob = uncond_prob
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: Tensor) -> Tensor:
        if self.training and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            null = self.y_embedding[: caption.shape[2]].to(caption.dtype)
            caption = torch.where(drop[:, None, None, None], null, caption)
        return self.y_proj(caption)


class STDiT3Block(nn.Module):
    """adaLN-modulated self-attention (spatial or temporal), cross-attention, MLP."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        qk_norm: bool,
        temporal: bool,
    ) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t_mlp: Tensor,
        y_mask: Tensor | None,
        x_mask: Tensor | None,
        t0_mlp: Tensor | None,
        num_frames: int,
        rope: RotaryEmbedding | None = None,
    ) -> Tensor:
        mod = self._modulation(t_mlp)
        mod0 = None if x_mask is None else self._modulation(t0_mlp)  # type: ignore[arg-type]
        h = self._modulated(self.norm1(x), mod, mod0, _MSA, x_mask, num_frames)
        h = self._self_attention(h, num_frames, rope)
        x = x + self.drop_path(self._gated(h, mod, mod0, _MSA, x_mask, num_frames))
        # Cross-attention has no norm, modulation or gate in the reference.
        x = x + self.cross_attn(x, y, y_mask)
        h = self.mlp(self._modulated(self.norm2(x), mod, mod0, _MLP, x_mask, num_frames))
        return x + self.drop_path(self._gated(h, mod, mod0, _MLP, x_mask, num_frames))

    def _modulation(self, t_mlp: Tensor) -> tuple[Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, 1, C]."""
        return (self.scale_shift_table[None] + t_mlp.reshape(t_mlp.shape[0], 6, -1)).chunk(6, dim=1)

    @staticmethod
    def _modulated(
        h: Tensor,
        mod: tuple[Tensor, ...],
        mod0: tuple[Tensor, ...] | None,
        i: int,
        x_mask: Tensor | None,
        nt: int,
    ) -> Tensor:
        out = _modulate(h, mod[i], mod[i + 1])
        if mod0 is None:
            return out
        return _per_frame(x_mask, out, _modulate(h, mod0[i], mod0[i + 1]), nt)

    @staticmethod
    def _gated(
        h: Tensor,
        mod: tuple[Tensor, ...],
        mod0: tuple[Tensor, ...] | None,
        i: int,
        x_mask: Tensor | None,
        nt: int,
    ) -> Tensor:
        out = mod[i + 2] * h
        if mod0 is None:
            return out
        return _per_frame(x_mask, out, mod0[i + 2] * h, nt)

    def _self_attention(self, h: Tensor, nt: int, rope: RotaryEmbedding | None) -> Tensor:
        """Spatial: sequences are the S patches of one frame. Temporal: the T frames of one patch."""
        b, n, c = h.shape
        s = n // nt
        if not self.temporal:
            return self.attn(h.reshape(b * nt, s, c)).reshape(b, n, c)
        h = h.view(b, nt, s, c).transpose(1, 2).reshape(b * s, nt, c)
        h = self.attn(h, rope)
        return h.view(b, s, nt, c).transpose(1, 2).reshape(b, n, c)


class T2IFinalLayer(nn.Module):
    """LayerNorm, modulate by the 1152-d `t` (not t_mlp), then Linear to patch pixels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: Tensor, t: Tensor, x_mask: Tensor | None, t0: Tensor | None, num_frames: int
    ) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        out = _modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)  # type: ignore[index]
            # The reference normalises the already-modulated tensor again on the t0 path; the
            # checkpoint was trained that way, so the quirk is kept.
            out = _per_frame(x_mask, out, _modulate(self.norm_final(out), shift0, scale0), num_frames)
        return self.linear(out)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class STDiT3(nn.Module):
    """The STDiT3 denoiser. Predicts [B, out_channels, T, H, W] (fp32) from a noisy latent.

    Attributes that change computation but not weights:
    - `gradient_checkpointing`: recompute each block in backward (VADER's `grad_checkpoint`).
    - `set_attention_backend("sdpa")`: fused attention kernels instead of the reference's math
      (a bare STDiT3 runs "math"; `vader.models.presets` sets the config's `model.attention`).
    """

    _no_split_modules = ["STDiT3Block"]  # one FSDP unit per block (sharding='fsdp'), as diffusers' models name theirs

    def __init__(self, config: STDiT3Config) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.gradient_checkpointing = False
        # Registration order matches the reference so state_dict() lists keys in its order.
        self.rope = RotaryEmbedding(config.head_dim)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, c, config.class_dropout_prob, config.model_max_length
        )
        self.spatial_blocks = self._make_blocks(temporal=False)
        self.temporal_blocks = self._make_blocks(temporal=True)
        self.final_layer = T2IFinalLayer(c, math.prod(config.patch_size), config.out_channels)
        self.init_weights()

    def _make_blocks(self, temporal: bool) -> nn.ModuleList:
        cfg = self.config
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        return nn.ModuleList(
            STDiT3Block(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, rate, cfg.qk_norm, temporal)
            for rate in rates
        )

    @property
    def null_caption(self) -> Tensor:
        """The learned unconditional caption [model_max_length, caption_channels], T5 space."""
        return self.y_embedder.y_embedding

    # --- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Initialise parameters; a no-op on the meta device.

        std=None: the reference scheme (xavier-uniform Linears with zero bias; fps_embedder
        output and the temporal blocks' attn.proj, cross_attn.proj and mlp.fc2 weights zeroed;
        default Conv3d init). That makes a fresh model's temporal blocks inert and cuts the
        gradient to their qkv, so it only suits loading real weights.

        std=float: every parameter ~ N(0, std), except RMS-norm weights ~ 1 + N(0, std) and the
        fixed RoPE frequencies. Use this for tiny random models in tests, where every LoRA
        target must change the output and receive a gradient.
        """
        if self.rope.freqs.is_meta:
            return
        if std is None:
            self._reference_init()
            return
        for name, p in self.named_parameters():
            if name == "rope.freqs":
                continue
            p.normal_(0.0, std)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(1.0)

    def _reference_init(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    def set_attention_backend(self, backend: str) -> None:
        """Pick "math" (the reference's numerics; the class default) or "sdpa" (F.scaled_dot_product_attention,
        what runs build from the config use unless `model.attention='math'`)."""
        if backend not in ATTENTION_BACKENDS:
            raise VaderError(f"unknown attention backend {backend!r}; use 'math' or 'sdpa'")
        for module in self.modules():
            if isinstance(module, SelfAttention | CrossAttention):
                module.sdpa = backend == "sdpa"

    @property
    def attention_backend(self) -> str:
        """"sdpa" or "math": what the attention layers run now."""
        layers = [m.sdpa for m in self.modules() if isinstance(m, SelfAttention | CrossAttention)]
        return "sdpa" if layers and all(layers) else "math"

    # --- forward ------------------------------------------------------------------------------

    def encode_text(
        self, y: Tensor, mask: Tensor | None, batch: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Project captions and build the key mask.

        y [b, 1, L, caption_channels] (or [b, L, ...]); mask [n, L] with 1/True = valid token,
        tiled to the batch like the reference (so a CFG null caption is cut to its prompt's
        token count). Returns tokens [B, L', C] and a bool mask [B, L'] (None = all valid), where
        L' drops trailing columns no sample uses: masked keys add nothing, so this is exact.
        """
        batch = batch or y.shape[0]
        y = _tile_batch(y if y.ndim == 4 else y[:, None], batch, "y")
        if mask is None:
            return self.y_embedder(y).squeeze(1), None
        mask = _tile_batch(mask.reshape(mask.shape[0], -1), batch, "mask") != 0
        used = mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        y = self.y_embedder(y[:, :, :length]).squeeze(1)
        return y, mask[:, :length]

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | None = None,
        height: Tensor | None = None,
        width: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """x [B, C_in, T, H, W]; timestep [B] in [0, 1000]; y [B, 1, L, caption_channels];
        mask [n, L]; x_mask [B, T] bool (False frames use the t=0 modulation); fps, height,
        width [n] (pixel height/width set the position-embedding scale). n must divide B.
        Extra kwargs (num_frames, ar, ...) are accepted and ignored, as in the reference."""
        if fps is None or height is None or width is None:
            raise ValueError("STDiT3.forward needs fps, height and width tensors")
        dtype = self.x_embedder.proj.weight.dtype
        b, _, t_in, h_in, w_in = x.shape
        x, y = x.to(dtype), y.to(dtype)
        nt, nh, nw = (
            -(-size // p) for size, p in zip((t_in, h_in, w_in), self.config.patch_size, strict=True)
        )

        # The timestep stays fp32 up to the sinusoidal embedding: bf16 has 8 significant bits, so
        # t = 985.87 would become 984 (cosine 0.90 against fp32 over the 256 frequencies). The
        # original kept fp32 weights, so its cast to the weights' dtype never rounded t.
        t, t_mlp, t0, t0_mlp = self._embed_time(
            _tile_batch(timestep.float(), b, "timestep"), fps, x_mask, b
        )
        y, y_mask = self.encode_text(y, mask, b)
        if x_mask is not None:
            x_mask = _tile_batch(x_mask, b, "x_mask").bool()

        pos = self._pos_embed(nh, nw, height, width, x)  # [1, S, C], the same for every frame
        x = (self.x_embedder(x).unflatten(1, (nt, -1)) + pos[:, None]).flatten(1, 2)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = self._run_block(spatial, x, y, t_mlp, y_mask, x_mask, t0_mlp, nt, None)
            x = self._run_block(temporal, x, y, t_mlp, y_mask, x_mask, t0_mlp, nt, self.rope)

        x = self.final_layer(x, t, x_mask, t0, nt)
        return self._unpatchify(x, (nt, nh, nw), (t_in, h_in, w_in)).to(torch.float32)

    def _embed_time(
        self, timestep: Tensor, fps: Tensor, x_mask: Tensor | None, batch: int
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """t = t_emb + fps_emb (for the final layer) and t_mlp = t_block(t) (for the blocks); the
        t0/t0_mlp pair is the same at timestep 0, needed only when x_mask is given."""
        fps_emb = self.fps_embedder(_tile_batch(fps.reshape(-1).float(), batch, "fps"))
        t = self.t_embedder(timestep) + fps_emb
        if x_mask is None:
            return t, self.t_block(t), None, None
        t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        return t, self.t_block(t), t0, self.t_block(t0)

    def _pos_embed(self, nh: int, nw: int, height: Tensor, width: Tensor, like: Tensor) -> Tensor:
        # The reference reads the first sample's pixel size as Python floats.
        scale = (
            height.reshape(-1)[0].item() * width.reshape(-1)[0].item()
        ) ** 0.5 / self.config.input_sq_size
        base_size = round((nh * nw) ** 0.5)
        return pos_embed_2d(self.config.hidden_size, nh, nw, scale, base_size, like.device, like.dtype)

    def _run_block(
        self,
        block: STDiT3Block,
        x: Tensor,
        y: Tensor,
        t_mlp: Tensor,
        y_mask: Tensor | None,
        x_mask: Tensor | None,
        t0_mlp: Tensor | None,
        nt: int,
        rope: RotaryEmbedding | None,
    ) -> Tensor:
        args = (x, y, t_mlp, y_mask, x_mask, t0_mlp, nt, rope)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> Tensor:
        """[B, N, (tp hp wp C)] -> [B, C, T, H, W], cropping the end padding away."""
        (nt, nh, nw), (pt, ph, pw) = grid, self.config.patch_size
        b, c = x.shape[0], self.config.out_channels
        x = x.view(b, nt, nh, nw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, c, nt * pt, nh * ph, nw * pw)
        if x.shape[2:] == size:  # no padding to crop: return the tensor itself, not a view (FSDP2's
            return x  # backward hook on a module's output is lost on a view modified in place)
        return x[:, :, : size[0], : size[1], : size[2]]
