"""LoRA files in diffusers' format, out and in, on the tiny Wan: the file a run writes applies the trained
strength in every loader (tensors alone, diffusers' pipeline) with no live dropout, and vader loads it (and
the musubi/kohya and original-Wan key formats diffusers converts) back for inference, eval and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "WanPipeline"):
    pytest.skip(f"diffusers {diffusers.__version__} has no WanPipeline", allow_module_level=True)

from backend_tiny import PROMPTS, backend_case, save_tiny_wan, tiny_config_text  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vader.backends.common import save_diffusers_lora  # noqa: E402
from vader.backends.wan import LORA_TARGETS  # noqa: E402
from vader.checkpoint import add_lora, load_lora, lora_config, save_adapter, saved_lora_config  # noqa: E402
from vader.errors import VaderError  # noqa: E402

RANK, ALPHA, DROPOUT = 4, 3.0, 0.01  # scale 0.75: a file that ignored alpha would apply 4/3 of the LoRA


def transformer(folder: Path):
    return diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer").eval()


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def effective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module: W + the LoRA's update} for every LoRA layer (adapter 'default'), as peft computes it."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.get_base_layer().weight + m.get_delta_weight("default")).detach()
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def run(wan, tmp_path_factory):
    """A run folder as train writes it (lora/ in peft's format, lora/diffusers/), with a random LoRA
    (vader's config: rank 4, alpha 3, dropout 0.01), and the peft model's effective weights."""
    model = transformer(wan)
    config = lora_config(RANK, ALPHA, DROPOUT, targets=LORA_TARGETS)
    add_lora(model, config)
    randomize(model)
    folder = tmp_path_factory.mktemp("run") / "run"
    save_adapter(folder / "lora", model, config, extra={"step": 1})
    save_diffusers_lora(diffusers.WanPipeline, model, folder / "lora" / "diffusers", config=config)
    return folder, effective(model)


def test_the_file_applies_the_trained_strength_from_its_tensors_alone(wan, run):
    folder, trained = run
    file = folder / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        settings = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert settings["transformer.lora_alpha"] == RANK and settings["transformer.lora_dropout"] == 0.0
    tensors = load_file(str(file))
    base = dict(transformer(wan).named_modules())
    assert len(tensors) == 2 * len(trained) == 32
    for module, weight in trained.items():  # W + B @ A by hand, nothing else read
        a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close(base[module].weight + b @ a, weight, atol=1e-6, rtol=0)


def test_the_pipeline_samples_what_vader_samples_and_twice_the_same(wan, run):
    from peft.tuners.lora import LoraLayer

    folder, _ = run
    case = backend_case("wan")
    s = case.settings(wan)
    gen = case.generator.build(s, "cpu")
    add_lora(gen.denoiser, lora_config(RANK, ALPHA, DROPOUT, targets=gen.lora_target_modules))
    load_lora(gen.denoiser, folder / "lora")
    gen.denoiser.eval()  # as vader samples (run.sample_videos)
    ours = gen.sample_latents(PROMPTS, torch.Generator().manual_seed(0))

    pipe = case.pipeline(wan)
    base = case.run_pipeline(pipe, s, seed=0)
    pipe.load_lora_weights(folder / "lora" / "diffusers")
    first, second = case.run_pipeline(pipe, s, seed=0), case.run_pipeline(pipe, s, seed=0)
    assert all(isinstance(m.lora_dropout[k], torch.nn.Identity) for m in pipe.transformer.modules()
               if isinstance(m, LoraLayer) for k in m.lora_dropout)
    assert torch.equal(first, second)  # no live dropout: two identical calls are bit-equal
    assert (first - base).abs().max() > 0.05  # the LoRA changes the output
    # Measured max |pipeline with the file - vader's sampler with lora/|: 3.3e-06 (latents up to 4.7)
    torch.testing.assert_close(first, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["folder", "file"])
def test_our_diffusers_file_loads_back_to_the_trained_weights(wan, run, where):
    folder, trained = run
    path = folder / "lora" / "diffusers"
    path = path if where == "folder" else path / "pytorch_lora_weights.safetensors"
    config = saved_lora_config(path)  # what infer and eval inject: the file's modules, rank, no dropout
    assert config.r == RANK and config.lora_alpha == RANK and config.lora_dropout == 0.0
    model = transformer(wan)
    add_lora(model, config)
    assert load_lora(model, path) == 32
    loaded = effective(model)
    assert loaded.keys() == trained.keys()
    assert max((loaded[k] - trained[k]).abs().max().item() for k in trained) < 1e-6


def test_a_diffusers_lora_starts_training_under_the_runs_own_alpha(wan, run):
    """train injects its own config (lora_alpha 8 here) and then loads: B is rescaled, the weights are the file's."""
    folder, trained = run
    model = transformer(wan)
    add_lora(model, lora_config(RANK, 8.0, 0.01, targets=LORA_TARGETS))
    load_lora(model, folder / "lora" / "diffusers")
    loaded = effective(model)
    assert max((loaded[k] - trained[k]).abs().max().item() for k in trained) < 1e-6


def test_a_cogvideox_lora_goes_out_and_back_in(tmp_path):
    from backend_tiny import tiny_cogvideox_pipeline

    from vader.backends.cogvideox import LORA_TARGETS as COGVIDEOX_TARGETS

    model = tiny_cogvideox_pipeline().transformer.eval()
    add_lora(model, lora_config(RANK, 6.0, DROPOUT, targets=COGVIDEOX_TARGETS))
    randomize(model, seed=2)
    trained = effective(model)
    save_diffusers_lora(diffusers.CogVideoXPipeline, model, tmp_path / "lora", config=model.peft_config["default"])
    fresh = tiny_cogvideox_pipeline().transformer.eval()
    add_lora(fresh, saved_lora_config(tmp_path / "lora"))
    load_lora(fresh, tmp_path / "lora")
    loaded = effective(fresh)
    assert loaded.keys() == trained.keys() and max((loaded[k] - trained[k]).abs().max().item() for k in trained) < 1e-6


def test_eval_takes_a_diffusers_lora_folder(run):
    from vader.evaluate import check_lora_path

    folder, _ = run
    assert check_lora_path(folder / "lora" / "diffusers") == folder / "lora" / "diffusers"


def test_vader_train_starts_from_a_diffusers_lora(wan, run, tmp_path):
    """`vader train --lora_ckpt_path <run>/lora/diffusers` (lora_alpha 8 here, the file's is baked): the
    denoiser starts with the file's weights, and the optimizer holds the very LoRA parameters loaded."""
    from vader.config import load_config
    from vader.preflight import preflight
    from vader.run import Run, make_accelerator
    from vader.train import setup

    folder, trained = run
    config = tmp_path / "wan.py"
    config.write_text(tiny_config_text("wan", wan, project_dir=str(tmp_path / "runs"), lora_rank=RANK, lora_alpha=8.0,
                                       lora_ckpt_path=str(folder / "lora" / "diffusers")))
    cfg = load_config(config)
    preflight(cfg, "train")
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, "train"))
    loaded = effective(t.gen.denoiser)
    assert max((loaded[k] - trained[k]).abs().max().item() for k in trained) < 1e-6
    assert {id(p) for p in t.params} == {id(p) for n, p in t.gen.denoiser.named_parameters() if "lora_" in n}


