"""Strong (time-stamped) labels for sound event detection training: DESED-style TSVs -> targets on the model's grid.

`HTSATForSoundEventDetection(input_features, labels=clip_targets, frame_labels=step_targets)` trains the
token-semantic map with frame-level BCE plus the clip-level loss, so strongly labelled data (AudioSet strong,
DESED synthetic) can be used, the direction the HTS-AT paper names as future work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..sed_metrics import read_ground_truth


def events_to_step_targets(
    events: Sequence[Mapping],
    num_steps: int,
    step_seconds: float,
    label2id: Mapping[str, int],
    offset_seconds: float = 0.0,
) -> np.ndarray:
    """
    (steps, labels) targets: the fraction of each step `[i, i + 1) * step_seconds` (shifted by `offset_seconds`, e.g.
    a crop's start) that an event of the label covers, so boundaries inside a step give soft targets.
    Events are dicts with `label` (or `event_label`), `onset`, `offset` in seconds.
    """
    targets = np.zeros((num_steps, len(label2id)), dtype=np.float32)
    step_starts = offset_seconds + np.arange(num_steps) * step_seconds
    for event in events:
        label = event.get("label", event.get("event_label"))
        if label not in label2id:
            raise ValueError(f"Event label {label!r} is not one of the model's labels {sorted(label2id)}.")
        overlap = np.minimum(step_starts + step_seconds, event["offset"]) - np.maximum(step_starts, event["onset"])
        covered = np.clip(overlap / step_seconds, 0.0, 1.0)
        column = targets[:, label2id[label]]
        np.maximum(column, covered, out=column)
    return targets


def clip_targets_from_steps(step_targets: np.ndarray) -> np.ndarray:
    """Weak (clip) targets implied by strong ones: a label is present if it covers any part of the clip."""
    return (step_targets.max(axis=0) > 0).astype(np.float32)


def read_strong_labels(tsv: str | Path, labels: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """DESED-style TSV (`filename onset offset event_label`) -> {filename: [events]}, validated (errors name the
    file and line; files listed with an empty label have no events)."""
    table = read_ground_truth(tsv, labels=labels)
    events: dict[str, list[dict]] = {}
    for row in table.itertuples(index=False):
        file_events = events.setdefault(row.filename, [])
        if isinstance(row.event_label, str) and row.event_label:
            file_events.append({"label": row.event_label, "onset": float(row.onset), "offset": float(row.offset)})
    return events


__all__ = ["clip_targets_from_steps", "events_to_step_targets", "read_strong_labels"]
