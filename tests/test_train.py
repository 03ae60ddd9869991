"""End-to-end training on the tiny preset: reward rises, runs are reproducible, resume is exact."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vader.errors import VaderError
from vader.infer import infer
from vader.media import read_video
from vader.rewards import build_reward
from vader.seeds import pick_prompts
from vader.train import total_train_steps, train


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lora(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    folder = run / "lora" if step is None else run / "checkpoints" / f"checkpoint-{step:06d}"
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 12-step training run shared by several tests (checkpoints at 4 and 8, videos at the end)."""
    from conftest import FAST, TINY_TRAIN

    from vader.config import load_config

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(TINY_TRAIN, [*FAST, "--project_dir", str(root), "--run_name", "base", "--max_train_steps",
                                   "12", "--checkpointing_steps", "4", "--is_sample_preview", "True",
                                   "--logger_type", "tensorboard", "--reward_fn", "brightness",
                                   "--decode_frame", "all"])
    return cfg, train(cfg)


def test_run_folder_has_lora_checkpoints_videos_metrics_curve_and_logs(trained):
    cfg, run = trained
    assert json.loads((run / "config.json").read_text())["lr"] == cfg.lr
    rows = [r for r in _metrics(run) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"loss", "reward", "grad_norm", "backprop_cutoff", "step_seconds"} <= set(r) for r in rows)
    assert (run / "reward_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000008",
                                                                      "checkpoint-000012"]
    assert (run / "lora" / "adapter_config.json").is_file()
    videos = sorted((run / "samples" / "step-000012").glob("*.mp4"))
    assert len(videos) == cfg.num_val_runs * cfg.val_batch_size  # × 1 process
    assert read_video(videos[0]).shape == (3, 17, 32, 32)
    assert list((run / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    assert not list(run.rglob(".*.tmp*")), "a temporary file or folder was left behind"


def test_training_raises_the_reward_on_fixed_seeds(trained, tmp_path, monkeypatch):
    """Same prompts and seeds, with and without the trained LoRA: the LoRA's videos score higher
    (scored on the exact frames, not on what the H.264 encoder makes of them)."""
    from conftest import FAST, TINY_INFER

    from vader.config import load_config

    cfg, run = trained
    frames = _capture_frames(monkeypatch)
    common = [*FAST, "--project_dir", str(tmp_path), "--num_val_runs", "2", "--val_batch_size", "2"]
    base = infer(load_config(TINY_INFER, [*common, "--run_name", "base"]))
    tuned = infer(load_config(TINY_INFER, [*common, "--run_name", "tuned", "--lora_ckpt_path", str(run / "lora"),
                                           "--lora_rank", str(cfg.lora_rank)]))
    assert len(base) == len(tuned) == 4 and len(frames) == 8
    reward = build_reward("brightness")
    videos = torch.stack([torch.from_numpy(f).permute(3, 0, 1, 2).float() / 127.5 - 1 for f in frames])
    scores = reward(videos, [""] * 8).reward
    before, after = scores[:4].mean().item(), scores[4:].mean().item()
    assert after > before + 0.003, (before, after)  # same seeds: without training the two are equal


def _capture_frames(monkeypatch) -> list:
    """Record the uint8 frames every saved video holds, before the encoder sees them: encoders may
    legitimately produce other bytes for the same frames, so determinism is checked on the frames."""
    import vader.run
    from vader.media import to_uint8, write_video

    frames: list = []

    def spy(path, video, *args, **kwargs):
        frames.append(to_uint8(video).copy())
        return write_video(path, video, *args, **kwargs)

    monkeypatch.setattr(vader.run, "write_video", spy)
    return frames


def test_infer_without_lora_is_deterministic(tmp_path, monkeypatch):
    from conftest import FAST, TINY_INFER

    from vader.config import load_config

    frames = _capture_frames(monkeypatch)
    a = infer(load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path), "--run_name", "a"]))
    torch.manual_seed(12345)  # a different global RNG state must not matter either
    b = infer(load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path), "--run_name", "b"]))
    assert len(a) == len(b) == 2 and len(frames) == 4
    for x, y in zip(frames[:2], frames[2:]):
        assert x.shape == (17, 32, 32, 3) and (x == y).all()
    assert not (frames[0] == frames[1]).all()  # two prompts, two different videos: the spy sees real frames
    # lossless files decode to exactly those frames, so comparing decoded lossless videos is also exact
    c = infer(load_config(TINY_INFER, [*FAST, "--project_dir", str(tmp_path), "--run_name", "c",
                                       "--video_quality", "lossless"]))
    decoded = read_video(c[0])
    assert torch.equal(((decoded + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0),
                       torch.from_numpy(frames[0]))


def test_same_seed_same_run_and_resume_is_exact(trained, tiny_cfg):
    cfg, run = trained
    root = Path(cfg.project_dir)
    # an identical run from scratch reproduces every step
    again = train(tiny_cfg("--project_dir", str(root), "--run_name", "again", "--max_train_steps", "8",
                           "--reward_fn", "brightness", "--decode_frame", "all"))
    rewards = [r["reward"] for r in _metrics(run) if "reward" in r][:8]
    assert [r["reward"] for r in _metrics(again) if "reward" in r] == rewards
    # resuming from step 4 of the base run gives the base run's step-8 LoRA exactly
    resumed = train(tiny_cfg("--project_dir", str(root), "--run_name", "resumed", "--max_train_steps", "8",
                             "--reward_fn", "brightness", "--decode_frame", "all",
                             "--resume_from", str(run / "checkpoints" / "checkpoint-000004")))
    assert [r["step"] for r in _metrics(resumed)] == [5, 6, 7, 8]
    base8, res8 = _lora(run, 8), _lora(resumed)
    assert base8.keys() == res8.keys()
    assert all(torch.equal(base8[k], res8[k]) for k in base8)
    other_seed = train(tiny_cfg("--project_dir", str(root), "--run_name", "seed2", "--max_train_steps", "2",
                                "--seed", "7"))
    assert [r["reward"] for r in _metrics(other_seed)] != rewards[:2]


@pytest.mark.parametrize("decode_frame", ["-1", "3", "all", "alt"])
def test_every_decode_frame_mode_trains(tiny_cfg, decode_frame):
    run = train(tiny_cfg("--decode_frame", decode_frame, "--max_train_steps", "1", "--backprop_mode", "last"))
    (row,) = _metrics(run)
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))