def _kohya_state(model: torch.nn.Module, fmt: str, alpha: float) -> tuple[dict, dict]:
    """The LoRA of every linear layer of Wan's blocks, in musubi-tuner's (`lora_unet_blocks_0_self_attn_q.
    lora_down.weight` + `.alpha`) or the original checkpoint's (`diffusion_model.blocks.0.self_attn.q.
    lora_A.weight`) key format, and {diffusers module: the update it means}."""
    names = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(3)
    state, updates = {}, {}
    for block in range(len(model.blocks)):
        for original, ours in names.items():
            linear = modules[f"blocks.{block}.{ours}"]
            down = torch.randn(RANK, linear.in_features, generator=gen) * 0.2
            up = torch.randn(linear.out_features, RANK, generator=gen) * 0.2
            if fmt == "musubi":
                key = f"lora_unet_blocks_{block}_{original.replace('.', '_')}"
                state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                              f"{key}.alpha": torch.tensor(alpha)})
                updates[f"blocks.{block}.{ours}"] = alpha / RANK * up @ down
            else:
                key = f"diffusion_model.blocks.{block}.{original}"
                state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
                updates[f"blocks.{block}.{ours}"] = up @ down  # no alpha: the tensors are the update
    return state, updates


@pytest.mark.parametrize("fmt", ["musubi", "original"])
def test_musubi_and_original_wan_keys_load_to_the_same_weights(wan, tmp_path, fmt):
    model = transformer(wan)
    state, updates = _kohya_state(model, fmt, alpha=2.0)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(state, str(path))
    config = saved_lora_config(path)  # the modules the keys name: the FFN too, beyond vader's targets
    assert sorted(config.target_modules) == sorted(updates)
    base = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in updates}
    add_lora(model, config)
    load_lora(model, path)
    loaded = effective(model)
    assert loaded.keys() == updates.keys()
    assert max((loaded[k] - base[k] - updates[k]).abs().max().item() for k in updates) < 1e-6


