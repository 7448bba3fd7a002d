"""Frame scores -> sound events, and AudioSet -> target label mapping (numpy/scipy only, no torch).

This file is also shipped next to saved models as remote code, so it imports nothing from the package.

Pipeline of `frames_to_events`, per class (the DCASE task 4 order, with dcase_util's event clean-up); every step
runs on all classes at once (numpy over the whole score matrix, not a Python loop over 527 columns):

1. upsample the step scores ("repeat": each step held constant, as the original HTS-AT; "linear": straight
   lines between step centres, so boundaries are not quantised to one step),
2. median filter over time (window in seconds, rounded to an odd number of working frames),
3. binarise: `score > threshold` (strict, as DCASE), or hysteresis (start above `onset`, stay above `offset`),
4. contiguous active regions -> events,
5. drop events shorter than `min_duration_seconds`,
6. merge same-class events separated by a gap <= `min_gap_seconds`,
7. clip to the audio duration.

`EventStream` does the same over scores that arrive block by block (the pipeline's long recordings), keeping only
the context each stage needs.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
from scipy.ndimage import median_filter

PerClass = Union[float, Sequence[float], Mapping[str, float]]
TIME_DECIMALS = 6
DEFAULT_LINEAR_FACTOR = 5  # odd, so step centres (the original values) are on the grid; 62.5 ms for HTS-AT
# Working frames x classes that `frames_to_events` takes in one pass: all 527 classes of a clip or a few minutes, and
# float64 copies of at most 32 MiB each for a long recording (an hour is 11,520 steps).
PASS_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------------------------------ validation
def _check_scores(scores: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (frames, classes), got shape {scores.shape}.")
    if labels is not None and len(labels) != scores.shape[1]:
        raise ValueError(f"Got {len(labels)} labels for {scores.shape[1]} score columns; they must match.")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}.")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values.")
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError(
            f"scores must be probabilities in [0, 1] (got {scores.min():.4g}..{scores.max():.4g}); "
            "turn logits into scores first (`htsat_hf.scores.logits_to_scores`: sigmoid or softmax as the model's "
            "problem_type says)."
        )
    return scores


def check_number(value: object, what: str) -> float:
    """`value` as a float, or a ValueError naming the setting when it is not a real number (a string, a bool, None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{what} must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


def _check_probability(value: float, what: str) -> float:
    value = check_number(value, what)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}.")
    return value


def check_seconds(value: float, what: str) -> float:
    """A duration setting: a finite number >= 0 (NaN and infinity are refused: they would silently drop or keep
    every event)."""
    value = check_number(value, what)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value}.")
    return value


def per_class_settings(value: PerClass | None, what: str) -> list:
    """The values of a scalar, per-class sequence or {label: value} setting (labels are checked against the model's
    where they are known, in `per_class_values`)."""
    if value is None or np.isscalar(value):
        return [value]
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (Sequence, np.ndarray)):
        return list(value)
    raise ValueError(f"{what} must be a number, a list with one value per label or a {{label: value}} dict, got "
                     f"{type(value).__name__}.")


def check_event_settings(
    threshold: PerClass = 0.5,
    median_filter_seconds: float | Sequence[float] | Mapping[str, float] | None = None,
    min_duration_seconds: float = 0.0,
    min_gap_seconds: float = 0.0,
    hysteresis: tuple[float, float] | None = None,
    upsample: str = "repeat",
    upsample_factor: int | None = None,
) -> None:
    """Checks the post-processing settings of `frames_to_events` that do not depend on the labels: a ValueError
    naming the setting when one is of the wrong type or out of range. `EventSettings` runs it when made, and
    `EventFrames.create` when resolved."""
    if threshold is not None:  # None: the default, 0.5
        for value in per_class_settings(threshold, "threshold"):
            _check_probability(value, "threshold")
    for value in per_class_settings(median_filter_seconds, "median_filter_seconds"):
        if value is not None:
            check_seconds(value, "median_filter_seconds")
    check_seconds(min_duration_seconds, "min_duration_seconds")
    check_seconds(min_gap_seconds, "min_gap_seconds")
    if hysteresis is not None:
        _check_hysteresis(hysteresis)
    if not isinstance(upsample, str) or upsample not in ("repeat", "linear"):
        raise ValueError(f'upsample must be "repeat" or "linear", got {upsample!r}.')
    if upsample_factor is not None:
        factor = check_number(upsample_factor, "upsample_factor")
        if not (math.isfinite(factor) and factor == int(factor) and factor >= 1):
            raise ValueError(f"upsample_factor must be a positive integer, got {upsample_factor}.")


