"""Seconds to build each full-size Open-Sora v1.2 model on the meta device (no memory, no weights).

    PYTHONPATH=src python benchmarks/meta_build.py [CONFIG]

CONFIG defaults to configs/opensora-v1-2/vader/vader_train.py. Prints one line per model: the build
time, the parameter count and the state-dict size, then the time peft takes to add the run's LoRA.
Building on meta is the first step of loading published weights (vader.models.loading), so these
seconds are the whole overhead of loading beyond reading the files.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub

from vader.backends import backend_module  # noqa: E402
from vader.config import load_config  # noqa: E402
from vader.inspection import PARTS, build_meta, count_parameters, lora_summary  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "opensora-v1-2" / "vader" / "vader_train.py"


def main(argv: list[str]) -> None:
    cfg = load_config(argv[0] if argv else DEFAULT, argv[1:])
    build_meta(cfg, "vae")  # warm up lazy imports (diffusers, transformers) outside the timings
    for part in PARTS:
        start = time.perf_counter()
        built = build_meta(cfg, part)
        seconds = time.perf_counter() - start
        print(f"{part:<13} {built.title:<18} {seconds:6.2f} s  {count_parameters(built.model):>15,} parameters  "
              f"{len(built.model.state_dict()):>4} keys")
        if part == "denoiser":
            start = time.perf_counter()
            lora = lora_summary(built.model, backend_module(cfg.backend).LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha,
                                cfg.lora_dropout)
            print(f"{'  + LoRA':<13} {'r=' + str(lora.rank):<18} {time.perf_counter() - start:6.2f} s  "
                  f"{lora.trainable:>15,} trainable")


if __name__ == "__main__":
    main(sys.argv[1:])
