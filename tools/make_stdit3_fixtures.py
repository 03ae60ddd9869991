"""Write the STDiT3 reference fixtures used by tests/test_stdit3.py.

Runs the *reference* Open-Sora v1.2 STDiT3 (imported from a checkout given on the command line;
no reference code is copied here) and writes, under --out (default tests/fixtures/stdit3):

- stdit3_xl2_keys.tsv: `key<TAB>d0,d1,...` per state_dict entry of STDiT3-XL/2, in order.
- tiny_parity.safetensors: a tiny STDiT3 with seeded random weights (every parameter and the
  null-caption buffer randomised, including the ones the reference zero-initialises), seeded
  inputs for a CFG-style batch (x batch 2n, mask/fps/height/width batch n, padded text mask,
  odd latent H and W) and the reference outputs with and without a partial x_mask. The config
  is stored as JSON in the metadata under "config".

It needs an environment with the reference's own pins, not this project's, e.g.:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch timm==0.9.16 rotary_embedding_torch==0.5.3 einops \
        'transformers<4.40' 'diffusers==0.27.2' 'huggingface_hub<0.26' safetensors mmengine
    /tmp/refvenv/bin/python tools/make_stdit3_fixtures.py --reference /path/to/VADER-Open-Sora

Only the modules STDiT3 needs are loaded (the `opensora` package __init__ files, which import
every model, are bypassed). xformers has no CPU kernels, so a small stand-in with the same
semantics as `memory_efficient_attention` + `BlockDiagonalMask` (each query block attends to its
own key block; plain fp32 softmax) is installed; the checkpoint loader (which needs colossalai)
is replaced by a stub that is never called.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(hidden_size=32, depth=2, num_heads=4, caption_channels=32, model_max_length=8)
SEED = 1234


# --- stand-ins for modules the reference imports but that cannot run here ---------------------


class BlockDiagonalMask:
    """Query block i attends to key block i only (xformers.ops.fmha.BlockDiagonalMask)."""

    def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]) -> None:
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int] | None = None) -> BlockDiagonalMask:
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)


def memory_efficient_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = 0.0, attn_bias: object = None
) -> torch.Tensor:
    """q [1, Mq, H, D], k/v [1, Mk, H, D] -> [1, Mq, H, D], softmax(q k^T / sqrt(D)) v per block."""
    assert p == 0.0 and q.shape[0] == 1
    if attn_bias is None:
        attn_bias = BlockDiagonalMask([q.shape[1]], [k.shape[1]])
    assert isinstance(attn_bias, BlockDiagonalMask)
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen, strict=True):
        qb = q[0, q0 : q0 + lq].transpose(0, 1)  # [H, lq, D]
        kb = k[0, k0 : k0 + lk].transpose(0, 1)
        vb = v[0, k0 : k0 + lk].transpose(0, 1)
        w = (qb @ kb.transpose(-1, -2) / q.shape[-1] ** 0.5).float().softmax(-1).to(q.dtype)
        outs.append((w @ vb).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)[None]


def _no_checkpoint_loader(*args: object, **kwargs: object) -> None:
    raise RuntimeError("the reference checkpoint loader is not available here")


def install_stand_ins(reference: Path) -> None:
    root = reference / "opensora"
    for name, path in [
        ("opensora", root),
        ("opensora.models", root / "models"),
        ("opensora.models.layers", root / "models" / "layers"),
        ("opensora.models.stdit", root / "models" / "stdit"),
        ("opensora.utils", root / "utils"),
        ("opensora.acceleration", root / "acceleration"),
    ]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]  # a namespace without running the package's __init__
        sys.modules[name] = pkg
    ckpt = types.ModuleType("opensora.utils.ckpt_utils")
    ckpt.load_checkpoint = _no_checkpoint_loader  # type: ignore[attr-defined]
    sys.modules[ckpt.__name__] = ckpt
    xformers, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
    fmha.BlockDiagonalMask = BlockDiagonalMask  # type: ignore[attr-defined]
    ops.fmha = fmha  # type: ignore[attr-defined]
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    xformers.ops = ops  # type: ignore[attr-defined]
    sys.modules.update({"xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha})


# --- fixtures ----------------------------------------------------------------------------------


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Move each parameter to meta as it is registered (like accelerate's init_empty_weights).

    `with torch.device("meta")` does not work here: the reference calls .item() on a tensor
    while building. Buffers stay real; the only persistent one is small.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def write_xl2_keys(stdit3: types.ModuleType, out: Path) -> None:
    config = stdit3.STDiT3Config(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16)
    with parameters_on_meta():
        model = stdit3.STDiT3(config)
    lines = [f"{k}\t{','.join(str(d) for d in v.shape)}" for k, v in model.state_dict().items()]
    (out / "stdit3_xl2_keys.tsv").write_text("\n".join(lines) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"XL/2: {len(lines)} state_dict keys, {n_params:,} parameters")


@torch.no_grad()
def randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial values everywhere, so zero-initialised paths are tested too."""
    for name, t in model.state_dict().items():
        if name == "rope.freqs":
            # Perturbed so a re-implementation that recomputes the frequencies instead of using
            # the loaded parameter (as the reference does) would fail.
            t.mul_(0.5 + torch.rand(t.shape, generator=g))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        elif name == "y_embedder.y_embedding":
            t.copy_(torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.15 * torch.randn(t.shape, generator=g))


