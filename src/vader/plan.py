"""`vader plan`: will a config fit a GPU, what holds the memory, how long a step takes, and how to make it fit.

The plan runs the real training step of the config — prompt embeddings, the sampler with the backprop
cutoff, the VAE decode of the chosen frames, the reward, backward and the AdamW step — and one
inference batch, at full size under torch's FakeTensorMode: shapes only, no weights, no GPU, seconds
on a CPU. `vader.memory.LiveBytes` counts every live tensor storage and records what held the peak;
torch.utils.flop_counter's formulas count the FLOPs. The text encoder runs first and is released before the
denoiser loads (as every backend's `build` does), so it is planned as its own phase. The backend builds
its generator on fake tensors (`plan_generator`), the method runs its micro-step on it (`plan_step`): the
plan runs the same calls as training, through the same two seams.

Exactness: sampling steps before the cutoff run without autograd, so they keep nothing; the plan runs
one of them for memory and multiplies its FLOPs (`all_steps=True` runs every step; the peaks are equal,
tested). Captions are planned at model_max_length tokens (the longest prompt possible); a real run
trims to its longest prompt. backprop_mode='rand' and decode_frame='-1' are planned at their worst
case (every step with gradients; the costliest frame). A 'module:function' reward is a Python function
with no model and no gradient: it is planned as such (a weightless stand-in, never the function itself).

Processes (`--num_processes N`): every figure is per process. With sharding='fsdp' on 2 or more the plan
applies FSDP2 as `vader.sharding.shard` does, simulated on the fake tensors (`vader.memory.PlannedFSDP`,
checked against real FSDP2 in tests/test_plan_sharding.py): the frozen denoiser weights count at their
padded 1/N shard, and each unit counts whole from its all-gather to its reshard, through the real step's
forward calls, backward, prefetching and checkpoint recomputation; its all-gathers are counted as they
happen and scaled like the FLOPs. On 2 or more processes (either sharding) the LoRA gradients' all-reduce
adds its buffers (`vader.methods.update.average_gradients`) and its traffic. `vader bench` under a
multi-process launch measures both beside the plan (`bench_main`).

Bounded in time: fake tensors make a plan's cost independent of tensor sizes, but not of the number of
model calls, which grows with videos x frames (the VAE decodes frame micro-batches) and with the
sampling steps. `check_plan_size` refuses, in one line and before any work, sizes past PLAN_LIMITS.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from vader.backends import backend_module
from vader.checkpoint import set_lora_dropout
from vader.config import VaderConfig, is_callable_spec, load_config
from vader.dtypes import DTYPES
from vader.errors import VaderError
from vader.frames import decode_choices, select_frames
from vader.memory import LiveBytes, PlannedFSDP, PlannedSteps, fake_mode, materialise
from vader.methods import method_module
from vader.methods.base import PlannedStep
from vader.models.presets import torch_dtype
from vader.preflight import preflight
from vader.rewards import check_decode_frame, reward_skeleton
from vader.rewards.skeleton import callable_skeleton
from vader.run import Run, load_prompts, make_accelerator
from vader.sharding import (
    Collectives,
    check_sharding,
    count_collectives,
    denoisers,
    shard_units,
    storage_resizes,
)
from vader.train import setup

GIB = 2**30
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the step-time estimate.
GPU_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "RTX4090": 165.0,
              "A10G": 125.0, "V100": 125.0}
DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.35

# What the breakdown calls each kind of memory, in printing order.
LABELS = {
    "denoiser": "denoiser weights (frozen)",
    "denoiser_shard": "denoiser weights (frozen): this process's 1/{n} shard",
    "gathered": "FSDP units gathered whole (all-gather)",
    "denoiser_buffers": "denoiser buffers (whole on every process)",
    "vae": "VAE weights (frozen)",
    "reward_model": "reward model weights (frozen)",
    "lora": "LoRA parameters (fp32)",
    "grads": "LoRA gradients",
    "optimizer": "optimizer state",
    "prompts": "prompt embeddings",
    "sampling": "sampling: activations kept for the gradient window",
    "decode": "VAE decode (with gradients)",
    "reward": "reward forward",
    "backward": "backward transients",
    "step": "optimizer step transients",
    "allreduce": "LoRA gradient all-reduce buffers",
    "sampling_nograd": "sampling: a step without gradients",
    "reward_prepare": "reward: prompts prepared once",
    "infer_decode": "VAE decode (no gradients)",
    "text_encoder": "text encoder weights (fp32)",
    "encode": "prompt encoding",
}


@dataclass
class Comm:
    """One process's collective traffic for one optimizer step (training) or one batch (inference):
    bytes received, as NCCL moves them on a ring. FSDP is the sharding `vader.sharding.shard` applies."""

    num_processes: int
    sharded: bool  # sharding='fsdp' on 2 or more processes
    units: int = 0  # FSDP units (blocks and roots)
    weight_bytes: int = 0  # the sharded (frozen denoiser) weights, whole
    shard_bytes: int = 0  # of them on one process, dim 0 padded to a multiple of N
    largest_unit_bytes: int = 0  # the largest unit, gathered whole
    root_bytes: int = 0  # the largest root's own weights (outside its blocks), gathered whole
    most_gathered_bytes: int = 0  # the most weight bytes gathered whole at once during the phase
    all_gathers: float = 0.0  # unit gathers
    forward_gathers: float = 0.0  # of them, in the forward passes (sampling)
    all_gather_bytes: float = 0.0  # (N - 1)/N x the gathered unit's bytes, per gather
    reduce_scatter_bytes: float = 0.0  # always 0: no sharded parameter has a gradient (the LoRA is whole)
    all_reduce_bytes: float = 0.0  # the LoRA gradients, once per optimizer step: 2 (N - 1)/N x their bytes

    @property
    def backward_gathers(self) -> float:
        return self.all_gathers - self.forward_gathers

    def as_dict(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.__dict__.items()}
        out["backward_gathers"] = float(self.backward_gathers)
        return out


@dataclass
class PhasePlan:
    """One measured phase: its peak, what held it, and its FLOPs."""

    name: str
    peak: int
    at_peak: dict[str, int]
    peak_phase: str
    flops: dict[str, float] = field(default_factory=dict)
    comm: Comm | None = None  # only when planned for 2 or more processes

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


@dataclass
class Plan:
    cfg: VaderConfig
    text: PhasePlan
    train: PhasePlan | None
    infer: PhasePlan
    cutoff: int | None
    frames: list[int]
    notes: list[str]
    how: str = ""  # the training step in words (the method's PlannedStep.how)
    num_processes: int = 1  # every figure is per process

    @property
    def peak(self) -> int:
        """The device's peak: T5 counts only when it runs there."""
        phases = (self.train, self.infer) if self.cfg.text_encoder.offload else (self.text, self.train, self.infer)
        return max(p.peak for p in phases if p is not None)


