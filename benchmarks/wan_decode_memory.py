"""Planned memory of Wan2.1-T2V-1.3B's VAE decode + backward, with and without checkpointing per chunk.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/wan_decode_memory.py [--frames 0,32,all]

Rows: plain, checkpointed, checkpointed with the kept caches in host memory (`vae.offload_cache`), and
that in bf16 (`vae.dtype='bf16'`).

Fake tensors, no weights, no GPU: the published AutoencoderKLWan (WanGenerator's meta model) in fp32,
as the pipeline loads it, decodes latents [1, 16, 9, 60, 104] (480x832, 33 frames) with gradients and
back-propagates a loss on the chosen output frames to the latents, under vader.memory.LiveBytes. Prints
the peak of live tensor storage (the VAE's weights included, listed separately), the FLOPs of decode
+ backward (recomputation and replays included: the cost of checkpointing) and the seconds each plan
took.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the published config is built in; nothing needs the hub

import torch  # noqa: E402

from vader.backends import common, wan, wan_decode  # noqa: E402
from vader.memory import LiveBytes, PlannedHostMemory, fake_mode, materialise  # noqa: E402

GIB = 2**30


def plan(vae: torch.nn.Module, latent_shape: tuple[int, ...], frames: list[int] | None,
         grad_checkpoint: bool, offload: bool = False, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """(peak bytes of decode + backward, bytes of the VAE's weights, FLOPs) on fake tensors."""
    meter = LiveBytes()
    total = (latent_shape[2] - 1) * vae.config.scale_factor_temporal + 1
    with fake_mode(), meter:
        with meter.phase("vae"):
            materialise(vae, dtype)
        latents = torch.empty(latent_shape, requires_grad=True, dtype=dtype)
        host = PlannedHostMemory(meter) if offload else None
        with meter.phase("decode"):
            video = common.decode_until(wan_decode.decode_chunks(vae, latents, grad_checkpoint=grad_checkpoint,
                                                                 host=host), frames, total)
        with meter.phase("backward"):
            video.float().mean().backward()
    return meter.peak, meter.by_label.get("vae", 0), sum(meter.flops.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="0,32,all", help="output frames to take the loss on, one plan each")
    parser.add_argument("--latents", default="1,16,9,60,104", help="B,C,T,H,W (default: 480x832, 33 frames)")
    args = parser.parse_args()

    shape = tuple(int(n) for n in args.latents.split(","))
    vae = wan.meta_models()["vae"].eval().requires_grad_(False)
    total = (shape[2] - 1) * vae.config.scale_factor_temporal + 1
    print(f"Wan2.1 VAE | latents {list(shape)} -> {total} frames "
          f"{shape[3] * vae.config.scale_factor_spatial}x{shape[4] * vae.config.scale_factor_spatial}")
    print(f"{'frames':>8} {'checkpoint':>18} {'dtype':>5} {'peak GiB':>9} {'weights GiB':>11} {'TFLOP':>7} {'seconds':>8}")
    for name in args.frames.split(","):
        frames = None if name == "all" else [int(name)]
        for grad_checkpoint, offload, dtype in ((False, False, torch.float32), (True, False, torch.float32),
                                                (True, True, torch.float32), (True, True, torch.bfloat16)):
            start = time.perf_counter()
            peak, weights, flops = plan(vae, shape, frames, grad_checkpoint, offload, dtype)
            how = "offload_cache" if offload else str(grad_checkpoint)
            print(f"{name:>8} {how:>18} {'bf16' if dtype == torch.bfloat16 else 'fp32':>5} {peak / GIB:>9.2f} {weights / GIB:>11.2f} "
                  f"{flops / 1e12:>7.1f} {time.perf_counter() - start:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
