"""Loading published checkpoints: hub layout, strict keys, straight to dtype/device, one-line errors.

Tiny checkpoints are written in the hub's own layout (config.json + model.safetensors, keys with
no prefix) by our own models, then loaded back from a local folder, a single file, or a fake
Hugging Face cache under the real repo ids. Nothing touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vader.config import ModelConfig, VAEConfig
from vader.errors import VaderError
from vader.models import loading
from vader.models.loading import Checkpoint, load_checkpoint, resolve_checkpoint
from vader.models.presets import (
    STDIT3_XL2_REPO,
    VAE_V1_2_REPO,
    build_denoiser,
    build_vae,
    load_denoiser,
    load_vae,
    tiny_stdit3_config,
)
from vader.models.stdit3 import STDiT3, STDiT3Config
from vader.models.vae import VideoVAE, tiny_vae_config

CPU = torch.device("cpu")
CAPTION, TOKENS = 32, 8  # the tiny checkpoints' text side
# A tiny STDiT3 that differs from the STDiT3-tiny preset, so only its config.json can explain it.
TINY_DENOISER = dict(hidden_size=48, depth=1, num_heads=3, mlp_ratio=2.0, caption_channels=CAPTION,
                     model_max_length=TOKENS)
# The published VAE config.json: it only names registry types (fixed architectures).
HUB_VAE_CONFIG = {
    "architectures": ["VideoAutoencoderPipeline"],
    "model_type": "VideoAutoencoderPipeline",
    "micro_frame_size": 17,
    "shift": [-0.1, 0.34, 0.27, 0.98],
    "scale": [3.85, 2.32, 2.33, 3.06],
    "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
               "subfolder": "vae", "micro_batch_size": 4},
    "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
}


def hub_stdit3_config(config: STDiT3Config) -> dict:
    """config.json as `STDiT3.save_pretrained` writes it on the hub (extra keys included)."""
    return {"architectures": ["STDiT3"], "model_type": "STDiT3", **config.to_dict(), "enable_flash_attn": False,
            "enable_layernorm_kernel": False, "enable_sequence_parallelism": False, "freeze_y_embedder": False,
            "input_size": [None, None, None], "only_train_temporal": False, "skip_y_embedder": False}


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def source_denoiser() -> STDiT3:
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(**TINY_DENOISER)).eval()
    model.init_weights(std=0.1)
    return model


@pytest.fixture(scope="module")
def source_vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(tiny_vae_config()).eval()


@pytest.fixture
def denoiser_dir(tmp_path: Path, source_denoiser: STDiT3) -> Path:
    return write_checkpoint(tmp_path / "stdit", source_denoiser.state_dict(),
                            hub_stdit3_config(source_denoiser.config))


@pytest.fixture
def vae_dir(tmp_path: Path, source_vae: VideoVAE) -> Path:
    # our own layout: config.json describes the whole (tiny) architecture
    return write_checkpoint(tmp_path / "vae", source_vae.state_dict(), source_vae.config.to_dict())


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub (already imported, offline) will use."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def populate_cache(cache: Path, repo: str, files: dict[str, Path], revision: str = "0" * 40) -> Path:
    """Lay out `files` as huggingface_hub does: blobs/, snapshots/<rev>/ symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for i, (name, source) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:064x}"
        blob.write_bytes(source.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def denoiser_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 3, 4, 6, generator=g), timestep=torch.rand(2, generator=g) * 1000,
                y=torch.randn(2, 1, TOKENS, CAPTION, generator=g), mask=torch.ones(2, TOKENS, dtype=torch.long),
                fps=torch.full((2,), 24.0), height=torch.full((2,), 32.0), width=torch.full((2,), 48.0))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# denoiser


