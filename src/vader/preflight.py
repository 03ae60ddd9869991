"""Every check that needs more than the config itself, run once before anything is created.

`preflight(cfg, command)` is the first call of every entry point (train, infer): a run that cannot
start fails here with one `VaderError`, before a run folder, a tracker or a model exists.
"""

from __future__ import annotations

from vader.config import VaderConfig
from vader.errors import VaderError


def preflight(cfg: VaderConfig, command: str) -> None:
    """Raise one VaderError naming every problem found; create nothing."""
    from vader.models.presets import check_model_weights
    from vader.rewards import check_reward_weights

    problems: list[str] = []
    checks = [lambda: check_model_weights(cfg.model, cfg.vae, cfg.text_encoder)]
    if command == "train":
        checks.append(lambda: check_reward_weights(cfg.reward_fn, cfg.hps_version, cfg.reward_sources))
    for check in checks:
        try:
            check()
        except VaderError as exc:
            problems.append(str(exc))
    if problems:
        raise VaderError("\n".join(problems))


__all__ = ["preflight"]
