"""LoRA adapters on STDiT3: injection, peft-compatible atomic folders, original .pt files, resume bookkeeping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

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
    params = add_lora(model, lora_config(rank))
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
    params = add_lora(model, lora_config(RANK))
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
    params = add_lora(model, lora_config(RANK))
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
    params = add_lora(model, lora_config(16))
    assert len(params) == 336
    assert sum(p.numel() for p in params) == 9_289_728
    assert len(get_peft_model_state_dict(model)) == 336
    assert sum(p.requires_grad for p in model.parameters()) == 336


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_adapter_writes_a_complete_folder(tmp_path: Path) -> None:
    model, _ = lora_model()
    config = lora_config(RANK)
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
    save_adapter(folder, first, lora_config(RANK), extra={"step": 1}, training_state={"step": 1})
    save_adapter(folder, second, lora_config(RANK), extra={"step": 2})
    assert json.loads((folder / STATE_FILE).read_text()) == {"step": 2}
    assert not (folder / "training_state.pt").exists()  # replaced as a whole, nothing stale kept
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
    fresh, _ = lora_model(lora_seed=None)
    load_lora(fresh, folder)
    assert_same_lora(fresh, second)


def test_failed_save_keeps_the_previous_folder(tmp_path: Path) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK), extra={"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_adapter(folder, model, lora_config(RANK), extra={"step": 2}, training_state={"bad": lambda: 0})
    assert json.loads((folder / STATE_FILE).read_text()) == {"step": 1}
    assert (folder / ADAPTER_FILE).is_file() and not (folder / "training_state.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # the half-written temp folder is removed


@pytest.mark.parametrize("target", ["folder", "file"])
def test_load_lora_round_trips_exactly(tmp_path: Path, target: str) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK))
    fresh, _ = lora_model(lora_seed=None)
    x = inputs()
    assert not torch.allclose(forward(fresh, **x), forward(model, **x))
    n = load_lora(fresh, folder if target == "folder" else folder / ADAPTER_FILE)
    assert n == TINY_LORA_TENSORS
    assert_same_lora(fresh, model)
    torch.testing.assert_close(forward(fresh, **x), forward(model, **x), rtol=0, atol=0)


def test_folder_loads_with_peft_from_pretrained(tmp_path: Path) -> None:
    model, _ = lora_model()
    folder = save_adapter(tmp_path / "lora", model, lora_config(RANK), extra={"step": 5})
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
    folder = save_adapter(tmp_path / "lora", model, lora_config(8))
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
    folders = [save_adapter(root / f"checkpoint-{s:06d}", model, lora_config(RANK), extra={"step": s})
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


def test_find_resume_dir_latest_picks_the_newest_of_any_run(tmp_path: Path) -> None:
    project = tmp_path / "runs"
    fake_checkpoint(project / "run-a" / "checkpoints", 10, mtime=1_000)
    newest = fake_checkpoint(project / "run-a" / "checkpoints", 20, mtime=3_000)
    fake_checkpoint(project / "run-b" / "checkpoints", 30, mtime=2_000)
    fake_checkpoint(project / "run-b" / "checkpoints", 40, training=False, mtime=9_000)  # not resumable
    fake_checkpoint(project / "run-c" / "checkpoints", 50, state=False, mtime=9_000)  # incomplete
    assert find_resume_dir("latest", project) == newest
    later = fake_checkpoint(project / "run-b" / "checkpoints", 35, mtime=4_000)
    assert find_resume_dir("latest", project) == later


def test_find_resume_dir_with_a_path(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, 7)
    assert find_resume_dir(str(folder), tmp_path / "unused") == folder
    with pytest.raises(VaderError, match="no training_state.pt"):
        find_resume_dir(str(fake_checkpoint(tmp_path, 8, training=False)), tmp_path)


def test_find_resume_dir_latest_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(VaderError, match="no checkpoint found"):
        find_resume_dir("latest", tmp_path)
    fake_checkpoint(tmp_path / "run" / "checkpoints", 1, training=False)
    with pytest.raises(VaderError, match="no checkpoint found"):
        find_resume_dir("latest", tmp_path)
