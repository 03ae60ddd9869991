"""`vader plan`: will a config fit a GPU, what holds the memory, how long a step takes, and how to make it fit.

The plan runs the real training step of the config — prompt embeddings, the sampler with the backprop
cutoff, the VAE decode of the chosen frames, the reward, backward and the AdamW step — and one
inference batch, at full size under torch's FakeTensorMode: shapes only, no weights, no GPU, seconds
on a CPU. `vader.memory.LiveBytes` counts every live tensor storage and records what held the peak;
torch.utils.flop_counter's formulas count the FLOPs. The text encoder runs first and is released before the
denoiser loads (as `VideoGenerator.build` does), so it is planned as its own phase.

Exactness: sampling steps before the cutoff run without autograd, so they keep nothing; the plan runs
one of them for memory and multiplies its FLOPs (`all_steps=True` runs every step; the peaks are equal,
tested). Captions are planned at model_max_length tokens (the longest prompt possible); a real run
trims to its longest prompt. backprop_mode='rand' and decode_frame='-1' are planned at their worst
case (every step with gradients; the costliest frame).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from vader.config import VaderConfig
from vader.errors import VaderError
from vader.memory import LiveBytes, fake_mode, materialise

GIB = 2**30
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the step-time estimate.
GPU_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "RTX4090": 165.0,
              "A10G": 125.0, "V100": 125.0}
DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.35

# What the breakdown calls each kind of memory, in printing order.
LABELS = {
    "denoiser": "denoiser weights (frozen)",
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
    "sampling_nograd": "sampling: a step without gradients",
    "reward_prepare": "reward: prompts prepared once",
    "infer_decode": "VAE decode (no gradients)",
    "text_encoder": "text encoder weights (fp32)",
    "encode": "prompt encoding",
}


@dataclass
class PhasePlan:
    """One measured phase: its peak, what held it, and its FLOPs."""

    name: str
    peak: int
    at_peak: dict[str, int]
    peak_phase: str
    flops: dict[str, float] = field(default_factory=dict)

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

    @property
    def peak(self) -> int:
        """The device's peak: T5 counts only when it runs there."""
        phases = (self.train, self.infer) if self.cfg.text_encoder.offload else (self.text, self.train, self.infer)
        return max(p.peak for p in phases if p is not None)


# ---------------------------------------------------------------------------------------------
# building the stack on fake tensors
# ---------------------------------------------------------------------------------------------


def _published(name: str | None) -> dict:
    from vader.models.loading import local_config

    return local_config(name) if name else {}


def _denoiser_on_meta(cfg: VaderConfig, caption_channels: int) -> nn.Module:
    from vader.checkpoint import lora_config
    from vader.models.loading import build_on_meta
    from vader.models.presets import denoiser_config
    from vader.models.stdit3 import STDiT3

    config = denoiser_config(cfg.model, caption_channels, cfg.text_encoder.model_max_length,
                             _published(cfg.model.from_pretrained))
    model = build_on_meta(lambda: STDiT3(config))
    if cfg.dtype == "fp8":  # as build_denoiser: Linear weights to fp8 before LoRA is added
        from vader.models.fp8 import quantize_linears

        quantize_linears(model)
    if cfg.is_vader_training:
        from peft import inject_adapter_in_model

        from vader.backends.opensora import LORA_TARGETS

        inject_adapter_in_model(lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets=LORA_TARGETS),
                                model, low_cpu_mem_usage=True)
    return model


def _vae_on_meta(cfg: VaderConfig) -> nn.Module:
    from vader.models.loading import build_on_meta
    from vader.models.presets import vae_config
    from vader.models.vae import VideoVAE

    config = vae_config(cfg.vae, _published(cfg.vae.from_pretrained))
    return build_on_meta(lambda: VideoVAE(config))


class _Scalar:
    """Stands for a [n] size tensor where the model reads `t.reshape(-1)[0].item()` (data-dependent
    under FakeTensorMode): the plan knows the pixel size."""

    def __init__(self, value: float) -> None:
        self.value = value

    def reshape(self, *_: object) -> _Scalar:
        return self

    def __getitem__(self, _: object) -> _Scalar:
        return self

    def item(self) -> float:
        return self.value


def _set_attention(model: nn.Module, cfg: VaderConfig) -> None:
    backend = getattr(cfg.model, "attention", None) or ("sdpa" if cfg.model.enable_flash_attn else "math")
    if hasattr(model, "set_attention_backend"):
        model.set_attention_backend(backend)


