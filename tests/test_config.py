from __future__ import annotations

import pytest
from conftest import OPENSORA_INFER, OPENSORA_TRAIN, TINY_INFER, TINY_TRAIN

from vader.config import describe_keys, load_config, parse_overrides
from vader.errors import VaderError


def test_original_configs_load_unchanged_with_original_defaults():
    cfg = load_config(OPENSORA_TRAIN)
    assert cfg.is_vader_training is True
    assert (cfg.lr, cfg.lora_rank, cfg.gradient_accumulation_steps, cfg.seed) == (2e-4, 16, 8, 200)
    assert (cfg.reward_fn, cfg.hps_version, cfg.backprop_mode, cfg.decode_frame) == ("hps", "v2.1", "last", "-1")
    assert cfg.model.from_pretrained == "hpcai-tech/OpenSora-STDiT-v3"
    assert cfg.scheduler.num_sampling_steps == 30 and cfg.scheduler.cfg_scale == 7.0
    assert cfg.height_width == (240, 426) and cfg.frames == 16
    inference = load_config(OPENSORA_INFER)
    assert inference.is_vader_training is False and inference.num_val_runs == 4


def test_opensora_flags_and_nested_overrides():
    cfg = load_config(OPENSORA_TRAIN, ["--num-frames", "2s", "--resolution", "240p", "--aspect-ratio", "3:4",
                                       "--scheduler.num_sampling_steps", "20", "lr=1e-4", "--use_wandb=false"])
    assert cfg.frames == 51 and cfg.height_width == (276, 368)
    assert cfg.scheduler.num_sampling_steps == 20 and cfg.lr == 1e-4 and cfg.use_wandb is False
    assert cfg.scheduler.cfg_scale == 7.0  # the rest of the nested dict is kept


def test_tiny_configs_validate_and_find_their_prompts():
    for path in (TINY_TRAIN, TINY_INFER):
        cfg = load_config(path)
        assert cfg.prompt_path and cfg.prompt_path.endswith("prompts.txt")
    assert load_config(TINY_INFER).is_vader_training is False


def test_parse_overrides_types():
    out = parse_overrides(["--a", "3", "--b", "none", "--c", "True", "--d", "{'hps': 1.0}", "--e", "hello",
                           "--flag", "--x-y", "[1, 2]"])
    assert out == {"a": 3, "b": None, "c": True, "d": {"hps": 1.0}, "e": "hello", "flag": True, "x_y": [1, 2]}


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--lrr", "1"], ["lrr", "did you mean 'lr'"]),
        (["--model.depht", "2"], ["model.depht", "did you mean 'depth'"]),
        (["--backprop_mode", "first"], ["backprop_mode='first'", "'last'", "'rand'", "'specific'"]),
        (["--decode_frame", "mid"], ["decode_frame='mid'", "fml", "alt"]),
        (["--decode_frame", "40"], ["decode_frame", "out of range", "0..16"]),
        (["--dtype", "int8"], ["dtype='int8'", "'bf16'", "'fp8'"]),
        (["--mixed_precision", "tf32"], ["mixed_precision='tf32'", "'no'"]),
        (["--reward_fn", "clip"], ["reward_fn='clip'", "'hps'", "'colorfulness'"]),
        (["--hps_version", "v3"], ["hps_version='v3'", "'v2.1'"]),
        (["--logger_type", "mlflow"], ["logger_type='mlflow'", "'tensorboard'"]),
        (["--resolution", "999p", "--image_size", "None"], ["999p", "240p"]),
        (["--aspect-ratio", "5:1", "--image_size", "None"], ["5:1", "9:16"]),
        (["--num-frames", "2min"], ["2min", "2s"]),
        (["--backprop_mode", "specific"], ["specific", "15", "num_sampling_steps=8"]),
        (["--backprop_mode", "99"], ["between 1 and"]),
        (["--train_batch_size", "0"], ["train_batch_size=0", "> 0"]),
        (["--lr", "'fast'"], ["lr='fast'", "type"]),
        (["--model.type", "DiT"], ["model.type='DiT'", "STDiT3-XL/2"]),
        (["--prompt_path", "/nope.txt"], ["prompt_path", "no such file"]),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_choices(argv, needles):
    with pytest.raises(VaderError) as info:
        load_config(TINY_TRAIN, argv)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_backprop_mode_integer_and_decode_frame_int_are_normalised():
    cfg = load_config(TINY_TRAIN, ["--backprop_mode", "3", "--decode_frame", "5"])
    assert cfg.backprop_mode == 3 and cfg.decode_frame == "5"