# ---------------------------------------------------------------------------------------------
# the measured phases: the backend builds its generator on fake tensors, the method runs its step
# ---------------------------------------------------------------------------------------------


def _reward_on_meta(cfg: VaderConfig, dtype: torch.dtype, num_frames: int):  # type: ignore[no-untyped-def]
    """The reward with no weights: a registered reward's skeleton, or for a 'module:function' reward a
    weightless stand-in that returns zeros (the user's function is never called on fake tensors)."""
    if is_callable_spec(cfg.reward_fn):
        return callable_skeleton(cfg.reward_fn)
    return reward_skeleton(cfg.reward_fn, dtype=dtype, hps_version=cfg.hps_version, resize=cfg.reward_resize,
                           grad_checkpoint=cfg.reward_grad_checkpoint, actpred_frames=cfg.actpred_frames,
                           num_frames=num_frames)


def planned_frames(cfg: VaderConfig, vae: nn.Module | None) -> list[int]:
    """decode_frame's frames; '-1' (one random frame) is planned at the frame that costs the most:
    the last, whose temporal chunk is decoded whole."""
    vae = vae if cfg.decode_strategy == "latent" else None  # only the 'latent' strategy reads its geometry
    if cfg.decode_frame == "-1":
        return [decode_choices(cfg.decode_strategy, cfg.frames, vae) - 1]
    return select_frames(cfg.decode_frame, cfg.frames, random.Random(0), cfg.decode_strategy, vae)


def _flops_of(meter: LiveBytes, scale: dict[str, float] | None = None, times: int = 1) -> dict[str, float]:
    """The meter's FLOPs by part, each phase multiplied by how many times the real step runs it."""
    names = {"sampling_nograd": "sampling (no gradients)", "sampling": "sampling (gradient window)",
             "decode": "VAE decode", "infer_decode": "VAE decode", "reward": "reward", "backward": "backward",
             "encode": "text encoder"}
    out: dict[str, float] = {}
    for label, value in meter.flops.items():
        if label in names and value:
            factor = (scale or {}).get(label, 1.0)
            out[names[label]] = out.get(names[label], 0.0) + value * factor * times
    return out


def _text_phase(cfg: VaderConfig) -> PhasePlan:
    """The backend's text encoder in its dtype on the device, encoding one batch of prompts at
    model_max_length tokens."""
    part = backend_module(cfg.backend).meta_part(cfg, "text_encoder")
    meter = LiveBytes()
    batch = max(cfg.train_batch_size, cfg.val_batch_size)
    with fake_mode(), meter:
        with meter.phase("text_encoder"):
            materialise(part.model, part.dtype)
        with meter.phase("encode"), torch.no_grad():
            ids = torch.zeros(batch, cfg.text_encoder.model_max_length, dtype=torch.long)
            part.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return PhasePlan("text", meter.peak, meter.at_peak, meter.peak_label, _flops_of(meter))


def _cpu_autocast(cfg: VaderConfig) -> torch.autocast:
    """The run's mixed precision on the fake CPU tensors the plan counts (bf16 autocast, or none)."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _plan_prompts(cfg: VaderConfig) -> tuple[list[str], dict[str, str]]:
    """The run's prompts when the config names them (ActPred needs an action in them, toy_alignment a
    toy caption); else a stand-in: the text only decides the reward's label, never a size."""
    # a prompts file's first-frame images are not read: the backend's plan_generator plans stand-ins
    found = load_prompts(cfg) if (cfg.prompt or cfg.prompt_path) else None
    prompts, labels = (found.prompts, found.labels) if found is not None else (["a video"], {})
    prompts = (prompts * cfg.train_batch_size)[: cfg.train_batch_size]
    return prompts, {p: labels[p] for p in prompts if p in labels}


