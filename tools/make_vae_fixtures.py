"""Write the VAE reference-parity fixtures from the original Open-Sora v1.2 code.

Run it with an environment that can import the reference (torch, diffusers==0.27.2,
transformers<4.40, mmengine, einops, numpy), NOT with vader's own environment:

    python tools/make_vae_fixtures.py /path/to/VADER-Open-Sora [--out tests/fixtures/vae]

`/path/to/VADER-Open-Sora` is a checkout of mihirp1998/VADER's `VADER-Open-Sora/` folder (its
`opensora/models/vae/*.py` are byte-identical to hpcaitech/Open-Sora v1.2.0). The reference code
is imported from there, never copied. It writes:

- `vae_v1_2_keys.tsv`: `key<TAB>shape` of the full-size `OpenSoraVAE_V1_2` state dict (built on
  the meta device, so no weights and no download are needed).
- `tiny_parity.safetensors`: a tiny `VideoAutoencoderPipeline` with seeded random weights
  (`model.*`), its input video, its encode output and decode outputs, and in the metadata the
  tiny config in `vader.models.vae.VideoVAEConfig.to_dict()` form.

Posterior sampling in the reference draws from the global CPU RNG (`torch.randn` without a
generator, in diffusers' `randn_tensor` and in the temporal VAE); `torch.manual_seed(SEED)` right
before encoding therefore equals passing `torch.Generator().manual_seed(SEED)` to vader's encode.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SEED = 1234
NOISE_SEED = 99
BATCH, NUM_FRAMES, HEIGHT, WIDTH = 2, 19, 16, 24  # 19 frames: a full 17-chunk plus a partial one
LATENT_FRAME = 4  # index for the single-latent-frame shortcut (VADER's decode_frame path)

SHIFT = (-0.10, 0.34, 0.27, 0.98)
SCALE = (3.85, 2.32, 2.33, 3.06)

SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
TINY_SPATIAL = {
    **SDXL_VAE,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEMPORAL = {
    "in_out_channels": 4,
    "latent_embed_dim": 4,
    "embed_dim": 4,
    "filters": 4,
    "num_res_blocks": 1,
    "channel_multipliers": [1, 2, 2, 4],
    "temporal_downsample": [False, True, True],
    "num_groups": 4,
    "activation_fn": "swish",
}

# Packages the reference imports at module level but that own no parameters of the VAE.
STUB_MODULES = {
    "colossalai": {},
    "colossalai.booster": {"Booster": object},
    "colossalai.checkpoint_io": {"GeneralCheckpointIO": object},
}


def install_stubs() -> None:
    """Register empty stand-ins for missing optional imports (in memory; nothing written)."""
    for name, attrs in STUB_MODULES.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__path__ = []  # lets `colossalai.booster` resolve as a submodule
            for attr, value in attrs.items():
                setattr(module, attr, value)
            sys.modules[name] = module


def import_reference(root: Path) -> types.SimpleNamespace:
    """Import only the VAE modules of the reference, skipping package __init__ files.

    `opensora/models/__init__.py` imports every model family (xformers, flash-attn, ...), none
    of which the VAE needs, so the packages are registered bare with the right search paths.
    """
    install_stubs()
    for package in ("opensora", "opensora.models", "opensora.models.vae", "opensora.utils"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")))]
        sys.modules[package] = module
    vae = importlib.import_module("opensora.models.vae.vae")
    importlib.import_module("opensora.models.vae.vae_temporal")  # registers VAE_Temporal(_SD)
    return types.SimpleNamespace(vae=vae)


def patch_autoencoder_from_pretrained(spatial_config: dict[str, Any]) -> None:
    """The reference builds its spatial VAE with AutoencoderKL.from_pretrained (a hub download);
    build it from a config instead. Its weights are overwritten by the checkpoint anyway."""
    from diffusers.models import AutoencoderKL

    def from_config(cls: type, *_args: Any, **_kwargs: Any) -> AutoencoderKL:
        return cls(**spatial_config)

    AutoencoderKL.from_pretrained = classmethod(from_config)


def write_key_listing(ref: types.SimpleNamespace, out: Path) -> int:
    patch_autoencoder_from_pretrained(SDXL_VAE)
    with torch.device("meta"):
        model = ref.vae.OpenSoraVAE_V1_2(micro_batch_size=4, micro_frame_size=17)
    state = model.state_dict()
    lines = [f"{key}\t{','.join(str(d) for d in value.shape)}" for key, value in state.items()]
    (out / "vae_v1_2_keys.tsv").write_text("\n".join(lines) + "\n")
    return len(lines)


def build_tiny(ref: types.SimpleNamespace) -> torch.nn.Module:
    patch_autoencoder_from_pretrained(TINY_SPATIAL)
    config = ref.vae.VideoAutoencoderPipelineConfig(
        vae_2d={"type": "VideoAutoencoderKL", "from_pretrained": "tiny", "micro_batch_size": 4},
        vae_temporal={"type": "VAE_Temporal", **TINY_TEMPORAL},
        micro_frame_size=17,
        shift=SHIFT,
        scale=SCALE,
    )
    torch.manual_seed(SEED)
    model = ref.vae.VideoAutoencoderPipeline(config).eval()
    randomise_norms(model)
    return model


def randomise_norms(model: torch.nn.Module) -> None:
    """GroupNorm affine params start at 1 / 0; perturb them so a swapped norm shows in outputs."""
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.add_(0.2 * torch.randn(module.bias.shape, generator=generator))


def run_tiny(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 2)
    video = torch.rand(BATCH, 3, NUM_FRAMES, HEIGHT, WIDTH, generator=generator) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(NOISE_SEED)
        # The reference returns z with permuted strides; decode the contiguous copy that gets saved,
        # since CPU convs pick other kernels for other layouts (~2e-5 apart on these outputs).
        z = model.encode(video).clone(memory_format=torch.contiguous_format)
        decoded = model.decode(z, num_frames=NUM_FRAMES)
        frame = model.decode(z[:, :, LATENT_FRAME : LATENT_FRAME + 1].contiguous(), num_frames=1)
    return {"input.video": video, "output.z": z, "output.video": decoded, "output.latent_frame": frame}


def tiny_config_dict() -> dict[str, Any]:
    """The tiny model's config in vader's VideoVAEConfig.to_dict() layout."""
    return {
        "spatial": TINY_SPATIAL,
        "temporal": TINY_TEMPORAL,
        "micro_frame_size": 17,
        "micro_batch_size": 4,
        "shift": list(SHIFT),
        "scale": list(SCALE),
    }


def write_tiny_parity(ref: types.SimpleNamespace, out: Path) -> Path:
    model = build_tiny(ref)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.contiguous() for k, v in run_tiny(model).items()})
    import diffusers

    metadata = {
        "config": json.dumps(tiny_config_dict()),
        "noise_seed": str(NOISE_SEED),
        "num_frames": str(NUM_FRAMES),
        "latent_frame": str(LATENT_FRAME),
        "made_with": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
    }
    path = out / "tiny_parity.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="VADER-Open-Sora checkout (holds opensora/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/vae")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ref = import_reference(args.reference.resolve())
    count = write_key_listing(ref, args.out)
    path = write_tiny_parity(ref, args.out)
    print(f"wrote {count} keys to {args.out / 'vae_v1_2_keys.tsv'}; {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
