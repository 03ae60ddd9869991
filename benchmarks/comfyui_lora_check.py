"""Does ComfyUI's own LoRA loader apply the Wan LoRA file vader writes for it, fully and at the trained strength?

A tiny diffusers WanTransformer3DModel (dim 128 = 1 head of 128, 2 blocks, text_dim 4096, 16 channels,
patch 1x2x2; seeded random weights) gets vader's LoRA (`checkpoint.lora_config(rank=4, alpha=3.0, ...)` on
`backends.wan.LORA_TARGETS`, `checkpoint.add_lora`) with random lora_B. Two files are written by vader's
own code: the ComfyUI one (`save_renamed_lora(model, file, lora_formats.original_wan_keys)`) and, for
comparison, diffusers' (`save_diffusers_lora(WanPipeline, model, folder)`).

ComfyUI (`COMFYUI_PATH`, default ./ComfyUI; packages it needs beyond vader's in `COMFYUI_DEPS`, a pip --target folder, if any)
loads the base weights under the original Wan names (`comfy.sd.load_diffusion_model_state_dict`; the
renaming of the base model is checked against diffusers' own Wan converter), reads each LoRA file with
`comfy.utils.load_torch_file`, applies it with `comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)`
(what the LoraLoaderModelOnly node runs) and patches the weights with `ModelPatcher.patch_model()` on
the CPU. Each file's row: keys in the file, keys ComfyUI logged as not loaded, weights it patched, and
the largest |ComfyUI's weight - the trained weight W + (alpha/r) B @ A| over the LoRA's weights (the
weights outside the LoRA are checked to be untouched). Exit 1 when the ComfyUI file leaves a key
unloaded or misses the trained weights by more than 1e-5; 0 (skipped) when ComfyUI is not there.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/comfyui_lora_check.py
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

COMFY = Path(os.environ.get("COMFYUI_PATH", "ComfyUI"))
DEPS = os.environ.get("COMFYUI_DEPS", "")
RANK, ALPHA = 4, 3.0
TOLERANCE = 1e-5

# diffusers' WanTransformer3DModel names -> the original Wan checkpoint's (the inverse of diffusers'
# convert_wan_transformer_to_diffusers), for the base model: substrings, in order
TOP_LEVEL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
)
IN_BLOCKS = (
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
)


def original_name(key: str) -> str:
    """One base-model key of diffusers' Wan under the original Wan name (ComfyUI's, without its prefix)."""
    if key == "scale_shift_table":
        return "head.modulation"
    if not key.startswith("blocks."):
        for ours, theirs in TOP_LEVEL:
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key  # patch_embedding
    if key.endswith(".scale_shift_table"):
        return key[:-len("scale_shift_table")] + "modulation"
    key = key.replace(".norm2.", ".norm@.").replace(".norm3.", ".norm2.").replace(".norm@.", ".norm3.")
    for ours, theirs in IN_BLOCKS:
        key = key.replace(ours, theirs)
    return key


def build() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(the tiny Wan with vader's LoRA, random lora_B; its base state dict in diffusers' names)."""
    from diffusers import WanTransformer3DModel

    from vader.backends.wan import LORA_TARGETS
    from vader.checkpoint import add_lora, lora_config

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=256,
                                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads").float().eval()
    with torch.no_grad():  # some of diffusers' inits are zeros or ones: random everywhere, so a mix-up shows
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.05)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    add_lora(model, lora_config(rank=RANK, alpha=ALPHA, dropout=0.01, targets=LORA_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model, base


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{diffusers module name: W + (alpha/r) B @ A} of every LoRA layer, from the peft model's tensors."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            w = module.base_layer.weight.detach().double()
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            out[name] = w + (ALPHA / RANK) * (b @ a)
    return out


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def import_comfy():  # type: ignore[no-untyped-def]
    """comfy.sd and comfy.utils set up for the CPU, or a reason why not."""
    if not (COMFY / "comfy" / "sd.py").is_file():
        return None, f"ComfyUI not found at {COMFY}: skipped"
    for path in (p for p in (DEPS, str(COMFY)) if p):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
        import comfy.model_management
        import comfy.sd
        import comfy.utils
    except Exception as exc:  # a package ComfyUI needs is missing here
        return None, f"ComfyUI at {COMFY} cannot be imported ({type(exc).__name__}: {exc}): skipped"
    return (comfy.sd, comfy.utils), ""


def main() -> int:
    comfy, why = import_comfy()
    if comfy is None:
        print(why)
        return 0
    comfy_sd, comfy_utils = comfy
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from vader.backends.common import save_diffusers_lora, save_renamed_lora
    from vader.lora_formats import DIFFUSERS_FILE, original_wan_keys

    model, base = build()
    trained = trained_weights(model)

    # the base model under the original names; diffusers' converter must map them back exactly
    original = {original_name(k): v for k, v in base.items()}
    back = convert_wan_transformer_to_diffusers(dict(original))
    if set(back) != set(base) or any(back[k] is not base[k] for k in base):
        print(f"base renaming does not invert diffusers' converter: {sorted(set(back) ^ set(base))[:5]}")
        return 1

    captured = Captured()  # ComfyUI's log from here on: counted, its first lines per file shown
    logging.getLogger().handlers = [captured]
    patcher = comfy_sd.load_diffusion_model_state_dict({f"model.diffusion_model.{k}": v.clone()
                                                        for k, v in original.items()},
                                                       model_options={"dtype": torch.float32})
    if patcher is None:
        print("ComfyUI did not recognise the tiny Wan's state dict")
        return 1
    loaded = {k[len("diffusion_model."):]: v for k, v in patcher.model.state_dict().items()
              if k.startswith("diffusion_model.")}
    missing = sorted(set(original) - set(loaded))
    base_diff = max(float((loaded[k].double() - v.double()).abs().max()) for k, v in original.items() if k in loaded)
    print(f"ComfyUI model: {type(patcher.model).__name__} ({type(patcher.model.model_config).__name__}), "
          f"{len(original)} base weights, {len(missing)} missing, max |ComfyUI - ours| {base_diff:.1e}")
    if missing or base_diff:
        print(f"the base model did not load as given: missing {missing[:5]}")
        return 1

    lora_weights = {original_name(f"{m}.weight"): w for m, w in trained.items()}  # our own mapping, not vader's
    delta = max(float((w - base[f"{m}.weight"].double()).abs().max()) for m, w in trained.items())
    rows = []
    with tempfile.TemporaryDirectory(prefix="vader-comfyui-") as tmp:
        folder = Path(tmp)
        comfy_file = save_renamed_lora(model, folder / "comfyui" / "tiny.safetensors", original_wan_keys)
        diffusers_file = save_diffusers_lora(diffusers.WanPipeline, model, folder / "diffusers") / DIFFUSERS_FILE
        for label, file in (("comfyui", comfy_file), ("diffusers", diffusers_file)):
            lora = comfy_utils.load_torch_file(str(file), safe_load=True)  # as ComfyUI's LoraLoader reads it
            captured.messages.clear()
            lora_patcher, _ = comfy_sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
            not_loaded = [m for m in captured.messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
            patched = len(lora_patcher.patches)
            lora_patcher.patch_model()
            after = {k[len("diffusion_model."):]: v.detach().double().clone()
                     for k, v in lora_patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
            lora_patcher.unpatch_model()
            lora_diff = max(float((after[k] - w).abs().max()) for k, w in lora_weights.items())
            others = max(float((after[k] - v.double()).abs().max())
                         for k, v in original.items() if k not in lora_weights)
            rows.append((f"{label} ({file.name})", len(lora), len(not_loaded), patched, lora_diff, others))
            if not_loaded:
                print(f"  {label}: ComfyUI logged {len(not_loaded)} lines such as: {not_loaded[0]}")

    print(f"\nLoRA rank {RANK}, alpha {ALPHA} (strength {ALPHA / RANK} baked into lora_B); {len(trained)} adapted "
          f"weights; max |(alpha/r) B A| (what the LoRA adds) {delta:.3g}; ComfyUI strength 1.0\n")
    head = ("file", "keys in file", "keys not loaded", "weights patched", "max |ComfyUI - trained|",
            "max |other weights changed|")
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for label, keys, lost, patched, diff, others in rows:
        print(f"{label} | {keys} | {lost} | {patched} | {diff:.1e} | {others:.1e}")
    _, keys, lost, patched, diff, others = rows[0]
    ok = lost == 0 and patched == len(trained) and diff <= TOLERANCE and others == 0
    print(f"\ncomfyui file: {'every key loaded and the trained weights applied' if ok else 'FAILED'} "
          f"({keys - lost}/{keys} keys, {patched}/{len(trained)} weights, max diff {diff:.1e} <= {TOLERANCE:g}: "
          f"{diff <= TOLERANCE})")
    print(f"diffusers file: {rows[1][1] - rows[1][2]}/{rows[1][1]} keys loaded by ComfyUI's loader")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