def test_reward_mix_is_validated():
    assert load_config(TINY_TRAIN, ["--reward_fn", "{'colorfulness': 1.0, 'brightness': 0.5}"]).reward_fn == {
        "colorfulness": 1.0, "brightness": 0.5}
    with pytest.raises(VaderError, match="weight"):
        load_config(TINY_TRAIN, ["--reward_fn", "{'colorfulness': 'a lot'}"])


def test_missing_config_file_and_broken_file(tmp_path):
    with pytest.raises(VaderError, match="not found"):
        load_config(tmp_path / "none.py")
    bad = tmp_path / "bad.py"
    bad.write_text("lr = (\n")
    with pytest.raises(VaderError, match="could not read config file"):
        load_config(bad)


def test_every_key_is_documented():
    rows = describe_keys()
    keys = {key for key, _, _ in rows}
    seed_keys = {"is_vader_training", "train_batch_size", "val_batch_size", "num_val_runs", "seed", "lora_ckpt_path",
                 "project_dir", "lr", "reward_fn", "gradient_accumulation_steps", "lora_rank", "dtype",
                 "mixed_precision", "logger_type", "use_wandb", "wandb_entity", "validation_steps",
                 "checkpointing_steps", "debug", "use_AdamW8bit", "hps_version", "num_train_epochs",
                 "max_train_steps", "backprop_mode", "decode_frame", "is_sample_preview", "grad_checkpoint"}
    assert seed_keys <= keys
    assert all(doc for _, _, doc in rows)


def test_readme_documents_every_key():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    missing = [key for key, _, _ in describe_keys() if f"| `{key}` |" not in readme]
    assert not missing, f"README config table lacks {missing}"
    # the row says what `vader config --keys` says: default and doc, not a stale copy
    stale = [key for key, default, doc in describe_keys()
             if f"| `{key}` | `{default}` | {doc.replace('|', chr(92) + '|')} |" not in readme]
    assert not stale, f"README config rows differ from describe_keys() for {stale}"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lora_dropout", "abc"], "lora_dropout"),
        (["--image_size", "abc"], "image_size"),
        (["--image_size", "(0,)"], "image_size"),
        (["--prompt_path", "5"], "prompt_path"),
        (["--start_index", "abc"], "start_index"),
        (["--aes", "abc"], "aes"),
        (["--scheduler.num_timesteps", "abc"], "scheduler.num_timesteps"),
        (["--vae.micro_frame_size", "0"], "vae.micro_frame_size"),
        (["--checkpoints_total_limit", "0"], "checkpoints_total_limit"),
        (["--max_train_steps", "None", "--num_train_epochs", "0"], "trains nothing"),
        (["--lora_ckpt_path", "/no/such/lora"], "lora_ckpt_path"),
    ],
)
def test_every_plain_key_is_type_checked(argv, needle):
    with pytest.raises(VaderError, match=needle.replace(".", r"\.")):
        load_config(TINY_TRAIN, argv)


def test_string_keys_accept_numbers_from_the_command_line():
    assert load_config(TINY_TRAIN, ["--run_name", "7"]).run_name == "7"


# ---- the declarative schema ------------------------------------------------------------------------


def _build(**values):
    from vader.config import _merge, build_config, load_config_file

    return build_config(_merge(load_config_file(TINY_TRAIN), values))


