"""DCASE task 4 sound event detection metrics in numpy: intersection-based F1, collar-based F1, segment-based F1
and PSDS, with readers for the DESED TSV formats.

The definitions follow the reference tools, and the tests reproduce their numbers on DESED:

- intersection F1 and PSDS: psds_eval (Bilen et al., ICASSP 2020). A detection passes the detection tolerance
  criterion (DTC) when the fraction of it covered by same-class ground truth is >= dtc; a ground-truth event is hit
  when the DTC-passing detections of its class cover a fraction >= gtc of it. TP = hit ground-truth events,
  FP = detections failing the DTC (cross-triggers included), FN = missed ground-truth events. Cross-triggers
  (detections failing the DTC that overlap another class's ground truth by a fraction >= cttc) only enter PSDS
  through `alpha_ct`.
- collar F1: sed_eval's event-based metric with optimal (maximum bipartite) matching: onset within
  `onset_collar`, offset within max(`offset_collar`, `offset_collar_rate` * reference length); times are rounded
  to 6 decimals (as sed_scores_eval) so that a 0.2-s shift is not lost to float error.
- segment F1: sed_eval's segment-based metric: an event marks the segments from floor(onset / length) to
  ceil(offset / length).

F-scores are fractions in [0, 1]. Per-class collar/segment F1 is 0 for a class with neither references nor
detections (sed_eval); per-class intersection F1 is NaN there and left out of the macro mean (psds_eval).
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from ..sed_postprocessing import contiguous_regions

EventsLike = Union[pd.DataFrame, str, Path, Sequence[Mapping[str, Any]]]
DurationsLike = Union[pd.DataFrame, pd.Series, Mapping[str, float], str, Path]
EVENT_COLUMNS = ("filename", "onset", "offset", "event_label")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif")
TIME_DECIMALS = 6
LINE_COLUMN = "__line__"
RATIO_TOLERANCE = 1e-9  # an exact 0.5 coverage computed as 0.4999999999999993 still passes a 0.5 criterion
DCASE_THRESHOLDS = tuple(np.round(np.arange(0.01, 1.0, 0.02), 2).tolist())
SECONDS_PER_UNIT = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=0.3, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0)


# ================================================================================================= reading
def read_table(path: str | Path) -> pd.DataFrame:
    """Reads a TSV (or CSV, when the header has commas and no tabs) as strings; short rows are padded with ''."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found.")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text table ({error}).") from error
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header line).")
    separator = "," if "\t" not in lines[0] and "," in lines[0] else "\t"
    header, *rows = csv.reader(lines, delimiter=separator)
    width = len(header)
    body, numbers = [], []
    for number, row in enumerate(rows, start=2):
        if not any(field.strip() for field in row):
            continue  # blank line
        if len(row) > width:
            raise ValueError(f"{path}, line {number}: {len(row)} fields but the header has {width}.")
        body.append(row + [""] * (width - len(row)))
        numbers.append(number)
    frame = pd.DataFrame(body, columns=[name.strip() for name in header], dtype=object)
    frame[LINE_COLUMN] = np.array(numbers, dtype=np.int64)
    return frame


def _row_names(frame: pd.DataFrame, from_file: bool) -> np.ndarray:
    """Human row references: file line numbers (header = line 1) or 1-based DataFrame rows."""
    if from_file and LINE_COLUMN in frame.columns:
        return frame[LINE_COLUMN].to_numpy()
    return np.arange(len(frame)) + 1


def _where(source: str, from_file: bool, row: int) -> str:
    return f"{source}, {'line' if from_file else 'row'} {row}"


def _as_frame(data: Any, name: str) -> tuple[pd.DataFrame, str, bool]:
    """Table, the name to use in error messages, and whether rows are file lines."""
    if isinstance(data, (str, Path)):
        return read_table(data), str(data), True
    if isinstance(data, pd.DataFrame):
        frame = data.reset_index(drop=True)
        if "event_label" not in frame.columns and "label" in frame.columns:
            frame = frame.rename(columns={"label": "event_label"})
        return frame, name, False
    if isinstance(data, Iterable):
        records = list(data)
        frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(EVENT_COLUMNS))
        if "event_label" not in frame.columns and "label" in frame.columns:
            frame = frame.rename(columns={"label": "event_label"})
        return frame, name, False
    raise ValueError(f"{name}: expected a path, a DataFrame or a list of event dicts, got {type(data).__name__}.")


def _numeric(values: pd.Series) -> np.ndarray:
    text = values.astype(str).str.strip()
    return pd.to_numeric(text.where(text != "", None), errors="coerce").to_numpy(dtype=np.float64)