def _shard(cfg: VaderConfig, meter: LiveBytes, gen: object, num_processes: int) -> PlannedFSDP | None:
    """`vader.sharding.shard` on the plan's generator: the same models, units and ignored parameters
    (every trainable one: the LoRA), simulated by PlannedFSDP. None where training shards nothing."""
    if cfg.sharding != "fsdp" or num_processes < 2:
        return None
    models = denoisers(gen)
    trainable = {p for model in models for p in model.parameters() if p.requires_grad}
    fsdp = PlannedFSDP(meter, [(model, shard_units(model)) for model in models], num_processes, trainable)
    meter.relabel([b for model in models for b in model.buffers()], "denoiser_buffers")  # FSDP shards no buffer
    return fsdp


def _comm(fsdp: PlannedFSDP | None, num_processes: int, scale: dict[str, float], times: int,
          lora_grad_bytes: int = 0) -> Comm:
    """The traffic the plan counted, each phase multiplied as its FLOPs are (`_flops_of`): the
    no-gradient steps the plan skipped, GRPO's updates, the accumulation micro-steps."""
    comm = Comm(num_processes, fsdp is not None)
    if num_processes > 1:  # ring all-reduce: each process sends and receives 2 (N - 1)/N of the buffer
        comm.all_reduce_bytes = 2 * (num_processes - 1) / num_processes * lora_grad_bytes
    if fsdp is None:
        return comm
    units = fsdp.units
    comm.units = len(units)
    comm.shard_bytes = sum(u.shard_bytes for u in units)
    comm.weight_bytes = sum(p.numel() * p.element_size() for u in units for p in u.params)
    comm.largest_unit_bytes = max(u.gathered_bytes for u in units if not u.is_root)
    comm.root_bytes = max(u.gathered_bytes for u in units if u.is_root)
    comm.most_gathered_bytes = fsdp.most_whole_bytes
    for label, count in fsdp.gathers.items():
        factor = scale.get(label, 1.0) * times
        comm.all_gathers += count * factor
        comm.all_gather_bytes += fsdp.gather_bytes[label] * factor
        if label != "backward":
            comm.forward_gathers += count * factor
    return comm


def _average_gradients(params: list[nn.Parameter], num_processes: int) -> None:
    """vader.methods.update.average_gradients' buffers on 2 or more processes: the gradients
    flattened into one tensor, accelerate's reduce clones it, the gradients become views of the
    clone (what all-reduce receives is counted in Comm, not here)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    reduced = flat.clone()
    reduced /= num_processes
    del flat
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = reduced[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def _train_phase(cfg: VaderConfig, all_steps: bool,
                 num_processes: int = 1) -> tuple[PhasePlan, PlannedStep, list[int]]:
    """The method's micro-step (its `plan_step`) on the backend's generator, with the frozen reward and
    AdamW's state in memory, then the backward and the optimizer step; on `num_processes` processes
    with the config's sharding, per process."""
    method = method_module(cfg.method)
    meter = LiveBytes()
    prompts, labels = _plan_prompts(cfg)
    vae, build = backend_module(cfg.backend).plan_generator(cfg, True)
    frames = planned_frames(cfg, vae)
    reward = _reward_on_meta(cfg, _dtype(cfg), len(frames))
    with fake_mode(), meter:
        gen = build(meter, prompts)
        params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
        fsdp = _shard(cfg, meter, gen, num_processes)  # as train.setup: after the LoRA is in place
        gen.denoiser.eval()  # as train.setup: LoRA dropout on (its masks are kept), the models' checkpointing
        set_lora_dropout(gen.denoiser, True)
        gen.enable_gradient_checkpointing(cfg.grad_checkpoint)
        with meter.phase("reward_model"):
            materialise(reward, _dtype(cfg))
        with meter.phase("reward_prepare"), torch.no_grad():
            reward.prepare(list(dict.fromkeys(gen.reward_prompts(prompts))),
                           {gen.reward_prompts([p])[0]: label for p, label in labels.items()})
        with meter.phase("optimizer"):
            state = _optimizer_state(params, cfg.use_AdamW8bit)
        meter.reset_peak()  # what follows is the step itself
        with _cpu_autocast(cfg):
            planned = method.plan_step(gen, reward, cfg, prompts, frames, meter, all_steps)
        with meter.phase("backward"):
            planned.loss.backward()
        planned.loss, planned.held = planned.loss.detach(), ()
        meter.relabel([p.grad for p in params], "grads")
        if num_processes > 1:  # once per optimizer step, after the last micro-step's backward
            with meter.phase("allreduce"), torch.no_grad():
                _average_gradients(params, num_processes)
            meter.relabel([p.grad for p in params], "grads")
        with meter.phase("step"), torch.no_grad():
            _optimizer_step(params, state, cfg.use_AdamW8bit)
        if fsdp is not None:
            fsdp.remove()
    flops = _flops_of(meter, planned.flop_scale, times=cfg.gradient_accumulation_steps)
    comm = _comm(fsdp, num_processes, planned.flop_scale, cfg.gradient_accumulation_steps,
                 sum(p.numel() * p.element_size() for p in params)) if num_processes > 1 else None
    if fsdp is not None and fsdp.recomputed_whole:
        planned.notes.append(
            f"sharding='fsdp': a checkpoint around the whole denoiser call (grad_checkpoint) recomputes its blocks "
            f"inside backward, where FSDP2 does not reshard after forward: up to {_gib(fsdp.most_whole_bytes)} of "
            "units whole at once, not two")
    return PhasePlan("train", meter.peak, meter.at_peak, meter.peak_label, flops, comm), planned, frames


