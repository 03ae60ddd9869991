"""Denoiser forward + backward time with fused attention (`model.attention='sdpa'`) vs the reference's math.

STDiT3 at XL width (hidden 1152, 16 heads, T5 captions 4096 x 300 with 30 valid tokens) but only
2 blocks, random weights, the original's LoRA (qkv, q_linear, kv_linear; rank 16 as lora_rank's
default), one classifier-free-guidance call (batch 2: prompt and null caption), fp32 by default.
Prints seconds per iteration (median) and the MiB autograd keeps for backward for each backend, the
ratio and the device. Example:

    python benchmarks/attention.py            # 2 latent frames of 240p 16:9 (30 x 54 latent, 810 tokens)
    python benchmarks/attention.py --frames 15 --height 30 --width 53   # 240p 2s: on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import add_lora, lora_config
from vader.models.stdit3 import STDiT3, STDiT3Config


def build(depth: int, rank: int, backend: str, device: torch.device, dtype: torch.dtype) -> STDiT3:
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(depth=depth))  # XL/2 width: hidden 1152, 16 heads, captions 4096 x 300
    model.init_weights(std=model.config.hidden_size**-0.5)
    model = model.to(device=device, dtype=dtype).requires_grad_(False).eval()
    model.set_attention_backend(backend)
    add_lora(model, lora_config(rank, targets=LORA_TARGETS))
    return model


def inputs(frames: int, height: int, width: int, valid_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[0, :valid_tokens] = 1
    kw = dict(x=torch.randn(2, 4, frames, height, width, generator=g), timestep=torch.full((2,), 700.0),
              y=torch.randn(2, 1, 300, 4096, generator=g), mask=mask, fps=torch.tensor([24.0]),
              height=torch.tensor([8.0 * height]), width=torch.tensor([8.0 * width]))
    return {k: v.to(device) for k, v in kw.items()}


def seconds_per_iteration(model: STDiT3, kw: dict[str, torch.Tensor], iters: int) -> float:
    times = []
    for i in range(iters + 1):  # the first is warm-up
        if kw["x"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**kw).square().mean().backward()
        if kw["x"].is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def saved_for_backward_mb(model: STDiT3, kw: dict[str, torch.Tensor]) -> float:
    """Bytes autograd keeps from one forward for the backward (distinct storages): the activation
    memory of the gradient window, which the math path fills with attention matrices."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**kw)
    del out
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2, help="latent frames (5 per 17 video frames)")
    parser.add_argument("--height", type=int, default=30, help="latent height (x8 pixels)")
    parser.add_argument("--width", type=int, default=54, help="latent width (x8 pixels)")
    parser.add_argument("--valid-tokens", type=int, default=30)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"device {name} | torch {torch.__version__} | STDiT3 hidden 1152, 16 heads, {args.depth} blocks, "
          f"LoRA r={args.lora_rank} | CFG batch 2 x {tokens} tokens ({args.frames} x {args.height // 2} x "
          f"{args.width // 2}) | {args.dtype} | median of {args.iters}")
    kw = inputs(args.frames, args.height, args.width, args.valid_tokens, device)
    result = {}
    for backend in ("math", "sdpa"):
        model = build(args.depth, args.lora_rank, backend, device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            result[backend] = seconds_per_iteration(model, kw, args.iters)
            saved = saved_for_backward_mb(model, kw)
        print(f"{backend:>5}: {result[backend]:.3f} s/iteration (forward + backward), {saved:.0f} MiB saved for backward")
        del model
    print(f"sdpa / math: {result['sdpa'] / result['math']:.2f}")


if __name__ == "__main__":
    main()