def _violations():
    """One out-of-range or off-choice value per schema row that declares a range or choices."""
    from vader.config import schema

    for key, _, f, _ in schema():
        meta = f.metadata
        if meta.get("choices"):
            yield key, "not-a-choice"
        for bound, delta in (("gt", 0), ("min", -1), ("lt", 0), ("max", 1)):
            if meta.get(bound) is not None:
                yield key, meta[bound] + delta


@pytest.mark.parametrize(("key", "value"), list(_violations()))
def test_every_declared_range_and_choice_is_enforced(key, value):
    with pytest.raises(VaderError) as info:
        _build(**{key: value})
    message = str(info.value)
    assert message.startswith(f"{key}=") and "\n" not in message


def test_every_key_is_checked_by_the_table_or_a_named_check():
    from vader.config import AFTER_TABLE, CUSTOM_CHECKS, schema

    table = {key for key, *_ in schema()}
    every = {key for key, _, _ in describe_keys()}
    assert every == table | set(CUSTOM_CHECKS)
    assert set(CUSTOM_CHECKS.values()) <= set(AFTER_TABLE)


FLOAT_KEYS = ["lr", "lora_alpha", "lora_dropout", "max_grad_norm", "aes", "flow", "scheduler.cfg_scale",
              "scheduler.cfg_scale_2",
              "scheduler.transform_scale", "scheduler.shift", "guard_drop"]


