"""A picture of sound event detection: class activity over time with the detected events (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_sound_events(
    result: dict,
    path: str | Path,
    top_k: int = 10,
    title: str | None = None,
) -> Path:
    """
    Writes a PNG from the output of `pipeline("sound-event-detection", ..., return_frame_scores=True)`: a heat map of
    the `top_k` most active classes over time, with each detected event drawn as a bar on its class's row.
    Classes with events always appear. Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_sound_events needs matplotlib: pip install 'htsat-hf[plot]'") from error
    missing = {"frame_scores", "frame_times", "labels", "events"} - set(result)
    if missing:
        raise ValueError(
            f"The result lacks {sorted(missing)}: call the pipeline with return_frame_scores=True to plot it."
        )
    scores = np.asarray(result["frame_scores"])
    times = np.asarray(result["frame_times"])
    labels = list(result["labels"])
    step = float(times[1] - times[0]) if len(times) > 1 else 1.0
    end = float(times[-1] + step) if len(times) else 0.0

    with_events = [labels.index(event["label"]) for event in result["events"]]
    by_activity = [int(i) for i in np.argsort(-scores.max(axis=0))]
    rows = list(dict.fromkeys(with_events + by_activity))[: max(top_k, len(set(with_events)))]
    rows.sort(key=lambda i: -scores[:, i].max())

    height = 1.2 + 0.35 * len(rows)
    figure, axis = plt.subplots(figsize=(12, height), dpi=100)
    image = axis.imshow(
        scores[:, rows].T, aspect="auto", origin="upper", cmap="magma", vmin=0.0, vmax=1.0,
        extent=(0.0, end, len(rows) - 0.5, -0.5), interpolation="nearest",
    )
    for event in result["events"]:
        row = rows.index(labels.index(event["label"]))
        axis.plot([event["onset"], event["offset"]], [row, row], color="cyan", linewidth=3, solid_capstyle="butt")
    axis.set_yticks(range(len(rows)), [labels[i] for i in rows])
    axis.set_xlabel("time (s)")
    axis.set_title(title or f"{len(result['events'])} detected events (bars) over class scores")
    figure.colorbar(image, ax=axis, fraction=0.02, pad=0.01, label="score")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__ = ["plot_sound_events"]