def per_class_values(value: PerClass | None, labels: Sequence[str], what: str, default: float | None) -> list:
    """Expands a scalar, a per-class sequence or a {label: value} dict (missing labels -> `default`) to a list."""
    if value is None or np.isscalar(value):
        return [value if value is not None else default] * len(labels)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(labels))
        if unknown:
            raise ValueError(f"{what} names unknown labels {unknown}; known labels: {list(labels)}.")
        return [value.get(label, default) for label in labels]
    values = list(value)
    if len(values) != len(labels):
        raise ValueError(f"{what} has {len(values)} values for {len(labels)} labels; give one per label.")
    return values


# ------------------------------------------------------------------------------------------------ time grid
def upsample_scores(scores: np.ndarray, factor: int, mode: str = "repeat") -> np.ndarray:
    """Upsamples (frames, ...) step scores by an integer factor along time.

    "repeat" holds each step constant; "linear" interpolates between step centres and holds the first and last
    half step constant, so the output covers exactly the same time span.
    """
    if mode not in ("repeat", "linear"):
        raise ValueError(f'upsample must be "repeat" or "linear", got {mode!r}.')
    if int(factor) != factor or factor < 1:
        raise ValueError(f"upsample_factor must be a positive integer, got {factor}.")
    factor = int(factor)
    if factor == 1 or len(scores) == 0:
        return scores
    if mode == "repeat":
        return np.repeat(scores, factor, axis=0)
    num_steps = len(scores)
    step_centres = np.arange(num_steps) + 0.5
    fine_centres = (np.arange(num_steps * factor) + 0.5) / factor
    columns = interpolate_columns(fine_centres, step_centres, scores.reshape(num_steps, -1))
    return columns.reshape((num_steps * factor,) + scores.shape[1:])


def interpolate_columns(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """`np.interp(x, xp, fp[:, k])` for every column k of `fp` (len(xp), k) at once, with the same arithmetic (the
    same values to the last bit): held constant outside `xp`, exact at its points, straight lines in between."""
    x, xp, fp = np.asarray(x, np.float64), np.asarray(xp, np.float64), np.asarray(fp, np.float64)
    if len(xp) == 1 or len(x) == 0:
        return np.repeat(fp[:1], len(x), axis=0)
    left = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)  # xp[left] <= x < xp[left + 1] inside
    slopes = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])[:, None]
    values = slopes[left] * (x - xp[left])[:, None] + fp[left]
    at_point = x == xp[left]
    values[at_point] = fp[left[at_point]]
    values[x <= xp[0]] = fp[0]
    values[x >= xp[-1]] = fp[-1]
    return values


def median_window_frames(seconds: float | None, frame_seconds: float) -> int:
    """Median-filter length in frames: `seconds / frame_seconds` rounded, made odd; 1 means no filtering."""
    if seconds is None:
        return 1
    if seconds < 0:
        raise ValueError(f"median_filter_seconds must be >= 0, got {seconds}.")
    frames = int(round(seconds / frame_seconds))
    return max(1, frames + 1 - frames % 2)


def apply_median_filter(scores: np.ndarray, window_frames: Sequence[int]) -> np.ndarray:
    """Median filter along time with a per-class window (frames; 1 = unchanged), scipy 'reflect' edges as DCASE.
    Classes that share a window length are filtered together (a (window, 1) footprint: each column on its own)."""
    filtered = np.array(scores, dtype=np.float64, copy=True)
    if not len(filtered):
        return filtered
    windows = np.asarray(window_frames, dtype=np.int64)
    for window in np.unique(windows[windows > 1]):
        columns = np.flatnonzero(windows == window)
        filtered[:, columns] = median_filter(filtered[:, columns], size=(int(window), 1), mode="reflect")
    return filtered