@pytest.mark.parametrize("model_type", ["STDiT3-XL/2", "STDiT3-tiny"])
def test_denoiser_from_folder_follows_its_config_json(denoiser_dir: Path, source_denoiser: STDiT3,
                                                      model_type: str) -> None:
    cfg = ModelConfig(type=model_type, from_pretrained=str(denoiser_dir))
    model = build_denoiser(cfg, CAPTION, TOKENS, torch.float32, CPU)
    assert model.config == source_denoiser.config  # hidden 48, depth 1: neither preset
    assert_same_state(model, source_denoiser)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.attention_backend == "sdpa"  # model.attention's default; the bare source runs math
    model.set_attention_backend(source_denoiser.attention_backend)  # same kernels: bit-equal outputs
    with torch.no_grad():
        assert torch.equal(model(**denoiser_inputs()), source_denoiser(**denoiser_inputs()))


def test_denoiser_bf16_is_read_straight_into_bf16(denoiser_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    built_on: list[bool] = []
    original_load = nn.Module.load_state_dict
    original_init = STDiT3.init_weights

    def spy_load(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        calls.append(dict(assign=assign, dtypes={v.dtype for v in state_dict.values()}, state=dict(state_dict)))
        return original_load(self, state_dict, strict=strict, assign=assign)

    def spy_init(self, std=None):  # type: ignore[no-untyped-def]
        built_on.append(self.rope.freqs.is_meta)
        return original_init(self, std)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy_load)
    monkeypatch.setattr(STDiT3, "init_weights", spy_init)
    model = build_denoiser(ModelConfig(from_pretrained=str(denoiser_dir)), CAPTION, TOKENS, torch.bfloat16, CPU)

    assert built_on == [True]  # constructed on meta: no fp32 model was ever allocated
    assert len(calls) == 1 and calls[0]["assign"] is True
    assert calls[0]["dtypes"] == {torch.bfloat16}  # every tensor converted as it was read
    state = calls[0]["state"]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.dtype == torch.bfloat16 and tensor.device == CPU, name
        assert tensor.data_ptr() == state[name].data_ptr(), name  # adopted, not copied
    assert not model.rope.freqs.requires_grad


def test_rope_freqs_are_taken_from_the_file(tmp_path: Path, source_denoiser: STDiT3) -> None:
    state = dict(source_denoiser.state_dict())
    state["rope.freqs"] = state["rope.freqs"] * 1.5  # not what the constructor computes
    folder = write_checkpoint(tmp_path / "odd-rope", state, hub_stdit3_config(source_denoiser.config))
    model = load_denoiser(str(folder))
    assert torch.equal(model.rope.freqs, state["rope.freqs"])


def test_load_denoiser_entry_point(denoiser_dir: Path, source_denoiser: STDiT3) -> None:
    model = load_denoiser(str(denoiser_dir), torch.bfloat16, "cpu")
    assert model.config == source_denoiser.config
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}
    with pytest.raises(VaderError, match="another shape"):
        load_denoiser(str(denoiser_dir), overrides={"mlp_ratio": 4.0})  # overrides beat config.json


def test_single_weights_file_takes_the_architecture_from_the_config(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = STDiT3(tiny_stdit3_config(CAPTION, TOKENS))
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_denoiser(ModelConfig(type="STDiT3-tiny", from_pretrained=str(path)), CAPTION, TOKENS,
                           torch.float32, CPU)
    assert_same_state(model, source)


def test_torch_bin_folder_loads(tmp_path: Path, source_denoiser: STDiT3) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(source_denoiser.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(hub_stdit3_config(source_denoiser.config)))
    model = build_denoiser(ModelConfig(from_pretrained=str(folder)), CAPTION, TOKENS, torch.bfloat16, CPU)
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.x_embedder.proj.weight, source_denoiser.x_embedder.proj.weight.bfloat16())


def test_caption_size_must_match_the_text_encoder(denoiser_dir: Path) -> None:
    with pytest.raises(VaderError, match=r"32 channels x 8 tokens.*4096 x 300") as info:
        build_denoiser(ModelConfig(from_pretrained=str(denoiser_dir)), 4096, 300, torch.float32, CPU)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# VAE


