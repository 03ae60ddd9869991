"""The VAE's memory keys: `vae.dtype` (the diffusers backends' VAE dtype over the pipeline's own) and
`vae.offload_cache` (Wan's checkpointed decode keeps its kept feature caches in CPU memory), from the
config to the generator and the plan, and their one-line refusals."""

from __future__ import annotations

import pytest
import torch
from backend_tiny import PROMPTS, save_tiny_wan, tiny_config_text

from vader.config import load_config
from vader.errors import VaderError

pytest.importorskip("diffusers")

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def wan_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-keys")
    folder = save_tiny_wan(root / "tiny-wan")
    path = root / "train.py"
    path.write_text(tiny_config_text("wan", folder, project_dir=str(root / "runs")))
    return path


def test_vae_dtype_reaches_the_settings_and_the_loaded_vae(wan_config):
    from vader.backends import wan

    assert wan.settings(load_config(wan_config, [])).vae_dtype == "fp32"  # the pipeline's own
    cfg = load_config(wan_config, ["--vae.dtype", "bf16"])
    s = wan.settings(cfg)
    assert s.vae_dtype == "bf16" and s.offload_vae_cache is False
    gen = wan.WanGenerator.build(s, "cpu", prompts=PROMPTS[:1])
    assert gen.vae.dtype == torch.bfloat16
    video = gen.decode(torch.randn(1, *gen.latent_shape))
    assert video.dtype == torch.float32 and torch.isfinite(video).all()


def test_offload_cache_sends_the_kept_caches_to_host_memory(wan_config):
    from vader.backends import wan

    cfg = load_config(wan_config, ["--vae.offload_cache", "True"])
    gen = wan.WanGenerator.build(wan.settings(cfg), "cpu", prompts=PROMPTS[:1])
    assert gen.settings.offload_vae_cache

    class Counting(type(gen.host_memory)):
        puts = gets = 0

        def put(self, tensor):
            Counting.puts += 1
            return super().put(tensor)

        def get(self, tensor, device):
            Counting.gets += 1
            return super().get(tensor, device)

    gen.host_memory = Counting()
    z = torch.randn(1, *gen.latent_shape, requires_grad=True)  # 3 latent frames: the cache after chunk 1 kept
    video = gen.decode(z, grad_checkpoint=True)
    assert Counting.puts > 0 and Counting.gets == 0  # nothing comes back before backward
    video.square().mean().backward()
    # each comes back once, for chunk 2's recomputation (no later chunk replays from it)
    assert Counting.gets == Counting.puts and z.grad.abs().max() > 0


def test_the_plan_counts_host_memory_off_the_card_and_bf16_halves_the_decode(wan_config):
    from vader.plan import make_plan

    def peak(*argv: str) -> int:
        return make_plan(load_config(wan_config, ["--decode_frame", "all", *argv])).train.peak

    base = peak()
    assert peak("--vae.offload_cache", "True") < base
    assert peak("--vae.dtype", "bf16") < base


@pytest.mark.parametrize(("config", "argv", "needle"), [
    ("wan", ["--vae.dtype", "fp8"], "vae.dtype='fp8' is not valid; choose one of: 'fp32', 'bf16', 'fp16'"),
    ("opensora", ["--vae.dtype", "bf16"], "vae.dtype='bf16' is for the diffusers backends"),
    ("opensora", ["--vae.offload_cache", "True"], "vae.offload_cache=True is for the diffusers backends"),
    ("cogvideox", ["--vae.offload_cache", "True"], "vae.offload_cache=True is for Wan's checkpointed causal decode"),
])
def test_bad_vae_keys_are_one_line_errors(wan_config, config, argv, needle):
    path = {"wan": wan_config, "opensora": REPO_CONFIGS / "tiny" / "vader_train.py",
            "cogvideox": REPO_CONFIGS / "cogvideox-2b" / "vader_train.py"}[config]
    with pytest.raises(VaderError) as caught:
        load_config(path, argv)
    message = str(caught.value)
    assert needle in message and "\n" not in message