def _error(model, path: Path) -> str:
    with pytest.raises(VaderError) as info:
        load_lora(model, path)
    message = str(info.value)
    assert "\n" not in message and "lora_ckpt_path=" in message
    return message


def test_files_vader_cannot_load_are_one_line_errors(wan, run, tmp_path):
    folder, _ = run
    good = load_file(str(folder / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"))
    model = transformer(wan)
    add_lora(model, lora_config(RANK, ALPHA, 0.0, targets=LORA_TARGETS))

    def write(name: str, state: dict) -> Path:
        save_file(state, str(tmp_path / name))
        return tmp_path / name

    a_key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    cases = {
        "unknown LoRA format": {"foo.lora_down.weight": torch.zeros(2, 3)},
        "match no module of this denoiser (WanTransformer3DModel): transformer_blocks.0.attn1.to_q": {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 4)},
        "blocks.0.attn1.to_q.lora_A/B give a (24, 48) update": {**good, a_key: torch.zeros(4, 48)},
        "holds NaN or inf": {**good, a_key: torch.full_like(good[a_key], float("nan"))},
        "LoRA biases": {**good, "transformer.blocks.0.attn1.to_q.lora_B.bias": torch.zeros(24)},
        "does not (blocks.0.ffn.net.2)": {**good, "transformer.blocks.0.ffn.net.2.lora_A.weight": torch.zeros(4, 32),
                                          "transformer.blocks.0.ffn.net.2.lora_B.weight": torch.zeros(24, 4)},
    }
    for i, (needle, state) in enumerate(cases.items()):
        assert needle in _error(model, write(f"bad{i}.safetensors", state)), needle
    partial = {k: v for k, v in _kohya_state(transformer(wan), "musubi", 2.0)[0].items() if "ffn" not in k}
    assert "WanPipeline.lora_state_dict: KeyError" in _error(model, write("partial.safetensors", partial))
    rank8 = {k: torch.zeros(8, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 8) for k, v in good.items()}
    assert "rank 8" in _error(model, write("rank8.safetensors", rank8)) and "lora_rank=8" in _error(
        model, tmp_path / "rank8.safetensors")


def test_vader_infer_with_lora_diffusers_makes_the_videos_of_lora(wan, run, tmp_path, monkeypatch, capsys):
    """`vader infer --lora_ckpt_path <run>/lora/diffusers` makes the videos `<run>/lora` makes; a broken
    diffusers LoRA fails in the preflight, exit 2, before a run folder exists."""
    import vader.run
    from vader.cli import main
    from vader.config import load_config
    from vader.infer import infer

    folder, _ = run
    videos: list[torch.Tensor] = []
    write_video = vader.run.write_video
    monkeypatch.setattr(vader.run, "write_video", lambda path, video, **kw: (videos.append(video.float().cpu()),
                                                                           write_video(path, video, **kw))[1])
    config = tmp_path / "wan.py"
    config.write_text(tiny_config_text("wan", wan, project_dir=str(tmp_path / "runs"), is_vader_training=False))
    made = {}
    for name, lora in (("peft", folder / "lora"), ("diffusers", folder / "lora" / "diffusers")):
        infer(load_config(config, ["--lora_ckpt_path", str(lora), "--run_name", name]))
        made[name], videos[:] = list(videos), []
    assert len(made["peft"]) == len(made["diffusers"]) == 2
    # Measured max |video with lora/diffusers - video with lora/|: 3.2e-06 on [-1, 1] pixels (B x 0.75 rounded)
    assert max((a - b).abs().max().item() for a, b in zip(made["peft"], made["diffusers"])) < 1e-4

    bad = tmp_path / "nan" / "pytorch_lora_weights.safetensors"
    bad.parent.mkdir()
    save_file({k: torch.full_like(v, float("inf")) for k, v in
               load_file(str(folder / "lora" / "diffusers" / "pytorch_lora_weights.safetensors")).items()}, str(bad))
    code = main(["infer", str(config), "--lora_ckpt_path", str(bad.parent), "--run_name", "never"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds NaN or inf" in err and "lora_ckpt_path=" in err and "\n" not in err
    assert not (tmp_path / "runs" / "never").exists()