@pytest.mark.parametrize("text", ["1e999", "-1e999", "nan", "inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_for_every_float_key(key, text):
    with pytest.raises(VaderError, match=rf"^{key.replace('.', '[.]')}=.* is not a finite number$"):
        load_config(TINY_TRAIN, [f"--{key}", text])


def test_float_keys_list_is_every_float_key():
    from vader.config import schema

    assert sorted(FLOAT_KEYS) == sorted(key for key, _, _, kind in schema() if float in kind)


def test_non_finite_reward_weight_is_refused():
    with pytest.raises(VaderError, match="not a finite number"):
        load_config(TINY_TRAIN, ["--reward_fn", "{'colorfulness': 1e999}"])


def test_seed_must_be_what_torch_accepts():
    import torch

    with pytest.raises(VaderError, match=r"^seed=2\*\*70 must be >= 0 and < 2\*\*63$"):
        load_config(TINY_TRAIN, ["--seed", str(2**70)])
    with pytest.raises(VaderError, match="seed=-1"):
        load_config(TINY_TRAIN, ["--seed", "-1"])
    top = load_config(TINY_TRAIN, ["--seed", str(2**63 - 1)]).seed
    torch.manual_seed(top)  # the largest accepted seed really is a torch seed


def test_image_size_that_the_vae_cannot_make_is_refused_with_the_nearest_sizes():
    with pytest.raises(VaderError) as info:
        load_config(TINY_TRAIN, ["--image_size", "(65, 65)"])
    message = str(info.value)
    assert "image_size=(65, 65)" in message and "64x64" in message
    assert "(64, 64) or (72, 72)" in message and "\n" not in message
    with pytest.raises(VaderError, match=r"nearest valid: \(64, 424\) or \(64, 432\)"):
        load_config(TINY_TRAIN, ["--image_size", "(64, 426)"])
    assert load_config(TINY_TRAIN, ["--image_size", "(40, 72)"]).height_width == (40, 72)


def test_open_sora_table_sizes_are_kept_as_open_sora_has_them():
    # 240p 9:16 is 240x426 in Open-Sora's table; the VAE makes 240x424 from it, as Open-Sora does.
    assert load_config(OPENSORA_TRAIN).height_width == (240, 426)


def test_decode_frame_range_follows_the_decode_strategy():
    # 17 frames = one VAE chunk = 5 latent frames; 'latent' indexes latent frames as the original did
    assert load_config(TINY_TRAIN, ["--decode_frame", "16"]).decode_frame == "16"
    assert load_config(TINY_TRAIN, ["--decode_frame", "4", "--decode_strategy", "latent"]).decode_frame == "4"
    with pytest.raises(VaderError, match=r"decode_frame='5' is out of range: .*latent frames 0\.\.4$"):
        load_config(TINY_TRAIN, ["--decode_frame", "5", "--decode_strategy", "latent"])


@pytest.mark.parametrize("reward", ["toy_alignment", "actpred", "{'toy_alignment': 1.0, 'toy_size': 0.5}"])
def test_clip_rewards_refuse_single_frame_decodes_when_the_config_is_read(tiny_cfg, reward):
    with pytest.raises(VaderError, match="clip"):
        tiny_cfg("--reward_fn", reward, "--decode_frame", "-1")
    tiny_cfg("--reward_fn", reward, "--decode_frame", "fml")  # a clip is fine


# ---- _base_: a config file built on another ------------------------------------------------------


def _write(folder, name: str, text: str):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_keys_load_first_and_the_file_overrides_them(tmp_path):
    from vader.config import load_config_file

    _write(tmp_path, "base.py", "lr = 0.1\nseed = 3\nrun_name = 'base'\n")
    child = _write(tmp_path, "child.py", "_base_ = 'base.py'\nlr = 0.2\nmax_train_steps = 7\n")
    assert load_config_file(child) == {"lr": 0.2, "seed": 3, "run_name": "base", "max_train_steps": 7}
    assert load_config_file(tmp_path / "base.py") == {"lr": 0.1, "seed": 3, "run_name": "base"}  # untouched


def test_base_dicts_merge_key_by_key_and_delete_replaces(tmp_path):
    from vader.config import load_config_file

    _write(tmp_path, "base.py", "scheduler = dict(type='rflow', num_sampling_steps=8, cfg_scale=4.0)\n"
                                "model = dict(type='STDiT3-tiny', from_pretrained=None, extra=dict(a=1, b=2))\n"
                                "image_size = (64, 64)\n")
    child = _write(tmp_path, "child.py", "_base_ = 'base.py'\nscheduler = dict(num_sampling_steps=4)\n"
                                         "model = dict(extra=dict(b=3))\nimage_size = (32, 32)\n")
    raw = load_config_file(child)
    assert raw["scheduler"] == {"type": "rflow", "num_sampling_steps": 4, "cfg_scale": 4.0}
    assert raw["model"] == {"type": "STDiT3-tiny", "from_pretrained": None, "extra": {"a": 1, "b": 3}}
    assert raw["image_size"] == (32, 32)  # not a dict: replaced
    fresh = _write(tmp_path, "fresh.py", "_base_ = 'base.py'\nscheduler = dict(_delete_=True, type='rflow')\n")
    assert load_config_file(fresh)["scheduler"] == {"type": "rflow"}


def test_a_config_built_on_tiny_resolves_like_tiny_with_the_same_overrides(tmp_path):
    child = _write(tmp_path, "mine.py", f"_base_ = {str(TINY_TRAIN)!r}\nlr = 0.01\nscheduler = dict(num_sampling_steps=4)\n")
    cfg = load_config(child)
    assert cfg == load_config(TINY_TRAIN, ["--lr", "0.01", "--scheduler.num_sampling_steps", "4"])
    assert cfg.prompt_path == str(TINY_TRAIN.parent / "prompts.txt")  # the base's prompt_path: next to the base
    assert load_config(child, ["--lr", "0.5"]).lr == 0.5  # the command line still wins


def test_base_chains_and_lists_apply_in_order(tmp_path):
    from vader.config import load_config_file

    _write(tmp_path, "a.py", "lr = 1.0\nseed = 1\nrun_name = 'a'\nscheduler = dict(x=1, y=1, z=1)\n")
    _write(tmp_path, "sub/b.py", "_base_ = '../a.py'\nseed = 2\nscheduler = dict(y=2)\n")
    _write(tmp_path, "other.py", "run_name = 'other'\nscheduler = dict(z=3)\n")
    c = _write(tmp_path, "c.py", "_base_ = ['sub/b.py', 'other.py']\nlr = 3.0\n")
    assert load_config_file(c) == {"lr": 3.0, "seed": 2, "run_name": "other", "scheduler": {"x": 1, "y": 2, "z": 3}}


def test_prompt_path_of_a_base_is_read_next_to_the_base(tmp_path, monkeypatch):
    from vader.config import load_config_file

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "shared/prompts.txt", "a cat\n")
    _write(tmp_path, "shared/base.py", "prompt_path = 'prompts.txt'\n")
    child = _write(tmp_path, "runs/child.py", "_base_ = '../shared/base.py'\n")
    assert load_config_file(child)["prompt_path"] == str(tmp_path / "runs" / ".." / "shared" / "prompts.txt")


def test_missing_base_is_one_line_naming_the_file(tmp_path):
    child = _write(tmp_path, "child.py", "_base_ = 'nowhere.py'\nlr = 0.1\n")
    with pytest.raises(VaderError) as info:
        load_config(child)
    message = str(info.value)
    assert str(child) in message and "'nowhere.py'" in message and "\n" not in message


@pytest.mark.parametrize("files", [{"a.py": "a.py"}, {"a.py": "b.py", "b.py": "a.py"},
                                   {"a.py": "b.py", "b.py": "c.py", "c.py": "b.py"}], ids=["self", "two", "three"])
def test_base_cycle_is_one_line_naming_the_file(tmp_path, files):
    for name, base in files.items():
        _write(tmp_path, name, f"_base_ = {base!r}\nlr = 0.1\n")
    with pytest.raises(VaderError, match="forms a cycle") as info:
        load_config(tmp_path / "a.py")
    message = str(info.value)
    assert message.startswith("config file ") and "\n" not in message
    assert str(tmp_path / "a.py" if len(files) < 3 else tmp_path / "c.py") in message


@pytest.mark.parametrize("value", ["3", "[]", "[1]", "dict(a=1)"])
def test_base_that_names_no_file_is_refused(tmp_path, value):
    child = _write(tmp_path, "child.py", f"_base_ = {value}\n")
    with pytest.raises(VaderError, match=r"_base_=.* must be a config file name"):
        load_config(child)


def test_broken_base_is_named(tmp_path):
    _write(tmp_path, "base.py", "lr = (\n")
    child = _write(tmp_path, "child.py", "_base_ = 'base.py'\n")
    with pytest.raises(VaderError, match=f"could not read config file {tmp_path / 'base.py'}"):
        load_config(child)


def test_shipped_inference_configs_differ_from_training_only_in_what_they_set():
    """configs/*: inference built on training (tiny, wan, cogvideox), toy training built on inference."""
    from vader.config import load_config_file

    configs = TINY_TRAIN.parents[1]
    tiny_train, tiny_infer = load_config_file(TINY_TRAIN), load_config_file(TINY_INFER)
    assert tiny_infer == {**tiny_train, "is_vader_training": False}
    for name, sampler in (("wan2.1-t2v-1.3b", {"cfg_scale": 5.0, "shift": 3.0, "solver": "published"}),
                          ("cogvideox-2b", {"cfg_scale": 6.0, "use_dynamic_cfg": False, "solver": "differentiable"})):
        train, infer = (load_config_file(configs / name / f"vader_{k}.py") for k in ("train", "inference"))
        assert infer == {**train, "scheduler": {"num_sampling_steps": 50, **sampler}, "is_vader_training": False,
                         "logger_type": "none", "debug": True, "decode_frame": "-1"}
    toy_infer, toy_train = (load_config_file(configs / "toy" / f"vader_{k}.py") for k in ("inference", "train"))
    assert {k: v for k, v in toy_train.items() if k in toy_infer and k not in ("is_vader_training", "num_val_runs")} \
        == {k: v for k, v in toy_infer.items() if k not in ("is_vader_training", "num_val_runs")}
    assert toy_train["is_vader_training"] and not toy_infer["is_vader_training"]
