"""sharding='fsdp': the frozen denoiser split over processes with FSDP2 (CPU, gloo), the LoRA whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO, TINY_TRAIN
from safetensors.torch import load_file
from torch import nn

from vader.errors import VaderError
from vader.sharding import check_sharding, shard_units

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vader", "train",
          str(TINY_TRAIN), *FAST, "--max_train_steps", "2", "--checkpointing_steps", "1", "--verbose", "1"]


def _train(tmp_path, run_name: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")
    proc = subprocess.run([*LAUNCH, "--project_dir", str(tmp_path), "--run_name", run_name, *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _lora(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_the_same_lora_and_resumes_exactly(tmp_path):
    _train(tmp_path, "replicated")
    # validation and the base-vs-LoRA videos sample through the sharded model too (collective forwards)
    sharded = _train(tmp_path, "sharded", "--sharding", "fsdp", "--is_sample_preview", "True")
    assert "split over 2 process(es) in 5 FSDP unit(s)" in sharded.stdout + sharded.stderr  # 2+2 blocks, root
    assert len(list((tmp_path / "sharded" / "samples" / "base").glob("*.mp4"))) == 2 * 2
    plain, fsdp = _lora(tmp_path / "replicated" / "lora"), _lora(tmp_path / "sharded" / "lora")
    assert plain.keys() == fsdp.keys() and any(t.abs().sum() > 0 for k, t in fsdp.items() if "lora_B" in k)
    for key in plain:
        scale = plain[key].abs().max().clamp_min(1e-12)
        assert float((plain[key] - fsdp[key]).abs().max() / scale) <= 1e-5, key
    # stopped after step 1, resumed under fsdp: the same LoRA and optimizer state as the run that went on
    first = tmp_path / "sharded" / "checkpoints" / "checkpoint-000001"
    _train(tmp_path, "resumed", "--sharding", "fsdp", "--resume_from", str(first))
    resumed = _lora(tmp_path / "resumed" / "lora")
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)
    end = "checkpoints/checkpoint-000002/training_state.pt"
    state_a = torch.load(tmp_path / "sharded" / end, weights_only=False)["optimizer"]["state"]
    state_b = torch.load(tmp_path / "resumed" / end, weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)


SPLIT = """
import os, sys
import torch, torch.distributed as dist
from vader.checkpoint import add_lora, lora_config
from vader.models.presets import tiny_stdit3_config
from vader.models.stdit3 import STDiT3
from vader.sharding import count_collectives, shard

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(0)
model = STDiT3(tiny_stdit3_config()).eval()
params = add_lora(model, lora_config(4, 4.0, 0.0, targets=["qkv", "q_linear", "kv_linear"]))
for p in params:
    torch.nn.init.normal_(p, std=0.02)
frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
x = torch.randn(2, model.config.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(1))
kw = dict(timestep=torch.tensor([500.0, 800.0]), fps=torch.tensor([24.0]), height=torch.tensor([64.0]),
          width=torch.tensor([64.0]),
          y=torch.randn(2, 1, model.config.model_max_length, model.config.caption_channels,
                        generator=torch.Generator().manual_seed(2)))
whole = model(x, **kw)
class Gen:
    denoiser = model
units = shard(Gen(), params, 2, torch.device("cpu"))
local = sum(p.to_local().numel() for p in model.parameters() if not p.requires_grad)
lora_whole = all(type(p) is torch.nn.Parameter for p in params) and all(p in set(model.parameters()) for p in params)
with count_collectives() as graph:
    out = model(x, **kw)
    out.square().mean().backward()
with count_collectives() as nograd, torch.no_grad():
    model(x, **kw)
grads = all(p.grad is not None and type(p.grad) is torch.Tensor for p in params)
print(f"RESULT {rank} {units} {frozen} {local} {lora_whole} {grads} {float((out - whole).abs().max())} "
      f"{graph.calls['all_gather']} {graph.bytes['all_gather']} {nograd.calls['all_gather']} "
      f"{nograd.bytes['all_gather']} {sorted(graph.calls)}", flush=True)