def tiny_inputs(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """CFG batch: n = 2 prompts, B = 4 = [cond; uncond], latent T=3, H=5, W=9 (odd)."""
    n, t, h, w = 2, 3, 5, 9
    z = torch.randn(n, 4, t, h, w, generator=g)
    steps = torch.rand(n, generator=g) * 1000
    y = torch.randn(n, 1, TINY["model_max_length"], TINY["caption_channels"], generator=g)
    null = model.y_embedder.y_embedding[None, None].repeat(n, 1, 1, 1)
    mask = torch.zeros(n, TINY["model_max_length"], dtype=torch.int64)
    mask[0, :3] = 1
    mask[1, :6] = 1
    x_mask = torch.ones(2 * n, t, dtype=torch.bool)
    x_mask[0, 0] = x_mask[3, 2] = False
    return {
        "x": torch.cat([z, z]),
        "timestep": torch.cat([steps, steps]),
        "y": torch.cat([y, null]),
        "mask": mask,
        "x_mask": x_mask,
        "fps": torch.tensor([24.0, 12.0]),
        "height": torch.tensor([40.0, 40.0]),
        "width": torch.tensor([72.0, 72.0]),
    }


def write_tiny_parity(stdit3: types.ModuleType, out: Path) -> None:
    g = torch.Generator().manual_seed(SEED)
    config = stdit3.STDiT3Config(**TINY)
    model = stdit3.STDiT3(config).eval()
    randomise(model, g)
    inputs = tiny_inputs(model, g)
    with torch.no_grad():
        with_mask = model(**inputs)
        without = model(**{k: v for k, v in inputs.items() if k != "x_mask"})
    tensors = {f"weights.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"inputs.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["output.x_mask"] = with_mask.contiguous()
    tensors["output.no_x_mask"] = without.contiguous()
    meta = {"config": json.dumps(TINY), "source": "reference Open-Sora v1.2 STDiT3, fp32, CPU"}
    path = out / "tiny_parity.safetensors"
    save_file(tensors, path, metadata=meta)
    path.chmod(0o644)  # save_file creates it owner-only
    print(f"tiny parity: output {tuple(with_mask.shape)}, {path.stat().st_size:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="VADER-Open-Sora (or Open-Sora v1.2) checkout"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "tests" / "fixtures" / "stdit3"
    )
    args = parser.parse_args()
    install_stand_ins(args.reference)
    stdit3 = importlib.import_module("opensora.models.stdit.stdit3")
    torch.set_num_threads(1)  # deterministic reductions for the saved output
    args.out.mkdir(parents=True, exist_ok=True)
    write_xl2_keys(stdit3, args.out)
    write_tiny_parity(stdit3, args.out)


if __name__ == "__main__":
    main()