# ------------------------------------------------------------------------------------------------ regions
def contiguous_regions(active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and end (exclusive) indices of the runs of True in a 1-D boolean array."""
    padded = np.concatenate(([False], np.asarray(active, dtype=bool), [False]))
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    return changes[0::2], changes[1::2]


def class_regions(
    frames: np.ndarray, thresholds: Sequence[float], hysteresis: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active regions of all classes of (frames, classes) scores at once: `score > threshold`, or with hysteresis the
    runs above `offset` that contain a value above `onset`. Returns the scores laid out class after class, each class
    followed by one inactive frame (-1) so that no region runs into the next class, and the start (inclusive) and end
    (exclusive) of each region in that layout, in class then time order."""
    num_frames, num_classes = frames.shape
    laid_out = np.full((num_classes, num_frames + 1), -1.0)
    laid_out[:, :num_frames] = frames.T
    level = hysteresis[1] if hysteresis is not None else np.asarray(thresholds, dtype=np.float64)[:, None]
    starts, ends = contiguous_regions((laid_out > level).ravel())
    laid_out = laid_out.ravel()
    if hysteresis is not None and len(starts):
        # reduceat over [start_i, start_{i+1}) also sees inactive frames, all <= offset <= onset threshold
        keep = np.maximum.reduceat(laid_out, starts) > hysteresis[0]
        starts, ends = starts[keep], ends[keep]
    return laid_out, starts, ends


def _drop_short_and_merge(
    classes: np.ndarray, starts: np.ndarray, ends: np.ndarray, min_frames: float, gap_frames: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dcase_util order: first drop regions shorter than `min_frames`, then merge gaps <= `gap_frames` between
    regions of the same class (regions in class, then time order)."""
    keep = (ends - starts) >= min_frames - 1e-9
    classes, starts, ends = classes[keep], starts[keep], ends[keep]
    if gap_frames > 0 and len(starts) > 1:
        apart = (starts[1:] - ends[:-1] > gap_frames + 1e-9) | (classes[1:] != classes[:-1])
        new_event = np.concatenate(([True], apart))
        last_of_event = np.append(np.flatnonzero(new_event)[1:] - 1, len(ends) - 1)
        classes, starts, ends = classes[new_event], starts[new_event], ends[last_of_event]
    return classes, starts, ends


# ------------------------------------------------------------------------------------------------ main API
def frames_to_events(
    scores: np.ndarray,
    step_seconds: float,
    labels: Sequence[str],
    threshold: PerClass = 0.5,
    median_filter_seconds: float | Sequence[float] | Mapping[str, float] | None = None,
    min_duration_seconds: float = 0.0,
    min_gap_seconds: float = 0.0,
    hysteresis: tuple[float, float] | None = None,
    upsample: str = "repeat",
    upsample_factor: int | None = None,
    offset_seconds: float = 0.0,
    duration_seconds: float | None = None,
) -> list[dict]:
    """Turns frame probabilities into events `{"label", "onset", "offset", "score"}` (seconds, sorted by onset).

    Args:
        scores: (frames, classes) probabilities in [0, 1]; frame `i` covers `[i, i + 1) * step_seconds`.
        step_seconds: time step of one input frame (HTS-AT: clip length / 32 per 10-s window).
        labels: one name per score column.
        threshold: scalar, one per class, or `{label: value}` (labels left out use 0.5). Active means `> threshold`.
        median_filter_seconds: median-filter length (scalar, per class, or `{label: seconds}`), None = off.
        min_duration_seconds: events shorter than this are dropped (before merging).
        min_gap_seconds: same-class events separated by at most this are merged (after dropping short ones).
        hysteresis: `(onset, offset)` thresholds (offset <= onset), replacing `threshold`: an event starts where the
            score exceeds `onset` and lasts while it stays above `offset`.
        upsample: "repeat" (hold each step, the original HTS-AT) or "linear" (interpolate between step centres).
        upsample_factor: working frames per input frame; default 1 for "repeat", 5 for "linear".
        offset_seconds: time of the first frame's start in the audio (added to all times).
        duration_seconds: audio duration; offsets are clipped to it and events starting after it dropped.

    The event score is the highest (post-filter) score inside the event.
    """
    scores = _check_scores(scores, labels)
    settings = EventFrames.create(
        step_seconds, labels, threshold, median_filter_seconds, min_duration_seconds, min_gap_seconds, hysteresis,
        upsample, upsample_factor,
    )
    per_pass = max(1, PASS_ELEMENTS // (len(scores) * settings.factor + 1))  # classes whose working frames fit
    found = [_class_events(scores[:, first : first + per_pass], first, settings)
             for first in range(0, scores.shape[1], per_pass)]
    classes, starts, ends, peaks = (np.concatenate(parts) for parts in zip(*found)) if found else ([],) * 4
    if not len(starts):
        return []
    onsets = offset_seconds + starts * settings.frame_seconds
    offsets = offset_seconds + ends * settings.frame_seconds
    if duration_seconds is not None:
        inside = onsets < duration_seconds
        classes, onsets, offsets, peaks = classes[inside], onsets[inside], offsets[inside], peaks[inside]
        offsets = np.minimum(offsets, duration_seconds)
    onsets = [round(onset, TIME_DECIMALS) for onset in onsets.tolist()]
    offsets = [round(offset, TIME_DECIMALS) for offset in offsets.tolist()]
    label_rank = _label_rank(labels)[classes]
    order = np.lexsort((label_rank, onsets))  # stable: as `sorted_events` orders them
    classes, peaks = classes.tolist(), peaks.tolist()
    return [
        {"label": labels[classes[i]], "onset": onsets[i], "offset": offsets[i], "score": peaks[i]}
        for i in order.tolist()
    ]


def _class_events(scores: np.ndarray, first_class: int, settings: EventFrames
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-6 for the classes `first_class ...` of `scores`' columns: (class, start, end, peak) per event, start and
    end in working frames, in class then time order."""
    chosen = slice(first_class, first_class + scores.shape[1])
    frames = upsample_scores(scores, settings.factor, settings.upsample)
    frames = apply_median_filter(frames, settings.median_windows[chosen])
    laid_out, starts, ends = class_regions(frames, settings.thresholds[chosen], settings.hysteresis)
    classes = starts // (len(frames) + 1)
    classes, starts, ends = _drop_short_and_merge(classes, starts, ends, settings.min_frames, settings.gap_frames)
    if not len(starts):
        return classes + first_class, starts, ends, np.zeros(0)
    peaks = np.maximum.reduceat(laid_out, np.stack([starts, ends], axis=1).ravel())[::2]  # max over [start, end)
    row_start = classes * (len(frames) + 1)
    return classes + first_class, starts - row_start, ends - row_start, peaks


def _label_rank(labels: Sequence[str]) -> np.ndarray:
    """Each class's place in the event order among events with the same onset (a repeated label: its last place)."""
    place = {label: k for k, label in enumerate(labels)}
    return np.array([place[label] for label in labels], dtype=np.int64)


def sorted_events(events: list[dict | None], labels: Sequence[str]) -> list[dict]:
    """Drops the None entries (events past the audio's end); sorts by onset, then by label order."""
    order = dict(zip(labels, _label_rank(labels).tolist()))
    events = [event for event in events if event is not None]
    events.sort(key=lambda event: (event["onset"], order[event["label"]]))
    return events


EVENT_SETTING_NAMES = (
    "threshold", "median_filter_seconds", "min_duration_seconds", "min_gap_seconds", "hysteresis", "upsample",
    "upsample_factor",
)


@dataclass(frozen=True)
class EventFrames:
    """`EventSettings` resolved for one score grid and label list: validated, per class, durations in working frames
    (what `frames_to_events` and `EventStream` run on)."""

    upsample: str  # "repeat" or "linear"
    factor: int  # working frames per score step
    frame_seconds: float
    thresholds: list[float]
    hysteresis: tuple[float, float] | None
    median_windows: list[int]  # per class, odd, in working frames
    min_frames: float
    gap_frames: float

    @classmethod
    def create(
        cls,
        step_seconds: float,
        labels: Sequence[str],
        threshold: PerClass = 0.5,
        median_filter_seconds: float | Sequence[float] | Mapping[str, float] | None = None,
        min_duration_seconds: float = 0.0,
        min_gap_seconds: float = 0.0,
        hysteresis: tuple[float, float] | None = None,
        upsample: str = "repeat",
        upsample_factor: int | None = None,
    ) -> EventFrames:
        step = check_number(step_seconds, "step_seconds")
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"step_seconds must be a finite number > 0, got {step_seconds}.")
        check_event_settings(threshold, median_filter_seconds, min_duration_seconds, min_gap_seconds, hysteresis,
                             upsample, upsample_factor)
        thresholds = [_check_probability(t, "threshold") for t in per_class_values(threshold, labels, "threshold", 0.5)]
        if hysteresis is not None:
            hysteresis = _check_hysteresis(hysteresis)
        factor = upsample_factor if upsample_factor is not None else (1 if upsample == "repeat" else DEFAULT_LINEAR_FACTOR)
        frame_seconds = step / int(factor)
        medians = per_class_values(median_filter_seconds, labels, "median_filter_seconds", None)
        return cls(
            upsample=upsample,
            factor=int(factor),
            frame_seconds=frame_seconds,
            thresholds=thresholds,
            hysteresis=hysteresis,
            median_windows=[median_window_frames(seconds, frame_seconds) for seconds in medians],
            min_frames=min_duration_seconds / frame_seconds,
            gap_frames=min_gap_seconds / frame_seconds,
        )


@dataclass(frozen=True)
class EventSettings:
    """
    How frame scores become events: the one settings object of every entry point (the SED pipeline, `Annotator`,
    `LiveDetector`, `EventStream`, and the `--threshold ...` flags of `htsat-hf detect|annotate|listen`, read by
    `add_event_arguments` + `EventSettings.from_arguments`). Checked when made (a ValueError naming the setting);
    checked against the labels, and turned into working frames, by `resolve`.

        settings = EventSettings(threshold=0.3, median_filter_seconds=0.5)
        pipeline("sound-event-detection", model=folder, event_settings=settings)
        Annotator(folder, event_settings=settings); LiveDetector(folder, event_settings=settings)
        frames_to_events(scores, step_seconds, labels, **settings.keywords())

    Fields: the post-processing keywords of `frames_to_events` (threshold: number, per-class list or {label: value};
    median_filter_seconds: the same or None; min_duration_seconds; min_gap_seconds; hysteresis (onset, offset);
    upsample "repeat" or "linear"; upsample_factor).
    """

    threshold: PerClass = 0.5
    median_filter_seconds: float | Sequence[float] | Mapping[str, float] | None = None
    min_duration_seconds: float = 0.0
    min_gap_seconds: float = 0.0
    hysteresis: tuple[float, float] | None = None
    upsample: str = "repeat"
    upsample_factor: int | None = None

    def __post_init__(self):
        if self.threshold is None:
            object.__setattr__(self, "threshold", 0.5)
        if isinstance(self.hysteresis, list):  # e.g. read from JSON
            object.__setattr__(self, "hysteresis", tuple(self.hysteresis))
        check_event_settings(**self.keywords())

    @classmethod
    def merged(cls, base: EventSettings | None = None, **keywords: Any) -> EventSettings:
        """`base` (default: the defaults) with the keywords given (not None) in place of its fields: how the
        pipelines, `Annotator` and `LiveDetector` combine `event_settings=` with their individual keywords."""
        if base is not None and not isinstance(base, EventSettings):
            raise TypeError(f"event_settings must be an EventSettings, got {type(base).__name__}.")
        unknown = set(keywords) - set(EVENT_SETTING_NAMES)
        if unknown:
            raise TypeError(f"unknown event settings {sorted(unknown)}; known: {list(EVENT_SETTING_NAMES)}.")
        given = {key: value for key, value in keywords.items() if value is not None}
        return replace(base, **given) if base is not None else cls(**given)

    def keywords(self) -> dict[str, Any]:
        """The settings as the keyword arguments of `frames_to_events`, `EventStream` and the pipeline."""
        return {name: getattr(self, name) for name in EVENT_SETTING_NAMES}

    def resolve(self, step_seconds: float, labels: Sequence[str]) -> EventFrames:
        """The settings for a grid of `step_seconds` and these labels (a ValueError when a setting names a label
        that is not among them, or has one value per label and the wrong count)."""
        return EventFrames.create(step_seconds, labels, **self.keywords())

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> EventSettings:
        """The settings the flags of `add_event_arguments` give (a ValueError naming the setting when one is bad;
        `check_event_arguments` reports it as the flag's usage error instead)."""
        return cls(
            threshold=args.threshold,
            median_filter_seconds=args.median_filter,
            min_duration_seconds=args.min_duration,
            min_gap_seconds=args.min_gap,
            hysteresis=tuple(args.hysteresis) if args.hysteresis else None,
            upsample=args.upsample,
        )


class EventStream:
    """
    `frames_to_events` over scores that arrive block by block, in time order: the same events, with memory that does
    not grow with the recording (a few working frames of context per class, plus the events found).

        stream = EventStream(step_seconds, labels, threshold=0.3, median_filter_seconds=0.5)
        for block in blocks:  # (steps, classes) probabilities, consecutive
            stream.push(block)
        events = stream.finish(duration_seconds)

    Each stage keeps only the context it needs: "linear" upsampling one step on each side, the median filter half
    its longest window on each side (its 'reflect' edges are the recording's own ends), and per class the open active
    region and the last event, which a later region within `min_gap_seconds` may still extend.
    """

    def __init__(self, step_seconds: float, labels: Sequence[str], offset_seconds: float = 0.0, **settings):
        """`settings`: the post-processing keywords of `frames_to_events` (threshold ... upsample_factor)."""
        self.labels = list(labels)
        self.settings = EventFrames.create(step_seconds, self.labels, **settings)
        self.offset_seconds = offset_seconds
        self.halo = max(self.settings.median_windows) // 2  # filter context on each side, in working frames
        classes = len(self.labels)
        self.steps = np.zeros((0, classes))  # received steps not yet upsampled (and one before them, for "linear")
        self.steps_start = 0  # global index of self.steps[0]
        self.next_step = 0  # first step not yet upsampled
        self.frames = np.zeros((0, classes))  # upsampled frames: filter context and frames not yet filtered
        self.frames_start = 0
        self.next_frame = 0  # first frame not yet filtered
        self.regions = [_RegionTracker(self.settings, k) for k in range(classes)]
        self.finished = False

    def push(self, scores: np.ndarray) -> None:
        """Adds the next (steps, classes) probabilities."""
        if self.finished:
            raise RuntimeError("This EventStream is finished; start a new one.")
        scores = _check_scores(scores, self.labels).astype(np.float64)
        self.steps = np.concatenate([self.steps, scores])
        self._advance(final=False)

    def finish(self, duration_seconds: float | None = None) -> list[dict]:
        """Ends the stream; returns every event, sorted by onset (offsets clipped to `duration_seconds`)."""
        if not self.finished:
            self._advance(final=True)
            self.finished = True
        events = []
        for k, label in enumerate(self.labels):
            for start, end, score in self.regions[k].finish(self.next_frame):
                events.append(_make_event(label, start, end, score, self.settings.frame_seconds, self.offset_seconds,
                                          duration_seconds))
        return sorted_events(events, self.labels)

    def pop_final_events(self) -> list[dict]:
        """The events found so far that nothing later can change (ended, and too far back for a later event to merge
        with), sorted by onset; they are handed out once and not kept, so a live stream's memory stays flat.
        `finish` then returns only the events not handed out yet."""
        events = []
        for k, label in enumerate(self.labels):
            for start, end, score in self.regions[k].pop_final():
                events.append(_make_event(label, start, end, score, self.settings.frame_seconds, self.offset_seconds,
                                          None))
        return sorted_events(events, self.labels)

    # ------------------------------------------------------------------------------------------------ stages
    def _advance(self, final: bool) -> None:
        total_steps = self.steps_start + len(self.steps)
        # "linear" frames of step i interpolate towards step i + 1: wait for it unless the stream has ended
        ready = total_steps if (final or self.settings.upsample == "repeat") else total_steps - 1
        if ready > self.next_step:
            self.frames = np.concatenate([self.frames, self._upsample(self.next_step, ready, total_steps)])
            self.next_step = ready
            keep_from = max(self.steps_start, ready - 1)  # one step of look-behind for "linear"
            self.steps, self.steps_start = self.steps[keep_from - self.steps_start :], keep_from
        frames_end = self.frames_start + len(self.frames)
        ready_frames = frames_end if final else frames_end - self.halo
        if ready_frames > self.next_frame:
            filtered = self._median_filter(self.next_frame, ready_frames)
            for k, tracker in enumerate(self.regions):
                tracker.add(filtered[:, k], self.next_frame)
            self.next_frame = ready_frames
            keep_from = max(self.frames_start, ready_frames - self.halo)
            self.frames, self.frames_start = self.frames[keep_from - self.frames_start :], keep_from

    def _upsample(self, first: int, last: int, total_steps: int) -> np.ndarray:
        """Working frames of steps [first, last), equal to `upsample_scores` over the whole recording."""
        factor = self.settings.factor
        local = self.steps[first - self.steps_start : last - self.steps_start]
        if self.settings.upsample == "repeat" or factor == 1:
            return np.repeat(local, factor, axis=0)
        known = self.steps  # steps_start .. total_steps - 1: one before `first` and (unless final) one after `last`
        centres = np.arange(self.steps_start, total_steps) + 0.5
        fine = (np.arange(first * factor, last * factor) + 0.5) / factor
        return interpolate_columns(fine, centres, known)

    def _median_filter(self, first: int, last: int) -> np.ndarray:
        """Filtered frames [first, last): each class's window sees real frames, or the recording's reflected ends."""
        start = max(self.frames_start, first - self.halo)
        context = self.frames[start - self.frames_start :]  # ends at the last frame received
        filtered = apply_median_filter(context, self.settings.median_windows)
        return filtered[first - start : last - start]


class _RegionTracker:
    """One class's events over filtered frames that arrive in order, as `frames_to_events` finds them in the whole
    column: runs above the threshold (or above the hysteresis offset, kept if they pass the onset), short ones
    dropped, then merged across gaps of at most `gap_frames`. An event's score is the max over its whole span."""

    def __init__(self, settings: EventFrames, k: int):
        hysteresis = settings.hysteresis
        self.level = hysteresis[1] if hysteresis else settings.thresholds[k]  # active while above this
        self.keep_level = hysteresis[0] if hysteresis else settings.thresholds[k]  # kept if it ever exceeds this
        self.min_frames, self.gap_frames = settings.min_frames, settings.gap_frames
        self.open_run: tuple[int, float] | None = None  # (start, max so far) of a run active at the last frame seen
        self.pending: list | None = None  # [start, end, score] of the last kept event: a later run may extend it
        self.after_pending = -np.inf  # max over frames [pending end, noted_upto)
        self.noted_upto = 0
        self.events: list[tuple[int, int, float]] = []

    def add(self, column: np.ndarray, first: int) -> None:
        """column: the filtered values of frames [first, first + len(column))."""
        starts, ends = contiguous_regions(column > self.level)
        if self.open_run is not None and (len(starts) == 0 or starts[0] != 0):  # it ended with the last block
            self._close(*self.open_run, end=first, column=column, first=first)
            self.open_run = None
        for start, end in zip(starts, ends):
            run_start, run_max = first + start, column[start:end].max()
            if start == 0 and self.open_run is not None:  # the run carried over from the last block goes on
                run_start, run_max = self.open_run[0], max(self.open_run[1], run_max)
                self.open_run = None
            if end == len(column):  # active up to the last frame seen: decided later
                self.open_run = (run_start, run_max)
            else:
                self._close(run_start, run_max, end=first + end, column=column, first=first)
        self._note(column, first, first + len(column))

    def finish(self, total_frames: int) -> list[tuple[int, int, float]]:
        if self.open_run is not None:
            self._close(*self.open_run, end=total_frames, column=np.zeros(0), first=total_frames)
            self.open_run = None
        if self.pending is not None:
            self.events.append(tuple(self.pending))
            self.pending = None
        return self.events

    def pop_final(self) -> list[tuple[int, int, float]]:
        """Hands out the closed events; the last one too once no run can still merge with it: a later run starts at
        `noted_upto` at the earliest (or at the open run's start), and merges only within `gap_frames`."""
        if self.pending is not None:
            next_start = self.open_run[0] if self.open_run is not None else self.noted_upto
            if self.gap_frames <= 0 or next_start - self.pending[1] > self.gap_frames + 1e-9:
                self.events.append(tuple(self.pending))
                self.pending = None
        events, self.events = self.events, []
        return events

    def _close(self, start: int, run_max: float, end: int, column: np.ndarray, first: int) -> None:
        """The run [start, end) has ended: keep it if it passed the keep level and is long enough, then merge."""
        if not (run_max > self.keep_level and (end - start) >= self.min_frames - 1e-9):
            return
        pending = self.pending
        if pending is not None and self.gap_frames > 0 and start - pending[1] <= self.gap_frames + 1e-9:
            self._note(column, first, end)  # the gap and the run: [pending end, end)
            pending[1], pending[2] = end, max(pending[2], self.after_pending)
        else:
            if pending is not None:
                self.events.append(tuple(pending))
            self.pending = [start, end, run_max]
        self.after_pending, self.noted_upto = -np.inf, end

    def _note(self, column: np.ndarray, first: int, upto: int) -> None:
        """Folds the frames [noted_upto, upto) of this block (they follow the pending event) into `after_pending`."""
        if self.pending is not None and upto > self.noted_upto:
            low = max(self.noted_upto, first) - first
            if upto - first > low:
                self.after_pending = max(self.after_pending, column[low : upto - first].max())
        self.noted_upto = max(self.noted_upto, upto)


def _check_hysteresis(hysteresis: Sequence[float]) -> tuple[float, float]:
    pair = isinstance(hysteresis, (Sequence, np.ndarray)) and not isinstance(hysteresis, (str, bytes))
    if not pair or len(hysteresis) != 2:
        raise ValueError(f"hysteresis must be (onset, offset) thresholds, got {hysteresis!r}.")
    onset_threshold = _check_probability(hysteresis[0], "hysteresis onset threshold")
    offset_threshold = _check_probability(hysteresis[1], "hysteresis offset threshold")
    if offset_threshold > onset_threshold:
        raise ValueError(
            f"hysteresis offset threshold {offset_threshold} must be <= onset threshold {onset_threshold}."
        )
    return onset_threshold, offset_threshold


def _make_event(label, start, end, score, frame_seconds, offset_seconds, duration_seconds) -> dict | None:
    onset = offset_seconds + start * frame_seconds
    offset = offset_seconds + end * frame_seconds
    if duration_seconds is not None:
        if onset >= duration_seconds:
            return None
        offset = min(offset, duration_seconds)
    return {
        "label": label,
        "onset": round(float(onset), TIME_DECIMALS),
        "offset": round(float(offset), TIME_DECIMALS),
        "score": float(score),
    }


# ------------------------------------------------------------------------------------------------ label mapping
def resolve_label_mapping(
    mapping: Mapping[str, Sequence[int | str]], source_labels: Sequence[str]
) -> dict[str, list[int]]:
    """Resolves a {target: [source names or indices]} mapping to source column indices, with clear errors."""
    index_of = {label: i for i, label in enumerate(source_labels)}
    resolved, unknown = {}, []
    for target, group in mapping.items():
        if isinstance(group, (str, int)):
            group = [group]
        if len(group) == 0:
            raise ValueError(f"Label mapping for {target!r} is empty.")
        indices = []
        for source in group:
            if isinstance(source, (bool, np.bool_)):
                raise ValueError(f"Label mapping for {target!r}: {source!r} is neither a label name nor an index.")
            if isinstance(source, (int, np.integer)):
                if not 0 <= source < len(source_labels):
                    raise ValueError(
                        f"Label mapping for {target!r}: index {source} is outside 0..{len(source_labels) - 1}."
                    )
                indices.append(int(source))
            elif source in index_of:
                indices.append(index_of[source])
            else:
                unknown.append(str(source))
        resolved[str(target)] = sorted(set(indices))
    if unknown:
        raise ValueError(f"Label mapping names labels the model does not have: {sorted(set(unknown))}.")
    return resolved


def map_scores(
    scores: np.ndarray,
    mapping: Mapping[str, Sequence[int | str]],
    source_labels: Sequence[str],
    exclusive: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """(frames, source classes) -> (frames, target classes), each target from its source group's scores.

    Independent (multi-label, sigmoid) scores: the max over the group, so a target class is active whenever any of its
    source classes is (e.g. DESED "Dog" from AudioSet "Dog", "Bark", ...). `exclusive` (single-label, softmax) scores:
    the sum over the group, the probability that the step belongs to any of its classes (capped at 1 against
    rounding); the max would understate a group whose members share the probability. Targets keep the mapping's order.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (frames, classes), got shape {scores.shape}.")
    if len(source_labels) != scores.shape[1]:
        raise ValueError(f"Got {len(source_labels)} source labels for {scores.shape[1]} score columns.")
    resolved = resolve_label_mapping(mapping, source_labels)
    if not resolved:
        raise ValueError("Label mapping is empty.")
    target_labels = list(resolved)
    if exclusive:
        mapped = np.stack([np.minimum(scores[:, resolved[t]].sum(axis=1), 1) for t in target_labels], axis=1)
    else:
        mapped = np.stack([scores[:, resolved[t]].max(axis=1) for t in target_labels], axis=1)
    return mapped, target_labels


def load_label_mapping(path: str | Path) -> dict[str, list[int | str]]:
    """Reads a {target label: [source label names or indices]} mapping from JSON (or YAML when PyYAML is installed)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON.") from error
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping {{target label: [source labels]}}, got {type(data).__name__}.")
    mapping = {}
    for target, group in data.items():
        group = [group] if isinstance(group, (str, int)) else group
        if not isinstance(group, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in group):
            raise ValueError(f"{path}: the entry for {target!r} must be a list of label names or indices.")
        mapping[str(target)] = list(group)
    return mapping


def label_mapping_from(value: Any) -> dict[str, list[int | str]] | None:
    """A `label_mapping` argument as every entry point takes it: None, a dict {new label: [model labels]}, or the path
    (`str` or `os.PathLike`) of a JSON/YAML file of one (`load_label_mapping`); anything else is a ValueError."""
    if value is None or isinstance(value, dict):
        return None if value is None else dict(value)
    if isinstance(value, (str, os.PathLike)):
        return load_label_mapping(value)
    raise ValueError(f"label_mapping must be a dict {{new label: [model labels]}} or the path of a JSON/YAML file of "
                     f"one, got {type(value).__name__}.")


# ------------------------------------------------------------------------------------------- command-line flags
def parse_threshold(text: str) -> float | dict:
    """A command-line threshold: a number, or a JSON object {label: threshold}."""
    return json.loads(text) if text.strip().startswith("{") else float(text)


def whole_number_at_least(lowest: int):
    """An argparse type: a command-line whole number >= `lowest` (anything else is a usage error naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lowest}, got {value}")
        return value

    parse.__name__ = f"whole number >= {lowest}"
    return parse


positive_int = whole_number_at_least(1)
non_negative_int = whole_number_at_least(0)


def seconds(text: str) -> float:
    """A command-line duration: a finite number of seconds >= 0."""
    try:
        return check_seconds(float(text), "seconds")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}") from None


EVENT_FLAGS = {
    "threshold": "--threshold", "hysteresis": "--hysteresis", "median_filter_seconds": "--median-filter",
    "min_duration_seconds": "--min-duration", "min_gap_seconds": "--min-gap", "upsample": "--upsample",
}


def add_event_arguments(parser) -> None:
    """The event flags of `htsat-hf detect`, `annotate` and `listen` (read them with `check_event_arguments` or
    `EventSettings.from_arguments`), and `--label-mapping`."""
    defaults = EventSettings()
    parser.add_argument("--threshold", type=parse_threshold, default=defaults.threshold,
                        help="number or JSON {label: threshold}")
    parser.add_argument("--hysteresis", type=float, nargs=2, metavar=("ONSET", "OFFSET"))
    parser.add_argument("--median-filter", type=seconds, help="median filter length in seconds")
    parser.add_argument("--min-duration", type=seconds, default=defaults.min_duration_seconds,
                        help="drop events shorter than this (s)")
    parser.add_argument("--min-gap", type=seconds, default=defaults.min_gap_seconds,
                        help="merge same-class events closer than this (s)")
    parser.add_argument("--upsample", choices=["repeat", "linear"], default=defaults.upsample)
    parser.add_argument("--label-mapping", help="JSON/YAML mapping of new labels to groups of the model's labels")


def check_event_arguments(parser, args) -> EventSettings:
    """The `EventSettings` of the flags of `add_event_arguments`, and the label mapping read, before any work: a bad
    one is `parser.error` (exit status 2) naming its flag."""
    values = {
        "threshold": args.threshold, "hysteresis": tuple(args.hysteresis) if args.hysteresis else None,
        "median_filter_seconds": args.median_filter, "min_duration_seconds": args.min_duration,
        "min_gap_seconds": args.min_gap, "upsample": args.upsample,
    }
    for key, flag in EVENT_FLAGS.items():
        try:
            check_event_settings(**{key: values[key]})
        except ValueError as error:
            parser.error(f"argument {flag}: {error}")
    if args.label_mapping is not None:
        try:
            load_label_mapping(args.label_mapping)
        except (OSError, ValueError) as error:
            parser.error(f"argument --label-mapping: {error}")
    try:
        return EventSettings.from_arguments(args)
    except ValueError as error:  # a combination no single flag makes wrong
        parser.error(str(error))
