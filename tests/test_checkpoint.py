"""LoRA adapters on STDiT3: injection, peft-compatible atomic folders, original .pt files, resume bookkeeping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from vader.backends.opensora import LORA_TARGETS
from vader.checkpoint import (
    ADAPTER_FILE,
    PEFT_PREFIX,
    STATE_FILE,
    add_lora,
    checkpoint_dirs,
    find_resume_dir,
    load_lora,
    lora_config,
    lora_state_dict,
    prune_checkpoints,
    save_adapter,
)
from vader.errors import VaderError
from vader.models.presets import tiny_stdit3_config
from vader.models.stdit3 import STDiT3, stdit3_xl_2_config

RANK = 4
DEPTH = 2  # tiny_stdit3_config: 2 spatial + 2 temporal blocks
# per block: attn.qkv, cross_attn.q_linear, cross_attn.kv_linear; A and B each
TINY_LORA_TENSORS = 2 * DEPTH * 3 * 2


def tiny_model(seed: int = 0) -> STDiT3:
    torch.manual_seed(seed)
    model = STDiT3(tiny_stdit3_config())
    model.init_weights(std=0.1)
    return model.eval()


def lora_model(rank: int = RANK, seed: int = 0, lora_seed: int | None = 1) -> tuple[STDiT3, list[torch.nn.Parameter]]:
    """A tiny model with LoRA; with lora_seed, every LoRA tensor (B included) is random so LoRA matters."""
    model = tiny_model(seed)
    params = add_lora(model, lora_config(rank, targets=LORA_TARGETS))
    if lora_seed is not None:
        g = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), params


def inputs(b: int = 2, t: int = 2, h: int = 4, w: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    cfg = tiny_stdit3_config()
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, 4, t, h, w, generator=g),
        timestep=torch.rand(b, generator=g) * 1000,
        y=torch.randn(b, 1, cfg.model_max_length, cfg.caption_channels, generator=g),
        mask=torch.ones(b, cfg.model_max_length, dtype=torch.long),
        fps=torch.full((b,), 24.0),
        height=torch.full((b,), 8.0 * h),
        width=torch.full((b,), 8.0 * w),
    )


def forward(model: torch.nn.Module, **kw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**(kw or inputs()))


def assert_same_lora(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert sa.keys() == sb.keys() and len(sa) == TINY_LORA_TENSORS
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------
# injection


def test_add_lora_freezes_the_base_and_returns_only_lora_params() -> None:
    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = add_lora(model, lora_config(RANK, targets=LORA_TARGETS))
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert len(params) == len(trainable) == TINY_LORA_TENSORS
    assert {id(p) for p in params} == {id(named[n]) for n in trainable}
    assert all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in params)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"qkv", "q_linear", "kv_linear"}
    shapes = {tuple(named[n].shape) for n in trainable if n.endswith("qkv.lora_A.default.weight")}
    assert shapes == {(RANK, 64)}
    # the base weights are untouched (peft moves them under base_layer)
    for n, p in named.items():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_fresh_lora_does_not_change_the_output_and_gets_gradients() -> None:
    plain = tiny_model()
    model = tiny_model()
    params = add_lora(model, lora_config(RANK, targets=LORA_TARGETS))
    x = inputs()
    torch.testing.assert_close(forward(model, **x), forward(plain, **x))  # B starts at zero
    model.train()
    model(**x).square().mean().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_xl2_lora_matches_the_original_vader_counts_on_meta() -> None:
    with torch.device("meta"):
        model = STDiT3(stdit3_xl_2_config())
    params = add_lora(model, lora_config(16, targets=LORA_TARGETS))
    assert len(params) == 336
    assert sum(p.numel() for p in params) == 9_289_728
    assert len(get_peft_model_state_dict(model)) == 336
    assert sum(p.requires_grad for p in model.parameters()) == 336


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_adapter_writes_a_complete_folder(tmp_path: Path) -> None:
    model, _ = lora_model()
    config = lora_config(RANK, targets=LORA_TARGETS)
    folder = save_adapter(tmp_path / "ckpt" / "checkpoint-000010", model, config, extra={"step": 10},
                          training_state={"step": 10, "seed": 3})
    assert folder == tmp_path / "ckpt" / "checkpoint-000010"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_FILE, "adapter_config.json", STATE_FILE, "training_state.pt"])
    assert json.loads((folder / STATE_FILE).read_text()) == {"step": 10}
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["r"] == RANK and adapter_config["lora_alpha"] == 8.0
    assert set(adapter_config["target_modules"]) == {"qkv", "q_linear", "kv_linear"}
    saved = load_file(str(folder / ADAPTER_FILE))
    assert len(saved) == TINY_LORA_TENSORS and all(k.startswith(PEFT_PREFIX) for k in saved)
    assert torch.load(folder / "training_state.pt", weights_only=True) == {"step": 10, "seed": 3}
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [folder.name]  # no temp folder left


def test_save_adapter_overwrites_an_existing_folder(tmp_path: Path) -> None:
    first, _ = lora_model(lora_seed=1)
    second, _ = lora_model(lora_seed=2)
    folder = tmp_path / "lora"
    save_adapter(folder, first, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 1}, training_state={"step": 1})
    save_adapter(folder, second, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 2})
    assert json.loads((folder / STATE_FILE).read_text()) == {"step": 2}
    assert not (folder / "training_state.pt").exists()  # replaced as a whole, nothing stale kept
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
    fresh, _ = lora_model(lora_seed=None)
    load_lora(fresh, folder)
    assert_same_lora(fresh, second)


def test_failed_save_keeps_the_previous_folder(tmp_path: Path) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_adapter(folder, model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 2}, training_state={"bad": lambda: 0})
    assert json.loads((folder / STATE_FILE).read_text()) == {"step": 1}
    assert (folder / ADAPTER_FILE).is_file() and not (folder / "training_state.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # the half-written temp folder is removed


@pytest.mark.parametrize("target", ["folder", "file"])
def test_load_lora_round_trips_exactly(tmp_path: Path, target: str) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK, targets=LORA_TARGETS))
    fresh, _ = lora_model(lora_seed=None)
    x = inputs()
    assert not torch.allclose(forward(fresh, **x), forward(model, **x))
    n = load_lora(fresh, folder if target == "folder" else folder / ADAPTER_FILE)
    assert n == TINY_LORA_TENSORS
    assert_same_lora(fresh, model)
    torch.testing.assert_close(forward(fresh, **x), forward(model, **x), rtol=0, atol=0)


def test_folder_loads_with_peft_from_pretrained(tmp_path: Path) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 5})
    base = tiny_model()  # same base weights, no LoRA
    x = inputs()
    without = forward(base, **x)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    ours = forward(model, **x)
    theirs = forward(peft_model, **x)
    assert not torch.allclose(ours, without, atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_original_vader_pt_file_loads(tmp_path: Path) -> None:
    model, _ = lora_model()
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    assert f"{PEFT_PREFIX}spatial_blocks.0.attn.qkv.lora_A.weight" in state
    path = tmp_path / "peft_model_100.pt"
    torch.save(state, path)
    fresh, _ = lora_model(lora_seed=None)
    assert load_lora(fresh, path) == TINY_LORA_TENSORS
    assert_same_lora(fresh, model)
    x = inputs()
    torch.testing.assert_close(forward(fresh, **x), forward(model, **x), rtol=0, atol=0)


def test_wrong_rank_names_the_shape_and_lora_rank(tmp_path: Path) -> None:
    model, _ = lora_model(rank=8)
    folder = save_adapter(tmp_path / "lora", model, lora_config(8, targets=LORA_TARGETS))
    fresh, _ = lora_model(rank=RANK, lora_seed=None)
    before = lora_state_dict(fresh)
    with pytest.raises(VaderError, match="trained with lora_rank=8"):  # our folder knows its rank
        load_lora(fresh, folder)
    bare = tmp_path / "peft_model_8.pt"  # the original's files do not: the shapes tell
    torch.save({PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}, bare)
    with pytest.raises(VaderError) as info:
        load_lora(fresh, bare)
    message = str(info.value)
    assert "lora_rank" in message and "shape" in message
    assert "(8, 64)" in message and "(4, 64)" in message and "\n" not in message
    for key, value in lora_state_dict(fresh).items():
        assert torch.equal(value, before[key])  # nothing half-loaded


def test_mismatched_keys_raise(tmp_path: Path) -> None:
    model, _ = lora_model()
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items() if "temporal_blocks.1." not in k}
    state[PEFT_PREFIX + "spatial_blocks.9.attn.qkv.lora_A.weight"] = torch.zeros(RANK, 64)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(VaderError, match="6 missing and 1 unexpected"):
        load_lora(lora_model(lora_seed=None)[0], tmp_path / "other.pt")


@pytest.mark.parametrize("name", ["nope", "nope.pt", "empty_dir"])
def test_missing_file_raises(tmp_path: Path, name: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VaderError, match="no such file"):
        load_lora(lora_model(lora_seed=None)[0], tmp_path / name)


# ---------------------------------------------------------------------------------------------
# checkpoint folders, pruning, resume


def fake_checkpoint(root: Path, step: int | str, adapter: bool = True, state: bool = True,
                    training: bool = True, mtime: float | None = None) -> Path:
    folder = root / (f"checkpoint-{step:06d}" if isinstance(step, int) else f"checkpoint-{step}")
    folder.mkdir(parents=True)
    if adapter:
        (folder / ADAPTER_FILE).write_bytes(b"x")
    if state:
        (folder / STATE_FILE).write_text("{}")
    if training:
        (folder / "training_state.pt").write_bytes(b"x")
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


def test_checkpoint_dirs_lists_complete_folders_by_step(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert checkpoint_dirs(root) == []  # no folder at all
    ten = fake_checkpoint(root, "10")
    nine = fake_checkpoint(root, "9")
    hundred = fake_checkpoint(root, 100)
    fake_checkpoint(root, 200, adapter=False)
    fake_checkpoint(root, 300, state=False)
    (root / ".checkpoint-000400.tmp-123").mkdir()
    (root / "notes").mkdir()
    fake_checkpoint(root, "best")  # complete but not a step: a user's copy, not ours to sort or prune
    assert checkpoint_dirs(root) == [nine, ten, hundred]  # numeric, not lexicographic, order


def test_saved_folders_are_complete_checkpoints(tmp_path: Path) -> None:
    model, _ = lora_model()
    root = tmp_path / "checkpoints"
    folders = [save_adapter(root / f"checkpoint-{s:06d}", model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": s})
               for s in (2, 1)]
    assert checkpoint_dirs(root) == folders[::-1]


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    folders = [fake_checkpoint(root, s) for s in (5, 10, 15, 20)]
    prune_checkpoints(root, None)
    assert checkpoint_dirs(root) == folders
    prune_checkpoints(root, 5)
    assert checkpoint_dirs(root) == folders
    prune_checkpoints(root, 2)
    assert checkpoint_dirs(root) == folders[2:]
    assert not folders[0].exists() and not folders[1].exists()
    prune_checkpoints(root, 1)
    assert checkpoint_dirs(root) == folders[3:]
    best = fake_checkpoint(root, "best")
    prune_checkpoints(root, 0)
    assert checkpoint_dirs(root) == [] and best.is_dir()  # keep=0 removes every step checkpoint only


def _run_with_config(project: Path, name: str, steps: list[int], mtime: float, **config) -> Path:
    run = project / name
    for i, step in enumerate(steps):
        fake_checkpoint(run / "checkpoints", step, mtime=mtime + i)
    (run / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"lr": 0.001, "reward_fn": "hps", "verbose": 1, **config}))
    return run


def test_latest_is_the_latest_checkpoint_of_the_named_run(tmp_path: Path) -> None:
    project = tmp_path / "runs"
    _run_with_config(project, "run-a", [10, 20], mtime=1_000)
    _run_with_config(project, "run-b", [30], mtime=5_000)  # newer, but not the named run
    assert find_resume_dir("latest", project, "run-a", {"lr": 0.001}) == project / "run-a/checkpoints/checkpoint-000020"
    with pytest.raises(VaderError, match="run_name='run-c' has no checkpoint"):
        find_resume_dir("latest", project, "run-c", {})


def test_latest_without_run_name_is_the_newest_run_with_the_same_config(tmp_path: Path) -> None:
    project = tmp_path / "runs"
    same = _run_with_config(project, "run-a", [10, 20], mtime=1_000)
    _run_with_config(project, "run-b", [40], mtime=9_000, lr=0.002)  # newest, another lr
    _run_with_config(project, "run-c", [50], mtime=9_500, verbose=0)  # newest: only a cosmetic key differs
    fake_checkpoint(project / "run-d" / "checkpoints", 60, training=False, mtime=9_900)  # not resumable
    assert find_resume_dir("latest", project, None, {"lr": 0.001, "reward_fn": "hps", "verbose": 1}) == \
        project / "run-c/checkpoints/checkpoint-000050"
    (project / "run-c" / "config.json").write_text(json.dumps({"lr": 0.001, "reward_fn": "aesthetic"}))
    assert find_resume_dir("latest", project, None, {"lr": 0.001, "reward_fn": "hps"}) == \
        same / "checkpoints" / "checkpoint-000020"


def test_latest_refuses_a_changed_config_listing_the_differences(tmp_path: Path) -> None:
    project = tmp_path / "runs"
    _run_with_config(project, "run-a", [10], mtime=1_000, lr=0.0002)
    with pytest.raises(VaderError) as info:
        find_resume_dir("latest", project, None, {"lr": 0.001, "reward_fn": "aesthetic", "verbose": 0})
    message = str(info.value)
    assert "lr: 0.0002 -> 0.001; reward_fn: 'hps' -> 'aesthetic'" in message and "run_name" in message
    assert "verbose" not in message and "\n" not in message


def test_config_differences_ignore_cosmetic_keys_and_compare_nested_ones() -> None:
    from vader.checkpoint import config_differences, describe_differences

    saved = {"lr": 1e-3, "image_size": [32, 32], "scheduler": {"num_sampling_steps": 4, "cfg_scale": 7.0},
             "vae": {"micro_batch_size": 4}, "max_train_steps": 10, "video_quality": "standard", "run_name": "a"}
    current = {"lr": 1e-3, "image_size": (32, 32), "scheduler": {"num_sampling_steps": 8, "cfg_scale": 7.0},
               "vae": {"micro_batch_size": 2}, "max_train_steps": 20, "video_quality": "lossless", "run_name": "b",
               "new_key": 1}
    diff = config_differences(saved, current)
    assert diff == {"scheduler.num_sampling_steps": (4, 8)}
    assert describe_differences(diff) == "scheduler.num_sampling_steps: 4 -> 8"


def test_resume_from_a_checkpoint_without_its_adapter_blames_resume_from(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, 7, adapter=False)
    with pytest.raises(VaderError, match=r"^resume_from=.*checkpoint-000007.*no adapter_model\.safetensors"):
        find_resume_dir(str(folder), tmp_path)


def test_find_resume_dir_with_a_path(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, 7)
    assert find_resume_dir(str(folder), tmp_path / "unused") == folder
    with pytest.raises(VaderError, match="no training_state.pt"):
        find_resume_dir(str(fake_checkpoint(tmp_path, 8, training=False)), tmp_path)


def test_find_resume_dir_latest_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(VaderError, match="no checkpoint found"):
        find_resume_dir("latest", tmp_path / "missing")
    fake_checkpoint(tmp_path / "run" / "checkpoints", 1, training=False)
    with pytest.raises(VaderError, match="no checkpoint found"):
        find_resume_dir("latest", tmp_path)


# ---------------------------------------------------------------------------------------------
# damaged files: one line naming the file and the key


def _truncate(path: Path, keep: int | None) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if keep is None else data[:keep])


@pytest.mark.parametrize("damage", ["zero-length", "truncated", "garbage"])
@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_corrupt_lora_file_is_one_line_naming_the_file_and_key(tmp_path: Path, damage: str, kind: str) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK, targets=LORA_TARGETS))
    path = folder / ADAPTER_FILE
    if kind == "pt":
        path = tmp_path / "peft_model_5.pt"
        torch.save({PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}, path)
    if damage == "garbage":
        path.write_bytes(b"not a tensor file at all" * 10)
    else:
        _truncate(path, None if damage == "zero-length" else path.stat().st_size // 2)
    fresh, _ = lora_model(lora_seed=None)
    before = lora_state_dict(fresh)
    for key in ("lora_ckpt_path", "resume_from"):
        with pytest.raises(VaderError) as info:
            load_lora(fresh, path, key=key)
        message = str(info.value)
        assert message.startswith(f"{key}=") and str(path) in message and "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(fresh).items())


def test_a_pt_file_that_is_not_a_lora_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(VaderError, match="not a dict of tensors"):
        load_lora(lora_model(lora_seed=None)[0], tmp_path / "list.pt")


@pytest.mark.parametrize("damage", ["zero-length", "truncated", "no-optimizer"])
def test_corrupt_training_state_is_one_line_naming_resume_from(tmp_path: Path, damage: str) -> None:
    from vader.checkpoint import load_training_state

    model, params = lora_model()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    state = {"step": 3} if damage == "no-optimizer" else {"step": 3, "optimizer": optimizer.state_dict()}
    folder = save_adapter(tmp_path / "checkpoint-000003", model, lora_config(RANK, targets=LORA_TARGETS), training_state=state)
    if damage != "no-optimizer":
        _truncate(folder / "training_state.pt", None if damage == "zero-length" else 40)
    with pytest.raises(VaderError) as info:
        load_training_state(folder)
    message = str(info.value)
    assert message.startswith(f"resume_from={str(folder)!r}") and "training_state.pt" in message
    assert "\n" not in message


def test_non_finite_lora_is_never_saved_or_loaded(tmp_path: Path) -> None:
    model, params = lora_model()
    good = save_adapter(tmp_path / "lora", model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 1})
    with torch.no_grad():
        params[3][0, 0] = float("nan")
    with pytest.raises(VaderError, match="NaN or inf"):
        save_adapter(good, model, lora_config(RANK, targets=LORA_TARGETS), extra={"step": 2})
    assert json.loads((good / STATE_FILE).read_text()) == {"step": 1}  # the good one is kept
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
    state = load_file(str(good / ADAPTER_FILE))
    assert all(torch.isfinite(v).all() for v in state.values())
    bad = {k: v.clone() for k, v in state.items()}
    next(iter(bad.values()))[0, 0] = float("inf")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(VaderError, match="NaN or inf"):
        load_lora(lora_model(lora_seed=None)[0], tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------
# interrupted writes


def test_interrupted_writes_are_cleaned_and_a_moved_aside_checkpoint_is_restored(tmp_path: Path) -> None:
    from vader.checkpoint import clean_partial_writes

    run = tmp_path / "run"
    root = run / "checkpoints"
    kept = fake_checkpoint(root, 4)
    (root / ".checkpoint-000008.tmp-123").mkdir(parents=True)  # killed while writing step 8
    (root / ".checkpoint-000004.old-77").mkdir()  # overwrite of step 4 that finished
    moved = fake_checkpoint(root, 12)
    moved.rename(root / ".checkpoint-000012.old-99")  # killed between the two renames of an overwrite
    (run / ".lora.tmp-5").mkdir()
    (run / "samples" / "step-000004").mkdir(parents=True)
    (run / "samples" / "step-000004" / ".a.tmp.mp4").write_bytes(b"x")
    removed = clean_partial_writes(run)
    assert sorted(p.name for p in removed) == [".a.tmp.mp4", ".checkpoint-000004.old-77",
                                               ".checkpoint-000008.tmp-123", ".lora.tmp-5"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000004", "checkpoint-000012"]
    assert checkpoint_dirs(root) == [kept, root / "checkpoint-000012"]
    assert not list(run.rglob(".*"))
