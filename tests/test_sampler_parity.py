"""Sampler parity with the reference VADER-Open-Sora `RFLOW.sample` (fixtures from
tools/make_sampler_fixtures.py; the reference code is not needed here).

Each fixture is one reference run on the tiny STDiT3 of tests/fixtures/stdit3/tiny_parity.safetensors
(fp32, CPU): n = 2 prompts with a padded T5 mask (3 of 8 tokens) and a full one, CFG scale 7, the
resolution/length timestep transform on, `backprop_mode=None`. Cases: 276x368 px x 51 frames with
fp32 conditioning and noise (with mask=None, and with the all-ones frame mask VADER passes), the same
with bf16 conditioning and bf16 noise as VADER runs it, and a single 240x426 frame (bf16).

Tolerances: conditioning, null caption and timesteps are compared exactly (same ops, same dtypes).
With the reference denoiser's own outputs replayed, the sampler's latents are bitwise equal too. With
our STDiT3 in the loop the latents (|z| up to ~8) get atol 5e-5: the only source of difference is
the denoiser's fp32 rounding (~1e-6 relative per call, see test_stdit3's parity test), amplified by
CFG scale 7 over the steps; observed at most 1.3e-5.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vader.models.stdit3 import STDiT3, STDiT3Config
from vader.sampling import TextCondition, conditioning, make_timesteps, sample

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["video_fp32", "video_fp32_mask", "video_bf16", "image_bf16"]
LATENT_ATOL = 5e-5


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """As in tools/make_sampler_fixtures.py."""
    h = hashlib.sha256()
    for k in sorted(weights):
        t = weights[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_denoiser() -> tuple[STDiT3, str]:
    meta, tensors = _read(FIXTURES / "stdit3" / "tiny_parity.safetensors")
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    model = STDiT3(STDiT3Config.from_dict(json.loads(meta["config"]))).eval()
    model.load_state_dict(weights, strict=True)
    return model, weights_sha256(weights)


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    meta, tensors = _read(FIXTURES / "sampler" / f"{name}.safetensors")
    case = json.loads(meta["case"]) | {"weights_sha256": meta["weights_sha256"]}
    inputs = {k.removeprefix("inputs."): v for k, v in tensors.items() if k.startswith("inputs.")}
    ref = {k.removeprefix("reference."): v for k, v in tensors.items() if k.startswith("reference.")}
    return case, inputs, ref


class StepInputs(nn.Module):
    """Records the first CFG half of z entering each step (the reference fixture has the same)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.z: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.z.append(x[: x.shape[0] // 2].detach().float().clone())
        return self.inner(x, *args, **kwargs)


class Replay(nn.Module):
    """Plays back the reference denoiser's outputs, checking it is called with the reference's inputs."""

    def __init__(self, ref: dict[str, torch.Tensor], y: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.ref, self.y, self.mask = ref, y, mask
        self.step = 0

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor, mask: torch.Tensor, **cond: torch.Tensor
    ) -> torch.Tensor:
        i, self.step = self.step, self.step + 1
        z, ts = self.ref["step_inputs"][i], self.ref["timesteps"][i]
        assert torch.equal(x.float(), torch.cat([z, z])) and torch.equal(t, torch.cat([ts, ts])), i
        assert torch.equal(y, self.y) and torch.equal(mask, self.mask), i
        assert {"height", "width", "fps"} <= cond.keys()
        return self.ref["model_outputs"][i]


@pytest.mark.parametrize("name", CASES)
def test_sampler_arithmetic_is_exact(name: str) -> None:
    """CFG combination, sigma-channel drop, dt (last step to t = 0) and the Euler update, bit for bit."""
    case, inputs, ref = load_case(name)
    dtype, n = getattr(torch, case["dtype"]), inputs["z"].shape[0]
    cond = conditioning(
        n, case["height"], case["width"], case["num_frames"], case["fps"], dtype, torch.device("cpu")
    )
    timesteps = make_timesteps(case["steps"], n, cond=cond, num_frames=case["num_frames"])
    text = TextCondition(y=inputs["y"], mask=inputs["mask"], y_null=inputs["y_null"])
    replay = Replay(ref, torch.cat([inputs["y"], inputs["y_null"]]), inputs["mask"])
    out = sample(replay, inputs["z"].clone(), text, cond, timesteps, cfg_scale=case["cfg_scale"])
    assert replay.step == case["steps"]
    assert ref["model_outputs"].shape[2] == 2 * out.shape[1]  # pred_sigma: [v, sigma] channels
    assert out.dtype == torch.float32 and torch.equal(out, ref["z"])


@pytest.fixture(scope="module")
def denoiser() -> tuple[STDiT3, str]:
    return load_denoiser()


@pytest.mark.parametrize("name", CASES)
def test_sampler_matches_reference(name: str, denoiser: tuple[STDiT3, str]) -> None:
    model, weights_hash = denoiser
    case, inputs, ref = load_case(name)
    assert case["weights_sha256"] == weights_hash, (
        "tests/fixtures/stdit3 weights changed: rerun tools/make_sampler_fixtures.py"
    )
    dtype = getattr(torch, case["dtype"])
    n = inputs["z"].shape[0]
    cpu = torch.device("cpu")

    # conditioning as the reference's prepare_multi_resolution_info builds it (dtype, fps for images)
    cond = conditioning(n, case["height"], case["width"], case["num_frames"], case["fps"], dtype, cpu)
    ref_cond = {k.removeprefix("cond."): v for k, v in inputs.items() if k.startswith("cond.")}
    assert cond.keys() == ref_cond.keys()
    for k, v in ref_cond.items():
        assert cond[k].dtype == v.dtype and torch.equal(cond[k], v), k

    # schedule, including the bf16-rounded shift ratio and the single-frame branch
    timesteps = make_timesteps(case["steps"], n, cond=cond, num_frames=case["num_frames"])
    assert all(t.dtype == torch.float32 for t in timesteps)
    torch.testing.assert_close(torch.stack(timesteps), ref["timesteps"], atol=0, rtol=0)

    # null caption: the reference's text_encoder.null(n) from the model's y_embedder
    null = model.y_embedder.y_embedding
    y_null = null[None, None].expand(n, 1, *null.shape).to(inputs["y"].dtype)
    assert torch.equal(y_null, inputs["y_null"])
    mask = inputs["mask"]
    assert mask.dtype == torch.int64 and not mask.all() and mask[1].all()  # padded and full prompts

    recorder = StepInputs(model)
    with torch.no_grad():
        out = sample(
            recorder,
            inputs["z"].clone(),
            TextCondition(y=inputs["y"], mask=mask, y_null=y_null),
            cond,
            timesteps,
            cfg_scale=case["cfg_scale"],
            num_timesteps=1000,
        )
    assert out.dtype == torch.float32 and out.shape == ref["z"].shape
    torch.testing.assert_close(torch.stack(recorder.z), ref["step_inputs"], atol=LATENT_ATOL, rtol=0)
    torch.testing.assert_close(out, ref["z"], atol=LATENT_ATOL, rtol=0)


def test_frame_mask_path_equals_no_mask() -> None:
    """VADER passes the all-ones mask from apply_mask_strategy; our sampler passes none."""
    _, a_in, a = load_case("video_fp32")
    _, b_in, b = load_case("video_fp32_mask")
    assert "frame_mask" not in a_in and bool((b_in["frame_mask"] == 1).all())
    assert torch.equal(a_in["z"], b_in["z"]) and torch.equal(a["z"], b["z"])


def test_fixtures_are_small() -> None:
    assert sum(p.stat().st_size for p in (FIXTURES / "sampler").glob("*.safetensors")) < 1_000_000
