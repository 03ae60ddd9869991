"""The image-to-video models that need a first frame for every prompt, end to end on tiny random folders:
`vader train` (2 steps, the reward on generated frames) and `vader eval` of the LoRA on the same image
prompts file; then the same file without an image on one line is refused before anything is made."""

from __future__ import annotations

import json

import pytest
from backend_tiny import PROMPTS, tiny_config_text
from one_line import assert_one_line_error

from vader.cli import main

pytest.importorskip("diffusers")


def _wan_i2v(folder):
    from wan_i2v_tiny import save_tiny_wan_i2v

    # diffusers' Wan attention splits the image tokens off 512 text tokens: I2V needs model_max_length 512
    return "wan", save_tiny_wan_i2v(folder), dict(text_encoder=dict(model_max_length=512))


def _cogvideox_i2v(folder):
    from cogvideox_i2v_tiny import FRAMES, SIZE, save_tiny_i2v

    # the learned positional embedding fixes the size; decode_frame '0' as the shipped config: frame 0 is
    # generated here (the image latents are extra channels), so the preflight lets the reward score it
    return "cogvideox", save_tiny_i2v(folder), dict(image_size=(SIZE, SIZE), num_frames=FRAMES, decode_frame="0")


@pytest.mark.parametrize("build", [_wan_i2v, _cogvideox_i2v], ids=["wan2.1-i2v", "cogvideox-5b-i2v"])
def test_required_first_frames_train_and_evaluate(build, tmp_path, capsys):
    from wan_i2v_tiny import tiny_images

    backend, folder, keys = build(tmp_path / "model")
    lines = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, tiny_images(len(PROMPTS), size=(40, 40)))):
        image.save(tmp_path / f"first{i}.png")
        lines.append(f"{prompt}\tfirst{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    config = tmp_path / "i2v.py"
    config.write_text(tiny_config_text(backend, folder, project_dir=str(tmp_path / "runs"), prompt=None,
                                       prompt_path=str(tmp_path / "prompts.txt"), max_train_steps=2,
                                       checkpointing_steps=0, is_sample_preview=False, **keys))
    assert main(["train", str(config), "--run_name", "r", "--verbose", "0"]) == 0
    run = tmp_path / "runs" / "r"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and not any(r["skipped"] for r in steps)
    assert (run / "lora" / "adapter_model.safetensors").is_file()
    assert (run / "lora" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["eval", str(config), "--lora", str(run / "lora"), "--seeds", "1", "--run_name", "e",
                 "--rewards", "brightness"]) == 0
    assert "2 of 2 prompt(s) with a first-frame image" in capsys.readouterr().out
    data = json.loads((tmp_path / "runs" / "eval" / "e" / "eval.json").read_text())
    assert set(data["images"]) == set(PROMPTS) and data["rewards"]["brightness"]["n"] == 2
    # every prompt needs its first frame: one without is refused in one line, nothing created
    (tmp_path / "missing.txt").write_text(f"{lines[0]}\n{PROMPTS[1]}\n")
    code = main(["infer", str(config), "--prompt_path", str(tmp_path / "missing.txt"), "--run_name", "i"])
    assert_one_line_error(code, capsys.readouterr().err, ["every prompt needs a first frame", "line 2 has none"])
    assert not (tmp_path / "runs" / "i").exists()
