"""The toy world: procedural captioned clips, and the small pretrained models and rewards trained on
them (weights under `vader/assets/toyworld/`), so alignment can be watched on a CPU."""

from pathlib import Path

WEIGHTS = str(Path(__file__).resolve().parent.parent / "assets" / "toyworld")
