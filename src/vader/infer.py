"""Inference: generate videos for the prompts, optionally with a trained LoRA.

As the original script in inference mode: num_val_runs × val_batch_size × num_processes videos,
cycling through the prompt list, from fixed seeds. An image-to-video model gets the prompts' first frames
(`prompt<TAB>image path`, checked by the preflight) when its generator is built (vader.run.build_generator);
the videos written are whole, frame 0 (the given image, re-generated) included.
"""

from __future__ import annotations

from pathlib import Path

from vader.checkpoint import add_lora, load_lora, lora_config, saved_lora_config
from vader.config import VaderConfig
from vader.preflight import preflight
from vader.run import Run, build_generator, make_accelerator


def infer(cfg: VaderConfig) -> list[Path]:
    """Returns this process's mp4 paths (under <run>/samples/)."""
    preflight(cfg, "infer")  # every check that can fail, before a folder or a model exists
    accelerator = make_accelerator(cfg)
    run = Run.create(cfg, accelerator, kind="infer")
    with run.discard_on_failure():  # a run that fails before its first video leaves no folder
        gen = build_generator(cfg, run, accelerator.device)
        if cfg.lora_ckpt_path:
            # our adapter folders carry their rank/alpha; the original .pt files need lora_rank/lora_alpha
            saved = saved_lora_config(cfg.lora_ckpt_path, key="lora_ckpt_path")
            add_lora(gen.denoiser, saved or lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                                         targets=gen.lora_target_modules))
            load_lora(gen.denoiser, cfg.lora_ckpt_path)
            run.note(f"loaded LoRA {cfg.lora_ckpt_path}")
        paths, _, _ = run.sample_videos(gen, None, run.dir / "samples", tag="infer")
        run.note(f"{len(paths)} video(s) per process in {run.dir / 'samples'}")
    accelerator.end_training()
    return paths