class _FakeStack:
    """The run's denoiser, VAE and reward as fake tensors, wired like `train.setup`."""

    def __init__(self, cfg: VaderConfig, meter: LiveBytes, caption_channels: int, training: bool,
                 denoiser: nn.Module, vae: nn.Module) -> None:
        """`denoiser` and `vae` come from `_denoiser_on_meta` / `_vae_on_meta`, built before the fake
        mode is entered (their constructors read small real tensors)."""
        from vader.backends.opensora import OpenSoraGenerator
        from vader.models.presets import torch_dtype

        self.cfg = cfg
        self.dtype = torch_dtype(cfg.dtype)
        with meter.phase("denoiser"):
            materialise(denoiser, self.dtype, trainable="lora_")
        meter.relabel([p for n, p in denoiser.named_parameters() if "lora_" in n], "lora")
        with meter.phase("vae"):
            materialise(vae, self.dtype)
        _set_attention(denoiser, cfg)
        height, width = cfg.height_width
        original = denoiser._pos_embed
        denoiser._pos_embed = (  # type: ignore[method-assign]
            lambda nh, nw, _h, _w, like: original(nh, nw, _Scalar(float(height)), _Scalar(float(width)), like))
        denoiser.eval()
        if training:
            from vader.checkpoint import set_lora_dropout

            set_lora_dropout(denoiser, True)  # train_step samples with LoRA dropout on: its masks are kept
            denoiser.gradient_checkpointing = cfg.grad_checkpoint
            vae.enable_gradient_checkpointing(cfg.grad_checkpoint)
        self.gen = OpenSoraGenerator(denoiser, vae, None, cfg, torch.device("cpu"), self.dtype, {})
        self.params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
        length = cfg.text_encoder.model_max_length
        with meter.phase("prompts"):
            # every prompt's embedding stays on the device (VideoGenerator.embeddings); fp32 as T5 gives them
            self.y = torch.empty(max(cfg.train_batch_size, cfg.val_batch_size), 1, length, caption_channels)

    def text_condition(self, n: int):  # type: ignore[no-untyped-def]
        from vader.sampling import TextCondition

        null = self.gen.denoiser.y_embedder.y_embedding
        y_null = null[None, None].expand(n, 1, *null.shape).to(self.y.dtype)
        return TextCondition(y=self.y[:n], mask=None, y_null=y_null)  # type: ignore[arg-type]


def _reward_on_meta(cfg: VaderConfig, dtype: torch.dtype, num_frames: int):  # type: ignore[no-untyped-def]
    from vader.rewards.skeleton import reward_skeleton

    return reward_skeleton(cfg.reward_fn, dtype=dtype, hps_version=cfg.hps_version, resize=cfg.reward_resize,
                           grad_checkpoint=cfg.reward_grad_checkpoint, actpred_frames=cfg.actpred_frames,
                           num_frames=num_frames)


# ---------------------------------------------------------------------------------------------
# the measured phases
# ---------------------------------------------------------------------------------------------


def worst_cutoff(cfg: VaderConfig) -> int:
    """The backprop cutoff that keeps the most steps' graphs: the plan's for every mode."""
    from vader.sampling import SPECIFIC_CUTOFF

    steps = cfg.scheduler.num_sampling_steps
    mode = cfg.backprop_mode
    if isinstance(mode, int):
        return steps - mode
    return {"last": steps - 1, "rand": 0, "specific": SPECIFIC_CUTOFF}[mode]


def planned_frames(cfg: VaderConfig, vae: nn.Module | None) -> list[int]:
    """decode_frame's frames; '-1' (one random frame) is planned at the frame that costs the most:
    the last, whose temporal chunk is decoded whole."""
    from vader.frames import decode_choices, select_frames

    if cfg.decode_frame == "-1":
        return [decode_choices(cfg.decode_strategy, cfg.frames, vae) - 1]
    return select_frames(cfg.decode_frame, cfg.frames, random.Random(0), cfg.decode_strategy, vae)


def _sample(stack: _FakeStack, meter: LiveBytes, n: int, cutoff: int | None, all_steps: bool,
            grad_checkpoint: bool) -> tuple[torch.Tensor, float]:
    """VideoGenerator.sample_latents, with the no-gradient steps before the cutoff run once (all of
    them with all_steps) under the label 'sampling_nograd', the gradient window under 'sampling'.
    Returns the latents and the factor to multiply the no-gradient steps' FLOPs by."""
    from vader.sampling import conditioning, make_timesteps, sample

    cfg, gen = stack.cfg, stack.gen
    sched = cfg.scheduler
    height, width = cfg.height_width
    cond = conditioning(n, height, width, gen.num_frames, cfg.fps, stack.dtype, torch.device("cpu"))
    timesteps = make_timesteps(sched.num_sampling_steps, n, num_timesteps=sched.num_timesteps,
                               use_timestep_transform=sched.use_timestep_transform,
                               use_discrete_timesteps=sched.use_discrete_timesteps,
                               transform_scale=sched.transform_scale, cond=cond, num_frames=gen.num_frames)
    z = torch.randn((n, *gen.latent_shape), dtype=torch.float32)
    text = stack.text_condition(n)
    first_grad = len(timesteps) if cutoff is None else cutoff
    no_grad = list(range(first_grad)) if all_steps else list(range(min(first_grad, 1)))
    with meter.phase("sampling_nograd"):
        for i in no_grad:  # one step at a time: dt's value differs from the full loop's, shapes do not
            z = sample(gen.denoiser, z, text, cond, timesteps[i:i + 1], cfg_scale=sched.cfg_scale,
                       num_timesteps=sched.num_timesteps, cutoff=None)
    scale = first_grad / max(1, len(no_grad))
    if cutoff is not None and cutoff < len(timesteps):
        with meter.phase("sampling"):
            z = sample(gen.denoiser, z, text, cond, timesteps[cutoff:], cfg_scale=sched.cfg_scale,
                       num_timesteps=sched.num_timesteps, cutoff=0, grad_checkpoint=grad_checkpoint)
    return z, scale


