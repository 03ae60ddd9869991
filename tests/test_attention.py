"""Fused attention (`model.attention='sdpa'`, the default) against the reference's math path.

Tolerances are measured on this CPU (torch 2.14) and asserted with about 2-10x margin:
- fp32: sdpa vs the reference fixture 3.2e-6 (math 3.0e-6) at output scale 7.2; gradients w.r.t.
  the input and the LoRA differ from math's by 6e-7 / 8e-7 of their largest value.
- bf16 weights: both backends round; vs the fixture's fp32 output sdpa differs by 1.35% of its
  scale, math by 1.17%; with a LoRA, vs the fp32 math model, the output differs by 1.5% (sdpa) /
  1.2% (math), input gradients 2.1% / 1.8%, LoRA gradients 3.4% / 4.9% of their largest value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_stdit3 import PARITY_ATOL, inputs, load_parity_fixture, tiny_model

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import add_lora, lora_config
from vader.errors import VaderError
from vader.models import stdit3
from vader.models.stdit3 import ATTENTION_BACKENDS, STDiT3, attention

# Gradient differences relative to the largest gradient, fp32 (measured 8e-7).
FP32_GRAD_RTOL = 1e-5
# bf16 vs the fp32 math model, relative to the largest value: (output, input grad, LoRA grads).
BF16_TOL = (0.04, 0.05, 0.10)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _fixture_run(dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, d(loss)/dx and d(loss)/d(LoRA) of the reference fixture's model with a random LoRA
    (CFG batch, padded captions, partial x_mask), for a fixed random projection of the output."""
    model, kw, _ = load_parity_fixture()
    model = model.to(dtype)
    model.set_attention_backend(backend)
    torch.manual_seed(1)
    params = add_lora(model, lora_config(4, targets=LORA_TARGETS))
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.1)  # LoRA B starts at zero: make every LoRA tensor matter
    x = kw["x"].clone().requires_grad_(True)
    out = model(**{**kw, "x": x})
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    return out.detach(), x.grad, [p.grad for p in params]


def test_sdpa_matches_the_reference_fixture_in_fp32() -> None:
    model, kw, outputs = load_parity_fixture()
    model.set_attention_backend("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(**kw), outputs["x_mask"], atol=PARITY_ATOL, rtol=0)
        del kw["x_mask"]
        torch.testing.assert_close(model(**kw), outputs["no_x_mask"], atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_bf16_weights_stay_close_to_the_reference_fixture(backend: str) -> None:
    """bf16 weights and activations vs the reference's fp32 output: sdpa 1.35%, math 1.17% of its scale."""
    model, kw, outputs = load_parity_fixture()
    model = model.to(torch.bfloat16)
    model.set_attention_backend(backend)
    with torch.no_grad():
        assert _rel(model(**kw), outputs["x_mask"]) < BF16_TOL[0]


def test_sdpa_gradients_match_math_in_fp32() -> None:
    out_m, gx_m, gp_m = _fixture_run(torch.float32, "math")
    out_s, gx_s, gp_s = _fixture_run(torch.float32, "sdpa")
    torch.testing.assert_close(out_s, out_m, atol=PARITY_ATOL, rtol=0)
    assert _rel(gx_s, gx_m) < FP32_GRAD_RTOL
    assert len(gp_s) == 24 and all(g is not None and g.abs().sum() > 0 for g in gp_s)
    assert max(_rel(a, b) for a, b in zip(gp_s, gp_m, strict=True)) < FP32_GRAD_RTOL


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_bf16_forward_and_gradients_stay_close_to_fp32(backend: str) -> None:
    out_ref, gx_ref, gp_ref = _fixture_run(torch.float32, "math")
    out, gx, gp = _fixture_run(torch.bfloat16, backend)
    assert out.dtype == torch.float32  # the denoiser returns fp32 whatever its weights
    assert gx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gp)  # LoRA trains in fp32
    errors = (_rel(out, out_ref), _rel(gx, gx_ref), max(_rel(a, b) for a, b in zip(gp, gp_ref, strict=True)))
    assert all(e < tol for e, tol in zip(errors, BF16_TOL, strict=True)), errors


def _masked_qkv(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g).to(dtype).requires_grad_(True) for n in (10, 7, 7))
    valid = torch.tensor([3, 7, 1])  # padded captions: sample i has valid[i] text tokens
    key_mask = (torch.arange(7)[None] < valid[:, None])[:, None, None, :]
    return q, k, v, key_mask


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_key_mask_is_handled_identically(dtype: torch.dtype, atol: float) -> None:
    """Cross-attention's key mask: both backends give the same output and gradients, and padded keys
    and values get exactly zero gradient (they do not take part)."""
    results = {}
    for backend in ATTENTION_BACKENDS:
        q, k, v, key_mask = _masked_qkv(dtype)
        out = attention(q, k, v, key_mask, sdpa=backend == "sdpa")
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert torch.count_nonzero(k.grad[0, :, 3:]) == 0 and torch.count_nonzero(v.grad[2, :, 1:]) == 0
        results[backend] = (out, q.grad, k.grad, v.grad)
    for sdpa, math in zip(results["sdpa"], results["math"], strict=True):
        torch.testing.assert_close(sdpa.float(), math.float(), atol=atol, rtol=0)


