"""Local `evaluate` metric modules, loadable offline: `evaluate.load(str(metric_path("audio_tagging")))`."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """Folder of the local metric module `name` (`accuracy` or `audio_tagging`)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").exists():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").exists())
        raise ValueError(f"No local metric {name!r}; available: {available}.")
    return path