def _optimizer_state(params: list[nn.Parameter], eight_bit: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AdamW's two moments per parameter, as they stand from the second step on: fp32 like the
    parameter (torch.optim.AdamW), or uint8 plus one fp32 scale per 256-element block (bitsandbytes'
    AdamW8bit)."""
    state = []
    for p in params:
        if eight_bit:
            blocks = math.ceil(p.numel() / 256)
            state.append((torch.empty(p.shape, dtype=torch.uint8), torch.empty(p.shape, dtype=torch.uint8)))
            state.append((torch.empty(blocks), torch.empty(blocks)))
        else:
            state.append((torch.zeros_like(p), torch.zeros_like(p)))
    return state


def _optimizer_step(params: list[nn.Parameter], state: list[tuple[torch.Tensor, torch.Tensor]],
                    eight_bit: bool) -> None:
    """The update's arithmetic as torch.optim.AdamW's foreach path (the default on CUDA) runs it: the
    moments in place, then the denominators of every parameter at once. (torch's own step reads its
    step count with .item(), which fake tensors cannot answer.) 8-bit: its kernel works blockwise in
    registers, with no transient beyond the update."""
    grads = [p.grad for p in params]
    if eight_bit:
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=-1e-4)
        return
    for (m, v), g in zip(state, grads, strict=True):
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
    denominators = [v.sqrt().add_(1e-8) for _, v in state]
    for p, (m, _), d in zip(params, state, denominators, strict=True):
        p.mul_(1 - 1e-6).addcdiv_(m, d, value=-1e-4)


def _infer_phase(cfg: VaderConfig, all_steps: bool, num_processes: int = 1) -> PhasePlan:
    """One validation / inference batch: val_batch_size videos, every step without gradients, full decode;
    with the denoiser sharded as training shards it when `num_processes` > 1 (validation runs on it)."""
    meter = LiveBytes()
    prompts = ["a video"] * cfg.val_batch_size
    _, build = backend_module(cfg.backend).plan_generator(cfg, False)
    with fake_mode(), meter:
        gen = build(meter, prompts)
        gen.denoiser.eval()
        fsdp = _shard(cfg, meter, gen, num_processes)
        meter.reset_peak()
        steps = PlannedSteps(meter, None, all_steps)
        with torch.no_grad():
            latents = gen.sample_latents(prompts, torch.Generator().manual_seed(0), progress=steps)
            with meter.phase("infer_decode"):
                gen.decode(latents)
        if fsdp is not None:
            fsdp.remove()
    scale = {"sampling_nograd": steps.nograd_scale}
    flops = _flops_of(meter, scale)
    comm = _comm(fsdp, num_processes, scale, 1) if fsdp is not None else None  # no gradients to all-reduce
    return PhasePlan("infer", meter.peak, meter.at_peak, meter.peak_label, flops, comm)


def _dtype(cfg: VaderConfig) -> torch.dtype:
    return torch_dtype(cfg.dtype)


# What one plan runs, at most (see check_plan_size). Measured on a shared 2-core CPU: Open-Sora v1.2
# at 16s 720p with val_batch_size 4 (1632 frames) plans in 37 s; the tiny preset at batches of 120
# (2040 frames through its VAE's 4-frame micro-batches) in 27 s, at batch 100000 it ran past 120 s;
# the sampler builds each step's timesteps (about 2 ms a step per phase on fake tensors: 100000 steps
# ran past 120 s, 1000 plan in 10 s).
PLAN_LIMITS = {
    "frames": 2048,  # videos x frames in one batch (the larger of train_batch_size and val_batch_size)
    "side": 16384,  # pixels, height or width (16K; at 2**31 torch's storage sizes overflow: a traceback)
    "steps": 1000,  # scheduler.num_sampling_steps
}


def check_plan_size(cfg: VaderConfig) -> None:
    """One line, before any work, for sizes a plan cannot run in minutes (PLAN_LIMITS): the plan's
    time grows with videos x frames and with the sampling steps, not with tensor sizes."""
    height, width = cfg.height_width
    if max(height, width) > PLAN_LIMITS["side"]:
        raise VaderError(f"image_size=({height}, {width}) is beyond what vader plan covers: height and width "
                         f"at most {PLAN_LIMITS['side']} pixels each")
    batch_key = "val_batch_size" if cfg.val_batch_size >= cfg.train_batch_size else "train_batch_size"
    batch = getattr(cfg, batch_key)
    if batch * cfg.frames > PLAN_LIMITS["frames"]:
        raise VaderError(f"{batch_key}={batch} x num_frames={cfg.frames} is {batch * cfg.frames} frames in one "
                         f"batch; vader plan runs at most {PLAN_LIMITS['frames']} (the VAE decodes them in "
                         "micro-batches, about 20 s per thousand on fake tensors): plan a smaller batch or fewer "
                         "frames (memory grows linearly with the batch)")
    steps = cfg.scheduler.num_sampling_steps
    if steps > PLAN_LIMITS["steps"]:
        raise VaderError(f"scheduler.num_sampling_steps={steps} is more than vader plan runs: at most "
                         f"{PLAN_LIMITS['steps']} (the sampler builds every step's timesteps)")


MAX_PROCESSES = 65536  # --num_processes: far past any cluster a LoRA run uses, small enough to plan in seconds


def check_processes(num_processes: object) -> int:
    """--num_processes: an integer from 1 to MAX_PROCESSES (one line otherwise)."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or \
            not 1 <= num_processes <= MAX_PROCESSES:
        raise VaderError(f"--num_processes={num_processes!r} must be an integer from 1 to {MAX_PROCESSES}: the "
                         "processes (GPUs) the run trains on, e.g. 8 for one 8-GPU node")
    return num_processes


def make_plan(cfg: VaderConfig, *, all_steps: bool = False, training: bool | None = None,
              num_processes: int = 1) -> Plan:
    """Plan the config's text encoding, training step (when it trains) and inference batch, per process
    on `num_processes` processes with the config's `sharding`."""
    check_plan_size(cfg)
    check_processes(num_processes)
    training = cfg.is_vader_training if training is None else training
    if training:
        check_sharding(cfg.sharding, cfg.dtype)  # as `vader train` refuses it
    sharded = num_processes if training else 1  # only training shards (validation runs on the sharded model)
    text = _text_phase(cfg)
    train, planned, frames = _train_phase(cfg, all_steps, num_processes) if training else (None, None, [])
    notes = list(planned.notes) if planned is not None else []
    if training and cfg.decode_frame == "-1":
        notes.append("decode_frame='-1' planned at the costliest frame (the last)")
    if training and is_callable_spec(cfg.reward_fn):
        notes.append(f"reward_fn={cfg.reward_fn!r} is a Python function: planned with no model, no FLOPs and no "
                     "gradient; the memory the function itself uses is not counted")
    if cfg.sharding == "fsdp" and (num_processes == 1 or not training):
        notes.append("sharding='fsdp' on one process: nothing to shard (FSDP splits over 2 or more), planned whole"
                     if training else "sharding='fsdp' applies to training; inference runs the model whole")
    return Plan(cfg, text, train, _infer_phase(cfg, all_steps, sharded), planned.cutoff if planned else None,
                frames, notes, planned.how if planned else "", num_processes)


# ---------------------------------------------------------------------------------------------
# budget, time and the fit search
# ---------------------------------------------------------------------------------------------


MIN_BUDGET, MAX_BUDGET = 2**20, 2**50  # 1 MiB .. 1024 TiB


def parse_bytes(text: str, key: str = "--budget") -> int:
    """'24GiB', '24GB' (taken as GiB, as nvidia-smi and most users mean it), '24' (GiB), '800MiB':
    a positive size from 1 MiB to 1024 TiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?)?\s*", str(text), re.IGNORECASE)
    size = float(m.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[(m.group(2) or "G")[0].upper()] if m else 0.0
    if not MIN_BUDGET <= size <= MAX_BUDGET:  # also what is not a number, negative, zero or rounds to 0 bytes
        raise VaderError(f"{key}={text!r} is not a memory size from 1 MiB to 1024 TiB; write a positive size "
                         "such as 24GiB, 80GB, 800MiB or 16 (GiB)")
    return int(size)


def step_seconds(flops: float, tflops: float, mfu: float) -> float:
    return flops / (tflops * 1e12 * mfu)


# Memory knobs the fit search turns, in order: those that keep the algorithm first (recompute and
# kernels), then cheaper weights and optimizer state, then the ones that change what is trained.
KNOBS: tuple[tuple[str, str, bool], ...] = (
    ("model.attention", "sdpa", False),
    ("text_encoder.offload", "True", False),
    ("vae.micro_batch_size", "1", False),
    ("reward_grad_checkpoint", "True", False),
    ("grad_checkpoint", "True", False),
    ("vae.offload_cache", "True", False),
    ("use_AdamW8bit", "True", False),
    ("vae.dtype", "bf16", False),
    ("dtype", "fp8", False),
    ("decode_strategy", "latent", True),
    ("decode_frame", "-1", True),
    ("backprop_mode", "last", True),
)


# On 2 or more processes the search can also shard: after fused attention (which saves FLOPs too), before
# everything that costs compute or changes the numbers. It costs communication (the all-gathers), which
# overlaps compute, and it does not combine with dtype='fp8' (whose weights FSDP cannot shard), so with it
# in play fp8 is not tried.
SHARDING_KNOB = ("sharding", "fsdp", False)


@dataclass
class FitResult:
    overrides: list[tuple[str, str]]  # the knobs to add; when nothing fits: every knob that applies
    plan: Plan | None  # None: no setting of the knobs fits the budget
    tried: int
    changes_algorithm: list[str]
    lowest_peak: int | None = None  # when nothing fits: the peak with every knob on


def _value(cfg: VaderConfig, key: str) -> str:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return str(obj)


def _fit_knobs(base: VaderConfig, knobs: tuple[tuple[str, str, bool], ...],
              num_processes: int) -> list[tuple[str, str, bool]]:
    """The knobs that apply to `base`; on 2 or more processes sharding among them (SHARDING_KNOB)."""
    available = [k for k in knobs if _knob_applies(base, k)]
    if num_processes > 1 and base.is_vader_training and base.sharding != "fsdp":
        available.insert(1 if available and available[0][0] == "model.attention" else 0, SHARDING_KNOB)
    if num_processes > 1 and base.is_vader_training and (base.sharding == "fsdp" or SHARDING_KNOB in available):
        available = [k for k in available if k[:2] != ("dtype", "fp8")]
    return available


def fit(path: str, overrides: list[str], budget: int, *, tflops: float, mfu: float,
        knobs: tuple[tuple[str, str, bool], ...] = KNOBS, num_processes: int = 1) -> FitResult:
    """The fastest setting within `budget`: turn knobs on in KNOBS order until the plan fits, then turn
    back off every one the fit does not need (fastest = fewest FLOPs, so recompute is dropped first).
    When the config does not fit as given, every knob at once is planned first: if even that does not
    fit, the search stops there (two plans, not one per knob). The peak is per process on
    `num_processes` processes, where sharding='fsdp' is a knob too."""
    base = load_config(path, overrides)
    available = _fit_knobs(base, knobs, num_processes)
    chosen: list[tuple[str, str, bool]] = []
    tried = 0
    plans: dict[tuple[tuple[str, str, bool], ...], Plan] = {}

    def plan_for(extra: list[tuple[str, str, bool]]) -> Plan:
        nonlocal tried
        if tuple(extra) not in plans:
            tried += 1
            cfg = load_config(path, [*overrides, *[x for k, v, _ in extra for x in (f"--{k}", v)]])
            plans[tuple(extra)] = make_plan(cfg, num_processes=num_processes)
        return plans[tuple(extra)]

    plan = plan_for([])
    if plan.peak > budget:
        everything = plan_for(available)
        if everything.peak > budget:
            return FitResult([(k, v) for k, v, _ in available], None, tried, [], everything.peak)
    for knob in available:
        if plan.peak <= budget:
            break
        chosen.append(knob)
        plan = plan_for(chosen)
    for knob in list(reversed(chosen)):  # drop what is not needed, costliest-in-time first
        trial = [k for k in chosen if k is not knob]
        candidate = plan_for(trial)
        if candidate.peak <= budget and _train_flops(candidate) <= _train_flops(plan) * 1.0001:
            chosen, plan = trial, candidate
    return FitResult([(k, v) for k, v, _ in chosen], plan, tried, [k for k, _, alg in chosen if alg])


def _knobs(cfg: VaderConfig) -> tuple[str, ...]:
    """The KNOBS keys the config's backend honours (its MEMORY_KNOBS)."""
    return backend_module(cfg.backend).MEMORY_KNOBS


def _knob_applies(cfg: VaderConfig, knob: tuple[str, str, bool]) -> bool:
    """The backend honours the knob (MEMORY_KNOBS), the method uses it (not in its IGNORED_KNOBS), and
    the config does not already have its value."""
    key, value, _ = knob
    if key not in _knobs(cfg) or key in method_module(cfg.method).IGNORED_KNOBS:
        return False
    if key == "model.attention" and not hasattr(cfg.model, "attention"):
        return False
    if key == "dtype" and value == "fp8":
        if "fp8" not in DTYPES:
            return False
    if key == "decode_frame" and not is_callable_spec(cfg.reward_fn):
        try:  # a clip reward (actpred, xclip, videoreward) refuses a one-frame decode: not a knob for it
            check_decode_frame(cfg.reward_fn, value)
        except VaderError:
            return False
    return _value(cfg, key) != value


def _train_flops(plan: Plan) -> float:
    return (plan.train or plan.infer).total_flops


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    """GiB for what a GPU is sized in; small amounts (tiny models) in MiB / KiB so they read."""
    if n >= 0.1 * GIB or n == 0:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _name(label: str, num_processes: int = 1) -> str:
    return LABELS.get(label, label).replace("{n}", str(num_processes))


def _breakdown(phase: PhasePlan, num_processes: int = 1) -> Iterator[str]:
    for label, size in sorted(phase.at_peak.items(), key=lambda kv: -kv[1]):
        if size >= max(1024, phase.peak // 10_000):  # what is visible at the peak's scale
            yield f"    {_name(label, num_processes):52s} {_gib(size):>11s}"


def _count(n: float) -> str:
    return f"{n:,.0f}" if abs(n - round(n)) < 1e-6 else f"{n:,.1f}"


def _sharding_lines(plan: Plan) -> list[str]:
    """What sharding does to the figures below, when planned for more than one process."""
    n = plan.num_processes
    comm = next((p.comm for p in (plan.train, plan.infer) if p is not None and p.comm is not None), None)
    if n == 1 or comm is None:
        return []
    if not comm.sharded:
        return [f"  {n} processes, sharding '{plan.cfg.sharding}' (figures are per process): every process holds every "
                "weight; --sharding fsdp splits the frozen denoiser over them"]
    return [f"  sharding fsdp over {n} processes (figures are per process): the frozen denoiser's "
            f"{_gib(comm.weight_bytes)} in {comm.units} FSDP units -> {_gib(comm.shard_bytes)} per process",
            f"    gathered whole for compute: blocks of up to {_gib(comm.largest_unit_bytes)} two at a time, and the "
            f"root's own {_gib(comm.root_bytes)} through each forward; the LoRA, VAE, text encoder and reward model "
            "stay whole on every process"]


def _comm_line(comm: Comm, per: str) -> str:
    parts = []
    if comm.sharded:
        parts.append(f"all-gather {_gib(comm.all_gather_bytes)} ({_count(comm.all_gathers)} unit gathers: "
                     f"{_count(comm.forward_gathers)} in forward, {_count(comm.backward_gathers)} in backward)")
        if per == "optimizer step":
            parts.append("reduce-scatter 0 (no sharded weight has a gradient)")
    if per == "optimizer step":
        parts.append(f"all-reduce {_gib(comm.all_reduce_bytes)} (the LoRA gradients, ring, once)")
    return f"    communication per {per}, per process: " + ", ".join(parts)


def describe(plan: Plan, *, budget: int | None, tflops: float, mfu: float, gpu: str) -> str:
    cfg = plan.cfg
    height, width = cfg.height_width
    n = plan.num_processes
    lines = [f"plan: {height}x{width}, {cfg.frames} frames, dtype {cfg.dtype}, mixed_precision "
             f"{cfg.mixed_precision}, attention {getattr(cfg.model, 'attention', 'math')}"]
    lines.extend(_sharding_lines(plan))
    t = plan.text
    if cfg.text_encoder.offload:
        lines.append(f"  text encoder on the CPU (text_encoder.offload): {_gib(t.peak)} of host memory, none on the GPU")
    else:
        hint = " (text_encoder.offload=True runs it on the CPU)" if "text_encoder.offload" in _knobs(cfg) else ""
        lines.append(f"  text encoder (runs first, released before the denoiser loads): peak {_gib(t.peak)}{hint}")
    if plan.train is not None:
        tr = plan.train
        lines.append(f"  training step (batch {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation, "
                     f"{plan.how}, grad_checkpoint {cfg.grad_checkpoint}, "
                     f"decode {len(plan.frames)} frame(s) '{cfg.decode_strategy}', reward {cfg.reward_fn}): "
                     f"peak {_gib(tr.peak)}, reached during {_name(tr.peak_phase, n)}")
        lines.extend(_breakdown(tr, n))
        seconds = step_seconds(tr.total_flops, tflops, mfu)
        parts = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in tr.flops.items())
        lines.append(f"    compute: {tr.total_flops / 1e12:.1f} TFLOP per optimizer step ({parts}) -> about "
                     f"{seconds:.1f} s on {gpu} ({tflops:g} TFLOP/s bf16) at {mfu:.0%} MFU")
        if tr.comm is not None:
            lines.append(_comm_line(tr.comm, "optimizer step"))
    inf = plan.infer
    lines.append(f"  inference batch ({cfg.val_batch_size} video(s), full decode): peak {_gib(inf.peak)}")
    lines.extend(_breakdown(inf, n))
    lines.append(f"    compute: {inf.total_flops / 1e12:.1f} TFLOP -> about "
                 f"{step_seconds(inf.total_flops, tflops, mfu):.1f} s on {gpu} at {mfu:.0%} MFU")
    if inf.comm is not None:
        lines.append(_comm_line(inf.comm, "batch"))
    lines.extend(f"  note: {note}" for note in plan.notes)
    verdict = f"peak {_gib(plan.peak)}" + (f" per process on {n} processes" if n > 1 else "")
    if budget is not None:
        verdict += (f" fits {_gib(budget)}" if plan.peak <= budget else
                    f" does NOT fit {_gib(budget)} (try --fit)")
    lines.append(verdict + " (tensor bytes; leave ~1-2 GiB for the CUDA context and allocator slack)")
    return "\n".join(lines)


TFLOPS_RANGE = (0.001, 1e6)  # --tflops: from a slow CPU to far past any card
MFU_RANGE = (0.001, 1.0)


def gpu_tflops(gpu: str | None, tflops: float | None) -> tuple[str, float]:
    """The card's name and dense bf16 TFLOP/s for the step-time estimate: --gpu (a name from GPU_TFLOPS,
    any case), or --tflops for a card not listed (named 'custom'); not both."""
    if gpu is not None and tflops is not None:
        raise VaderError(f"--gpu={gpu!r} and --tflops={tflops!r} both give the card's speed; give --gpu (one of "
                         f"{', '.join(GPU_TFLOPS)}) or --tflops for another card, not both")
    if tflops is not None:
        low, high = TFLOPS_RANGE
        if not (math.isfinite(tflops) and low <= tflops <= high):
            raise VaderError(f"--tflops={tflops!r} must be a number from {low:g} to {high:g} (the card's dense "
                             "bf16 TFLOP/s, e.g. 989 for an H100)")
        return "custom", tflops
    names = {name.upper(): name for name in GPU_TFLOPS}
    name = names.get((DEFAULT_GPU if gpu is None else gpu).strip().upper())
    if name is None:
        raise VaderError(f"--gpu={gpu!r} is not known; choose one of {', '.join(GPU_TFLOPS)} or give --tflops")
    return name, GPU_TFLOPS[name]


def plan_main(path: str, overrides: list[str], *, budget: str | None, do_fit: bool, gpu: str | None,
              tflops: float | None, mfu: float, all_steps: bool, num_processes: int = 1) -> str:
    check_processes(num_processes)
    name, peak_tflops = gpu_tflops(gpu, tflops)
    low, high = MFU_RANGE
    if not (math.isfinite(mfu) and low <= mfu <= high):
        raise VaderError(f"--mfu={mfu!r} must be a number from {low:g} to {high:g} (the share of the card's "
                         "peak the step reaches, e.g. 0.35)")
    limit = parse_bytes(budget) if budget is not None else None
    if do_fit and limit is None:
        raise VaderError("--fit needs --budget (e.g. --budget 24GiB)")
    cfg = load_config(path, overrides)
    if not do_fit:
        return describe(make_plan(cfg, all_steps=all_steps, num_processes=num_processes), budget=limit,
                        tflops=peak_tflops, mfu=mfu, gpu=name)
    assert limit is not None
    result = fit(path, overrides, limit, tflops=peak_tflops, mfu=mfu, num_processes=num_processes)
    flags = " ".join(f"--{k} {v}" for k, v in result.overrides)
    if result.plan is None:
        assert result.lowest_peak is not None
        every = f"with every memory knob ({flags})" if flags else "with no memory knob left to turn"
        raise VaderError(f"--budget={budget!r} ({_gib(limit)}): nothing fits; {every} the peak is "
                         f"{_gib(result.lowest_peak)} ({result.tried} plans): give a budget of at least "
                         f"{_gib(result.lowest_peak)}, or lower train_batch_size, the resolution or num_frames")
    lines = [describe(result.plan, budget=limit, tflops=peak_tflops, mfu=mfu, gpu=name), ""]
    if not result.overrides:
        lines.append(f"fit: the config as given fits {_gib(limit)} ({result.tried} plan(s))")
    else:
        lines.append(f"fit ({result.tried} plans): add  {flags}")
        if result.changes_algorithm:
            lines.append("  these change what is trained, not only how: " + ", ".join(result.changes_algorithm))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# calibration: the same step measured on real tensors
# ---------------------------------------------------------------------------------------------


def measure_real_step(cfg: VaderConfig, seconds: list[float] | None = None,
                      traffic: list[Collectives] | None = None) -> PhasePlan:
    """The reference a plan is calibrated against: `vader.train`'s own setup and train_step on real
    tensors of this machine, the peak of live tensor bytes over the second optimizer step (the first
    creates AdamW's state, which every later step carries). Builds a run folder under project_dir.
    `seconds` receives the wall time of a third step, run without the meter; `traffic` the collectives
    of the second step (several processes)."""
    import time

    meter = LiveBytes()
    accelerator = make_accelerator(cfg)
    run = Run.create(cfg, accelerator, kind="plan")
    with meter, storage_resizes(meter.resized):
        trainer = setup(cfg, accelerator, run)
        trainer.step(0)
        meter.reset_peak()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with count_collectives() as seen:
            trainer.step(1)
    if traffic is not None:
        traffic.append(seen)
    if seconds is not None:  # timed without the meter, whose per-op Python bookkeeping costs time
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(2)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return PhasePlan("measured", meter.peak, meter.at_peak, meter.peak_label, {})


def bench_main(path: str, overrides: list[str]) -> str:
    """`vader bench`: the real training step beside its plan. On a GPU: torch.cuda.max_memory_allocated
    and the card's name; everywhere: the peak of live tensor bytes and the step's seconds. Under
    `accelerate launch` / `torchrun` (several processes, e.g. with `--sharding fsdp`) every process
    measures its own peak and its collectives (all-gather, reduce-scatter, all-reduce bytes of the
    step) beside the per-process plan. The run folder goes to a temporary directory and is removed."""
    import os
    import shutil
    import tempfile

    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as make_accelerator builds it
    num = state.num_processes
    if num == 1:
        scratch = tempfile.mkdtemp(prefix="vader-bench-")
    else:  # one folder for all the processes of this machine: their launcher is their common parent
        scratch = os.path.join(tempfile.gettempdir(), f"vader-bench-{os.getppid()}")
    try:
        cfg = load_config(path, [*overrides, "--project_dir", scratch, "--logger_type", "none",
                                 "--is_sample_preview", "False", "--verbose", "0"])
        preflight(cfg, "train")
        planned = make_plan(cfg, training=True, num_processes=num)
        seconds: list[float] = []
        traffic: list[Collectives] = []
        measured = measure_real_step(cfg, seconds, traffic)
    finally:
        state.wait_for_everyone()
        if state.is_local_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    who = f" (process {state.process_index} of {num}, sharding {cfg.sharding!r})" if num > 1 else ""
    lines = [f"bench on {device}{who}: training step 2 (step 1 creates AdamW's state; step 3 is timed)",
             f"  planned peak (fake tensors):      {_gib(planned.train.peak)}",
             f"  measured peak of live tensors:    {_gib(measured.peak)} "
             f"({_off(planned.train.peak, measured.peak)} planned vs measured)"]
    if torch.cuda.is_available():
        lines.append(f"  torch.cuda.max_memory_allocated: {_gib(torch.cuda.max_memory_allocated())}")
    comm = planned.train.comm
    if num > 1 and comm is not None:
        seen = traffic[0]
        rows = [("all-gather", comm.all_gather_bytes, seen.bytes.get("all_gather", 0),
                 f"{comm.all_gathers:,.0f} planned / {seen.calls.get('all_gather', 0):,} measured unit gathers"),
                ("reduce-scatter", comm.reduce_scatter_bytes, seen.bytes.get("reduce_scatter", 0), ""),
                ("all-reduce", comm.all_reduce_bytes, seen.bytes.get("all_reduce", 0),
                 "the LoRA gradients and the step's finite-value flags")]
        for name, plan_bytes, real_bytes, note in rows:
            lines.append(f"  {name} bytes this process received: planned {_gib(int(plan_bytes))}, measured "
                         f"{_gib(int(real_bytes))} ({_off(plan_bytes, real_bytes)})" + (f"; {note}" if note else ""))
    flops = planned.train.total_flops
    lines.append(f"  step time (a third step, unmetered): {seconds[0]:.2f} s; planned compute {flops / 1e9:,.1f} GFLOP "
                 f"-> {flops / seconds[0] / 1e12:.4f} TFLOP/s achieved")
    return "\n".join(lines)


def _off(planned: float, measured: float) -> str:
    if not measured:
        return "both 0" if not planned else "measured 0"
    return f"{100 * (planned - measured) / measured:+.1f}%"
