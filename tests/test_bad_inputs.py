"""Bad inputs through the real CLI: each ends in one `vader: error:` line, exit status 2, no
traceback, and nothing created (no run folder, no cache) — the checks run before anything exists.

One row per bad input: (id, argv, needles). In argv, `{in}` is a folder of prepared bad files and
`{pd}` the project_dir the run would write to; every train/infer row also gets `BASE` (tiny, fast,
offline, project_dir={pd}) before its own arguments, which win.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import stat
from pathlib import Path

import pytest
import torch
from conftest import FAST, OPENSORA_INFER, OPENSORA_TRAIN, REPO, TINY_INFER, TINY_TRAIN
from one_line import assert_one_line_error, tree
from safetensors.torch import save_file

from vader.cli import main

TRAIN, INFER = str(TINY_TRAIN), str(TINY_INFER)
BASE = [*FAST, "--max_train_steps", "1", "--project_dir", "{pd}"]
MODELS = ["hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2", "DeepFloyd/t5-v1_1-xxl"]
HPS = "xswu/HPSv2/HPS_v2.1_compressed.pt"
WANDB = ["--logger_type", "wandb", "--use_wandb", "True", "--debug", "False"]

CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- keys and values (config.py's schema) ----
    ("unknown attention", ["train", TRAIN, "--model.attention", "flash"],
     ["model.attention='flash' is not valid", "'sdpa', 'math'"]),
    ("math attention with enable_flash_attn", ["infer", INFER, "--model.attention", "math", "--model.enable_flash_attn",
                                               "True"], ["model.attention='math' contradicts model.enable_flash_attn"]),
    ("unknown key", ["train", TRAIN, "--seeed", "1"], ["'seeed'", "did you mean 'seed'"]),
    ("unknown nested key", ["train", TRAIN, "--model.depht", "2"], ["model.depht", "did you mean 'depth'"]),
    ("bad choice dtype", ["train", TRAIN, "--dtype", "int8"], ["dtype='int8'", "'bf16'"]),
    ("bad choice logger", ["infer", INFER, "--logger_type", "mlflow"], ["logger_type='mlflow'", "'tensorboard'"]),
    ("bad choice video_quality", ["train", TRAIN, "--video_quality", "ultra"], ["video_quality='ultra'", "'lossless'"]),
    ("bad choice hps_version", ["train", TRAIN, "--hps_version", "v3"], ["hps_version='v3'", "'v2.1'"]),
    ("wrong type lr", ["train", TRAIN, "--lr", "fast"], ["lr='fast'", "float"]),
    ("wrong type bool", ["train", TRAIN, "--debug", "maybe"], ["debug='maybe'", "bool"]),
    ("wrong type int", ["train", TRAIN, "--train_batch_size", "1.5"], ["train_batch_size=1.5", "int"]),
    ("bool for a number", ["train", TRAIN, "--lora_rank", "True"], ["lora_rank=True", "not a bool"]),
    ("lr 1e999", ["train", TRAIN, "--lr", "1e999"], ["lr=inf is not a finite number"]),
    ("lr -1e999", ["train", TRAIN, "--lr", "-1e999"], ["lr=-inf is not a finite number"]),
    ("lr nan", ["train", TRAIN, "--lr", "nan"], ["lr=nan is not a finite number"]),
    ("cfg_scale nan", ["infer", INFER, "--scheduler.cfg_scale", "nan"], ["scheduler.cfg_scale=nan"]),
    ("lr zero", ["train", TRAIN, "--lr", "0"], ["lr=0 must be > 0"]),
    ("lora_dropout 1", ["train", TRAIN, "--lora_dropout", "1.0"], ["lora_dropout=1.0", "< 1"]),
    ("seed 2**70", ["train", TRAIN, "--seed", str(2**70)], ["seed=2**70", "< 2**63"]),
    ("seed negative", ["infer", INFER, "--seed", "-1"], ["seed=-1", ">= 0"]),
    ("image_size 65x65", ["train", TRAIN, "--image_size", "(65, 65)"], ["image_size=(65, 65)", "(64, 64) or (72, 72)"]),
    ("image_size tiny", ["infer", INFER, "--image_size", "(8, 8)"], ["at least 16x16"]),
    ("image_size text", ["train", TRAIN, "--image_size", "abc"], ["image_size='abc'"]),
    ("num_frames 2min", ["train", TRAIN, "--num-frames", "2min"], ["num_frames='2min'", "2s"]),
    ("resolution 999p", ["train", TRAIN, "--image_size", "None", "--resolution", "999p"], ["999p", "240p"]),
    ("bad reward name", ["train", TRAIN, "--reward_fn", "clip"], ["reward_fn='clip'", "'colorfulness'"]),
    ("reward weight text", ["train", TRAIN, "--reward_fn", "{'colorfulness': 'a lot'}"], ["must be a number"]),
    ("reward weight inf", ["train", TRAIN, "--reward_fn", "{'colorfulness': 1e999}"], ["not a finite number"]),
    ("reward_sources key", ["train", TRAIN, "--reward_sources", "{'hpss': '/x.pt'}"], ["'hpss'", "valid keys"]),
    ("decode_frame out of range", ["train", TRAIN, "--decode_frame", "40"], ["decode_frame='40'", "0..16"]),
    ("decode_frame latent range", ["train", TRAIN, "--decode_frame", "5", "--decode_strategy", "latent"],
     ["latent frames 0..4"]),
    ("decode_frame bad mode", ["train", TRAIN, "--decode_frame", "middle"], ["decode_frame='middle'", "fml"]),
    ("backprop_mode out of range", ["train", TRAIN, "--backprop_mode", "99"], ["backprop_mode=99", "between 1 and"]),
    ("backprop_mode zero", ["train", TRAIN, "--backprop_mode", "0"], ["between 1 and"]),
    ("backprop_mode bad mode", ["train", TRAIN, "--backprop_mode", "first"], ["backprop_mode='first'", "'last'"]),
    ("backprop_mode specific", ["train", TRAIN, "--backprop_mode", "specific"], ["specific", "15"]),
    ("max_nonfinite_steps 0", ["train", TRAIN, "--max_nonfinite_steps", "0"], ["max_nonfinite_steps=0", "> 0"]),
    ("checkpoints_total_limit 0", ["train", TRAIN, "--checkpoints_total_limit", "0"], ["checkpoints_total_limit=0"]),
    ("trains nothing", ["train", TRAIN, "--max_train_steps", "None", "--num_train_epochs", "0"], ["trains nothing"]),
    ("actpred single frame", ["train", TRAIN, "--reward_fn", "actpred", "--decode_frame", "-1"], ["actpred"]),
    ("empty project_dir", ["train", TRAIN, "--project_dir", ""], ["project_dir=''"]),
    ("empty prompt list", ["infer", INFER, "--prompt", "[]"], ["prompt=[]", "non-empty"]),
    ("stray argument", ["train", TRAIN, "stray"], ["unexpected argument 'stray'"]),
    # ---- rewards: gold, callables (checked when the config is read) ----
    ("gold is the training reward", ["train", TRAIN, "--gold_reward", "colorfulness"],
     ["gold_reward='colorfulness' is the training reward"]),
    ("gold is the training reward as a dict", ["train", TRAIN, "--gold_reward", "{'colorfulness': 2.0}"],
     ["is the training reward (reward_fn='colorfulness')"]),
    ("gold is a mix of the training mix", ["train", TRAIN, "--reward_fn", "{'colorfulness': 1.0, 'brightness': 2.0}",
                                           "--gold_reward", "{'brightness': 4.0, 'colorfulness': 2.0}"],
     ["is the training reward"]),
    ("callable reward_fn without arguments", ["train", TRAIN, "--method", "grpo", "--reward_fn",
                                              "grpo_rewards:no_arguments"],
     ["reward_fn='grpo_rewards:no_arguments'", "cannot be called as fn(videos, prompts)"]),
    ("callable reward_fn with one argument", ["train", TRAIN, "--method", "grpo", "--reward_fn",
                                              "grpo_rewards:one_argument"], ["one_argument(videos) cannot be called"]),
    ("callable gold without arguments", ["train", TRAIN, "--gold_reward", "grpo_rewards:no_arguments"],
     ["gold_reward='grpo_rewards:no_arguments'", "cannot be called as fn(videos, prompts)"]),
    ("callable gold with one argument", ["train", TRAIN, "--gold_reward", "grpo_rewards:one_argument"],
     ["gold_reward='grpo_rewards:one_argument'", "cannot be called"]),
    ("callable reward_fn for VADER", ["train", TRAIN, "--reward_fn", "grpo_rewards:mean_red"],
     ["is a Python function with no gradient", "--method grpo"]),
    ("GRPO group_size huge", ["train", TRAIN, "--method", "grpo", "--grpo", "{'group_size': 100000}"],
     ["grpo.group_size=100000 is invalid", "from 2 to 1024"]),
    ("GRPO on a DDIM backend", ["train", str(REPO / "configs" / "cogvideox-2b" / "vader_train.py"), "--method", "grpo",
                                "--image_size", "(480, 720)", "--reward_fn", "grpo_rewards:mean_red"],
     ["method='grpo' needs a sampler with a log-probability", "opensora, wan", "model.type='cogvideox'"]),
    # ---- config files ----
    ("missing config file", ["train", "{in}/none.py"], ["config file not found"]),
    ("config --keys of a missing file", ["config", "{in}/none.py", "--keys"], ["config file not found"]),
    ("config file not Python", ["train", "{in}/binary.py"], ["could not read config file"]),
    ("config file a folder", ["infer", "{in}"], ["is a folder"]),
    # ---- prompts ----
    ("prompts not UTF-8 (train)", ["train", TRAIN, "--prompt_path", "{in}/latin1.txt"], ["not UTF-8", "line 2"]),
    ("prompts not UTF-8 (infer)", ["infer", INFER, "--prompt_path", "{in}/latin1.txt"], ["not UTF-8"]),
    ("empty prompts file", ["train", TRAIN, "--prompt_path", "{in}/empty.txt"], ["empty.txt", "is empty"]),
    ("blank prompts file", ["infer", INFER, "--prompt_path", "{in}/blank.txt"], ["blank.txt", "is empty"]),
    ("missing prompts file", ["train", TRAIN, "--prompt_path", "{in}/none.txt"], ["prompt_path=", "no such file"]),
    ("two TABs in a prompt line", ["train", TRAIN, "--prompt_path", "{in}/tabs.txt"], ["more than one TAB"]),
    ("start_index past the end", ["infer", INFER, "--start_index", "100"], ["no prompts left"]),
    # ---- the run folder ----
    ("project_dir a file", ["train", TRAIN, "--project_dir", "{in}/afile"], ["project_dir=", "not a folder"]),
    ("project_dir under a file", ["infer", INFER, "--project_dir", "{in}/afile/runs"], ["afile is a file"]),
    ("project_dir with NUL", ["train", TRAIN, "--project_dir", "{pd}/a\0b"], ["NUL"]),
    ("project_dir unwritable", ["train", TRAIN, "--project_dir", "{in}/readonly/runs"], ["not writable"]),
    ("run_name an existing file", ["train", TRAIN, "--project_dir", "{in}", "--run_name", "afile"],
     ["run_name='afile'", "not a folder"]),
    ("run_name under a file", ["train", TRAIN, "--project_dir", "{in}", "--run_name", "afile/run"],
     ["run_name='afile/run'", "afile is a file"]),
    # ---- LoRA files ----
    ("zero-length LoRA (train)", ["train", TRAIN, "--lora_ckpt_path", "{in}/zero.safetensors"], ["is empty (0 bytes)"]),
    ("zero-length LoRA (infer)", ["infer", INFER, "--lora_ckpt_path", "{in}/zero.pt"], ["is empty (0 bytes)"]),
    ("corrupt LoRA (train)", ["train", TRAIN, "--lora_ckpt_path", "{in}/corrupt.safetensors"],
     ["lora_ckpt_path=", "not a readable weights file"]),
    ("corrupt LoRA .pt (infer)", ["infer", INFER, "--lora_ckpt_path", "{in}/corrupt.pt"],
     ["not a readable weights file"]),
    ("truncated LoRA (infer)", ["infer", INFER, "--lora_ckpt_path", "{in}/truncated.safetensors"],
     ["not a readable weights file"]),
    ("truncated LoRA .pt (train)", ["train", TRAIN, "--lora_ckpt_path", "{in}/truncated.pt"],
     ["not a readable weights file"]),
    ("LoRA .pt with Python objects", ["infer", INFER, "--lora_ckpt_path", "{in}/objects.pt"],
     ["holds Python objects besides tensors", "torch.save(model.state_dict(), path)"]),
    ("LoRA folder without adapter", ["infer", INFER, "--lora_ckpt_path", "{in}/emptydir"],
     ["has no adapter_model.safetensors"]),
    ("missing LoRA", ["infer", INFER, "--lora_ckpt_path", "{in}/none.safetensors"], ["no such file or folder"]),
    ("resume_from with a corrupt adapter", ["train", TRAIN, "--resume_from", "{in}/ckpt"],
     ["resume_from=", "not a readable weights file"]),
    # ---- weights, tracker, machine ----
    ("missing weights offline (train)", ["train", str(OPENSORA_TRAIN), "--prompt_path", "{in}/ok.txt",
                                         "--logger_type", "none"],
     ["missing weights (offline", *MODELS, HPS, "hf download hpcai-tech/OpenSora-STDiT-v3"]),
    ("missing weights offline (infer)", ["infer", str(OPENSORA_INFER), "--prompt_path", "{in}/ok.txt",
                                         "--logger_type", "none"], ["missing weights (offline", *MODELS]),
    ("missing local denoiser", ["train", TRAIN, "--model.from_pretrained", "{in}/no_stdit"],
     ["model.from_pretrained=", "no_stdit"]),
    ("missing local reward weights", ["train", TRAIN, "--reward_fn", "hps", "--reward_sources",
                                      "{'hps': '{in}/no_hps.pt'}"], ["reward_sources['hps']", "no_hps.pt"]),
    ("missing reward weights offline", ["train", TRAIN, "--reward_fn", "{'colorfulness': 1.0, 'aesthetic': 0.5}"],
     ["missing weights (offline", "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"]),
    ("missing gold weights offline", ["train", TRAIN, "--gold_reward", "aesthetic"],
     ["missing weights (offline", "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"]),
    ("missing reward and gold weights in one line", ["train", TRAIN, "--reward_fn", "{'colorfulness': 1.0, 'hps': 1.0}",
                                                     "--gold_reward", "aesthetic"],
     ["missing weights (offline", HPS.rsplit("/", 1)[0], "openai/clip-vit-large-patch14"]),
    ("wandb without credentials", ["train", TRAIN, *WANDB], ["logger_type='wandb'", "wandb login",
                                                             "WANDB_MODE=offline", "--logger_type tensorboard"]),
    ("wandb without credentials (infer)", ["infer", INFER, *WANDB], ["wandb login"]),
    ("several problems at once", ["train", TRAIN, "--project_dir", "{in}/afile", "--prompt_path", "{in}/empty.txt",
                                  "--lora_ckpt_path", "{in}/zero.pt"], ["not a folder", "is empty", "0 bytes"]),
]


def _prepare(folder: Path) -> None:
    """The bad files the rows name."""
    folder.mkdir()
    (folder / "ok.txt").write_text("a red fox in the snow\n")
    (folder / "latin1.txt").write_bytes("a dog\ncafé au lait\n".encode("latin-1"))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.txt").write_text("\n   \n\n")
    (folder / "tabs.txt").write_text("a dog\tdog\twalking\n")
    (folder / "binary.py").write_bytes(b"\x00\x01\x02 not python")
    (folder / "afile").write_text("a file, not a folder")
    (folder / "emptydir").mkdir()
    (folder / "zero.safetensors").write_bytes(b"")
    (folder / "zero.pt").write_bytes(b"")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" * 4)
    (folder / "corrupt.pt").write_bytes(random.Random(0).randbytes(256))  # fixed: its error must not vary
    tensors = {"base_model.model.a.lora_A.weight": torch.ones(4, 64), "base_model.model.a.lora_B.weight": torch.ones(64, 4)}
    save_file(tensors, str(folder / "whole.safetensors"))
    data = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(tensors, folder / "whole.pt")
    data = (folder / "whole.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": tensors, "when": datetime.date(2026, 1, 1)}, folder / "objects.pt")  # not a plain state dict
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"step": 1}, folder / "ckpt" / "training_state.pt")
    (folder / "readonly").mkdir()
    (folder / "readonly").chmod(stat.S_IRUSR | stat.S_IXUSR)


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize(("argv", "needles"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, needles, tmp_path, capsys, no_wandb_credentials):
    inputs, project = tmp_path / "in", tmp_path / "pd"
    _prepare(inputs)
    if "{in}/readonly/runs" in argv and os.access(inputs / "readonly", os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    argv = [a.replace("{in}", str(inputs)).replace("{pd}", str(project)) for a in argv]
    if argv[0] in ("train", "infer") and len(argv) > 1:
        argv = [argv[0], argv[1], *[a.replace("{pd}", str(project)) for a in BASE], *argv[2:]]
    before = tree(tmp_path)
    code = main(argv)
    assert_one_line_error(code, capsys.readouterr().err, needles)
    assert tree(tmp_path) == before, "a failed start left files behind"


def test_the_table_is_large():
    assert len(CASES) >= 40


# ---- the hub probe ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens on it once the socket is closed


@pytest.fixture
def online_but_unreachable(monkeypatch):
    """HF_HUB_OFFLINE unset, and the hub endpoint a closed local port."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def test_unreachable_hub_names_every_missing_weight_in_one_line(online_but_unreachable, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red fox\n")
    code = main(["train", str(OPENSORA_TRAIN), "--prompt_path", str(tmp_path / "p.txt"), "--logger_type", "none",
                 "--project_dir", str(tmp_path / "pd")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "the hub cannot be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert all(name in err for name in [*MODELS, HPS])
    assert not (tmp_path / "pd").exists()


def test_hub_probe_says_unreachable_for_a_closed_port(online_but_unreachable):
    from vader.weights import hub_reachable

    assert hub_reachable() is False


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (302, True), (401, True), (404, False), (502, False)])
def test_hub_probe_counts_only_answers_the_hub_gives(monkeypatch, status, reachable):
    """200, a redirect, or 401 for a gated repo come from the hub; a 404 for every URL is what an
    intercepting proxy says, and a 5xx a broken gateway: downloads would fail after a minute."""
    import http.server
    import threading

    from vader.weights import hub_reachable

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the stdlib's name
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/api/models/final")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Final(Answer):
        def do_HEAD(self):  # noqa: N802
            if self.path.endswith("/final"):
                self.send_response(200)
                self.end_headers()
            else:
                super().do_HEAD()

        do_GET = do_HEAD  # noqa: N815 - urllib follows a redirect with GET

    server = http.server.HTTPServer(("127.0.0.1", 0), Final)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub_reachable("hpcai-tech/OpenSora-STDiT-v3") is reachable
    finally:
        server.shutdown()
        server.server_close()