def _flops_of(meter: LiveBytes, nograd_scale: float, times: int = 1) -> dict[str, float]:
    names = {"sampling_nograd": "sampling (no gradients)", "sampling": "sampling (gradient window)",
             "decode": "VAE decode", "infer_decode": "VAE decode", "reward": "reward", "backward": "backward",
             "encode": "text encoder"}
    out: dict[str, float] = {}
    for label, value in meter.flops.items():
        if label in names and value:
            scale = nograd_scale if label == "sampling_nograd" else 1.0
            out[names[label]] = out.get(names[label], 0.0) + value * scale * times
    return out


def _text_phase(cfg: VaderConfig) -> tuple[PhasePlan, int]:
    """T5 in fp32 on the device, encoding one batch of prompts at model_max_length tokens."""
    from transformers import T5EncoderModel

    from vader.models.loading import build_on_meta
    from vader.models.presets import text_encoder_config

    config = text_encoder_config(cfg.text_encoder)
    model = build_on_meta(lambda: T5EncoderModel(config))
    meter = LiveBytes()
    batch = max(cfg.train_batch_size, cfg.val_batch_size)
    with fake_mode(), meter:
        with meter.phase("text_encoder"):
            materialise(model, torch.float32)
        with meter.phase("encode"), torch.no_grad():
            ids = torch.zeros(batch, cfg.text_encoder.model_max_length, dtype=torch.long)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return PhasePlan("text", meter.peak, meter.at_peak, meter.peak_label, _flops_of(meter, 1.0)), config.d_model


def _cpu_autocast(cfg: VaderConfig) -> torch.autocast:
    """The run's mixed precision on the fake CPU tensors the plan counts (bf16 autocast, or none)."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _train_inputs(cfg: VaderConfig, caption_channels: int):  # type: ignore[no-untyped-def]
    """What a planned training step starts from, built before the fake mode (meta models): the batch's
    prompts and labels, the denoiser and VAE on meta, the decoded frames and the reward on meta.
    The run's prompts when the config names them (ActPred needs an action in them, toy_alignment a
    toy caption); else a stand-in: the text only decides the reward's label, never a size."""
    from vader.models.presets import torch_dtype
    from vader.run import load_prompts

    prompts, labels = load_prompts(cfg) if (cfg.prompt or cfg.prompt_path) else (["a video"], {})
    prompts = (prompts * cfg.train_batch_size)[: cfg.train_batch_size]
    labels = {p: labels[p] for p in prompts if p in labels}
    meta = (_denoiser_on_meta(cfg, caption_channels), _vae_on_meta(cfg))
    frames = planned_frames(cfg, meta[1])
    return prompts, labels, meta, frames, _reward_on_meta(cfg, torch_dtype(cfg.dtype), len(frames))