def test_vae_from_folder_follows_its_config_json(vae_dir: Path, source_vae: VideoVAE) -> None:
    cfg = VAEConfig(type="OpenSoraVAE_V1_2", from_pretrained=str(vae_dir), micro_batch_size=2)
    model = build_vae(cfg, torch.float32, CPU)
    assert model.config.spatial == source_vae.config.spatial  # tiny, not the full preset
    assert model.config.temporal == source_vae.config.temporal
    assert model.config.micro_batch_size == 2  # chunking comes from the run config
    assert_same_state(model, source_vae)
    z = torch.randn(1, 4, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # another spatial micro-batch size changes the conv batching, so equal up to float rounding
        torch.testing.assert_close(model.decode(z, num_frames=1), source_vae.decode(z, num_frames=1))


def test_vae_with_the_hub_config_json_takes_the_preset_architecture(tmp_path: Path, source_vae: VideoVAE) -> None:
    folder = write_checkpoint(tmp_path / "hub-vae", source_vae.state_dict(), HUB_VAE_CONFIG)
    model = build_vae(VAEConfig(type="OpenSoraVAE_V1_2-tiny", from_pretrained=str(folder)), torch.bfloat16, CPU)
    assert model.config.spatial == tiny_vae_config().spatial
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert torch.equal(model.shift, source_vae.shift.bfloat16())
    # the full preset does not fit these tiny weights: strict, one line
    with pytest.raises(VaderError, match="does not fit"):
        build_vae(VAEConfig(from_pretrained=str(folder)), torch.float32, CPU)


def test_load_vae_entry_point(vae_dir: Path, source_vae: VideoVAE) -> None:
    model = load_vae(str(vae_dir), torch.bfloat16, "cpu", {"micro_batch_size": 1})
    assert model.config.temporal == source_vae.config.temporal and model.config.micro_batch_size == 1
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(VaderError, match="not VideoVAEConfig settings"):
        load_vae(str(vae_dir), overrides={"micro_batch": 1})


# ---------------------------------------------------------------------------------------------
# the Hugging Face cache


def test_repo_ids_resolve_offline_from_the_hf_cache(hub_cache: Path, denoiser_dir: Path, vae_dir: Path,
                                                    source_denoiser: STDiT3, source_vae: VideoVAE) -> None:
    files = ("config.json", "model.safetensors")
    populate_cache(hub_cache, STDIT3_XL2_REPO, {f: denoiser_dir / f for f in files})
    populate_cache(hub_cache, VAE_V1_2_REPO, {f: vae_dir / f for f in files})
    denoiser = build_denoiser(ModelConfig(), CAPTION, TOKENS, torch.float32, CPU)  # the default repo id
    vae = build_vae(VAEConfig(), torch.float32, CPU)
    assert_same_state(denoiser, source_denoiser)
    assert_same_state(vae, source_vae)


def test_a_repo_missing_offline_is_one_line_with_the_fix(hub_cache: Path) -> None:
    with pytest.raises(VaderError) as info:
        build_denoiser(ModelConfig(), 4096, 300, torch.bfloat16, CPU)
    message = str(info.value)
    assert "\n" not in message
    assert "model.from_pretrained='hpcai-tech/OpenSora-STDiT-v3'" in message
    assert "`hf download hpcai-tech/OpenSora-STDiT-v3`" in message
    assert "huggingface-cli download on huggingface_hub < 1.0" in message
    assert "local folder" in message and str(hub_cache) in message
    with pytest.raises(VaderError, match=r"vae\.from_pretrained='hpcai-tech/OpenSora-VAE-v1\.2'.*hf download"):
        build_vae(VAEConfig(), torch.bfloat16, CPU)


def test_cached_config_without_weights_counts_as_missing(hub_cache: Path, denoiser_dir: Path) -> None:
    populate_cache(hub_cache, STDIT3_XL2_REPO, {"config.json": denoiser_dir / "config.json"})
    with pytest.raises(VaderError, match="not in the Hugging Face cache"):
        resolve_checkpoint(STDIT3_XL2_REPO)


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(VaderError, match="no such local folder or file"):
        resolve_checkpoint(str(tmp_path / "nope" / "weights"), "model.from_pretrained")
    with pytest.raises(VaderError, match="has none of model.safetensors"):
        resolve_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# strictness and its messages


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_keys(
    tmp_path: Path, source_denoiser: STDiT3, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = dict(source_denoiser.state_dict())
    del state["final_layer.linear.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["x_embedder.proj.bias"] = torch.zeros(7)
    folder = write_checkpoint(tmp_path / "bad", state, hub_stdit3_config(source_denoiser.config))

    def no_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("tensors were read before the keys were checked")

    monkeypatch.setattr(loading, "read_state_dict", no_read)
    with pytest.raises(VaderError) as info:
        build_denoiser(ModelConfig(from_pretrained=str(folder)), CAPTION, TOKENS, torch.float32, CPU)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert "1 missing key (first: final_layer.linear.bias)" in message
    assert "1 unexpected key (first: extra.weight)" in message
    assert "x_embedder.proj.bias is [7] in the file, [48] in the model" in message


def test_prefixed_keys_get_a_hint(tmp_path: Path, source_denoiser: STDiT3) -> None:
    state = {f"module.{k}": v for k, v in source_denoiser.state_dict().items()}
    folder = write_checkpoint(tmp_path / "ddp", state, hub_stdit3_config(source_denoiser.config))
    with pytest.raises(VaderError, match="'module.' prefix"):
        load_denoiser(str(folder))


def test_load_strict_rejects_an_in_memory_state_dict_that_does_not_fit(source_denoiser: STDiT3) -> None:
    state = dict(source_denoiser.state_dict())
    state.pop("rope.freqs")
    with torch.device("meta"):
        model = STDiT3(source_denoiser.config)
    with pytest.raises(VaderError, match=r"1 missing key \(first: rope\.freqs\)"):
        loading.load_strict(model, state, "test")


class _WithNonPersistentBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_nothing_may_stay_on_meta(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_WithNonPersistentBuffer().state_dict(), str(path))
    with pytest.raises(VaderError, match=r"still on the meta device \(first: table\)"):
        load_checkpoint(_WithNonPersistentBuffer, Checkpoint(str(path), (path,)), torch.float32)


def test_published_models_have_no_state_outside_their_checkpoints(source_denoiser: STDiT3,
                                                                  source_vae: VideoVAE) -> None:
    """Every tensor of STDiT3 / VideoVAE is in the state dict, so loading onto meta leaves nothing behind."""
    for model in (source_denoiser, source_vae):
        state = model.state_dict()
        assert len(state) == len(list(model.parameters())) + len(list(model.buffers()))
        with torch.device("meta"):
            empty = type(model)(model.config)
        loading.load_strict(empty, {k: v.clone() for k, v in state.items()}, "test")  # checks for meta


def test_missing_model_weights_names_uncached_hub_ids_and_bad_local_paths(
        hub_cache: Path, denoiser_dir: Path, tmp_path: Path) -> None:
    from vader.config import TextEncoderConfig
    from vader.models.presets import T5_XXL_REPO, missing_model_weights

    populate_cache(hub_cache, STDIT3_XL2_REPO, {name: denoiser_dir / name for name in ("config.json",
                                                                                       "model.safetensors")})
    found = missing_model_weights(ModelConfig(), VAEConfig(), TextEncoderConfig())
    assert [(m.key, m.name, m.fetch) for m in found] == [
        ("vae.from_pretrained", VAE_V1_2_REPO, f"hf download {VAE_V1_2_REPO}"),
        ("text_encoder.from_pretrained", T5_XXL_REPO, f"hf download {T5_XXL_REPO}"),
    ]  # the cached denoiser is not missing; nothing was downloaded to find out
    empty = tmp_path / "empty"
    empty.mkdir()
    found = missing_model_weights(ModelConfig(from_pretrained=str(denoiser_dir)), VAEConfig(from_pretrained=str(empty)),
                                  TextEncoderConfig(from_pretrained=str(tmp_path / "nope")))
    assert [(m.key, m.fetch) for m in found] == [("vae.from_pretrained", None), ("text_encoder.from_pretrained", None)]
    assert "has none of" in found[0].problem and "no such local folder" in found[1].problem
    none = missing_model_weights(ModelConfig(from_pretrained=None), VAEConfig(from_pretrained=None),
                                 TextEncoderConfig(from_pretrained=None))
    assert none == []