def events_table(
    data: EventsLike, labels: Sequence[str] | None = None, name: str = "events", ground_truth: bool = False
) -> pd.DataFrame:
    """Validated events: columns filename, onset, offset, event_label (None for a file with no events).

    Raises ValueError naming the file and the 1-based line (or row) for missing columns, non-numeric times,
    negative times, onset > offset, labels outside `labels`, and, for ground truth, same-class events that overlap
    or touch.
    """
    frame, source, from_file = _as_frame(data, name)
    missing = [c for c in EVENT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected {list(EVENT_COLUMNS)} (tab-separated).")
    rows = _row_names(frame, from_file)
    filenames = frame["filename"].astype(str).str.strip()
    label_text = frame["event_label"].astype(object).where(frame["event_label"].notna(), "")
    label_text = label_text.astype(str).str.strip()
    has_event = (label_text != "").to_numpy()
    onset, offset = _numeric(frame["onset"]), _numeric(frame["offset"])
    checks = [
        ((filenames == "").to_numpy(), "empty filename"),
        (has_event & ~np.isfinite(onset), "onset is not a number"),
        (has_event & ~np.isfinite(offset), "offset is not a number"),
        (has_event & (onset < 0), "onset is negative"),
        (has_event & (onset > offset), "onset is after offset"),
    ]
    if labels is not None:
        checks.append((has_event & ~label_text.isin(list(labels)).to_numpy(), "unknown event label"))
    for bad, message in checks:
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            detail = f" {label_text.iloc[first]!r} (known: {list(labels)})" if message == "unknown event label" else ""
            raise ValueError(f"{_where(source, from_file, rows[first])}: {message}{detail}.")
    table = pd.DataFrame(
        {
            "filename": filenames.to_numpy(dtype=object),
            "onset": np.where(has_event, onset, np.nan),
            "offset": np.where(has_event, offset, np.nan),
            "event_label": np.where(has_event, label_text.to_numpy(dtype=object), None),
        }
    )
    if ground_truth:
        _check_no_overlaps(table, rows, source, from_file)
    return table


def _check_no_overlaps(table: pd.DataFrame, rows: np.ndarray, source: str, from_file: bool) -> None:
    events = table[table.event_label.notna()]
    order = np.lexsort((events.onset.to_numpy(), events.event_label.to_numpy(str), events.filename.to_numpy(str)))
    events, event_rows = events.iloc[order], rows[events.index.to_numpy()[order]]
    same = (events.filename.to_numpy()[1:] == events.filename.to_numpy()[:-1]) & (
        events.event_label.to_numpy()[1:] == events.event_label.to_numpy()[:-1]
    )
    clash = same & (events.onset.to_numpy()[1:] <= events.offset.to_numpy()[:-1])
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        row = events.iloc[i + 1]
        raise ValueError(
            f"{_where(source, from_file, event_rows[i + 1])}: {row.event_label} event in {row.filename} overlaps or "
            f"touches the one at {'line' if from_file else 'row'} {event_rows[i]}; merge same-class events first."
        )


def read_ground_truth(path: EventsLike, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Ground-truth events (`filename onset offset event_label`; an empty label = a file with no events)."""
    return events_table(path, labels, name="ground truth", ground_truth=True)


def read_predictions(path: EventsLike, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Detected events, same format as the ground truth (extra columns are ignored)."""
    return events_table(path, labels, name="predictions")


def read_durations(data: DurationsLike) -> dict[str, float]:
    """`filename duration` table (path, DataFrame, Series or dict) -> {filename: seconds}."""
    if isinstance(data, pd.Series):
        data = data.to_dict()
    if isinstance(data, Mapping):
        data = pd.DataFrame({"filename": list(data), "duration": list(data.values())})
    frame, source, from_file = _as_frame(data, "durations")
    missing = [c for c in ("filename", "duration") if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected ['filename', 'duration'].")
    rows = _row_names(frame, from_file)
    filenames = frame["filename"].astype(str).str.strip().to_numpy()
    durations = _numeric(frame["duration"])
    bad = ~np.isfinite(durations) | (durations < 0) | (filenames == "")
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{_where(source, from_file, rows[first])}: duration must be a number >= 0 with a filename.")
    result: dict[str, float] = {}
    for filename, duration, row in zip(filenames, durations, rows):
        if filename in result and result[filename] != duration:
            raise ValueError(f"{_where(source, from_file, row)}: {filename} is listed twice with different durations.")
        result[filename] = float(duration)
    return result


def read_operating_points(directory: str | Path, labels: Sequence[str] | None = None) -> dict[float, pd.DataFrame]:
    """Reads a DCASE folder of `predictions_th_<threshold>.tsv` detection files -> {threshold: events}."""
    directory = Path(directory)
    found = {}
    for path in sorted(directory.glob("predictions_th_*.tsv")):
        match = re.fullmatch(r"predictions_th_([0-9.eE+-]+)\.tsv", path.name)
        if match is None:
            continue
        try:
            threshold = float(match.group(1))
        except ValueError:
            continue
        found[threshold] = read_predictions(path, labels)
    if not found:
        raise ValueError(f"{directory}: no predictions_th_<threshold>.tsv files found.")
    return dict(sorted(found.items()))


def read_frame_scores(directory: str | Path) -> dict[str, pd.DataFrame]:
    """Reads sed_scores_eval score files (`<audio_id>.tsv`: `onset offset <class...>`, one row per frame)."""
    directory = Path(directory)
    scores = {}
    for path in sorted(directory.glob("*.tsv")):
        frame = pd.read_csv(path, sep="\t")
        scores[path.name[: -len(".tsv")]] = check_score_frame(frame, str(path))
    if not scores:
        raise ValueError(f"{directory}: no <audio_id>.tsv score files found.")
    return scores


def check_score_frame(frame: pd.DataFrame, source: str = "scores") -> pd.DataFrame:
    """Validates a score table: onset/offset columns, contiguous increasing frames, numeric class scores."""
    if list(frame.columns[:2]) != ["onset", "offset"] or frame.shape[1] < 3:
        raise ValueError(f"{source}: expected columns onset, offset, <class...>; got {list(frame.columns)}.")
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(values).all(axis=1)
    if bad_rows.any():
        raise ValueError(f"{source}, line {int(np.flatnonzero(bad_rows)[0]) + 2}: non-numeric value.")
    onset, offset = values[:, 0], values[:, 1]
    broken = (offset <= onset) | np.concatenate(([False], np.abs(onset[1:] - offset[:-1]) > 1e-6))
    if broken.any():
        raise ValueError(f"{source}, line {int(np.flatnonzero(broken)[0]) + 2}: frames must be contiguous, increasing.")
    return frame


def scores_dataframe(scores: np.ndarray, timestamps: np.ndarray | float, labels: Sequence[str]) -> pd.DataFrame:
    """(frames, classes) scores -> sed_scores_eval table; `timestamps` = frame boundaries (T + 1) or a step in s."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isscalar(timestamps):
        timestamps = np.arange(len(scores) + 1) * float(timestamps)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if scores.ndim != 2 or len(timestamps) != len(scores) + 1 or scores.shape[1] != len(labels):
        raise ValueError("scores must be (frames, classes) with frames + 1 timestamps and one label per class.")
    frame = pd.DataFrame(scores, columns=list(labels))
    frame.insert(0, "offset", timestamps[1:])
    frame.insert(0, "onset", timestamps[:-1])
    return frame


# ================================================================================================= encoding
@dataclass
class EventArrays:
    """Events as parallel arrays: file index, onset, offset (s), class index."""

    file: np.ndarray
    onset: np.ndarray
    offset: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def select(self, mask: np.ndarray) -> EventArrays:
        return EventArrays(self.file[mask], self.onset[mask], self.offset[mask], self.label[mask])


@dataclass
class EvaluationSet:
    """The evaluated files (durations when known), classes and ground truth."""

    files: list[str]
    classes: list[str]
    ground_truth: EventArrays
    durations: np.ndarray | None
    file_index: dict[str, int] = field(default_factory=dict)


def _encode(table: pd.DataFrame, file_index: Mapping[str, int], class_index: Mapping[str, int]) -> EventArrays:
    events = table[table.event_label.notna()]
    return EventArrays(
        file=np.array([file_index[f] for f in events.filename], dtype=np.int64),
        onset=np.round(events.onset.to_numpy(np.float64), TIME_DECIMALS),
        offset=np.round(events.offset.to_numpy(np.float64), TIME_DECIMALS),
        label=np.array([class_index[c] for c in events.event_label], dtype=np.int64),
    )


def evaluation_set(
    ground_truth: EventsLike, durations: DurationsLike | None = None, labels: Sequence[str] | None = None
) -> EvaluationSet:
    """Reads and checks the reference side: files = those with durations (or in the ground truth)."""
    truth = read_ground_truth(ground_truth, labels)
    classes = list(labels) if labels is not None else sorted(truth.event_label.dropna().unique().tolist())
    truth_files = list(dict.fromkeys(truth.filename))
    if durations is not None:
        duration_of = read_durations(durations)
        files = list(duration_of)
        missing = [f for f in truth_files if f not in duration_of]
        if missing:
            raise ValueError(f"{len(missing)} ground-truth file(s) have no duration, e.g. {missing[:3]}.")
        duration_array = np.array([duration_of[f] for f in files], dtype=np.float64)
    else:
        files, duration_array = truth_files, None
    file_index = {f: i for i, f in enumerate(files)}
    gt = _encode(truth, file_index, {c: i for i, c in enumerate(classes)})
    return EvaluationSet(files, classes, gt.select(gt.offset > gt.onset), duration_array, file_index)


def encode_predictions(predictions: EventsLike, evaluation: EvaluationSet, strict_labels: bool = False) -> EventArrays:
    """Predictions on the evaluated files; other files and (unless `strict_labels`) unknown labels are skipped."""
    table = read_predictions(predictions, evaluation.classes if strict_labels else None)
    known_file = table.filename.isin(evaluation.file_index).to_numpy()
    if not known_file.all():
        others = sorted(set(table.filename[~known_file]))
        warnings.warn(f"Ignoring predictions for {len(others)} file(s) not in the evaluation set, e.g. {others[:3]}.")
    known_label = table.event_label.isna().to_numpy() | table.event_label.isin(evaluation.classes).to_numpy()
    if not known_label.all():
        others = sorted(set(table.event_label[~known_label]))
        warnings.warn(f"Ignoring predictions with labels not in the ground truth: {others}.")
    table = table[known_file & known_label]
    events = _encode(table, evaluation.file_index, {c: i for i, c in enumerate(evaluation.classes)})
    return events.select(events.offset > events.onset)


def _pairs(group_a: np.ndarray, group_b: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j) with group_a[i] == group_b[j], without a Python loop."""
    order_b = np.argsort(group_b, kind="stable")
    counts_b = np.bincount(group_b, minlength=num_groups)
    first_b = np.cumsum(counts_b) - counts_b
    per_a = counts_b[group_a]
    i = np.repeat(np.arange(len(group_a)), per_a)
    within = np.arange(per_a.sum()) - np.repeat(np.cumsum(per_a) - per_a, per_a)
    j = order_b[np.repeat(first_b[group_a], per_a) + within]
    return i, j


# ================================================================================================= F-scores
def _f_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, classes: Sequence[str], empty: float) -> dict:
    """Macro / micro F1 and per-class F1, precision, recall and counts; `empty` = F1 of a class with no data."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), empty)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
    total = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "macro": float(np.nanmean(f1)) if np.isfinite(f1).any() else 0.0,
        "micro": float(2 * tp.sum() / total) if total > 0 else 0.0,
        "per_class": {c: float(v) for c, v in zip(classes, f1)},
        "precision": {c: float(v) for c, v in zip(classes, precision)},
        "recall": {c: float(v) for c, v in zip(classes, recall)},
        "counts": {c: {"tp": int(a), "fp": int(b), "fn": int(d)} for c, a, b, d in zip(classes, tp, fp, fn)},
    }


@dataclass
class IntersectionCounts:
    """psds_eval counts at one operating point: hit ground truth, DTC-failing detections, cross-triggers."""

    tp: np.ndarray  # (K,) ground-truth events hit
    fp: np.ndarray  # (K,) detections failing the DTC
    cross_triggers: np.ndarray  # (K det, K gt)
    num_ground_truth: np.ndarray  # (K,)


def intersection_counts(
    evaluation: EvaluationSet, detections: EventArrays, dtc: float, gtc: float, cttc: float
) -> IntersectionCounts:
    """DTC / GTC / CTTC counting of psds_eval, vectorised over all files."""
    gt, det, num_classes = evaluation.ground_truth, detections, len(evaluation.classes)
    i, j = _pairs(det.file, gt.file, len(evaluation.files))
    inter = np.minimum(det.offset[i], gt.offset[j]) - np.maximum(det.onset[i], gt.onset[j])
    overlap = inter > 0
    i, j, inter = i[overlap], j[overlap], inter[overlap]
    det_fraction = inter / (det.offset - det.onset)[i]
    same = det.label[i] == gt.label[j]

    dtc_sum = np.bincount(i[same], weights=det_fraction[same], minlength=len(det))
    passes_dtc = dtc_sum >= dtc - RATIO_TOLERANCE
    covering = same & passes_dtc[i]
    gt_fraction = inter[covering] / (gt.offset - gt.onset)[j[covering]]
    gtc_sum = np.bincount(j[covering], weights=gt_fraction, minlength=len(gt))
    tp = np.bincount(gt.label[gtc_sum >= gtc - RATIO_TOLERANCE], minlength=num_classes)

    in_file = np.ones(len(det), dtype=bool)
    if evaluation.durations is not None:
        in_file = (det.onset < evaluation.durations[det.file]) & (det.offset > 0)
    fp = np.bincount(det.label[~passes_dtc & in_file], minlength=num_classes)

    cross = ~same & ~passes_dtc[i]
    key = i[cross] * num_classes + gt.label[j[cross]]
    ct_sum = np.bincount(key, weights=det_fraction[cross], minlength=len(det) * num_classes)
    present = np.bincount(key, minlength=len(det) * num_classes) > 0
    det_ids, gt_classes = np.nonzero((present & (ct_sum >= cttc - RATIO_TOLERANCE)).reshape(len(det), num_classes))
    cross_triggers = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cross_triggers, (det.label[det_ids], gt_classes), 1)
    return IntersectionCounts(tp, fp, cross_triggers, np.bincount(gt.label, minlength=num_classes))


def intersection_f1(
    ground_truth: EventsLike,
    predictions: EventsLike,
    durations: DurationsLike | None = None,
    dtc: float = 0.5,
    gtc: float = 0.5,
    cttc: float = 0.3,
    labels: Sequence[str] | None = None,
) -> dict:
    """Intersection-based F1 (psds_eval `compute_macro_f_score`): {"macro", "micro", "per_class", ...}."""
    for name, value in (("dtc", dtc), ("gtc", gtc), ("cttc", cttc)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    evaluation = evaluation_set(ground_truth, durations, labels)
    detections = encode_predictions(predictions, evaluation, strict_labels=labels is not None)
    counts = intersection_counts(evaluation, detections, dtc, gtc, cttc)
    fn = counts.num_ground_truth - counts.tp
    return _f_scores(counts.tp, counts.fp, fn, evaluation.classes, empty=np.nan)


def collar_f1(
    ground_truth: EventsLike,
    predictions: EventsLike,
    onset_collar: float = 0.2,
    offset_collar: float = 0.2,
    offset_collar_rate: float = 0.2,
    durations: DurationsLike | None = None,
    labels: Sequence[str] | None = None,
) -> dict:
    """Collar-based (event-based) F1 of sed_eval with optimal matching: {"macro", "micro", "per_class", ...}."""
    evaluation = evaluation_set(ground_truth, durations, labels)
    gt, det = evaluation.ground_truth, encode_predictions(predictions, evaluation, labels is not None)
    num_classes = len(evaluation.classes)
    i, j = _pairs(gt.file * num_classes + gt.label, det.file * num_classes + det.label,
                  len(evaluation.files) * num_classes)
    reference_length = gt.offset[i] - gt.onset[i]
    offset_tolerance = np.round(np.maximum(offset_collar, offset_collar_rate * reference_length), TIME_DECIMALS)
    hit = (np.round(np.abs(gt.onset[i] - det.onset[j]), TIME_DECIMALS) <= round(onset_collar, TIME_DECIMALS)) & (
        np.round(np.abs(gt.offset[i] - det.offset[j]), TIME_DECIMALS) <= offset_tolerance
    )
    tp = np.zeros(num_classes, dtype=np.int64)
    if hit.any():
        graph = csr_matrix((np.ones(hit.sum()), (i[hit], j[hit])), shape=(len(gt), len(det)))
        matched = maximum_bipartite_matching(graph, perm_type="column") >= 0
        tp = np.bincount(gt.label[matched], minlength=num_classes)
    num_ref = np.bincount(gt.label, minlength=num_classes)
    num_sys = np.bincount(det.label, minlength=num_classes)
    return _f_scores(tp, num_sys - tp, num_ref - tp, evaluation.classes, empty=0.0)


def _segment_roll(events: EventArrays, base: np.ndarray, total: int, num_classes: int, length: float) -> np.ndarray:
    first = np.floor(np.round(events.onset / length, TIME_DECIMALS)).astype(np.int64)
    last = np.ceil(np.round(events.offset / length, TIME_DECIMALS)).astype(np.int64)
    change = np.zeros((total + 1, num_classes), dtype=np.int64)
    np.add.at(change, (base[events.file] + first, events.label), 1)
    np.add.at(change, (base[events.file] + last, events.label), -1)
    return np.cumsum(change, axis=0)[:-1] > 0


def segment_f1(
    ground_truth: EventsLike,
    predictions: EventsLike,
    durations: DurationsLike | None = None,
    segment_seconds: float = 1.0,
    labels: Sequence[str] | None = None,
) -> dict:
    """Segment-based F1 of sed_eval (fixed grid of `segment_seconds` per file): {"macro", "micro", ...}."""
    if not segment_seconds > 0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}.")
    evaluation = evaluation_set(ground_truth, durations, labels)
    gt, det = evaluation.ground_truth, encode_predictions(predictions, evaluation, labels is not None)
    num_files, num_classes = len(evaluation.files), len(evaluation.classes)
    end = np.zeros(num_files)
    np.maximum.at(end, gt.file, gt.offset)
    np.maximum.at(end, det.file, det.offset)
    if evaluation.durations is not None:
        end = np.maximum(end, evaluation.durations)
    num_segments = np.ceil(np.round(end / segment_seconds, TIME_DECIMALS)).astype(np.int64)
    base = np.cumsum(num_segments) - num_segments
    total = int(num_segments.sum())
    reference = _segment_roll(gt, base, total, num_classes, segment_seconds)
    system = _segment_roll(det, base, total, num_classes, segment_seconds)
    tp = (reference & system).sum(axis=0)
    return _f_scores(tp, system.sum(axis=0) - tp, reference.sum(axis=0) - tp, evaluation.classes, empty=0.0)


# ================================================================================================= PSDS
@dataclass
class PSDSResult:
    """PSDS value and the PSD-ROC it integrates (eFPR per `unit`, eTPR, and the class mean/std of TPR)."""

    value: float
    efpr: np.ndarray
    etpr: np.ndarray
    mean_tpr: np.ndarray
    std_tpr: np.ndarray
    classes: list[str]
    unit: str = "hour"


def _rates(
    counts: IntersectionCounts, evaluation: EvaluationSet, unit_seconds: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TPR (K,), FP rate (K,) and cross-trigger rate (K, K; NaN diagonal) per unit of time."""
    gt = evaluation.ground_truth
    total_duration = float(evaluation.durations.sum())
    gt_duration = np.bincount(gt.label, weights=gt.offset - gt.onset, minlength=len(evaluation.classes))
    fpr = counts.fp * unit_seconds / total_duration
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = counts.tp / counts.num_ground_truth
        ctr = counts.cross_triggers * unit_seconds / gt_duration[None, :]
    np.fill_diagonal(ctr, np.nan)
    return tpr, fpr, ctr


def _step_roc(x_points: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """psds_eval's staircase: best y per x, made non-decreasing, read at `x_points` (last point at or before)."""
    unique_x, inverse = np.unique(x, return_inverse=True)
    best = np.full(len(unique_x), -np.inf)
    np.maximum.at(best, inverse, y)
    best = np.maximum.accumulate(best)
    position = np.searchsorted(unique_x, x_points, side="right") - 1
    return np.where(position >= 0, best[np.clip(position, 0, None)], 0.0)


def _area_up_to(x: np.ndarray, y: np.ndarray, max_x: float) -> float:
    """Area under the post-step curve (x, y) from x[0] to `max_x` (rectangles, as psds_eval)."""
    if max_x not in x:
        position = int(np.searchsorted(x, max_x))
        x = np.insert(x, position, max_x)
        y = np.insert(y, position, y[position - 1] if position > 0 else 0.0)
    keep = x <= max_x
    return float(np.sum(np.diff(x[keep]) * y[keep][:-1]))


def psds_from_counts(
    operating_points: Sequence[IntersectionCounts],
    evaluation: EvaluationSet,
    alpha_ct: float = 0.0,
    alpha_st: float = 0.0,
    max_efpr: float = 100.0,
    unit: str = "hour",
) -> PSDSResult:
    """PSDS (psds_eval algorithm) from the counts of a set of operating points plus the (0, 0) point."""
    if not 0.0 <= alpha_ct <= 1.0 or alpha_st < 0 or not max_efpr > 0:
        raise ValueError("Need 0 <= alpha_ct <= 1, alpha_st >= 0 and max_efpr > 0.")
    if unit not in SECONDS_PER_UNIT:
        raise ValueError(f"unit must be one of {list(SECONDS_PER_UNIT)}, got {unit!r}.")
    if evaluation.durations is None:
        raise ValueError("PSDS needs the audio durations (to count false positives per hour).")
    scored = evaluation.ground_truth.label
    has_truth = np.bincount(scored, minlength=len(evaluation.classes)) > 0
    if not has_truth.all():
        skipped = [c for c, ok in zip(evaluation.classes, has_truth) if not ok]
        warnings.warn(f"PSDS leaves out classes without ground-truth events: {skipped}.")
    rates = [_rates(c, evaluation, SECONDS_PER_UNIT[unit]) for c in operating_points]
    tpr = np.stack([r[0] for r in rates] + [np.zeros(len(has_truth))], axis=1)[has_truth]
    fpr = np.stack([r[1] for r in rates] + [np.zeros(len(has_truth))], axis=1)[has_truth]
    ctr = np.stack([r[2] for r in rates] + [np.zeros((len(has_truth),) * 2)], axis=2)[has_truth][:, has_truth]
    if ctr.shape[0] > 1 and alpha_ct > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            efpr = fpr + alpha_ct * np.nanmean(ctr, axis=1)
    else:
        efpr = fpr
    x_points = np.unique(efpr)
    curves = np.stack([_step_roc(x_points, efpr[c], tpr[c]) for c in range(len(tpr))])
    mean, std = curves.mean(axis=0), curves.std(axis=0)
    etpr = np.clip(np.nan_to_num(mean - alpha_st * std, nan=0.0), 0.0, None)
    value = _area_up_to(x_points, etpr, max_efpr) / max_efpr
    classes = [c for c, ok in zip(evaluation.classes, has_truth) if ok]
    return PSDSResult(value, x_points, etpr, mean, std, classes, unit)


def frame_scores_to_operating_points(
    scores: Mapping[str, pd.DataFrame], evaluation: EvaluationSet, thresholds: Sequence[float] = DCASE_THRESHOLDS
) -> dict[float, EventArrays]:
    """Thresholds per-file score tables (`score > threshold`) into one detection set per threshold, vectorised."""
    lookup = {}
    for index, filename in enumerate(evaluation.files):
        lookup[filename] = index
        lookup.setdefault(_audio_id(filename), index)
    unknown = [key for key in scores if key not in lookup]
    if unknown:
        warnings.warn(f"Ignoring scores for {len(unknown)} file(s) not in the evaluation set, e.g. {unknown[:3]}.")
    blocks, row_file, starts, ends = [], [], [], []
    for key, frame in scores.items():
        if key not in lookup:
            continue
        missing = [c for c in evaluation.classes if c not in frame.columns]
        if missing:
            raise ValueError(f"Scores for {key} lack class column(s) {missing}.")
        values = frame[evaluation.classes].to_numpy(np.float64)
        blocks += [values, np.full((1, values.shape[1]), -np.inf)]  # separator row: no event spans two files
        row_file += [np.full(len(values) + 1, lookup[key])]
        starts += [frame["onset"].to_numpy(np.float64), [np.nan]]
        ends += [frame["offset"].to_numpy(np.float64), [np.nan]]
    if not blocks:
        raise ValueError("No frame scores for the evaluated files.")
    scored = set(np.concatenate(row_file).tolist())
    if len(scored) < len(evaluation.files):
        unscored = [f for i, f in enumerate(evaluation.files) if i not in scored]
        warnings.warn(f"No scores for {len(unscored)} evaluated file(s) (no detections there), e.g. {unscored[:3]}.")
    stacked, row_file = np.concatenate(blocks), np.concatenate(row_file)
    row_onset, row_offset = np.concatenate(starts), np.concatenate(ends)
    operating_points = {}
    for threshold in thresholds:
        active = (stacked > threshold).T.ravel()  # class-major, so runs never cross classes (separator rows)
        first, stop = contiguous_regions(active)
        label, first_row = np.divmod(first, len(stacked))
        last_row = stop - label * len(stacked) - 1
        operating_points[float(threshold)] = EventArrays(
            file=row_file[first_row],
            onset=np.round(row_onset[first_row], TIME_DECIMALS),
            offset=np.round(row_offset[last_row], TIME_DECIMALS),
            label=label.astype(np.int64),
        )
    return operating_points


def _audio_id(filename: str) -> str:
    lower = filename.lower()
    for extension in AUDIO_EXTENSIONS:
        if lower.endswith(extension):
            return filename[: -len(extension)]
    return filename


def psds_detections(
    evaluation: EvaluationSet,
    operating_points: Mapping[float, EventsLike] | None = None,
    scores: Mapping[str, pd.DataFrame] | None = None,
    thresholds: Sequence[float] = DCASE_THRESHOLDS,
    strict_labels: bool = False,
) -> list[EventArrays]:
    """The detection sets PSDS integrates over: the operating points as given, or the thresholded scores."""
    if (operating_points is None) == (scores is None):
        raise ValueError("Give exactly one of operating_points or scores.")
    if operating_points is not None:
        if not operating_points:
            raise ValueError("No operating points given.")
        return [encode_predictions(p, evaluation, strict_labels) for p in operating_points.values()]
    return list(frame_scores_to_operating_points(scores, evaluation, thresholds).values())


def psds_from_detections(
    evaluation: EvaluationSet,
    detections: Sequence[EventArrays],
    dtc_threshold: float = 0.5,
    gtc_threshold: float = 0.5,
    cttc_threshold: float = 0.3,
    alpha_ct: float = 0.0,
    alpha_st: float = 0.0,
    max_efpr: float = 100.0,
    unit: str = "hour",
) -> PSDSResult:
    """PSDS of already encoded detection sets (see `psds`)."""
    for name, value in (("dtc", dtc_threshold), ("gtc", gtc_threshold), ("cttc", cttc_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}_threshold must be in [0, 1], got {value}.")
    counts = [intersection_counts(evaluation, d, dtc_threshold, gtc_threshold, cttc_threshold) for d in detections]
    return psds_from_counts(counts, evaluation, alpha_ct, alpha_st, max_efpr, unit)


def psds(
    ground_truth: EventsLike,
    durations: DurationsLike,
    operating_points: Mapping[float, EventsLike] | None = None,
    scores: Mapping[str, pd.DataFrame] | None = None,
    thresholds: Sequence[float] = DCASE_THRESHOLDS,
    dtc_threshold: float = 0.5,
    gtc_threshold: float = 0.5,
    cttc_threshold: float = 0.3,
    alpha_ct: float = 0.0,
    alpha_st: float = 0.0,
    max_efpr: float = 100.0,
    unit: str = "hour",
    labels: Sequence[str] | None = None,
) -> PSDSResult:
    """PSDS from operating points ({threshold: detections}, as DCASE's psds_eval) or from frame scores
    ({audio_id or filename: sed_scores_eval table}, thresholded at `thresholds` with `>`). Give exactly one.

    PSDS1 / PSDS2: `psds(gt, durations, ops, **PSDS1)` / `**PSDS2`. With scores this is the psds_eval value at
    the given thresholds, not sed_scores_eval's threshold-free one (they agree closely for 50 thresholds).
    """
    evaluation = evaluation_set(ground_truth, durations, labels)
    detections = psds_detections(evaluation, operating_points, scores, thresholds, labels is not None)
    return psds_from_detections(
        evaluation, detections, dtc_threshold, gtc_threshold, cttc_threshold, alpha_ct, alpha_st, max_efpr, unit
    )


def psds1_and_psds2(
    evaluation: EvaluationSet,
    operating_points: Mapping[float, EventsLike] | None = None,
    scores: Mapping[str, pd.DataFrame] | None = None,
    thresholds: Sequence[float] = DCASE_THRESHOLDS,
    strict_labels: bool = False,
) -> dict[str, float]:
    """{"psds1": ..., "psds2": ...} with the DCASE settings, encoding the detections once."""
    detections = psds_detections(evaluation, operating_points, scores, thresholds, strict_labels)
    return {
        "psds1": psds_from_detections(evaluation, detections, **PSDS1).value,
        "psds2": psds_from_detections(evaluation, detections, **PSDS2).value,
    }


# ================================================================================================= summary
def compute_sed_metrics(
    ground_truth: EventsLike,
    predictions: EventsLike,
    durations: DurationsLike | None = None,
    operating_points: Mapping[float, EventsLike] | None = None,
    scores: Mapping[str, pd.DataFrame] | None = None,
    labels: Sequence[str] | None = None,
    per_class: bool = True,
) -> dict[str, float]:
    """The DCASE task 4 set as one flat dict of floats (for `Trainer.compute_metrics` or logging):

    intersection_f1 (dtc = gtc = 0.5, cttc = 0.3), collar_f1 and collar_f1_micro (200 ms, 20 %),
    segment_f1 and segment_f1_micro (1 s), psds1 and psds2 when operating points or scores are given
    (and durations), and `<metric>/<class>` per class when `per_class`.
    """
    results = {
        "intersection_f1": intersection_f1(ground_truth, predictions, durations, labels=labels),
        "collar_f1": collar_f1(ground_truth, predictions, durations=durations, labels=labels),
        "segment_f1": segment_f1(ground_truth, predictions, durations, labels=labels),
    }
    flat = {}
    for name, result in results.items():
        flat[name] = result["macro"]
        if name != "intersection_f1":
            flat[f"{name}_micro"] = result["micro"]
        if per_class:
            flat.update({f"{name}/{label}": value for label, value in result["per_class"].items()})
    if operating_points is not None or scores is not None:
        if durations is None:
            raise ValueError("PSDS needs durations.")
        evaluation = evaluation_set(ground_truth, durations, labels)
        flat.update(psds1_and_psds2(evaluation, operating_points, scores, strict_labels=labels is not None))
    return flat


def evaluate_files(
    ground_truth: str | Path,
    durations: str | Path,
    predictions: str | Path,
    operating_points_dir: str | Path | None = None,
    scores_dir: str | Path | None = None,
) -> dict:
    """Everything `htsat-hf evaluate` prints, as a JSON-ready dict (F-scores and PSDS as fractions).

    With both operating points and scores, `psds1`/`psds2` come from the operating points and
    `psds1_scores`/`psds2_scores` from the scores.
    """
    truth, duration_of = read_ground_truth(ground_truth), read_durations(durations)
    evaluation = evaluation_set(truth, duration_of)
    detections = read_predictions(predictions)
    report: dict[str, Any] = {
        "num_files": len(evaluation.files),
        "classes": evaluation.classes,
        "intersection_f1": intersection_f1(truth, detections, duration_of),
        "collar_f1": collar_f1(truth, detections, durations=duration_of),
        "segment_f1": segment_f1(truth, detections, duration_of),
    }
    if operating_points_dir is not None:
        report.update(psds1_and_psds2(evaluation, operating_points=read_operating_points(operating_points_dir)))
    if scores_dir is not None:
        from_scores = psds1_and_psds2(evaluation, scores=read_frame_scores(scores_dir))
        suffix = "_scores" if operating_points_dir is not None else ""
        report.update({name + suffix: value for name, value in from_scores.items()})
    return _json_ready(report)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