def _frozen_reward_and_optimizer(stack: _FakeStack, meter: LiveBytes, reward, prompts: list[str],
                                 labels: dict[str, str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inside the fake mode: the reward's weights and prepared prompts, AdamW's state; then the peak
    is reset, so what follows is the step itself."""
    gen = stack.gen
    with meter.phase("reward_model"):
        materialise(reward, stack.dtype)
    with meter.phase("reward_prepare"), torch.no_grad():
        reward.prepare(list(dict.fromkeys(gen.reward_prompts(prompts))),
                       {gen.reward_prompts([p])[0]: label for p, label in labels.items()})
    with meter.phase("optimizer"):
        state = _optimizer_state(stack.params, stack.cfg.use_AdamW8bit)
    meter.reset_peak()
    return state


def _train_phase(cfg: VaderConfig, caption_channels: int, all_steps: bool) -> tuple[PhasePlan, int, list[int]]:
    meter = LiveBytes()
    accumulation = cfg.gradient_accumulation_steps
    prompts, labels, meta, frames, reward = _train_inputs(cfg, caption_channels)
    with fake_mode(), meter:
        stack = _FakeStack(cfg, meter, caption_channels, True, *meta)
        gen = stack.gen
        state = _frozen_reward_and_optimizer(stack, meter, reward, prompts, labels)
        cutoff = worst_cutoff(cfg)
        autocast = _cpu_autocast(cfg)
        n = cfg.train_batch_size
        with autocast:
            latents, scale = _sample(stack, meter, n, cutoff, all_steps, cfg.grad_checkpoint)
            with meter.phase("decode"):
                video = gen.decode(latents, frames, grad_checkpoint=cfg.grad_checkpoint)  # as micro_step
            with meter.phase("reward"):
                out = reward(video, gen.reward_prompts(prompts))
        with meter.phase("backward"):
            (out.loss.mean() / accumulation).backward()
        del latents, video, out
        meter.relabel([p.grad for p in stack.params], "grads")
        with meter.phase("step"), torch.no_grad():
            _optimizer_step(stack.params, state, cfg.use_AdamW8bit)
    flops = _flops_of(meter, scale, times=accumulation)
    return PhasePlan("train", meter.peak, meter.at_peak, meter.peak_label, flops), cutoff, frames


def _grpo_train_phase(cfg: VaderConfig, caption_channels: int) -> tuple[PhasePlan, None, list[int]]:
    """grpo_step: train_batch_size x group_size SDE trajectories without gradients (every step's latents
    kept), the decode and reward without gradients, then one recorded transition's clipped loss with
    gradients and its backward (the others have the same shapes and are freed in between), AdamW."""
    from vader.backends.base import FlowState
    from vader.backends.opensora import OpenSoraCondition
    from vader.methods.grpo import GRPOSettings, Trajectory, grpo_loss, sde_step
    from vader.sampling import conditioning, make_timesteps

    settings = GRPOSettings.from_config(cfg)
    meter = LiveBytes()
    prompts, labels, meta, frames, reward = _train_inputs(cfg, caption_channels)
    group = [p for p in prompts for _ in range(settings.group_size)]
    sched = cfg.scheduler
    num_steps = sched.num_sampling_steps
    trained = max(1, round(settings.train_steps_fraction * num_steps)) if settings.train_steps_fraction < 1 else num_steps
    with fake_mode(), meter:
        stack = _FakeStack(cfg, meter, caption_channels, True, *meta)
        gen = stack.gen
        from vader.checkpoint import set_lora_dropout

        set_lora_dropout(gen.denoiser, False)  # grpo_step samples and trains without LoRA dropout
        state = _frozen_reward_and_optimizer(stack, meter, reward, prompts, labels)
        autocast = _cpu_autocast(cfg)
        n = len(group)
        height, width = cfg.height_width
        cond = conditioning(n, height, width, gen.num_frames, cfg.fps, stack.dtype, torch.device("cpu"))
        timesteps = make_timesteps(num_steps, n, num_timesteps=sched.num_timesteps,
                                   use_timestep_transform=sched.use_timestep_transform,
                                   use_discrete_timesteps=sched.use_discrete_timesteps,
                                   transform_scale=sched.transform_scale, cond=cond, num_frames=gen.num_frames)
        with autocast:
            with meter.phase("sampling_nograd"), torch.no_grad():
                z = torch.randn((n, *gen.latent_shape), dtype=torch.float32)
                text = stack.text_condition(1)  # as gen.text_condition(group): one row per sample
                text = dataclasses.replace(text, y=text.y.repeat(n, 1, 1, 1), y_null=text.y_null.repeat(n, 1, 1, 1))
                flow = FlowState(z, timesteps, sched.num_timesteps, OpenSoraCondition(text, cond, sched.cfg_scale))
                traj = Trajectory(flow, [z], torch.empty(0))
                # one SDE step run; the trajectory keeps every step's latent, which the others would add
                v = gen.flow_velocity(flow, z, 0)
                z, _, _, _ = sde_step(v, z, timesteps[0], flow.next_t(0), settings.noise_level,
                                      num_timesteps=sched.num_timesteps)
                del v
                traj.latents += [z] + [torch.empty_like(z) for _ in range(num_steps - 1)]
                traj.log_probs = torch.empty(n, num_steps)
            with meter.phase("decode"), torch.no_grad():
                video = gen.decode(traj.final, frames)
            with meter.phase("reward"), torch.no_grad():
                reward(video, gen.reward_prompts(group))
            del video
            advantages = torch.ones(n)
            with meter.phase("sampling"):
                parts = grpo_loss(gen, traj, advantages, 0, settings, cfg.grad_checkpoint)
        with meter.phase("backward"):
            (parts.loss / trained).backward()
        del parts
        meter.relabel([p.grad for p in stack.params], "grads")
        with meter.phase("step"), torch.no_grad():
            _optimizer_step(stack.params, state, cfg.use_AdamW8bit)
    flops = _flops_of(meter, num_steps, times=cfg.gradient_accumulation_steps)
    per_update = trained * settings.inner_epochs
    for part in ("sampling (gradient window)", "backward"):
        if part in flops:
            flops[part] *= per_update
    if settings.kl_beta > 0 and "sampling (no gradients)" in flops:  # the base model's velocity per update
        flops["sampling (no gradients)"] *= 1 + per_update / num_steps
    return PhasePlan("train", meter.peak, meter.at_peak, meter.peak_label, flops), None, frames


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


def _infer_phase(cfg: VaderConfig, caption_channels: int, all_steps: bool) -> PhasePlan:
    """One validation / inference batch: val_batch_size videos, every step without gradients, full decode."""
    meter = LiveBytes()
    infer_cfg = dataclasses.replace(cfg, is_vader_training=False)
    meta = (_denoiser_on_meta(infer_cfg, caption_channels), _vae_on_meta(infer_cfg))
    with fake_mode(), meter:
        stack = _FakeStack(infer_cfg, meter, caption_channels, False, *meta)
        meter.reset_peak()
        with torch.no_grad():
            latents, scale = _sample(stack, meter, cfg.val_batch_size, None, all_steps, False)
            with meter.phase("infer_decode"):
                stack.gen.decode(latents)
    return PhasePlan("infer", meter.peak, meter.at_peak, meter.peak_label, _flops_of(meter, scale))


# ---------------------------------------------------------------------------------------------
# the diffusers backends (Wan2.1, CogVideoX): the same phases through the backend's own surface
# ---------------------------------------------------------------------------------------------


def _backend_meta(cfg: VaderConfig, training: bool):  # type: ignore[no-untyped-def]
    from vader.backends import backend_class, backend_module, settings_from_config

    settings = settings_from_config(cfg)
    models = backend_module(cfg.backend).meta_models(settings)
    cls = backend_class(cfg.backend)
    if training:
        from peft import inject_adapter_in_model

        from vader.checkpoint import lora_config

        inject_adapter_in_model(lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                            targets=cls.lora_target_modules), models["transformer"],
                                low_cpu_mem_usage=True)
    return settings, models, cls


def _backend_text_phase(cfg: VaderConfig) -> PhasePlan:
    """The backend's text encoder (UMT5-XXL / T5-XXL) in the run's dtype, one batch of prompts."""
    from vader.models.presets import torch_dtype

    settings, models, _ = _backend_meta(cfg, training=False)
    model = models["text_encoder"]
    meter = LiveBytes()
    batch = max(cfg.train_batch_size, cfg.val_batch_size)
    with fake_mode(), meter:
        with meter.phase("text_encoder"):
            materialise(model, torch_dtype(cfg.dtype))
        with meter.phase("encode"), torch.no_grad():
            ids = torch.zeros(batch, settings.max_sequence_length, dtype=torch.long)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return PhasePlan("text", meter.peak, meter.at_peak, meter.peak_label, _flops_of(meter, 1.0))


def _backend_generator(cfg: VaderConfig, meter: LiveBytes, training: bool, prompts: list[str],
                       meta: tuple) -> object:
    """The backend generator on fake tensors: transformer and VAE (from `_backend_meta`, built before
    the fake mode is entered) materialised as `build` loads them, every prompt (and the negative
    prompt) given an embedding of the encoder's output shape."""
    from vader.models.presets import torch_dtype

    settings, models, cls = meta
    dtype = torch_dtype(cfg.dtype)
    vae_dtype = torch_dtype(getattr(settings, "vae_dtype", cfg.dtype))
    with meter.phase("denoiser"):
        transformer = materialise(models["transformer"], dtype, trainable="lora_" if training else None)
    meter.relabel([p for n, p in transformer.named_parameters() if "lora_" in n], "lora")
    with meter.phase("vae"):
        vae = materialise(models["vae"], vae_dtype)
    if cfg.backend == "cogvideox":  # its sampler takes the checkpoint's scheduler
        gen = cls.from_components(transformer, vae, None, None, _cogvideox_scheduler(settings), settings)
    else:
        gen = cls.from_components(transformer, vae, None, None, settings)
    if training:
        from vader.checkpoint import set_lora_dropout

        set_lora_dropout(transformer, True)
    width = models["text_encoder"].config.d_model
    with meter.phase("prompts"):
        for prompt in dict.fromkeys([*prompts, settings.negative_prompt]):
            gen.embeddings[prompt] = torch.zeros(1, settings.max_sequence_length, width, dtype=dtype)
    return gen


def _cogvideox_scheduler(settings):  # type: ignore[no-untyped-def]
    """The checkpoint's CogVideoXDDIMScheduler when its files are on this machine, else the published
    CogVideoX-2b one (v-prediction, trailing spacing, zero-SNR betas); its values never change memory."""
    from diffusers import CogVideoXDDIMScheduler

    try:
        return CogVideoXDDIMScheduler.from_pretrained(settings.pretrained, subfolder="scheduler",
                                                      local_files_only=True)
    except Exception:  # not on this machine: the plan needs no download
        return CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing")


def _backend_train_phase(cfg: VaderConfig) -> tuple[PhasePlan, int, list[int]]:
    """micro_step on the backend: every sampling step runs (the backend's loop has no shortcut)."""
    from vader.run import load_prompts
    from vader.seeds import make_generator

    meter = LiveBytes()
    prompts, labels = load_prompts(cfg) if (cfg.prompt or cfg.prompt_path) else (["a video"], {})
    prompts = (prompts * cfg.train_batch_size)[: cfg.train_batch_size]
    labels = {p: labels[p] for p in prompts if p in labels}
    frames = planned_frames(cfg, None)
    reward = _reward_on_meta(cfg, _dtype(cfg), len(frames))
    cutoff = worst_cutoff(cfg)
    meta = _backend_meta(cfg, training=True)
    with fake_mode(), meter:
        gen = _backend_generator(cfg, meter, True, prompts, meta)
        params = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
        with meter.phase("reward_model"):
            materialise(reward, _dtype(cfg))
        with meter.phase("reward_prepare"), torch.no_grad():
            reward.prepare(list(dict.fromkeys(gen.reward_prompts(prompts))),
                           {gen.reward_prompts([p])[0]: label for p, label in labels.items()})
        with meter.phase("optimizer"):
            state = _optimizer_state(params, cfg.use_AdamW8bit)
        meter.reset_peak()
        autocast = _cpu_autocast(cfg)
        with autocast:
            with meter.phase("sampling"):
                latents = gen.sample_latents(prompts, make_generator(random.Random(0)), cutoff=cutoff,
                                             grad_checkpoint=cfg.grad_checkpoint)
            with meter.phase("decode"):
                video = gen.decode(latents, frames, grad_checkpoint=cfg.grad_checkpoint)
            with meter.phase("reward"):
                out = reward(video, gen.reward_prompts(prompts))
        with meter.phase("backward"):
            (out.loss.mean() / cfg.gradient_accumulation_steps).backward()
        del latents, video, out
        meter.relabel([p.grad for p in params], "grads")
        with meter.phase("step"), torch.no_grad():
            _optimizer_step(params, state, cfg.use_AdamW8bit)
    flops = _flops_of(meter, 1.0, times=cfg.gradient_accumulation_steps)
    return PhasePlan("train", meter.peak, meter.at_peak, meter.peak_label, flops), cutoff, frames


def _backend_infer_phase(cfg: VaderConfig) -> PhasePlan:
    from vader.seeds import make_generator

    meter = LiveBytes()
    prompts = ["a video"] * cfg.val_batch_size
    meta = _backend_meta(cfg, training=False)
    with fake_mode(), meter:
        gen = _backend_generator(cfg, meter, False, prompts, meta)
        meter.reset_peak()
        with torch.no_grad():
            with meter.phase("sampling_nograd"):
                latents = gen.sample_latents(prompts, make_generator(random.Random(0)))
            with meter.phase("infer_decode"):
                gen.decode(latents)
    return PhasePlan("infer", meter.peak, meter.at_peak, meter.peak_label, _flops_of(meter, 1.0))


def _dtype(cfg: VaderConfig) -> torch.dtype:
    from vader.models.presets import torch_dtype

    return torch_dtype(cfg.dtype)


def make_plan(cfg: VaderConfig, *, all_steps: bool = False, training: bool | None = None) -> Plan:
    """Plan the config's text encoding, training step (when it trains) and inference batch."""
    training = cfg.is_vader_training if training is None else training
    if cfg.backend != "opensora":
        text = _backend_text_phase(cfg)
        train, cutoff, frames = _backend_train_phase(cfg) if training else (None, None, [])
        notes = ["every sampling step is run (the backend's sampler has no one-step shortcut)"]
        return Plan(cfg, text, train, _backend_infer_phase(cfg), cutoff, frames, notes)
    text, caption_channels = _text_phase(cfg)
    train, cutoff, frames = (None, None, [])
    notes = []
    if training and cfg.method == "grpo":
        train, cutoff, frames = _grpo_train_phase(cfg, caption_channels)
        notes.append(f"method='grpo': {cfg.train_batch_size} prompt(s) x group_size trajectories sampled without "
                     "gradients, then one recorded step at a time with gradients")
    elif training:
        train, cutoff, frames = _train_phase(cfg, caption_channels, all_steps)
    infer = _infer_phase(cfg, caption_channels, all_steps)
    if training and cfg.method != "grpo" and cfg.backprop_mode == "rand":
        notes.append("backprop_mode='rand' planned at its worst draw (every step keeps gradients)")
    if training and cfg.decode_frame == "-1":
        notes.append("decode_frame='-1' planned at the costliest frame (the last)")
    return Plan(cfg, text, train, infer, cutoff, frames, notes)


# ---------------------------------------------------------------------------------------------
# budget, time and the fit search
# ---------------------------------------------------------------------------------------------


def parse_bytes(text: str, key: str = "--budget") -> int:
    """'24GiB', '24GB' (taken as GiB, as nvidia-smi and most users mean it), '24' (GiB), '800MiB'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise VaderError(f"{key}={text!r} is not a memory size; write e.g. 24GiB, 80GB or 16")
    unit = (m.group(2) or "G")[0].upper()
    return int(float(m.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit])


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
    ("use_AdamW8bit", "True", False),
    ("dtype", "fp8", False),
    ("decode_strategy", "latent", True),
    ("decode_frame", "-1", True),
    ("backprop_mode", "last", True),
)


@dataclass
class FitResult:
    overrides: list[tuple[str, str]]
    plan: Plan | None
    tried: int
    changes_algorithm: list[str]


def _value(cfg: VaderConfig, key: str) -> str:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return str(obj)


def fit(path: str, overrides: list[str], budget: int, *, tflops: float, mfu: float,
        knobs: tuple[tuple[str, str, bool], ...] = KNOBS) -> FitResult:
    """The fastest setting within `budget`: turn knobs on in KNOBS order until the plan fits, then turn
    back off every one the fit does not need (fastest = fewest FLOPs, so recompute is dropped first)."""
    from vader.config import load_config

    base = load_config(path, overrides)
    available = [k for k in knobs if _knob_applies(base, k)]
    chosen: list[tuple[str, str, bool]] = []
    tried = 0

    def plan_for(extra: list[tuple[str, str, bool]]) -> Plan:
        nonlocal tried
        tried += 1
        cfg = load_config(path, [*overrides, *[x for k, v, _ in extra for x in (f"--{k}", v)]])
        return make_plan(cfg)

    plan = plan_for([])
    for knob in available:
        if plan.peak <= budget:
            break
        chosen.append(knob)
        plan = plan_for(chosen)
    if plan.peak > budget:
        return FitResult([(k, v) for k, v, _ in chosen], None, tried, [])
    for knob in list(reversed(chosen)):  # drop what is not needed, costliest-in-time first
        trial = [k for k in chosen if k is not knob]
        candidate = plan_for(trial)
        if candidate.peak <= budget and _train_flops(candidate) <= _train_flops(plan) * 1.0001:
            chosen, plan = trial, candidate
    return FitResult([(k, v) for k, v, _ in chosen], plan, tried, [k for k, _, alg in chosen if alg])


# What the diffusers backends honour (they run diffusers' own attention, no fp8 path, no latent
# decode shortcut, and their build encodes on the device).
BACKEND_KNOBS = ("reward_grad_checkpoint", "grad_checkpoint", "use_AdamW8bit", "decode_frame", "backprop_mode")


def _knob_applies(cfg: VaderConfig, knob: tuple[str, str, bool]) -> bool:
    key, value, _ = knob
    if cfg.backend != "opensora" and key not in BACKEND_KNOBS:
        return False
    if key == "model.attention" and not hasattr(cfg.model, "attention"):
        return False
    if key == "dtype" and value == "fp8":
        from vader.dtypes import DTYPES

        if "fp8" not in DTYPES:
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


def _breakdown(phase: PhasePlan) -> Iterator[str]:
    for label, size in sorted(phase.at_peak.items(), key=lambda kv: -kv[1]):
        if size >= max(1024, phase.peak // 10_000):  # what is visible at the peak's scale
            yield f"    {LABELS.get(label, label):52s} {_gib(size):>11s}"


def describe(plan: Plan, *, budget: int | None, tflops: float, mfu: float, gpu: str) -> str:
    cfg = plan.cfg
    height, width = cfg.height_width
    lines = [f"plan: {height}x{width}, {cfg.frames} frames, dtype {cfg.dtype}, mixed_precision "
             f"{cfg.mixed_precision}, attention {getattr(cfg.model, 'attention', 'math')}"]
    t = plan.text
    if cfg.backend != "opensora":
        lines.append(f"  text encoder (runs first, released before the transformer loads): peak {_gib(t.peak)}")
    elif cfg.text_encoder.offload:
        lines.append(f"  text encoder on the CPU (text_encoder.offload): {_gib(t.peak)} of host memory, none on the GPU")
    else:
        lines.append(f"  text encoder (runs first, released before the denoiser loads): peak {_gib(t.peak)} "
                     "(text_encoder.offload=True runs it on the CPU)")
    if plan.train is not None:
        tr = plan.train
        steps = cfg.scheduler.num_sampling_steps
        window = steps - (plan.cutoff or 0)
        if cfg.method == "grpo":
            from vader.methods.grpo import GRPOSettings

            g = GRPOSettings.from_config(cfg)
            trained = max(1, round(g.train_steps_fraction * steps)) if g.train_steps_fraction < 1 else steps
            how = (f"GRPO: {g.group_size} samples per prompt, {trained} of {steps} recorded steps trained one at a "
                   f"time x {g.inner_epochs} inner epoch(s)")
        else:
            how = f"{window} of {steps} sampling steps with gradients"
        lines.append(f"  training step (batch {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation, "
                     f"{how}, grad_checkpoint {cfg.grad_checkpoint}, "
                     f"decode {len(plan.frames)} frame(s) '{cfg.decode_strategy}', reward {cfg.reward_fn}): "
                     f"peak {_gib(tr.peak)}, reached during {LABELS.get(tr.peak_phase, tr.peak_phase)}")
        lines.extend(_breakdown(tr))
        seconds = step_seconds(tr.total_flops, tflops, mfu)
        parts = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in tr.flops.items())
        lines.append(f"    compute: {tr.total_flops / 1e12:.1f} TFLOP per optimizer step ({parts}) -> about "
                     f"{seconds:.1f} s on {gpu} ({tflops:g} TFLOP/s bf16) at {mfu:.0%} MFU")
    inf = plan.infer
    lines.append(f"  inference batch ({cfg.val_batch_size} video(s), full decode): peak {_gib(inf.peak)}")
    lines.extend(_breakdown(inf))
    lines.append(f"    compute: {inf.total_flops / 1e12:.1f} TFLOP -> about "
                 f"{step_seconds(inf.total_flops, tflops, mfu):.1f} s on {gpu} at {mfu:.0%} MFU")
    lines.extend(f"  note: {n}" for n in plan.notes)
    verdict = f"peak {_gib(plan.peak)}"
    if budget is not None:
        verdict += (f" fits {_gib(budget)}" if plan.peak <= budget else
                    f" does NOT fit {_gib(budget)} (try --fit)")
    lines.append(verdict + " (tensor bytes; leave ~1-2 GiB for the CUDA context and allocator slack)")
    return "\n".join(lines)


def plan_main(path: str, overrides: list[str], *, budget: str | None, do_fit: bool, gpu: str | None,
              tflops: float | None, mfu: float, all_steps: bool) -> str:
    from vader.config import load_config

    if gpu is not None and gpu not in GPU_TFLOPS:
        raise VaderError(f"--gpu={gpu!r} is not known; choose one of {', '.join(GPU_TFLOPS)} or give --tflops")
    if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
        raise VaderError(f"--tflops={tflops!r} must be a positive number (the card's dense bf16 TFLOP/s)")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise VaderError(f"--mfu={mfu!r} must be in (0, 1]")
    name = gpu or ("custom" if tflops else DEFAULT_GPU)
    peak_tflops = tflops or GPU_TFLOPS[gpu or DEFAULT_GPU]
    limit = parse_bytes(budget) if budget is not None else None
    if do_fit and limit is None:
        raise VaderError("--fit needs --budget (e.g. --budget 24GiB)")
    cfg = load_config(path, overrides)
    if not do_fit:
        return describe(make_plan(cfg, all_steps=all_steps), budget=limit, tflops=peak_tflops, mfu=mfu, gpu=name)
    assert limit is not None
    result = fit(path, overrides, limit, tflops=peak_tflops, mfu=mfu)
    flags = " ".join(f"--{k} {v}" for k, v in result.overrides)
    if result.plan is None:
        return (f"no setting of the memory knobs fits {_gib(limit)} ({result.tried} plans); with all of them "
                f"({flags}) the peak is still above it: lower train_batch_size, the resolution or num_frames")
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


def measure_real_step(cfg: VaderConfig, seconds: list[float] | None = None) -> PhasePlan:
    """The reference a plan is calibrated against: `vader.train`'s own setup and train_step on real
    tensors of this machine, the peak of live tensor bytes over the second optimizer step (the first
    creates AdamW's state, which every later step carries). Builds a run folder under project_dir.
    `seconds` receives the wall time of a third step, run without the meter."""
    import time

    from vader.run import Run, make_accelerator
    from vader.train import setup

    meter = LiveBytes()
    accelerator = make_accelerator(cfg)
    run = Run.create(cfg, accelerator, kind="plan")
    with meter:
        trainer = setup(cfg, accelerator, run)
        trainer.step(0)
        meter.reset_peak()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.step(1)
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
    and the card's name; everywhere: the peak of live tensor bytes and the step's seconds. The run
    folder goes to a temporary directory and is removed."""
    import shutil
    import tempfile

    from vader.config import load_config
    from vader.preflight import preflight

    scratch = tempfile.mkdtemp(prefix="vader-bench-")
    try:
        cfg = load_config(path, [*overrides, "--project_dir", scratch, "--logger_type", "none",
                                 "--is_sample_preview", "False", "--verbose", "0"])
        preflight(cfg, "train")
        planned = make_plan(cfg, training=True)
        seconds: list[float] = []
        measured = measure_real_step(cfg, seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    lines = [f"bench on {device}: training step 2 (step 1 creates AdamW's state; step 3 is timed)",
             f"  planned peak (fake tensors):      {_gib(planned.train.peak)}",
             f"  measured peak of live tensors:    {_gib(measured.peak)} "
             f"({100 * (planned.train.peak - measured.peak) / max(1, measured.peak):+.1f}% planned vs measured)"]
    if torch.cuda.is_available():
        lines.append(f"  torch.cuda.max_memory_allocated: {_gib(torch.cuda.max_memory_allocated())}")
    flops = planned.train.total_flops
    lines.append(f"  step time (a third step, unmetered): {seconds[0]:.2f} s; planned compute {flops / 1e9:,.1f} GFLOP "
                 f"-> {flops / seconds[0] / 1e12:.4f} TFLOP/s achieved")
    return "\n".join(lines)
