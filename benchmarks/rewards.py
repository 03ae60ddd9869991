"""Seconds and peak memory of one forward + backward through each FULL-SIZE reward model.

    PYTHONPATH=src python benchmarks/rewards.py [NAMES...] [--device cpu] [--dtype fp32]
        [--frames 1] [--batch 1] [--size 240x426] [--grad-checkpoint]

NAMES default to aesthetic hps aesthetic_hps pick_score. Models are built from their published
architectures with random weights (no download): CLIP ViT-L/14 vision tower + the LAION MLP,
open_clip ViT-H-14 (HPS), transformers CLIP ViT-H-14 (PickScore). Each reward runs in its own
process so that the peak resident memory (ru_maxrss; CUDA: max_memory_allocated) is its own. Frames
[B, 3, K, H, W] stand in for a decoded 240p clip (default 1x3x1x240x426). Printed per reward: build
seconds (random init), parameters, prepare (text encoding) seconds, the first forward + backward and
a second one, resident memory after the build and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub

NAMES = ["aesthetic", "hps", "aesthetic_hps", "pick_score"]
PROMPT = "a red fox jumping over a wooden fence in the snow"


def _byte_tokenizer():
    """A CLIP BPE tokenizer over the 512 byte symbols (ids < 514, inside the real 49408 vocab)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_full(name: str, grad_checkpoint: bool):
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from vader.rewards.aesthetic import AestheticMLP, AestheticReward
    from vader.rewards.hps import AestheticHPSReward, HPSReward
    from vader.rewards.pickscore import PickScoreReward

    def aesthetic():
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        return AestheticReward(CLIPVisionModelWithProjection(config), AestheticMLP(768), grad_checkpoint=grad_checkpoint)

    def hps():
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        return HPSReward(model, open_clip.get_tokenizer("ViT-H-14"), grad_checkpoint=grad_checkpoint)

    def pick_score():
        config = CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, hidden_act="gelu"),
            projection_dim=1024, logit_scale_init_value=4.6052)
        return PickScoreReward(CLIPModel(config), _byte_tokenizer(), grad_checkpoint=grad_checkpoint)

    if name == "aesthetic_hps":
        return AestheticHPSReward(aesthetic(), hps())
    return {"aesthetic": aesthetic, "hps": hps, "pick_score": pick_score}[name]()


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    import torch

    from vader.rewards.base import as_dtype, freeze

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    reward = freeze(build_full(args.child, args.grad_checkpoint)).to(device=device, dtype=as_dtype(args.dtype))
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in reward.parameters())
    rss_build = _rss_mib()
    h, w = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    reward.prepare([PROMPT])
    prepare_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    runs = []
    for _ in range(2):
        frames = (torch.rand(args.batch, 3, args.frames, h, w, device=device) * 2 - 1).requires_grad_(True)
        t0 = time.perf_counter()
        out = reward(frames, [PROMPT] * args.batch)
        out.loss.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        assert frames.grad is not None and torch.isfinite(frames.grad).all()
    result = {"reward": args.child, "params_M": params / 1e6, "build_s": build_s, "prepare_s": prepare_s,
              "fwd_bwd_s": runs[0], "fwd_bwd_2nd_s": runs[1], "rss_after_build_MiB": rss_build,
              "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "reward_value": float(out.reward.float().mean())}
    if cuda:
        result["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_activations_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default="240x426", help="HxW of the frames")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"frames {args.batch}x3x{args.frames}x{args.size.replace('x', 'x')} on {args.device} in {args.dtype}"
          f"{' with grad checkpointing' if args.grad_checkpoint else ''}; full-size models, random weights")
    header = (f"{'reward':<14}{'params':>9}{'build':>9}{'prepare':>9}{'fwd+bwd':>9}{'2nd':>8}"
              f"{'RSS built':>11}{'peak RSS':>10}")
    print(header + ("   CUDA peak / activations" if args.device.startswith("cuda") else ""))
    for name in args.names:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--dtype", args.dtype,
               "--frames", str(args.frames), "--batch", str(args.batch), "--size", args.size]
        cmd += ["--grad-checkpoint"] if args.grad_checkpoint else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"{name:<14} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1])
        row = (f"{name:<14}{r['params_M']:>8.0f}M{r['build_s']:>8.1f}s{r['prepare_s']:>8.2f}s{r['fwd_bwd_s']:>8.2f}s"
               f"{r['fwd_bwd_2nd_s']:>7.2f}s{r['rss_after_build_MiB']:>8.0f} MiB{r['peak_rss_MiB']:>6.0f} MiB")
        if "cuda_peak_MiB" in r:
            row += f"   {r['cuda_peak_MiB']:.0f} / {r['cuda_activations_MiB']:.0f} MiB"
        print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
