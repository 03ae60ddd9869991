"""Write the rectified-flow sampler fixtures used by tests/test_sampler_parity.py.

Runs the *reference* sampler, VADER's `RFLOW.sample` (`opensora/schedulers/rf/__init__.py`, with
`timestep_transform` from `rectified_flow.py`), on the reference tiny STDiT3, importing everything
from a checkout given on the command line (no reference code is copied here). The denoiser
weights are the ones in tests/fixtures/stdit3/tiny_parity.safetensors (written by
tools/make_stdit3_fixtures.py); each fixture stores a hash of them, not a copy.

What comes from the reference, not from this script:
- the size/fps conditioning: `prepare_multi_resolution_info("OpenSora", ...)` (fps -> IMG_FPS for
  a single frame);
- the prompt embeddings' layout and the null caption: `T5Encoder.encode` / `T5Encoder.null`, run on
  an instance whose T5 is replaced by fixed random embeddings with padded tokens (the padded
  positions hold non-zero values, as real T5 outputs do) and whose `y_embedder` is the model's,
  as the reference wires it (`text_encoder.y_embedder = model.y_embedder`);
- the all-ones frame mask VADER passes: `apply_mask_strategy(z, refs, [""] * n, loop)`.

Each case writes tests/fixtures/sampler/<case>.safetensors with inputs.* (z, y, mask, y_null,
the conditioning tensors), the mask passed to RFLOW.sample if any, and reference.* outputs:
`timesteps` [steps, n] (what the model received, first CFG half), `step_inputs` [steps, n, ...]
(z entering each step), `model_outputs` [steps, 2n, 2C, ...] (the denoiser's raw outputs, so a
test can replay them and check the sampler's own arithmetic exactly) and `z` (the final latents). The case settings are JSON in the metadata
under "case"; "weights_sha256" identifies the denoiser weights. (safetensors writes the metadata
keys in a varying order, so a rerun can change the files' bytes but not their contents.)

Needs the reference's own environment (see tools/make_stdit3_fixtures.py), e.g.:

    /tmp/refvenv/bin/python tools/make_sampler_fixtures.py --reference /path/to/VADER-Open-Sora
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "fixtures" / "stdit3" / "tiny_parity.safetensors"
SEED = 4321
N_PROMPTS = 2
TOKEN_LENGTHS = (3, 8)  # prompt 0 padded (3 of 8 tokens), prompt 1 full length

VIDEO_240P = dict(height=276, width=368, num_frames=51, fps=24, latent=(3, 5, 7), steps=5, cfg_scale=7.0)
CASES = {
    # 240p 3:4 pixel sizes and 51 frames on a small latent: the transform uses the pixel values
    # and num_frames // 17 * 5 = 15 latent frames; fp32 conditioning and noise, mask=None.
    "video_fp32": dict(VIDEO_240P, noise_seed=1, dtype="float32", frame_mask=False),
    # The same (same noise) with the all-ones frame mask VADER's training script passes (x_mask all
    # True and an unused randn_like per step); checked here to give the same latents as mask=None.
    "video_fp32_mask": dict(VIDEO_240P, noise_seed=1, dtype="float32", frame_mask=True),
    # As VADER runs: bf16 conditioning (the shift ratio is rounded in bf16), noise drawn in bf16,
    # all-ones frame mask. The denoiser stays fp32.
    "video_bf16": dict(VIDEO_240P, noise_seed=2, dtype="bfloat16", frame_mask=True),
    # A single frame: the transform's num_frames == 1 branch and fps = IMG_FPS.
    "image_bf16": dict(
        height=240,
        width=426,
        num_frames=1,
        fps=24,
        latent=(1, 5, 7),
        steps=4,
        cfg_scale=7.0,
        noise_seed=3,
        dtype="bfloat16",
        frame_mask=True,
    ),
}


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, in name order (same function in the test)."""
    h = hashlib.sha256()
    for k in sorted(weights):
        t = weights[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- importing the reference ------------------------------------------------------------------


def _load_stdit3_tool() -> types.ModuleType:
    """tools/make_stdit3_fixtures.py, for its stand-ins (xformers, checkpoint loader, namespaces)."""
    spec = importlib.util.spec_from_file_location(
        "make_stdit3_fixtures", Path(__file__).with_name("make_stdit3_fixtures.py")
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _img_fps(reference: Path) -> int:
    """IMG_FPS as the reference defines it (read from its source; the module needs video libs)."""
    source = (reference / "opensora" / "datasets" / "datasets.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMG_FPS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("IMG_FPS not found in the reference")


def _no_video_io(*args: object, **kwargs: object) -> None:
    raise RuntimeError("reference video reading is not available here")


def install_stand_ins(reference: Path) -> None:
    _load_stdit3_tool().install_stand_ins(reference)
    root = reference / "opensora"
    for name, path in [
        ("opensora.schedulers", root / "schedulers"),  # skip __init__ (DPMS, IDDPM and their deps)
        ("opensora.schedulers.iddpm", root / "schedulers" / "iddpm"),
        ("opensora.models.text_encoder", root / "models" / "text_encoder"),
    ]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    datasets = types.ModuleType("opensora.datasets")
    datasets.IMG_FPS = _img_fps(reference)  # type: ignore[attr-defined]
    datasets.__path__ = []  # type: ignore[attr-defined]
    dutils = types.ModuleType("opensora.datasets.utils")
    dutils.read_from_path = _no_video_io  # type: ignore[attr-defined]
    sys.modules.update({"opensora.datasets": datasets, "opensora.datasets.utils": dutils})


# --- the run ----------------------------------------------------------------------------------


class FixedT5:
    """Stands in for T5Embedder: fixed embeddings [n, L, C] and the tokenizer's int64 mask [n, L]."""

    def __init__(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        self.y, self.mask = y, mask

    def get_text_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(texts) == self.y.shape[0]
        return self.y.clone(), self.mask.clone()


class Recorder(torch.nn.Module):
    """Calls the reference model; keeps the first CFG half of each step's (x, t), the x_mask and the
    model's whole output (both CFG halves, velocity and sigma channels)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.x: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []
        self.x_mask: list[torch.Tensor | None] = []
        self.out: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // 2
        self.x.append(x[:n].detach().clone())
        self.t.append(t[:n].detach().clone())
        self.x_mask.append(kwargs.get("x_mask"))
        out = self.model(x, t, **kwargs)
        self.out.append(out.detach().clone())
        return out


def build_model(stdit3: types.ModuleType) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    with safe_open(str(WEIGHTS), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        weights = {k.removeprefix("weights."): f.get_tensor(k) for k in f.keys() if k.startswith("weights.")}  # noqa: SIM118
    model = stdit3.STDiT3(stdit3.STDiT3Config(**config)).eval()
    model.load_state_dict(weights, strict=True)
    return model, weights


def text_inputs(config_len: int, channels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randn(N_PROMPTS, config_len, channels, generator=g)
    mask = torch.zeros(N_PROMPTS, config_len, dtype=torch.int64)
    for i, n_tokens in enumerate(TOKEN_LENGTHS):
        mask[i, :n_tokens] = 1
    return y, mask


def run_case(
    name: str,
    case: dict,
    model: torch.nn.Module,
    weights_hash: str,
    y_t5: torch.Tensor,
    mask_t5: torch.Tensor,
    out: Path,
) -> torch.Tensor:
    rf = importlib.import_module("opensora.schedulers.rf")
    t5 = importlib.import_module("opensora.models.text_encoder.t5")
    inference_utils = importlib.import_module("opensora.utils.inference_utils")

    dtype = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(SEED + case["noise_seed"])
    z = torch.randn(N_PROMPTS, 4, *case["latent"], generator=g, dtype=dtype)  # VADER: randn in the run dtype
    additional_args = inference_utils.prepare_multi_resolution_info(
        "OpenSora",
        N_PROMPTS,
        (case["height"], case["width"]),
        case["num_frames"],
        case["fps"],
        torch.device("cpu"),
        dtype,
    )
    frame_mask = None
    if case["frame_mask"]:
        refs = [[] for _ in range(N_PROMPTS)]
        frame_mask = inference_utils.apply_mask_strategy(z, refs, [""] * N_PROMPTS, 1, align=None)
        assert frame_mask is not None and bool((frame_mask == 1).all())

    encoder = t5.T5Encoder.__new__(t5.T5Encoder)  # no tokenizer / weights: only encode() and null()
    encoder.t5 = FixedT5(y_t5, mask_t5)
    encoder.y_embedder = model.y_embedder
    prompts = [f"prompt {i}" for i in range(N_PROMPTS)]
    encoded = encoder.encode(prompts)
    y_null = encoder.null(N_PROMPTS)

    scheduler = rf.RFLOW(
        num_sampling_steps=case["steps"],
        num_timesteps=1000,
        cfg_scale=case["cfg_scale"],
        use_timestep_transform=True,
    )
    recorder = Recorder(model)
    with torch.no_grad():
        final = scheduler.sample(
            recorder,
            encoder,
            z=z.clone(),
            prompts=prompts,
            device=torch.device("cpu"),
            additional_args=dict(additional_args),
            mask=frame_mask,
            progress=False,
            backprop_mode=None,
        )
    if case["frame_mask"]:
        assert all(m is not None and bool(m.all()) for m in recorder.x_mask), "x_mask not all True"

    tensors = {
        "inputs.z": z,
        "inputs.y": encoded["y"],
        "inputs.mask": encoded["mask"],
        "inputs.y_null": y_null,
        **{f"inputs.cond.{k}": v for k, v in additional_args.items()},
        "reference.timesteps": torch.stack(recorder.t),
        "reference.step_inputs": torch.stack([x.float() for x in recorder.x]),
        "reference.model_outputs": torch.stack(recorder.out),
        "reference.z": final,
    }
    if frame_mask is not None:
        tensors["inputs.frame_mask"] = frame_mask
    meta = {
        "case": json.dumps(case),
        "weights": "tests/fixtures/stdit3/tiny_parity.safetensors (weights.*)",
        "weights_sha256": weights_hash,
        "source": "reference VADER-Open-Sora RFLOW.sample, backprop_mode=None, fp32 STDiT3 on CPU",
    }
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    path.chmod(0o644)
    ts = ", ".join(f"{t[0].item():.4f}" for t in recorder.t)
    print(f"{name}: z {tuple(final.shape)} {final.dtype}, t = [{ts}], {path.stat().st_size:,} bytes")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="VADER-Open-Sora checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "sampler")
    args = parser.parse_args()
    install_stand_ins(args.reference)
    stdit3 = importlib.import_module("opensora.models.stdit.stdit3")
    torch.set_num_threads(1)  # deterministic reductions for the saved outputs
    model, weights = build_model(stdit3)
    weights_hash = weights_sha256(weights)
    g = torch.Generator().manual_seed(SEED)
    y_t5, mask_t5 = text_inputs(model.config.model_max_length, model.config.caption_channels, g)
    args.out.mkdir(parents=True, exist_ok=True)
    finals = {
        name: run_case(name, case, model, weights_hash, y_t5, mask_t5, args.out)
        for name, case in CASES.items()
    }
    diff = (finals["video_fp32_mask"] - finals["video_fp32"]).abs().max().item()
    print(f"all-ones frame mask vs mask=None: max |diff| = {diff:.3g}")
    assert diff < 1e-6


if __name__ == "__main__":
    main()
