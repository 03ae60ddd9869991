"""`vader inspect`: full-size models described from the meta device, with no download and no weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OPENSORA_TRAIN, TINY_TRAIN

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import add_lora, lora_config
from vader.config import load_config
from vader.errors import VaderError
from vader.inspection import build_meta, inspect, key_listing, lora_summary
from vader.models import loading
from vader.models.presets import build_denoiser, build_vae, tiny_stdit3_config
from vader.models.stdit3 import STDiT3

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HF cache, and any attempt to read weights or reach the hub fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("inspect must not read weights or download")

    monkeypatch.setattr(loading, "read_state_dict", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)


@pytest.fixture(scope="module")
def opensora():
    return load_config(OPENSORA_TRAIN, ["--lora_rank", "16"])


def _fixture_listing(name: str) -> str:
    return (FIXTURES / name).read_text().rstrip("\n")


def test_denoiser_counts_and_lora(opensora) -> None:
    text = inspect(opensora, "denoiser")
    assert "STDiT3-XL/2" in text
    assert "1,207,643,972 parameters in 972 tensors" in text
    assert "973 state-dict keys" in text
    assert "595,159,488" in text  # spatial_blocks (and temporal_blocks)
    assert "LoRA r=16" in text and "qkv, q_linear, kv_linear" in text
    assert "168 modules (56 qkv 1152->3456, 56 q_linear 1152->1152, 56 kv_linear 1152->2304)" in text
    assert "LoRA trainable parameters: 9,289,728 in 336 tensors" in text
    assert "weights in bf16: 2.25 GiB" in text


def test_vae_counts(opensora) -> None:
    text = inspect(opensora, "vae")
    assert "393,341,007 parameters in 515 tensors" in text and "517 state-dict keys" in text
    assert "83,653,863" in text and "309,687,144" in text  # spatial / temporal


def test_text_encoder_counts(opensora) -> None:
    text = inspect(opensora, "text_encoder")
    assert "4,762,310,656 parameters" in text and "220 state-dict keys" in text
    assert "weights in fp32" in text


def test_all_parts_by_default(opensora) -> None:
    text = inspect(opensora)
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ") and line] == [
        "denoiser", "vae", "text_encoder"]


def test_key_listings_equal_the_reference_dumps(opensora) -> None:
    assert inspect(opensora, "denoiser", keys=True) == _fixture_listing("stdit3/stdit3_xl2_keys.tsv")
    assert inspect(opensora, "vae", keys=True) == _fixture_listing("vae/vae_v1_2_keys.tsv")


def test_text_encoder_key_listing(opensora) -> None:
    lines = inspect(opensora, "text_encoder", keys=True).splitlines()
    assert len(lines) == 220
    assert lines[0] == "shared.weight\t32128,4096"
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight\t10240,4096" in lines
    assert lines[-1] == "encoder.final_layer_norm.weight\t4096"


def test_all_keys_come_in_labelled_blocks(opensora) -> None:
    text = inspect(opensora, None, keys=True)
    headers = [line for line in text.splitlines() if line.startswith("#")]
    assert headers == ["# denoiser: STDiT3-XL/2", "# vae: OpenSoraVAE_V1_2", "# text_encoder: t5"]
    assert len(text.splitlines()) == 3 + 973 + 517 + 220


@pytest.mark.parametrize("part", ["unet", "", "Denoiser"])
def test_a_bad_part_is_a_user_error(opensora, part: str) -> None:
    with pytest.raises(VaderError, match="denoiser, vae, text_encoder"):
        inspect(opensora, part)


def test_tiny_preset_counts_equal_the_built_models(tiny_cfg) -> None:
    cfg = tiny_cfg()
    text = inspect(cfg)
    denoiser = build_denoiser(cfg.model, 32, cfg.text_encoder.model_max_length, torch.float32, torch.device("cpu"))
    vae = build_vae(cfg.vae, torch.float32, torch.device("cpu"))
    for model in (denoiser, vae):
        assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in text
    assert inspect(cfg, "denoiser", keys=True) == key_listing(denoiser)
    assert inspect(cfg, "vae", keys=True) == key_listing(vae)
    trainable = add_lora(denoiser, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets=LORA_TARGETS))
    assert f"LoRA trainable parameters: {sum(p.numel() for p in trainable):,}" in text


def test_lora_on_meta_matches_lora_on_real_weights() -> None:
    with torch.device("meta"):
        meta = STDiT3(tiny_stdit3_config())
    real = STDiT3(tiny_stdit3_config())
    summary = lora_summary(meta, LORA_TARGETS, rank=4)
    trainable = add_lora(real, lora_config(4, targets=LORA_TARGETS))
    assert summary.trainable == sum(p.numel() for p in trainable)
    assert summary.tensors == len(trainable)
    assert all(p.is_meta for n, p in meta.named_parameters() if "lora_" in n)


def test_a_local_config_json_drives_what_is_described(tmp_path: Path) -> None:
    folder = tmp_path / "stdit"
    folder.mkdir()
    config = tiny_stdit3_config(4096, 300)
    (folder / "config.json").write_text(json.dumps({"model_type": "STDiT3", **config.to_dict()}))
    cfg = load_config(TINY_TRAIN, ["--model", repr({"type": "STDiT3-XL/2", "from_pretrained": str(folder)}),
                                   "--text_encoder", repr({"type": "t5", "from_pretrained": None, "model_max_length": 300})])
    built = build_meta(cfg, "denoiser")
    assert built.model.config == config
    assert "its config.json read" in inspect(cfg, "denoiser")


def test_full_size_models_build_on_meta_quickly(opensora) -> None:
    import time

    for part in ("denoiser", "vae", "text_encoder"):
        start = time.perf_counter()
        built = build_meta(opensora, part)
        assert time.perf_counter() - start < 10, part  # about 0.1-0.4 s each on a laptop CPU
        assert all(t.is_meta for t in built.model.state_dict().values())


def test_fp8_weights_are_described_in_one_byte(opensora) -> None:
    import re

    def size(text: str) -> float:
        return float(re.search(r"weights in [^:]+: ([0-9.]+) GiB", text).group(1))

    bf16 = inspect(opensora, "denoiser")
    opensora.dtype = "fp8"
    fp8 = inspect(opensora, "denoiser")
    assert "fp8 (Linear) + bf16" in fp8 and "float8 e4m3" in fp8
    assert size(fp8) < 0.55 * size(bf16)  # STDiT3-XL/2: 2.25 -> 1.13 GiB


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_backend_inspect_keys_equal_the_saved_checkpoint_and_config_gives_its_latent_shape(tmp_path, name):
    """`vader inspect --keys` of a diffusers backend lists, from the meta device, exactly the keys and
    shapes the pipeline's own save_pretrained wrote; `vader config` gives the generator's latent shape."""
    pytest.importorskip("diffusers")
    from backend_tiny import SAVERS, tiny_config_text
    from safetensors import safe_open

    from vader.backends import backend_class, settings_from_config
    from vader.inspection import resolved_values

    folder = SAVERS[name](tmp_path / f"tiny-{name}")
    path = tmp_path / f"{name}.py"
    path.write_text(tiny_config_text(name, folder, project_dir=str(tmp_path / "runs")))
    cfg = load_config(path)
    for part, sub in (("denoiser", "transformer"), ("vae", "vae")):
        listing = dict(line.split("\t") for line in inspect(cfg, part, keys=True).splitlines())
        with safe_open(str(next((folder / sub).glob("*.safetensors"))), "pt") as f:
            saved = {k: ",".join(str(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}
        assert listing == saved, part
    gen = backend_class(name).build(settings_from_config(cfg), "cpu")
    assert resolved_values(cfg)["latent_shape_CTHW"] == list(gen.latent_shape)
    assert "to_out.0" in inspect(cfg, "denoiser")  # the backend's own LoRA targets
