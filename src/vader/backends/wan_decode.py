"""Wan's causal VAE decode, one latent frame at a time (AutoencoderKLWan._decode, unrolled so that
decoding can stop after the last chunk a chosen frame needs), optionally with activation checkpointing.

diffusers' AutoencoderKLWan has no gradient checkpointing: decoding frame 32 of a 33-frame 480x832
Wan2.1 video with gradients keeps all nine chunks' activations for backward: 209 GiB planned, fp32.
With `grad_checkpoint` it is 26.6 GiB (81 frames: 501 -> 34.1 GiB; benchmarks/wan_decode_memory.py),
for about 2.2x the decode's FLOPs, and three things change, none of which changes a value or a
gradient:

- each chunk runs under torch.utils.checkpoint as a pure function (latent frame, feature cache in) ->
  (decoded frames, feature cache out), and inside it each residual block does the same with its two
  cache slots: backward recomputes one chunk, then one block of it, at a time;
- the caches the chunks' checkpoints would keep as inputs (3.3 GiB per chunk at 480x832) are kept
  for every ceil(sqrt(n))-th chunk only, and the others recomputed in backward from the last kept one;
- a cache's gradient gets its own storage instead of staying a slice of a conv's padded gradient.

With a `host` (config `vae.offload_cache`) the kept caches wait for backward in CPU memory (6.6 GiB of
the 26.6 at 480x832x33 fp32), copied back when backward reaches them: the same values and gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# One entry per causal conv of the decoder: None before the first chunk reaches it, the string "Rep"
# (WanResample's upsample3d after the first chunk: no temporal context yet), or the last frames it saw.
CacheEntry = Tensor | str | None
FeatCache = list[CacheEntry]
# (output, cache out) of one cached step: a whole decoder call, or one residual block of it
CachedStep = Callable[[Tensor, FeatCache], tuple[Tensor, FeatCache]]

RESIDUAL_SLOTS = 2  # WanResidualBlock caches the inputs of its conv1 and conv2


class _TensorSlot:
    """Marks where a cache list holds a tensor, in the layout that travels beside the tensors."""


_TENSOR = _TensorSlot()


def _split(cache: Sequence[CacheEntry]) -> tuple[tuple[object, ...], list[Tensor]]:
    """(layout, tensors). checkpoint saves, and hands gradients to, only tensors passed as positional
    arguments (one inside a list would be held as is), so a cache crosses a checkpoint as a flat
    tuple of tensors, its None / "Rep" entries as plain Python values in the layout."""
    layout = tuple(_TENSOR if isinstance(entry, Tensor) else entry for entry in cache)
    return layout, [entry for entry in cache if isinstance(entry, Tensor)]


def _join(layout: Sequence[object], tensors: Sequence[Tensor]) -> FeatCache:
    rest = iter(tensors)
    return [next(rest) if entry is _TENSOR else entry for entry in layout]  # type: ignore[misc]


class _CompactGrad(torch.autograd.Function):
    """Identity whose backward copies the gradient into its own storage. The gradient reaching a cache
    tensor is a slice of the padded gradient of the causal conv that read it (2 of its 6 frames); held
    until the previous chunk's backward, the slice would keep the whole padded gradient alive."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _checkpointed(step: CachedStep, x: Tensor, cache: FeatCache) -> tuple[Tensor, FeatCache]:
    """`step(x, cache)` under non-reentrant checkpointing: forward keeps `x` and the cache's tensors,
    backward recomputes the step from them, and gradients reach both. `step` must not mutate the list
    it is given (its recomputation starts from the same one)."""
    layout, tensors = _split(cache)
    layout_out: list[tuple[object, ...]] = []

    def pure(x: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        out, new = step(x, _join(layout, [_CompactGrad.apply(t) for t in tensors]))
        new_layout, new_tensors = _split(new)
        layout_out[:] = [new_layout]  # recomputation gives the same: it follows from the layout in
        return (out, *new_tensors)

    out, *new_tensors = checkpoint(pure, x, *tensors, use_reentrant=False)
    return out, _join(layout_out[0], new_tensors)


def _checkpointed_residual(block: nn.Module, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A forward for one WanResidualBlock that runs its own `forward` as a checkpointed pure function of
    (x, its cache slots), then writes the new slots into the decoder's cache list as diffusers does."""

    def step(x: Tensor, cache: FeatCache) -> tuple[Tensor, FeatCache]:
        cache, idx = list(cache), [0]
        out = forward(x, feat_cache=cache, feat_idx=idx)
        if idx[0] != len(cache):
            raise RuntimeError(f"{type(block).__name__} used {idx[0]} feature-cache slots where vader's "
                               f"checkpointed Wan decode expects {len(cache)}: this diffusers changed it")
        return out, cache

    def checkpointed(x: Tensor, feat_cache: FeatCache | None = None, feat_idx: list[int] | None = None) -> Tensor:
        if feat_cache is None or feat_idx is None:
            return forward(x)
        start = feat_idx[0]
        out, new = _checkpointed(step, x, feat_cache[start: start + RESIDUAL_SLOTS])
        feat_cache[start: start + RESIDUAL_SLOTS] = new
        feat_idx[0] += RESIDUAL_SLOTS
        return out

    return checkpointed


@contextlib.contextmanager
def _residuals_checkpointed(decoder: nn.Module) -> Iterator[None]:
    """The decoder's residual blocks checkpointed while inside (an instance attribute on each block,
    wrapping the forward it had, hooks such as accelerate's included: the class and other decoders are
    untouched). Every run of a chunk enters it, its recomputation in backward included, so that both
    save the same tensors."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    blocks = [m for m in decoder.modules() if isinstance(m, WanResidualBlock)]
    before = [m.__dict__.get("forward") for m in blocks]
    for block in blocks:
        block.forward = _checkpointed_residual(block, block.forward)
    try:
        yield
    finally:
        for block, previous in zip(blocks, before):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def _chunk_step(decoder: nn.Module, first_chunk: bool) -> CachedStep:
    def step(x: Tensor, cache: FeatCache) -> tuple[Tensor, FeatCache]:
        cache = list(cache)
        with _residuals_checkpointed(decoder):
            out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
        return out, cache

    return step


class HostMemory:
    """CPU memory for tensors backward needs again later: `put` copies one there, `get` brings it back to
    `device`. Synchronous copies: the caches are read back once per chunk of backward, and a non-blocking
    copy into pageable memory would be synchronous anyway."""

    def put(self, tensor: Tensor) -> Tensor:
        return tensor.detach().to("cpu", copy=True)

    def get(self, tensor: Tensor, device: torch.device) -> Tensor:
        return tensor.to(device)


class _CacheReplay:
    """Stands in for the feature caches that the chunks' checkpoints keep as inputs. The cache left by
    every `every`-th chunk is kept; the others are saved as (chunk, position) and recomputed in
    backward, just before the chunk that reads them is, by decoding the chunks since the last kept
    cache again without gradients: the same operations on the same values, so the same cache.
    Forward keeps n / every caches instead of n, for (every - 1) / 2 extra chunk decodes per chunk.
    With `host` the kept caches are held in its memory (the CPU) and brought back when backward needs them."""

    def __init__(self, decoder: nn.Module, x: Tensor, initial: FeatCache, every: int,
                 host: HostMemory | None = None) -> None:
        self.decoder, self.x, self.every, self.host = decoder, x.detach(), every, host
        self.kept: dict[int, FeatCache] = {-1: list(initial)}  # the cache chunk k left (-1: none yet)
        self.replayed: dict[int, tuple[list[Tensor], list[int]]] = {}  # k -> (tensors, how many not handed out)
        self.autocast: dict[int, list[tuple[str, bool, torch.dtype]]] = {}  # chunk -> its forward's autocast

    @contextlib.contextmanager
    def saving(self, k: int, cache: FeatCache) -> Iterator[None]:
        """Around the checkpoint of chunk k + 1, whose inputs include `cache`, the cache chunk k left."""
        # backward may run outside the forward's autocast (as training's does): replays re-enter it,
        # as checkpoint's own recomputation does
        device_types = [t for t in dict.fromkeys([self.x.device.type, "cpu"]) if torch.amp.is_autocast_available(t)]
        self.autocast[k + 1] = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types]
        if k < 0 or (k + 1) % self.every == 0:
            kept = [entry.detach() if isinstance(entry, Tensor) else entry for entry in cache]
            if self.host is None:  # the checkpoint holds the same tensors as its inputs
                self.kept[k] = kept
                yield
                return
            self.kept[k] = [self.host.put(entry) if isinstance(entry, Tensor) else entry for entry in kept]
        # by id: the hooks live as long as the graph, and must not keep the tensors alive themselves
        positions = {id(t): j for j, t in enumerate(_split(cache)[1])}

        def pack(t: Tensor) -> Tensor | tuple[int, int]:
            j = positions.get(id(t))
            return t if j is None else (k, j)

        def unpack(packed: Tensor | tuple[int, int]) -> Tensor:
            return packed if isinstance(packed, Tensor) else self._tensor(*packed)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _tensor(self, k: int, j: int) -> Tensor:
        if k in self.kept:  # in host memory (the kept ones are saved as positions only with a host)
            assert self.host is not None
            return self.host.get(_split(self.kept[k])[1][j], self.x.device)
        # checkpoint unpacks a chunk's inputs one by one: replay once, hand out each tensor, then forget
        if k not in self.replayed:
            tensors = _split(self._replay(k))[1]
            self.replayed[k] = (tensors, [len(tensors)])
        tensors, left = self.replayed[k]
        left[0] -= 1
        if left[0] == 0:
            del self.replayed[k]
        return tensors[j]

    def _replay(self, k: int) -> FeatCache:
        start = max(b for b in self.kept if b < k)
        cache = self.kept[start] if self.host is None else _join(_split(self.kept[start])[0],
                                                                  self._on_device(self.kept[start]))
        with torch.no_grad():
            for i in range(start + 1, k + 1):
                cache = list(cache)
                with contextlib.ExitStack() as stack:
                    for device_type, enabled, dtype in self.autocast[i]:
                        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
                    self.decoder(self.x[:, :, i: i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
        return cache

    def _on_device(self, cache: FeatCache) -> list[Tensor]:
        assert self.host is not None
        return [self.host.get(t, self.x.device) for t in _split(cache)[1]]


def decode_chunks(vae: nn.Module, latents: Tensor, grad_checkpoint: bool = False,
                  host: HostMemory | None = None) -> Iterator[Tensor]:
    """Decoded chunks [B, 3, f, H, W] in [-1, 1], in order: the first latent frame alone (one output
    frame), then one latent frame (4 output frames) per chunk, each with the feature cache of the
    chunks before it. Gradients flow back to `latents`. With `grad_checkpoint` (and autograd
    recording), backward recomputes what it needs instead of forward keeping it: the same values and
    gradients, for memory of about one chunk plus sqrt(chunks) feature caches, and about twice the
    decode's compute; with a `host`, those sqrt(chunks) caches wait in its (CPU) memory instead."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    cfg = vae.config
    z = latents.to(vae.dtype)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
    z = z / inv_std + mean  # WanPipeline's own expression, so the full decode matches it bit for bit
    # AutoencoderKLWan._decode, one latent frame per call. The plain path keeps the cache on the module
    # as diffusers does; the checkpointed one threads it through pure functions instead. The module's
    # cache is cleared either way, so that a generator closed early leaves nothing behind.
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        n = x.shape[2]
        cache: FeatCache = list(vae._feat_map)
        replay = None
        if grad_checkpoint and torch.is_grad_enabled():
            # sqrt(n) caches kept, at most sqrt(n) - 1 chunks replayed for each of the others
            replay = _CacheReplay(vae.decoder, x, cache, every=math.ceil(math.sqrt(n)), host=host)
        for i in range(n):
            chunk = x[:, :, i: i + 1]
            if replay is not None:
                with replay.saving(i - 1, cache):
                    out, cache = _checkpointed(_chunk_step(vae.decoder, i == 0), chunk, cache)
            else:
                vae._conv_idx = [0]
                out = vae.decoder(chunk, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
            if cfg.patch_size is not None:
                out = unpatchify(out, patch_size=cfg.patch_size)
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()
