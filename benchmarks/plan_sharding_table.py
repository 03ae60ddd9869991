"""The README's sharding table: Wan VADER training planned per process by `vader plan --num_processes N`.

    HF_HUB_OFFLINE=1 python benchmarks/plan_sharding_table.py [--processes 8] [--out benchmarks/plan_sharding_table.md]

Wan2.1-T2V-1.3B, Wan2.1-T2V-14B and Wan2.2-T2V-A14B (two experts, both sharded) trained as their configs
train them (HPS v2.1, backprop 'last', decoded frame 0, grad_checkpoint, bf16) at 33 frames of 480x832 and
720x1280, on one process and on N, with sharding 'none' and 'fsdp': the per-process peak of the run (the
text encoder, the training step or a validation batch, whichever is highest), what holds it, the training
step's own peak, and each process's all-gather and all-reduce traffic per optimizer step. Figures are tensor bytes from
fake-tensor plans (no GPU, no weights: the published architectures); add ~1-2 GiB for the CUDA context and
allocator slack, and FSDP2's all-gather buffers beyond the two units the plan counts.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vader.plan import GIB, Plan, make_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "wan2.1-t2v-1.3b" / "vader_train.py"
# (name, its config, what to plan with the 1.3B config before that config existed)
MODELS = [
    ("Wan2.1-T2V-1.3B", BASE, []),
    ("Wan2.1-T2V-14B", REPO / "configs" / "wan2.1-t2v-14b" / "vader_train.py",
     ["--model.from_pretrained", "Wan-AI/Wan2.1-T2V-14B-Diffusers"]),
    ("Wan2.2-T2V-A14B", REPO / "configs" / "wan2.2-t2v-a14b" / "vader_train.py",
     ["--model.from_pretrained", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"]),
]
SIZES = [((480, 832), "3.0"), ((720, 1280), "5.0")]  # Wan's flow shift for 480p / 720p (no effect on memory)
STEP = ["--num_frames", "33", "--reward_fn", "hps", "--backprop_mode", "last", "--decode_frame", "0"]
SHORT = {  # the breakdown's labels, short enough for a table cell
    "denoiser": "weights", "denoiser_shard": "weight shard", "gathered": "gathered units", "vae": "VAE",
    "reward_model": "HPS", "sampling": "activations", "decode": "VAE decode", "backward": "backward",
    "infer_decode": "VAE decode", "text_encoder": "UMT5", "encode": "UMT5 encode", "optimizer": "AdamW",
}
GOAL = ("Wan2.1-T2V-14B", (480, 832), "fsdp", 40 * GIB)  # issue 20: fits 40 GiB per process on 8 processes


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def holders(plan: Plan) -> str:
    """The phase that sets the run's peak, and its three largest holders."""
    phase = max((p for p in (plan.text, plan.train, plan.infer) if p is not None), key=lambda p: p.peak)
    if plan.cfg.text_encoder.offload and phase is plan.text:
        phase = max((p for p in (plan.train, plan.infer) if p is not None), key=lambda p: p.peak)
    top = sorted(phase.at_peak.items(), key=lambda kv: -kv[1])[:3]
    return f"{phase.name}: " + ", ".join(f"{SHORT.get(k, k)} {gib(v)}" for k, v in top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plan_sharding_table.md"))
    args = parser.parse_args()
    from vader.config import load_config

    n = args.processes
    rows, goal = [], None
    start = time.time()
    for name, path, fallback in MODELS:
        config, extra = (path, []) if path.exists() else (BASE, fallback)
        for (h, w), shift in SIZES:
            base = [*extra, *STEP, "--image_size", f"({h}, {w})", "--scheduler.shift", shift]
            for processes, sharding in ((1, "none"), (n, "none"), (n, "fsdp")):
                cfg = load_config(config, [*base, "--sharding", sharding] if sharding == "fsdp" else base)
                plan = make_plan(cfg, num_processes=processes)
                comm = plan.train.comm
                gather = gib(comm.all_gather_bytes) if comm and comm.sharded else "-"
                reduce = gib(comm.all_reduce_bytes) if comm else "-"
                label = sharding if processes > 1 else "none (fsdp: the same)"
                rows.append(f"| {name} | {h}x{w} | {processes} | {label} | {gib(plan.peak)} | {holders(plan)} | "
                            f"{gib(plan.train.peak)} | {gather} | {reduce} |")
                print(rows[-1], f"({time.time() - start:.0f}s)", flush=True)
                if (name, (h, w), sharding) == GOAL[:3] and processes == n:
                    goal = plan.peak
    table = "\n".join([
        "| model | size (33 frames) | processes | sharding | peak per process (GiB) | what holds it (GiB) | "
        "training step's peak | all-gather GiB per optimizer step | all-reduce GiB per step |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    lines = [table]
    if goal is not None:
        verdict = "meets" if goal <= GOAL[3] else "misses"
        lines.append(f"\n{GOAL[0]} {GOAL[1][0]}x{GOAL[1][1]}x33, fsdp on {n} processes: {gib(goal)} GiB per process "
                     f"planned, {verdict} the {gib(GOAL[3])} GiB goal.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
