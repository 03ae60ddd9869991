"""The tool end to end on the diffusers backends (model.type 'wan' and 'cogvideox'): `vader train`
and `vader infer` on tiny random pipelines saved in the diffusers layout, with a weight-free reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from backend_tiny import SAVERS, tiny_config_text  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vader.cli import main  # noqa: E402
from vader.config import load_config  # noqa: E402
from vader.errors import VaderError  # noqa: E402

PIPELINES = {"wan": "WanPipeline", "cogvideox": "CogVideoXPipeline"}
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not hasattr(diffusers, cls),
                                                        reason=f"diffusers {diffusers.__version__} lacks {cls}"))
            for name, cls in PIPELINES.items()]
# validation reward of the trained LoRA minus the base model's, same prompts and seeds (brightness, 8
# steps). Measured: wan 0.4299 -> 0.4388, cogvideox 0.5419 -> 0.7726; the bounds are about half the gains.
MIN_GAIN = {"wan": 0.004, "cogvideox": 0.1}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, SAVERS[name](tmp_path_factory.mktemp(name) / f"tiny-{name}")


def write_config(folder: Path, backend: str, weights: Path | str, filename: str | None = None, **keys) -> Path:
    path = folder / (filename or f"{backend}.py")
    path.write_text(tiny_config_text(backend, weights, **keys))
    return path


@pytest.fixture(scope="module")
def trained(backend, tmp_path_factory):
    """An 8-step run (checkpoints at 4 and 8) per backend."""
    from vader.train import train

    name, weights = backend
    work = tmp_path_factory.mktemp(f"{name}-runs")
    path = write_config(work, name, weights, project_dir=str(work / "runs"), run_name="full")
    return name, weights, work, path, train(load_config(path))


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_the_reward_on_fixed_seeds(trained):
    name, _, _, _, run = trained
    metrics = rows(run)
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) and not any(r["skipped"] for r in steps)
    lora = next(r["val_reward"] for r in metrics if "val_reward" in r)
    base = next(r["base_val_reward"] for r in metrics if "base_val_reward" in r)
    assert lora - base > MIN_GAIN[name], (base, lora)
    assert (run / "before_after.png").is_file() and (run / "reward_curve.png").is_file()


def test_run_folder_holds_our_lora_and_a_diffusers_lora_the_pipeline_loads(trained):
    import diffusers

    name, weights, _, _, run = trained
    ours = load_file(str(run / "lora" / "adapter_model.safetensors"))
    config = json.loads((run / "lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    theirs = load_file(str(run / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert len(theirs) == len(ours) and all(k.startswith("transformer.") for k in theirs)
    for key, value in ours.items():  # the same tensors under diffusers' names
        short = key.removeprefix("base_model.model.")
        assert torch.equal(theirs["transformer." + short], value), key
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(weights)
    pipe.load_lora_weights(run / "lora" / "diffusers")
    (adapter,) = pipe.get_active_adapters()
    loaded = dict(pipe.transformer.named_parameters())
    for key, value in ours.items():  # the pipeline now holds exactly the trained tensors
        name_in_pipe = key.removeprefix("base_model.model.").replace(".weight", f".{adapter}.weight")
        assert torch.equal(loaded[name_in_pipe].detach(), value), key
    assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)  # trained (peft starts B at 0)


def test_wan_run_folder_holds_a_comfyui_lora_under_the_original_wan_names(trained):
    """ComfyUI's Wan loader maps the original checkpoint's names (blocks.N.self_attn.q), not diffusers'.
    The file diffusers' own converter of those names (WanPipeline.lora_state_dict) turns back into
    exactly the diffusers file's tensors."""
    import diffusers

    name, _, _, _, run = trained
    files = sorted((run / "lora" / "comfyui").glob("*.safetensors"))
    if name != "wan":
        assert not files  # the format is Wan's
        return
    assert [f.name for f in files] == [f"{run.name}.safetensors"]
    comfy = load_file(str(files[0]))
    assert comfy and all(k.startswith("diffusion_model.blocks.") for k in comfy)
    assert any(".self_attn.q.lora_A." in k for k in comfy) and any(".cross_attn.o.lora_B." in k for k in comfy)
    theirs = load_file(str(run / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"))
    back = diffusers.WanPipeline.lora_state_dict(str(files[0]))
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_gradients_reach_only_the_lora(backend, tmp_path):
    from vader.methods.vader import micro_step
    from vader.run import Run, make_accelerator
    from vader.train import setup

    name, weights = backend
    cfg = load_config(write_config(tmp_path, name, weights, project_dir=str(tmp_path / "runs")))
    accelerator = make_accelerator(cfg)
    t = setup(cfg, accelerator, Run.create(cfg, accelerator, "train"))
    micro_step(t.gen, t.reward, cfg, accelerator, t.run.prompts, 0, 0)
    with_grad = {n for n, p in t.gen.denoiser.named_parameters() if p.grad is not None}
    lora = {n for n, p in t.gen.denoiser.named_parameters() if "lora_" in n}
    assert with_grad == lora and all(p.requires_grad == ("lora_" in n) for n, p in t.gen.denoiser.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in t.gen.vae.parameters())
    assert {id(p) for p in t.params} == {id(p) for n, p in t.gen.denoiser.named_parameters() if "lora_" in n}
    assert t.gen.text_encoder is None  # released once the prompts were encoded


def test_resume_from_a_checkpoint_is_exact(trained):
    from vader.train import train

    name, weights, work, _, full = trained
    project = work / "resume"
    part = write_config(work, name, weights, f"{name}_part.py", project_dir=str(project), run_name="part",
                        max_train_steps=4)
    train(load_config(part))
    resumed = train(load_config(part, ["--max_train_steps", "8", "--resume_from", "latest"]))
    assert resumed == project / "part"
    for a, b in ((full / "lora", resumed / "lora"), (full / "checkpoints" / "checkpoint-000008",
                                                     resumed / "checkpoints" / "checkpoint-000008")):
        first, second = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    losses = [(r["step"], r["loss"]) for r in rows(full) if "loss" in r]
    assert [(r["step"], r["loss"]) for r in rows(resumed) if "loss" in r] == losses


def test_infer_with_the_lora_writes_videos(trained):
    from vader.infer import infer

    name, weights, work, path, run = trained
    cfg = load_config(path, ["--is_vader_training", "False", "--lora_ckpt_path", str(run / "lora"),
                             "--project_dir", str(work / "infer"), "--run_name", "with-lora"])
    paths = infer(cfg)
    assert len(paths) == 2 and all(p.is_file() and p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize(("backend_name", "argv", "needle"), [
    ("wan", ["--num_frames", "10"], "num_frames=10 must be 4k + 1"),
    ("cogvideox", ["--num_frames", "13"], "num_frames=13 must be 8k + 1"),
    ("wan", ["--image_size", "(40, 32)"], "height=40 must be a positive multiple of 16"),
    ("cogvideox", ["--decode_strategy", "latent"], "decode_strategy='latent'"),
    ("wan", ["--image_size", "None"], "needs image_size=(height, width)"),
    ("wan", ["--vae.type", "OpenSoraVAE_V1_2-tiny"], "vae.type='OpenSoraVAE_V1_2-tiny' is an Open-Sora part"),
    ("cogvideox", ["--scheduler.shift", "5.0"], "scheduler.shift=5.0 is Wan's"),
    ("wan", ["--dtype", "fp8"], "dtype='fp8' is not available"),
    ("wan", ["--model.depth", "2"], "model.depth=2: STDiT3 architecture keys do not apply"),
    ("cogvideox", ["--text_encoder.offload", "True"], "text_encoder.offload=True is for Open-Sora's T5"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, backend_name, argv, needle):
    path = write_config(tmp_path, backend_name, tmp_path / "no-weights-needed")
    assert main(["config", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vader: error: ") and err.count("\n") == 1 and needle in err, err


def test_open_sora_refuses_the_backend_keys():
    from conftest import TINY_TRAIN

    with pytest.raises(VaderError, match=r"^negative_prompt='x' is for the diffusers backends"):
        load_config(TINY_TRAIN, ["--negative_prompt", "x"])


@pytest.mark.parametrize("name", list(PIPELINES))
def test_missing_weights_offline_named_in_one_line_before_any_folder(tmp_path, name):
    from vader.train import train

    project = tmp_path / "runs"
    cfg = load_config(write_config(tmp_path, name, "nobody-has/this-checkpoint", project_dir=str(project)))
    with pytest.raises(VaderError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and "missing weights (offline" in message
    assert "nobody-has/this-checkpoint (tokenizer, text_encoder, transformer, vae" in message
    assert not project.exists()


def test_missing_backend_and_reward_weights_share_one_line_exit_2(tmp_path, capsys):
    """The shipped Wan config offline: the pipeline's parts and HPS in the one line of `vader train`."""
    from conftest import REPO

    project = tmp_path / "runs"
    argv = ["train", str(REPO / "configs" / "wan2.1-t2v-1.3b" / "vader_train.py"), "--prompt", "['a cat']",
            "--logger_type", "none", "--project_dir", str(project)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vader: error: ") and err.count("\n") == 1, err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (tokenizer, text_encoder, transformer, vae)" in err
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err and "HPS_v2.1_compressed.pt" in err
    assert not project.exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob(
    "[wcl]*/vader_*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_backend_configs_validate_offline(path, capsys):
    assert main(["config", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["type"] in (*PIPELINES, "ltx") and out["decode_strategy"] == "exact"
    # a published hub repo (org/name), never a local folder of the machine that wrote the config
    org, _, name = out["model"]["from_pretrained"].partition("/")
    assert org in ("Wan-AI", "THUDM", "Lightricks") and name and "/" not in name


@pytest.mark.parametrize("backend", ["wan", "cogvideox"])
def test_settings_from_config_maps_every_key(tmp_path, backend):
    """Every config key a diffusers backend reads reaches ITS settings (each backend's own mapping)."""
    from vader.backends import settings_class, settings_from_config

    extra = {"wan": ["--scheduler.shift", "5.0"], "cogvideox": ["--scheduler.use_dynamic_cfg", "True"]}[backend]
    frames = {"wan": "13", "cogvideox": "25"}[backend]
    cfg = load_config(write_config(tmp_path, backend, tmp_path / "w"),
                      ["--image_size", "(48, 64)", "--num_frames", frames, "--scheduler.num_sampling_steps", "7",
                       "--scheduler.cfg_scale", "4.5", "--negative_prompt", "dull", "--dtype", "bf16",
                       "--text_encoder.model_max_length", "24", "--vae.from_pretrained", str(tmp_path / "v"),
                       "--text_encoder.from_pretrained", str(tmp_path / "t"), *extra])
    expected = dict(pretrained=str(tmp_path / "w"), vae=str(tmp_path / "v"), text_encoder=str(tmp_path / "t"),
                    dtype="bf16", height=48, width=64, num_frames=int(frames), num_steps=7, guidance_scale=4.5,
                    negative_prompt="dull", max_sequence_length=24)
    expected.update({"wan": dict(vae_dtype="fp32", shift=5.0),  # Wan's VAE stays fp32, as diffusers loads it
                     "cogvideox": dict(vae_dtype="bf16", use_dynamic_cfg=True)}[backend])
    assert settings_from_config(cfg) == settings_class(backend)(**expected)
