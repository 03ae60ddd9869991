"""vader.guards: the reward-hacking guards' values (diversity, motion, temporal consistency), the
comparison that flags a fallen guard, the grouping of preview rows by prompt and the warning text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import vader
from vader.guards import (
    GUARD_NAMES,
    diversity,
    group_by_prompt,
    guard_drops,
    guard_warning,
    guards,
    guards_of_rows,
    motion,
    temporal_consistency,
)


def _const(value: float, n: int = 1, frames: int = 4, size: int = 16) -> torch.Tensor:
    """n videos [n, 3, frames, size, size], every pixel `value`."""
    return torch.full((n, 3, frames, size, size), value)


def _halves(frames: str, size: int = 16) -> torch.Tensor:
    """One video [1, 3, F, H, W]: 'A' frames white on the left half and black on the right, 'B' frames
    the opposite (after the guard's shift to [0, 2] an A and a B frame are orthogonal)."""
    v = torch.full((1, 3, len(frames), size, size), -1.0)
    for t, kind in enumerate(frames):
        if kind == "A":
            v[:, :, t, :, : size // 2] = 1.0
        else:
            v[:, :, t, :, size // 2:] = 1.0
    return v


def _moving(n: int, frames: int = 6, seed: int = 0) -> torch.Tensor:
    """Videos of a bright square sliding right on noise: real motion, consecutive frames similar."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, 3, frames, 16, 16, generator=g) * 0.2 - 0.9
    for t in range(frames):
        v[:, :, t, 4:10, t:t + 6] = 0.9
    return v


# ---- the values -----------------------------------------------------------------------------------


def test_guard_names_in_display_order():
    assert GUARD_NAMES == ("motion", "temporal_consistency", "diversity")


def test_diversity_of_collapsed_seeds_is_exactly_zero():
    """Every seed of the prompt gave the same video: no spread at all."""
    one = _moving(1)
    assert diversity([one.expand(4, -1, -1, -1, -1)]) == 0.0
    assert diversity([_const(0.3, n=3), _const(-0.7, n=2)]) == 0.0


def test_diversity_is_the_mean_over_prompts_of_the_seed_variance():
    """Seeds all -1 and all +1: the embedding is -1 or +1 in every dimension, its variance across the
    two seeds (population variance) 1; a collapsed prompt adds 0, so the mean over the two prompts is 0.5."""
    spread = torch.cat([_const(-1.0), _const(1.0)])
    assert diversity([spread]) == 1.0
    assert diversity([torch.cat([_const(-0.5), _const(0.5)])]) == 0.25
    assert diversity([_const(0.2, n=3), spread]) == 0.5
    assert diversity([_const(0.2, n=1), spread]) == 1.0  # a single-seed prompt is left out, not counted as 0


def test_diversity_needs_a_prompt_with_two_seeds():
    with pytest.raises(ValueError, match="two or more seeds"):
        diversity([_const(0.0), _const(1.0)])


def test_motion_of_a_still_video_is_exactly_zero_and_of_a_flip_is_two():
    assert motion(_const(0.4, n=2)) == 0.0
    flip = _const(-1.0, frames=5)
    flip[:, :, 1::2] = 1.0  # black, white, black, ...: every pixel moves by 2 each frame
    assert motion(flip) == 2.0
    ramp = torch.cat([_const(0.0, frames=1), _const(0.5, frames=1)], dim=2)
    assert motion(ramp) == 0.5


def test_temporal_consistency_values():
    assert temporal_consistency(_const(0.4, n=2)) == pytest.approx(1.0, abs=1e-6)
    assert temporal_consistency(_halves("ABA")) == 0.0  # orthogonal consecutive frames
    assert temporal_consistency(_halves("AAB")) == pytest.approx(0.5, abs=1e-6)  # (1 + 0) / 2
    # uniform brightness: the frames stay parallel (consistency sees structure, not level)
    ramp = torch.cat([_const(0.0, frames=1), _const(0.5, frames=1)], dim=2)
    assert temporal_consistency(ramp) == pytest.approx(1.0, abs=1e-6)


def test_temporal_consistency_of_an_all_black_video_is_zero():
    """Black (-1) becomes the zero vector after the shift to [0, 2], whose cosine similarity is 0: a
    frozen black video scores 0, not 1 (pinned as it behaves today)."""
    assert temporal_consistency(_const(-1.0)) == 0.0
    assert temporal_consistency(torch.cat([_const(-1.0), _const(1.0)])) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("fn", [motion, temporal_consistency])
def test_single_frame_videos_are_refused(fn):
    with pytest.raises(ValueError, match="two or more frames"):
        fn(_const(0.0, frames=1))


def test_guards_combines_the_three_over_all_prompts():
    spread = torch.cat([_const(-0.5), _const(0.5)])
    still = _const(0.2, n=2)
    out = guards([spread, still])
    assert out == {"motion": 0.0, "temporal_consistency": pytest.approx(1.0, abs=1e-6), "diversity": 0.125}
    assert list(out) == ["motion", "temporal_consistency", "diversity"]
    assert guards([_const(0.1), _const(0.2)]) == {"motion": 0.0, "temporal_consistency": pytest.approx(1.0, abs=1e-6)}


def test_frozen_motion_drops_the_motion_guard_and_raises_consistency():
    moving = _moving(4)
    frozen = moving[:, :, :1].expand_as(moving).clone()  # the "reward-hacked" run: the first frame held
    assert motion(moving) > 0.1
    assert motion(frozen) == 0.0
    assert temporal_consistency(frozen) == pytest.approx(1.0, abs=1e-6)
    assert temporal_consistency(moving) < temporal_consistency(frozen) - 0.01
    before, after = guards([moving[:2], moving[2:]]), guards([frozen[:2], frozen[2:]])
    assert after["motion"] < 0.1 * before["motion"]


def test_diversity_is_zero_for_identical_seeds_and_positive_otherwise():
    one = _moving(1)
    same = [one.expand(3, -1, -1, -1, -1), (one * 0.5).expand(3, -1, -1, -1, -1)]
    assert diversity(same) == 0.0
    varied = [torch.rand(3, 3, 4, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(2)]
    assert diversity(varied) > 0.0
    assert "diversity" not in guards([one, one])  # one seed per prompt: no spread to measure


# ---- rows of (prompt, video, score) ---------------------------------------------------------------


def test_rows_are_grouped_by_prompt_in_first_seen_order():
    a0, b0, a1 = (torch.full((3, 2, 4, 4), x, dtype=torch.float16) for x in (0.0, 1.0, 0.5))
    stacks = group_by_prompt([("a", a0, 0.1), ("b", b0, None), ("a", a1, 0.3)])
    assert [s.shape for s in stacks] == [(2, 3, 2, 4, 4), (1, 3, 2, 4, 4)]
    assert all(s.dtype == torch.float32 for s in stacks)
    assert torch.equal(stacks[0][1], a1.float()) and torch.equal(stacks[1][0], b0.float())


def test_guards_of_rows():
    assert guards_of_rows([]) == {}
    single = [("p", torch.zeros(3, 1, 8, 8), 0.0), ("p", torch.ones(3, 1, 8, 8), 0.0)]
    assert guards_of_rows(single) == {}  # single-frame videos: no motion to guard
    rows = [("p", torch.full((3, 2, 8, 8), -1.0), 0.0), ("q", torch.zeros(3, 2, 8, 8), 0.0),
            ("p", torch.full((3, 2, 8, 8), 1.0), 0.0)]
    assert guards_of_rows(rows) == {"motion": 0.0, "temporal_consistency": pytest.approx(2 / 3, abs=1e-6),
                                    "diversity": 1.0}  # the black videos (0 after the shift) count 0


# ---- the comparison and the warning ---------------------------------------------------------------


@pytest.mark.parametrize("lora, fell", [(0.49, True), (0.5, False), (0.51, False), (0.0, True), (2.0, False)])
def test_guard_drops_flags_a_fall_strictly_beyond_guard_drop(lora, fell):
    """guard_drop=0.5 of a base 1.0: 0.5 is the limit, a value below it has fallen."""
    out = guard_drops({"motion": 1.0}, {"motion": lora}, 0.5)
    assert out == ([f"motion 1 → {lora:.4g}"] if fell else [])


def test_guard_drops_just_above_and_below_the_limit():
    base = {"motion": 2.0, "temporal_consistency": 0.8, "diversity": 0.02}
    limit = (1 - 0.25) * 2.0  # 1.5
    assert guard_drops(base, {**base, "motion": limit - 1e-9}, 0.25) == ["motion 2 → 1.5"]
    assert guard_drops(base, {**base, "motion": limit}, 0.25) == []
    assert guard_drops(base, {**base, "motion": limit + 1e-9}, 0.25) == []


def test_guard_drops_order_missing_and_zero_base():
    base = {"diversity": 0.02, "temporal_consistency": 0.9, "motion": 0.05}  # not in display order
    lora = {"diversity": 0.001, "temporal_consistency": 0.1, "motion": 0.0}
    assert guard_drops(base, lora, 0.5) == ["motion 0.05 → 0", "temporal_consistency 0.9 → 0.1",
                                            "diversity 0.02 → 0.001"]
    assert guard_drops({"motion": 0.0}, {"motion": -1.0}, 0.5) == []  # nothing to fall from
    assert guard_drops({"motion": 1.0}, {"diversity": 0.0}, 0.5) == []  # not measured on both sides
    assert guard_drops(base, lora, 1.0) == []  # guard_drop=1: only a negative value would count


def test_guard_warning_is_one_line():
    text = guard_warning("the reward rose (base 0.1 -> LoRA 0.9)", ["motion 0.05 → 0", "diversity 0.02 → 0.001"],
                         0.5, Path("run/before_after.png"))
    assert text == ("warning: the reward rose (base 0.1 -> LoRA 0.9) while motion 0.05 → 0; diversity 0.02 → 0.001 "
                    "fell by more than guard_drop=0.5: possible reward hacking, look at run/before_after.png")
    assert "\n" not in text


# ---- layering -------------------------------------------------------------------------------------


def _vader_imports(module: str) -> set[str]:
    tree = ast.parse((Path(vader.__file__).parent / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] == "vader"}


def test_guards_is_a_bottom_layer_module_and_report_does_not_import_evaluate():
    assert _vader_imports("guards") <= {"vader.errors"}
    assert "vader.evaluate" not in _vader_imports("report")
