"""Cost of decode_frame strategies: 'exact' (true output frames) vs 'latent' (original shortcut).

Prints seconds and peak memory for forward + backward through the VAE decode of the chosen frames,
for each decode_frame mode. Random weights (no download). Example:

    python benchmarks/decode_frames.py --vae full --num-frames 51 --height 272 --width 368
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from vader.frames import decode_selected, select_frames
from vader.models.vae import VideoVAE, opensora_vae_v1_2_config, tiny_vae_config


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (CPU)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--num-frames", type=int, default=51)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--modes", default="-1,fml,alt,all")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = opensora_vae_v1_2_config() if args.vae == "full" else tiny_vae_config()
    torch.manual_seed(0)
    vae = VideoVAE(config).to(device, dtype).eval().requires_grad_(False)
    t, h, w = vae.get_latent_size(args.num_frames, args.height, args.width)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name} | VAE {args.vae} {args.dtype} | {args.num_frames} frames {args.height}x{args.width} "
          f"-> latents {t}x{h}x{w}")
    print(f"{'decode_frame':>12} {'strategy':>8} {'frames':>6} {'seconds':>8} {'peak MB':>8}")
    for mode in args.modes.split(","):
        for strategy in ("exact", "latent"):
            # 'latent' indexes latent frames (the original's meaning), 'exact' output frames
            frames = select_frames(mode, args.num_frames, random.Random(0), strategy, vae)
            z = torch.randn(1, 4, t, h, w, device=device, dtype=dtype, requires_grad=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            video = decode_selected(vae, z, args.num_frames, frames, strategy)
            video.float().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"{mode:>12} {strategy:>8} {len(frames):>6} {time.perf_counter() - start:>8.2f} {peak_mb():>8.0f}")


if __name__ == "__main__":
    main()