def test_no_probe_when_every_weight_is_local(online_but_unreachable, monkeypatch, tiny_cfg):
    """The tiny preset needs no weights: preflight must not touch the network for it."""
    import vader.weights as weights
    from vader.preflight import preflight

    def probe(*_, **__):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(weights, "probe_hub", probe)
    preflight(tiny_cfg(), "train")
    preflight(tiny_cfg(), "infer")


def test_probe_only_when_online(monkeypatch, tiny_cfg):
    """Offline (HF_HUB_OFFLINE=1, as in these tests) the missing weights are named without a probe."""
    import vader.weights as weights
    from vader.errors import VaderError
    from vader.preflight import preflight

    def probe(*_, **__):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(weights, "probe_hub", probe)
    with pytest.raises(VaderError, match="offline"):
        preflight(tiny_cfg("--model.from_pretrained", "hpcai-tech/OpenSora-STDiT-v3"), "infer")


def test_reachable_hub_lets_missing_weights_download_later(monkeypatch, tiny_cfg):
    """Online with a hub that answers, hub weights are a download to come, not an error."""
    from huggingface_hub import constants

    import vader.weights as weights
    from vader.preflight import preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "probe_hub", lambda *_, **__: None)
    preflight(tiny_cfg("--reward_fn", "hps"), "train")


