"""Strong (time-stamped) labels for sound event detection training: DESED-style TSVs -> targets on the model's grid.

`HTSATForSoundEventDetection(input_features, labels=clip_targets, frame_labels=step_targets)` trains the
token-semantic map with frame-level BCE plus the clip-level loss, so strongly labelled data (AudioSet strong,
DESED synthetic) can be used, the direction the HTS-AT paper names as future work.

`htsat-hf train --strong_labels_train TSV [--strong_labels_eval TSV] [--audio_dir DIR]` goes through
`load_strong_labels` (one row per audio file the TSV names, files without events included with all-zero targets)
and `prepare_strong_data` (`StrongLabelTransform`: each example is exactly one model window, and its step targets
follow the crop). The TSV format is DCASE task 4's: tab-separated, header `filename onset offset event_label`,
extra columns ignored, a row with an empty onset / offset / label lists a clip without events.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Audio, Dataset

from ..metrics.sed_metrics import LINE_COLUMN, events_table, read_table
from .data import AudioTransform, BadExampleError, PreparedData, SplitReport, prepare_splits, validate_split
from .labels import LabelSpace, read_label_csv

EVENTS_COLUMN = "events"
EVENT_LABELS_COLUMN = "event_labels"
EVENT_FEATURE = datasets.List(
    {"label": datasets.Value("string"), "onset": datasets.Value("float64"), "offset": datasets.Value("float64")}
)


# -------------------------------------------------------------------------------------------------- targets
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


def repeat_events(events: Sequence[Mapping], period_seconds: float, total_seconds: float) -> list[dict]:
    """The events of a `period_seconds` clip repeated end to end up to `total_seconds`, as the feature extractor's
    repeat padding repeats its audio. Each copy is cut to the clip (an offset past its end stops at the end)."""
    repeated: list[dict] = []
    for copy in range(max(1, math.ceil(total_seconds / period_seconds - 1e-9))):
        shift = copy * period_seconds
        for event in events:
            onset = min(max(float(event["onset"]), 0.0), period_seconds) + shift
            offset = min(float(event["offset"]), period_seconds, total_seconds - shift) + shift
            if offset > onset:
                label = event.get("label", event.get("event_label"))
                repeated.append({"label": label, "onset": onset, "offset": offset})
    return repeated


def window_step_targets(
    events: Sequence[Mapping],
    start_seconds: float,
    audio_seconds: float,
    window_seconds: float,
    num_steps: int,
    step_seconds: float,
    label2id: Mapping[str, int],
) -> np.ndarray:
    """
    (steps, labels) targets of one training example: `audio_seconds` of the clip from `start_seconds` (the crop),
    padded to `window_seconds` by repeating it when shorter (the feature extractor's padding; then the events
    repeat too). Event times are in the clip's time.
    """
    if audio_seconds < window_seconds:
        clip_events = [
            {**event, "onset": event["onset"] - start_seconds, "offset": event["offset"] - start_seconds}
            for event in events
        ]
        repeated = repeat_events(clip_events, audio_seconds, window_seconds)
        return events_to_step_targets(repeated, num_steps, step_seconds, label2id)
    return events_to_step_targets(events, num_steps, step_seconds, label2id, offset_seconds=start_seconds)


@dataclass(frozen=True)
class StepGrid:
    """The token-semantic step grid of an input that fits one model image: `num_steps` steps spread over its
    frames, exactly as `HTSATForSoundEventDetection.frame_step_seconds` computes them."""

    num_steps: int
    hop_length: int
    sampling_rate: int
    image_frames: int

    @classmethod
    def from_config(cls, config: Any) -> StepGrid:
        return cls(config.token_steps, config.hop_length, config.sampling_rate, config.image_frames)

    def step_seconds(self, num_frames: int) -> float:
        """Seconds per step of an input of `num_frames` feature frames (one window: at most `image_frames`)."""
        if num_frames > self.image_frames:
            raise ValueError(
                f"{num_frames} frames do not fit one {self.image_frames}-frame model image; strong-label examples "
                "must be one model window (lower --max_length_seconds)."
            )
        return (num_frames - 1) * self.hop_length / self.sampling_rate / self.num_steps


# -------------------------------------------------------------------------------------------------- reading
def read_strong_labels(tsv: str | Path, labels: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """DESED-style TSV (`filename onset offset event_label`) -> {filename: [events]}, in the TSV's order, validated
    (errors name the file and line; files listed with an empty label have no events). Same-class events may
    overlap: the targets take their union."""
    table = events_table(tsv, labels=labels, name=str(tsv))
    events: dict[str, list[dict]] = {}
    for row in table.itertuples(index=False):
        file_events = events.setdefault(row.filename, [])
        if isinstance(row.event_label, str) and row.event_label:
            file_events.append({"label": row.event_label, "onset": float(row.onset), "offset": float(row.offset)})
    return events


def first_lines(tsv: str | Path) -> dict[str, int]:
    """{filename: the TSV line (header = 1) where it first appears}."""
    table = read_table(tsv)
    lines: dict[str, int] = {}
    for filename, line in zip(table["filename"].astype(str).str.strip(), table[LINE_COLUMN]):
        lines.setdefault(filename, int(line))
    return lines


def strong_label_split(
    tsv: str | Path,
    audio_dir: str | Path | None,
    labels: Sequence[str] | None,
    name: str,
    skip_bad_examples: bool = False,
) -> tuple[Dataset, SplitReport]:
    """
    One row per audio file the TSV names (`audio`: `Audio(decode=False)`, `events`, `event_labels`, `tsv_line`);
    file names are relative to `audio_dir` (default: the TSV's folder). A missing file raises `BadExampleError`
    naming the TSV line and the path, or with `skip_bad_examples` is left out and reported.
    """
    events = read_strong_labels(tsv, labels)
    if not events:
        raise BadExampleError(f"{tsv} lists no audio files.")
    lines = first_lines(tsv)
    base = Path(audio_dir) if audio_dir else Path(tsv).resolve().parent
    if not base.is_dir():
        raise FileNotFoundError(f"Audio folder {base} (for {tsv}) does not exist; pass --audio_dir / --eval_audio_dir.")
    table: dict[str, list] = {"audio": [], EVENTS_COLUMN: [], EVENT_LABELS_COLUMN: [], "tsv_line": []}
    skipped: list[tuple[int, str, str]] = []
    for filename, file_events in events.items():
        path = Path(filename) if os.path.isabs(filename) else base / filename
        if not path.is_file():
            if not skip_bad_examples:
                raise BadExampleError(
                    f"{tsv}, line {lines[filename]}: audio file {path} not found. Fix the name or --audio_dir, or "
                    "pass --skip_bad_examples."
                )
            skipped.append((lines[filename], str(path), "audio file not found"))
            continue
        table["audio"].append(str(path))
        table[EVENTS_COLUMN].append(file_events)
        table[EVENT_LABELS_COLUMN].append(sorted({event["label"] for event in file_events}))
        table["tsv_line"].append(lines[filename])
    if not table["audio"]:
        raise BadExampleError(f"None of the {len(events)} audio files of {tsv} exists under {base}.")
    features = datasets.Features(
        {
            "audio": Audio(decode=False),
            EVENTS_COLUMN: EVENT_FEATURE,
            EVENT_LABELS_COLUMN: datasets.List(datasets.Value("string")),
            "tsv_line": datasets.Value("int64"),
        }
    )
    dataset = Dataset.from_dict(table, features=features)
    return dataset, SplitReport(name=f"{name} ({Path(tsv).name})", kept=len(dataset), skipped=skipped, split=name)


@dataclass
class StrongLabelSource:
    """The `train` / `eval` splits read from strong-label TSVs, their class names, and the missing files skipped."""

    splits: datasets.DatasetDict
    names: list[str]
    reports: list[SplitReport]


def strong_label_names(train_tsv: str | Path, label_csv: str | None = None,
                       class_names: Sequence[str] | None = None) -> list[str]:
    """The classes: from `label_csv` or `class_names` when given, else the event labels of the training TSV, sorted."""
    if label_csv:
        return read_label_csv(label_csv)[0]
    if class_names:
        return list(class_names)
    names = sorted({event["label"] for events in read_strong_labels(train_tsv).values() for event in events})
    if not names:
        raise BadExampleError(f"{train_tsv} has no events, so it names no classes; pass --class_names.")
    return names


def load_strong_labels(
    train_tsv: str | Path,
    eval_tsv: str | Path | None = None,
    audio_dir: str | Path | None = None,
    eval_audio_dir: str | Path | None = None,
    label_csv: str | None = None,
    class_names: Sequence[str] | None = None,
    skip_bad_examples: bool = False,
) -> StrongLabelSource:
    """Splits `train` (and `eval`) from DESED-style TSVs. Event labels outside the classes raise naming the TSV
    line. `eval_audio_dir` defaults to `audio_dir`, else to the eval TSV's folder."""
    names = strong_label_names(train_tsv, label_csv, class_names)
    splits: dict[str, Dataset] = {}
    reports: list[SplitReport] = []
    for name, tsv, folder in (("train", train_tsv, audio_dir), ("eval", eval_tsv, eval_audio_dir or audio_dir)):
        if tsv:
            splits[name], report = strong_label_split(tsv, folder, names, name, skip_bad_examples)
            reports.append(report)
    return StrongLabelSource(datasets.DatasetDict(splits), names, reports)


# ---------------------------------------------------------------------------------------------- transform
class StrongLabelTransform(AudioTransform):
    """
    `AudioTransform` for strong labels: adds `frame_labels` (steps, labels) on the model's token-semantic grid and
    the clip `labels` they imply (a class is present when it covers any part of the window).

    Every example is exactly one model window, so the model never crops it and the targets line up with its
    `frame_logits`: training clips longer than `max_length_seconds` are randomly cropped and evaluation clips
    cropped centrally (`eval_crop` is always "center"), the crop's start shifting the events. Clips shorter than the
    window are repeated up to it by the feature extractor, as in classification training and as the pretrained
    models saw short clips; their events are repeated with the audio, so every padded step keeps a true target.
    """

    def __init__(
        self,
        feature_extractor: Any,
        labels: LabelSpace,
        grid: StepGrid,
        train: bool = True,
        max_length_seconds: float | None = None,
        skip_bad_examples: bool = False,
        audio_column: str = "audio",
        events_column: str = EVENTS_COLUMN,
    ) -> None:
        super().__init__(feature_extractor, labels, audio_column, None, train, max_length_seconds, "center",
                         skip_bad_examples)
        self.grid = grid
        self.events_column = events_column
        self.label2id = labels.label2id
        window = max(self.max_samples, feature_extractor.max_length_samples)
        frames = feature_extractor.num_frames(window)
        if frames > grid.image_frames:
            raise ValueError(
                f"Strong-label examples of {window / feature_extractor.sampling_rate:g} s give {frames} frames, more "
                f"than one {grid.image_frames}-frame model image: the model would crop them and the frame targets "
                "would no longer line up. Use --max_length_seconds of at most the model's clip_seconds."
            )

    @property
    def target_names(self) -> list[str]:
        return ["labels", "frame_labels"]

    def targets(self, batch: dict[str, list], row: int, start: int, num_samples: int) -> dict[str, Any]:
        rate = self.feature_extractor.sampling_rate
        window = max(num_samples, self.feature_extractor.max_length_samples)
        step_seconds = self.grid.step_seconds(self.feature_extractor.num_frames(window))
        frame_labels = window_step_targets(
            batch[self.events_column][row], start / rate, num_samples / rate, window / rate, self.grid.num_steps,
            step_seconds, self.label2id,
        )
        return {"labels": clip_targets_from_steps(frame_labels), "frame_labels": frame_labels}


def prepare_strong_data(
    train: Dataset | None,
    eval_: Dataset | None,
    feature_extractor: Any,
    grid: StepGrid,
    labels: LabelSpace,
    max_length_seconds: float | None = None,
    check_audio: bool | None = None,
    skip_bad_examples: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    reports: Sequence[SplitReport] = (),
) -> PreparedData:
    """`prepare_data` for splits from `load_strong_labels`: validate the audio, subsample, attach
    `StrongLabelTransform`s. `reports` (the TSV files skipped) are carried into the result."""
    return prepare_splits(
        {"train": train, "eval": eval_},
        labels,
        make_transform=lambda is_train: StrongLabelTransform(
            feature_extractor, labels, grid, train=is_train, max_length_seconds=max_length_seconds,
            skip_bad_examples=skip_bad_examples,
        ),
        validate=lambda split, name: validate_split(split, name, "audio", None, None, check_audio, skip_bad_examples),
        # clips without events have no labels, so the names are looked up directly (LabelSpace.indices refuses them)
        example_labels=lambda split: [[labels.label2id[n] for n in cell] for cell in split[EVENT_LABELS_COLUMN]],
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        seed=seed,
        reports=reports,
    )


__all__ = [
    "StepGrid",
    "StrongLabelSource",
    "StrongLabelTransform",
    "clip_targets_from_steps",
    "events_to_step_targets",
    "load_strong_labels",
    "prepare_strong_data",
    "read_strong_labels",
    "repeat_events",
    "strong_label_names",
    "strong_label_split",
    "window_step_targets",
]