dist.destroy_process_group()
"""


def test_shard_splits_the_frozen_weights_keeps_the_lora_whole_and_computes_the_same(tmp_path):
    script = tmp_path / "split.py"
    script.write_text(SPLIT)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "rendezvous")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    rows = [next(line.split(maxsplit=12)[1:] for line in out.splitlines() if line.startswith("RESULT"))
            for out, _ in outs]
    for _rank, units, frozen, local, lora_whole, grads, diff, calls, received, calls0, received0, kinds in rows:
        assert int(units) == 2 * 2 + 1  # STDiT3-tiny: 2 spatial + 2 temporal blocks, then the root
        assert int(frozen) / 2 <= int(local) <= int(frozen) / 2 + 64 * 5  # half each, dim 0 padded per unit
        assert lora_whole == "True" and grads == "True"
        assert float(diff) <= 1e-6
        # every unit gathered for its forward, and again for its backward (resharded after forward);
        # each gather receives the other process's half of the fp32 weights; nothing reduce-scattered
        assert int(calls0) == 5 and int(calls) == 10
        assert 4 * int(frozen) / 2 <= int(received0) <= 4 * int(local) and int(received) == 2 * int(received0)
        assert kinds == "['all_gather']"
    assert int(rows[0][3]) + int(rows[1][3]) >= int(rows[0][2])


def test_units_are_the_blocks_the_model_names_and_fp8_is_refused():
    from vader.models.presets import tiny_stdit3_config
    from vader.models.stdit3 import STDiT3

    model = STDiT3(tiny_stdit3_config())
    units = shard_units(model)
    assert [type(u).__name__ for u in units] == ["STDiT3Block"] * 4
    with pytest.raises(VaderError, match="names no blocks to shard"):
        shard_units(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(VaderError, match=r"sharding='fsdp' with dtype='fp8'.*dtype='bf16'"):
        check_sharding("fsdp", "fp8")
    check_sharding("fsdp", "bf16")
    check_sharding("none", "fp8")


def test_rand_cutoff_is_one_draw_for_every_process_under_fsdp(tiny_cfg):
    """backprop_mode='rand' under fsdp: every process keeps the same steps' graphs (their backward gathers
    pair up); without sharding each process draws its own, as before."""
    from vader.methods.vader import draw_cutoff
    from vader.seeds import set_step_seed

    def cutoffs(cfg, world):
        return [[draw_cutoff(cfg, set_step_seed(cfg.seed, step, 0, rank), step, 0, world) for rank in range(world)]
                for step in range(20)]

    sharded = cutoffs(tiny_cfg(backprop_mode="rand", sharding="fsdp"), 2)
    assert all(a == b for a, b in sharded) and len({a for a, _ in sharded}) > 1
    replicated = cutoffs(tiny_cfg(backprop_mode="rand"), 2)
    assert any(a != b for a, b in replicated)
    alone = tiny_cfg(backprop_mode="rand", sharding="fsdp")
    assert cutoffs(alone, 1) == cutoffs(tiny_cfg(backprop_mode="rand"), 1)  # one process: its own stream


@pytest.mark.slow
def test_bench_on_two_processes_calibrates_the_sharded_plan(tmp_path):
    """`vader bench` under a 2-process launch with fsdp: each process's planned peak within 10% of its
    measured one (FSDP2's in-place storage frees counted), the all-gathers and all-reduce exactly. The
    plan leaves out FSDP2's all-gather staging buffers (about a unit or two in flight): ~1 MiB here, on
    the preset's 64x64 size (the 32x32 of FAST would make it 16% of a 6.5 MiB step)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")
    cmd = [*LAUNCH[:LAUNCH.index("train")], "bench", str(TINY_TRAIN), "--scheduler.num_sampling_steps", "4",
           "--sharding", "fsdp", "--grad_checkpoint", "True"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("of 2, sharding 'fsdp'") == 2


    offs = [float(x) for x in re.findall(r"measured peak of live tensors: .*\(([-+0-9.]+)% planned vs measured\)", out)]
    assert len(offs) == 2 and all(abs(x) <= 10 for x in offs), out
    gathers = re.findall(r"all-gather bytes .*\(([-+0-9.]+)%\); (\d+) planned / (\d+) measured unit gathers", out)
    assert len(gathers) == 2 and all(float(o) == 0 and a == b and int(a) > 0 for o, a, b in gathers), out
    assert len(re.findall(r"all-reduce bytes .*\([-+]0\.0%\)", out)) == 2, out