# ---- wandb credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("fix", ["WANDB_MODE=offline", "WANDB_MODE=disabled", "WANDB_API_KEY=x", "netrc"])
def test_wandb_with_any_credential_passes(fix, no_wandb_credentials, monkeypatch, tmp_path, tiny_cfg):
    from vader.preflight import check_tracker

    cfg = tiny_cfg(*WANDB)
    assert check_tracker(cfg, "train")  # no credential: a problem
    if fix == "netrc":
        netrc = tmp_path / "netrc"
        netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
    else:
        key, value = fix.split("=")
        monkeypatch.setenv(key, value)
    assert check_tracker(cfg, "train") == []



def test_hub_probe_gives_up_on_a_server_that_never_answers(monkeypatch):
    """A listening socket that never replies (a black-holed route): the probe stops at its timeout
    instead of waiting for huggingface_hub's retries."""
    from vader.weights import probe_hub

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        reason = probe_hub("hpcai-tech/OpenSora-STDiT-v3", timeout=0.2)
    assert reason is not None and ("timed out" in reason or "did not answer" in reason)


def test_unwritable_project_dir_is_refused_even_where_root_could_write(monkeypatch, tmp_path, tiny_cfg):
    """As root every folder is writable, so the table's unwritable row skips; here os.access says no."""
    from vader.preflight import check_project_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    assert "is not writable" in check_project_dir(tiny_cfg("--project_dir", str(locked / "runs")), "train")[0]
    assert "is not writable" in check_project_dir(tiny_cfg("--project_dir", str(locked)), "train")[0]
    assert not (locked / "runs").exists()