def test_gradient_accumulation_and_latent_decode_and_checkpointing(tiny_cfg):
    run = train(tiny_cfg("--gradient_accumulation_steps", "2", "--max_train_steps", "1", "--decode_strategy",
                         "latent", "--grad_checkpoint", "True", "--backprop_mode", "rand"))
    (row,) = _metrics(run)
    assert row["grad_norm"] > 0


def test_bf16_autocast_on_cpu(tiny_cfg):
    """bf16 weights under bf16 autocast: the frozen weights and the denoiser's activations are bf16,
    the LoRA trains in fp32, and one step moves it with a finite loss."""
    from vader.run import Run, make_accelerator
    from vader.train import setup

    cfg = tiny_cfg("--mixed_precision", "bf16", "--dtype", "bf16", "--run_name", "bf16")
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))
    frozen = [p for n, p in t.gen.denoiser.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in t.params)
    dtypes = set()
    t.gen.denoiser.final_layer.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    before = [p.detach().clone() for p in t.params]
    result = t.step(0)
    assert dtypes == {torch.bfloat16}
    assert not result.skipped and math.isfinite(result.loss) and result.grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, t.params))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed: "
                    "tests/test_gpu.py checks AdamW8bit itself")
def test_adamw8bit_without_bitsandbytes_is_one_line(tiny_cfg):
    with pytest.raises(VaderError) as info:
        train(tiny_cfg("--use_AdamW8bit", "True", "--max_train_steps", "1", "--run_name", "bnb"))
    message = str(info.value)
    assert "bitsandbytes" in message and "use_AdamW8bit=False" in message and "\n" not in message


def test_wandb_offline_logging(tiny_cfg, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = train(tiny_cfg("--logger_type", "wandb", "--use_wandb", "True", "--max_train_steps", "1"))
    assert list((run / "logs").rglob("*.wandb")), "no offline wandb run written"


def test_epochs_and_prompt_order(tiny_cfg):
    cfg = tiny_cfg("--max_train_steps", "None", "--num_train_epochs", "3")
    assert total_train_steps(cfg, num_prompts=8, num_processes=1) == 3 * 4  # batch 2 -> 4 steps per epoch
    prompts = [f"p{i}" for i in range(8)]
    epoch0 = [p for step in range(4) for p in pick_prompts(prompts, cfg, step, 0, 0, 1)]
    assert sorted(epoch0) == prompts  # every prompt exactly once per epoch
    assert pick_prompts(prompts, cfg, 5, 0, 0, 1) == pick_prompts(prompts, cfg, 5, 0, 0, 1)


def test_missing_reward_weights_offline_fail_before_any_generation(tiny_cfg):
    cfg = tiny_cfg("--reward_fn", "{'hps': 1.0, 'pick_score': 0.5}", "--run_name", "nohub")
    with pytest.raises(VaderError) as info:
        train(cfg)
    message = str(info.value)
    assert "xswu/HPSv2" in message and "HPS_v2.1_compressed.pt" in message
    assert "yuvalkirstain/PickScore_v1" in message and "download" in message
    assert not (Path(cfg.project_dir) / "nohub" / "metrics.jsonl").exists()


def test_missing_real_weights_offline_are_all_named_before_anything_starts(tiny_cfg):
    cfg = tiny_cfg("--model.type", "STDiT3-XL/2", "--model.from_pretrained", "hpcai-tech/OpenSora-STDiT-v3",
                   "--text_encoder", "{'type': 't5', 'from_pretrained': 'DeepFloyd/t5-v1_1-xxl'}")
    with pytest.raises(VaderError) as info:
        train(cfg)
    message = str(info.value)
    assert "hpcai-tech/OpenSora-STDiT-v3" in message and "DeepFloyd/t5-v1_1-xxl" in message
    assert "download" in message and "\n" not in message
    assert not Path(cfg.project_dir).exists()  # no run folder for a run that could not start


def test_diverged_lora_across_processes_is_caught():
    from types import SimpleNamespace

    from vader.train import _check_ranks_agree

    params = [torch.nn.Parameter(torch.ones(3))]
    fake = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                           gather=lambda t: torch.cat([t, t + 1]))  # the other rank drifted
    with pytest.raises(RuntimeError, match="differ between processes"):
        _check_ranks_agree(params, fake)
    fake.gather = lambda t: torch.cat([t, t])
    _check_ranks_agree(params, fake)


def test_model_loading_shows_no_library_progress_bar(tiny_cfg):
    """transformers'/diffusers' "Loading weights" bars would precede vader's own bar or an error line;
    huggingface_hub's download bars keep their state."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.enable_progress_bar()
    diffusers.utils.logging.enable_progress_bar()
    train(tiny_cfg("--max_train_steps", "1"))
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not diffusers.utils.logging.is_progress_bar_enabled()
    assert not huggingface_hub.utils.are_progress_bars_disabled()