def test_sdpa_ignores_padded_caption_tokens_and_text_free_samples() -> None:
    model, kw = tiny_model(), inputs()
    model.set_attention_backend("sdpa")
    with torch.no_grad():
        ref = model(**kw)
        y = kw["y"].clone()
        y[kw["mask"][:, None, :, None].expand_as(y) == 0] = 1e3  # garbage where the mask says padding
        torch.testing.assert_close(model(**{**kw, "y": y}), ref, atol=1e-6, rtol=0)
    kw["mask"][1] = 0  # a sample with no text token attends to nothing (0), as on the math path
    x = kw["x"].clone().requires_grad_(True)
    out = model(**{**kw, "x": x})
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    model.set_attention_backend("math")
    with torch.no_grad():
        torch.testing.assert_close(model(**kw), out.detach(), atol=1e-5, rtol=0)


# ---- the config key and what a run builds -----------------------------------------------------


def test_config_key_validation(tiny_cfg) -> None:
    assert tiny_cfg().model.attention == "sdpa"
    assert tiny_cfg("--model.attention", "math").model.attention == "math"
    with pytest.raises(VaderError) as info:
        tiny_cfg("--model.attention", "flash")
    message = str(info.value)
    assert message == "model.attention='flash' is not valid; choose one of: 'sdpa', 'math'"
    with pytest.raises(VaderError, match=r"^model.attention='math' contradicts model.enable_flash_attn=True") as info:
        tiny_cfg("--model.attention", "math", "--model.enable_flash_attn", "True")
    assert "\n" not in str(info.value)


def test_config_and_model_name_the_same_backends() -> None:
    from vader.config import ATTENTION_BACKENDS as CONFIG_BACKENDS

    assert CONFIG_BACKENDS == ATTENTION_BACKENDS


@pytest.mark.parametrize(("argv", "backend"), [
    ((), "sdpa"),
    (("--model.attention", "math"), "math"),
    (("--model.enable_flash_attn", "True"), "sdpa"),
    (("--model.enable_flash_attn", "True", "--model.attention", "sdpa"), "sdpa"),
])
def test_build_denoiser_applies_the_key(tiny_cfg, argv: tuple[str, ...], backend: str) -> None:
    from vader.models.presets import build_denoiser

    cfg = tiny_cfg(*argv)
    model = build_denoiser(cfg.model, 32, cfg.text_encoder.model_max_length, torch.float32, torch.device("cpu"))
    assert model.attention_backend == backend


def _count_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the denoiser's F.scaled_dot_product_attention calls (the VAE's diffusers attention also
    uses it, so the counter sits in vader.models.stdit3's view of torch.nn.functional only)."""
    calls = [0]

    class CountingFunctional:
        def __getattr__(self, name: str):
            return getattr(F, name)

        def scaled_dot_product_attention(self, *args, **kwargs):
            calls[0] += 1
            return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(stdit3, "F", CountingFunctional())
    return calls


@pytest.mark.parametrize(("argv", "fused"), [((), True), (("--model.attention", "math"), False)])
def test_training_and_inference_run_the_configured_backend(tiny_cfg, monkeypatch, argv: tuple[str, ...],
                                                           fused: bool) -> None:
    """A default config trains and samples with F.scaled_dot_product_attention; 'math' never calls it."""
    from vader.infer import infer
    from vader.run import Run, make_accelerator
    from vader.train import setup

    calls = _count_sdpa(monkeypatch)
    cfg = tiny_cfg(*argv, "--run_name", "attn")
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, kind="train"))
    blocks = 2 * t.gen.denoiser.config.depth  # spatial + temporal, each with self- and cross-attention
    assert t.gen.denoiser.attention_backend == ("sdpa" if fused else "math")
    t.step(0)
    # 4 sampling steps, one CFG call each, 2 attention calls per block (more with recomputation)
    assert (calls[0] >= 4 * blocks * 2) if fused else calls[0] == 0
    calls[0] = 0
    cfg = tiny_cfg(*argv, "--run_name", "attn-infer", "--num_val_runs", "1", "--val_batch_size", "1")
    assert infer(cfg)
    assert (calls[0] >= 4 * blocks * 2) if fused else calls[0] == 0


def test_bare_model_keeps_the_reference_math() -> None:
    """The class itself stays the reference re-implementation; runs get sdpa from the config."""
    model = STDiT3(tiny_model().config)
    assert model.attention_backend == "math"
    with pytest.raises(VaderError, match="unknown attention backend 'flash'"):
        model.set_attention_backend("flash")
