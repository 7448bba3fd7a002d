"""Frame scores -> events on synthetic scores with known answers, label mapping, and input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from htsat_hf.sed_postprocessing import (
    EventStream,
    apply_median_filter,
    contiguous_regions,
    frames_to_events,
    interpolate_columns,
    load_label_mapping,
    map_scores,
    median_window_frames,
    upsample_scores,
)

STEP = 10.0 / 32  # HTS-AT's step: 32 per 10-s window


def spans(events, label=None):
    return [(e["onset"], e["offset"]) for e in events if label is None or e["label"] == label]


def column(values) -> np.ndarray:
    return np.asarray(values, dtype=float)[:, None]


def test_contiguous_regions_edges():
    starts, ends = contiguous_regions(np.array([1, 1, 0, 1, 0, 1], dtype=bool))
    assert starts.tolist() == [0, 3, 5] and ends.tolist() == [2, 4, 6]
    assert [len(x) for x in contiguous_regions(np.zeros(0, dtype=bool))] == [0, 0]


def test_repeat_events_times_scores_and_order():
    scores = np.zeros((32, 2))
    scores[4:10, 0] = [0.6, 0.9, 0.9, 0.7, 0.6, 0.55]
    scores[2, 1] = 0.8
    events = frames_to_events(scores, 0.3125, ["Dog", "Cat"])
    assert events == [
        {"label": "Cat", "onset": 0.625, "offset": 0.9375, "score": 0.8},
        {"label": "Dog", "onset": 1.25, "offset": 3.125, "score": 0.9},
    ]


def test_threshold_is_strict():
    scores = column([0.0, 0.5, 0.5, 0.0])
    assert frames_to_events(scores, 1.0, ["a"], threshold=0.5) == []
    assert spans(frames_to_events(scores, 1.0, ["a"], threshold=0.49)) == [(1.0, 3.0)]


def test_median_filter_removes_one_frame_blip_and_keeps_event():
    scores = np.zeros((40, 1))
    scores[5, 0] = 0.9  # blip
    scores[20:26, 0] = 0.9  # 0.6-s event
    assert spans(frames_to_events(scores, 0.1, ["a"])) == [(0.5, 0.6), (2.0, 2.6)]
    assert spans(frames_to_events(scores, 0.1, ["a"], median_filter_seconds=0.3)) == [(2.0, 2.6)]
    assert median_window_frames(0.3, 0.1) == 3 and median_window_frames(0.4, 0.1) == 5
    assert median_window_frames(None, 0.1) == 1 and median_window_frames(0.04, 0.1) == 1


def test_median_filter_per_class():
    scores = np.zeros((20, 2))
    scores[5, :] = 0.9
    events = frames_to_events(scores, 0.1, ["a", "b"], median_filter_seconds={"a": 0.3})
    assert spans(events, "a") == [] and spans(events, "b") == [(0.5, 0.6)]


def test_min_duration_drops_short_events():
    scores = column([0, 0.9, 0, 0, 0.9, 0.9, 0.9, 0])
    events = frames_to_events(scores, 0.1, ["a"], min_duration_seconds=0.2)
    assert spans(events) == [(0.4, 0.7)]
    assert spans(frames_to_events(scores, 0.1, ["a"], min_duration_seconds=0.3)) == [(0.4, 0.7)]  # == kept


def test_min_gap_merges_same_class_events():
    scores = column([0.9, 0.9, 0, 0, 0.9, 0.9, 0])
    assert spans(frames_to_events(scores, 0.1, ["a"], min_gap_seconds=0.1)) == [(0.0, 0.2), (0.4, 0.6)]
    merged = frames_to_events(scores, 0.1, ["a"], min_gap_seconds=0.2)
    assert spans(merged) == [(0.0, 0.6)] and merged[0]["score"] == 0.9


def test_short_events_are_dropped_before_merging():
    # long [0, .5), short [.6, .7), long [.8, 1.3): dropping first leaves a 0.3-s gap, which is not merged
    scores = column([0.9] * 5 + [0, 0.9, 0] + [0.9] * 5)
    events = frames_to_events(scores, 0.1, ["a"], min_duration_seconds=0.2, min_gap_seconds=0.15)
    assert spans(events) == [(0.0, 0.5), (0.8, 1.3)]


def test_hysteresis():
    scores = column([0, 0.8, 0.8, 0.4, 0.8, 0.8, 0, 0.5, 0.5, 0])
    assert spans(frames_to_events(scores, 0.1, ["a"])) == [(0.1, 0.3), (0.4, 0.6)]
    # the dip to 0.4 stays above the offset threshold; the 0.5 bump never exceeds the onset threshold
    assert spans(frames_to_events(scores, 0.1, ["a"], hysteresis=(0.7, 0.3))) == [(0.1, 0.6)]
    assert spans(frames_to_events(scores, 0.1, ["a"], hysteresis=(0.45, 0.3))) == [(0.1, 0.6), (0.7, 0.9)]


def test_per_class_thresholds_list_and_dict():
    scores = np.tile([[0.3, 0.6]], (4, 1))
    assert {e["label"] for e in frames_to_events(scores, 1.0, ["a", "b"])} == {"b"}
    assert {e["label"] for e in frames_to_events(scores, 1.0, ["a", "b"], threshold=[0.2, 0.7])} == {"a"}
    assert {e["label"] for e in frames_to_events(scores, 1.0, ["a", "b"], threshold={"a": 0.2})} == {"a", "b"}


def test_linear_boundaries_are_not_quantised_to_steps():
    scores = column([0, 0, 1, 1, 0, 0])  # 1-s steps, centres at 0.5, 1.5, ...
    assert spans(frames_to_events(scores, 1.0, ["a"], threshold=0.7)) == [(2.0, 4.0)]
    # linear: score(t) = t - 1.5 on [1.5, 2.5] > 0.7 from t = 2.2; working frames of 0.2 s (factor 5)
    assert spans(frames_to_events(scores, 1.0, ["a"], threshold=0.7, upsample="linear")) == [(2.2, 3.8)]
    fine = frames_to_events(scores, 1.0, ["a"], threshold=0.7, upsample="linear", upsample_factor=20)
    assert spans(fine) == [(2.2, 3.8)]


def test_linear_keeps_step_values_and_time_span():
    steps = np.array([[0.1], [0.8], [0.3]])
    fine = upsample_scores(steps, 5, "linear")
    assert fine.shape == (15, 1) and np.allclose(fine[[2, 7, 12], 0], [0.1, 0.8, 0.3])
    assert np.allclose(fine[:3, 0], 0.1) and np.allclose(fine[-3:, 0], 0.3)
    assert np.array_equal(upsample_scores(steps, 3, "repeat")[:, 0], np.repeat(steps[:, 0], 3))
    events = frames_to_events(column([0, 0, 0.8, 0, 0]), 1.0, ["a"], upsample="linear")
    assert len(events) == 1 and events[0]["score"] == pytest.approx(0.8)


def test_offset_and_duration_clipping():
    scores = column([0, 0.9, 0.9, 0.9])
    assert spans(frames_to_events(scores, 1.0, ["a"], offset_seconds=10.0)) == [(11.0, 14.0)]
    assert spans(frames_to_events(scores, 1.0, ["a"], duration_seconds=3.5)) == [(1.0, 3.5)]
    assert frames_to_events(scores, 1.0, ["a"], duration_seconds=1.0) == []
    assert frames_to_events(np.zeros((0, 1)), 1.0, ["a"]) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores=np.zeros(5)), "2-D"),
        (dict(labels=["a", "b", "c"]), "3 labels for 2"),
        (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(threshold=[0.5]), "1 values for 2 labels"),
        (dict(threshold={"x": 0.5}), "unknown labels"),
        (dict(hysteresis=(0.3, 0.7)), "must be <= onset"),
        (dict(hysteresis=(0.5,)), "onset, offset"),
        (dict(scores=np.full((4, 2), 3.0)), "sigmoid"),
        (dict(scores=np.full((4, 2), np.nan)), "NaN"),
        (dict(upsample="cubic"), "repeat"),
        (dict(upsample_factor=0), "positive integer"),
        (dict(step_seconds=0.0), "step_seconds"),
        (dict(median_filter_seconds=-1.0), "median_filter_seconds"),
        (dict(min_duration_seconds=-1.0), "min_duration"),
        (dict(min_duration_seconds=float("nan")), "min_duration_seconds must be a finite number"),
        (dict(min_gap_seconds=float("inf")), "min_gap_seconds must be a finite number"),
        (dict(median_filter_seconds=float("nan")), "median_filter_seconds must be a finite number"),
        (dict(median_filter_seconds={"a": float("inf")}), "median_filter_seconds must be a finite number"),
        (dict(threshold=float("nan")), r"threshold must be in \[0, 1\], got nan"),
        (dict(threshold="0.3"), "threshold must be a number, got '0.3'"),
        (dict(threshold={"a": None}), "threshold must be a number, got None"),
        (dict(min_duration_seconds="0.2"), "min_duration_seconds must be a number"),
        (dict(hysteresis=0.5), "onset, offset"),
        (dict(hysteresis=(0.7, float("nan"))), "offset threshold must be in"),
        (dict(upsample=None), "repeat"),
        (dict(upsample_factor=float("nan")), "positive integer"),
        (dict(upsample_factor=2.5), "positive integer"),
        (dict(step_seconds=float("nan")), "step_seconds"),
        (dict(step_seconds=float("inf")), "step_seconds"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    arguments = dict(scores=np.zeros((4, 2)), step_seconds=0.1, labels=["a", "b"]) | kwargs
    with pytest.raises(ValueError, match=message):
        frames_to_events(**arguments)


def test_map_scores_takes_the_group_maximum():
    source = ["Speech", "Bark", "Dog", "Cat"]
    scores = np.array([[0.1, 0.7, 0.2, 0.3], [0.9, 0.1, 0.4, 0.0]])
    mapped, labels = map_scores(scores, {"Dog": ["Dog", "Bark"], "Speech": [0], "Cat": "Cat"}, source)
    assert labels == ["Dog", "Speech", "Cat"]
    assert np.allclose(mapped, [[0.7, 0.1, 0.3], [0.4, 0.9, 0.0]])


def test_map_scores_errors_name_the_problem():
    source = ["Speech", "Bark"]
    with pytest.raises(ValueError, match=r"\['Meow', 'Purr'\]"):
        map_scores(np.zeros((2, 2)), {"Cat": ["Meow", "Purr"], "Dog": ["Bark"]}, source)
    with pytest.raises(ValueError, match="index 5"):
        map_scores(np.zeros((2, 2)), {"Dog": [5]}, source)
    with pytest.raises(ValueError, match="empty"):
        map_scores(np.zeros((2, 2)), {"Dog": []}, source)
    with pytest.raises(ValueError, match="3 source labels"):
        map_scores(np.zeros((2, 2)), {"Dog": [0]}, source + ["x"])


def test_load_label_mapping_json_and_yaml(tmp_path):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"Dog": ["Dog", "Bark", 74], "Speech": "Speech"}))
    assert load_label_mapping(path) == {"Dog": ["Dog", "Bark", 74], "Speech": ["Speech"]}
    pytest.importorskip("yaml")
    yaml_path = tmp_path / "mapping.yaml"
    yaml_path.write_text("Dog: [Dog, Bark, 74]\nCat:\n  - Cat\n")
    assert load_label_mapping(yaml_path) == {"Dog": ["Dog", "Bark", 74], "Cat": ["Cat"]}


@pytest.mark.parametrize("text", ["[1, 2]", '{"Dog": [1.5]}', "{not json"])
def test_load_label_mapping_rejects_bad_files(tmp_path, text):
    path = tmp_path / "mapping.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="mapping.json"):
        load_label_mapping(path)


def test_module_is_standalone_without_torch(repo_root):
    """The file is shipped as remote code: importable on its own, and it must not pull in torch."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import sed_postprocessing, numpy as np; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(len(sed_postprocessing.frames_to_events(np.ones((3, 1)) * 0.9, 1.0, ['a'])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(repo_root / "src" / "htsat_hf")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


# ------------------------------------------------------------------------------------------------ streaming
STREAM_SETTINGS = [
    dict(),
    dict(threshold=[0.3, 0.5, 0.7]),
    dict(median_filter_seconds={"a": 0.3, "c": 1.5}),  # per-class windows, one class unfiltered
    dict(hysteresis=(0.6, 0.4), min_duration_seconds=0.7),
    dict(min_duration_seconds=0.4, min_gap_seconds=1.1, median_filter_seconds=0.5),
    dict(upsample="linear", median_filter_seconds=0.5, min_gap_seconds=0.5, hysteresis=(0.55, 0.45)),
    dict(upsample="linear", upsample_factor=3, min_duration_seconds=0.3),
]


def wandering_scores(rng: np.random.Generator, steps: int) -> np.ndarray:
    """Probabilities that drift in and out of activity, so thresholds cut them into many events of all lengths."""
    return (1 / (1 + np.exp(-np.cumsum(rng.normal(0, 0.15, (steps, 3)), axis=0)))).astype(np.float32)


@pytest.mark.parametrize("settings", STREAM_SETTINGS)
def test_event_stream_equals_frames_to_events_for_any_blocks(settings):
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    found = 0
    for _ in range(12):
        steps = int(rng.integers(1, 400))
        scores = wandering_scores(rng, steps)
        duration = steps * STEP - 0.1
        expected = frames_to_events(scores, STEP, labels, duration_seconds=duration, **settings)
        cuts = sorted(set(rng.integers(0, steps + 1, int(rng.integers(0, 12))).tolist())) + [steps]
        stream = EventStream(STEP, labels, **settings)
        previous = 0
        for cut in cuts:  # blocks of any size, empty ones included
            stream.push(scores[previous:cut])
            previous = cut
        assert stream.finish(duration) == expected
        found += len(expected)
    assert found > 20  # the comparison saw many events


def test_event_stream_step_by_step_keeps_only_its_context():
    rng = np.random.default_rng(1)
    settings = dict(upsample="linear", median_filter_seconds=1.0, min_gap_seconds=0.6)
    scores = wandering_scores(rng, 3000)
    stream = EventStream(STEP, ["a", "b", "c"], **settings)
    held = 0
    for step in range(len(scores)):
        stream.push(scores[step : step + 1])
        held = max(held, len(stream.frames), len(stream.steps))
    assert stream.finish() == frames_to_events(scores, STEP, ["a", "b", "c"], **settings)
    assert held <= 2 * stream.halo + 2 * stream.settings.factor  # the filter's context, not the 15,000 frames


def test_event_stream_checks_its_input():
    stream = EventStream(STEP, ["a"], threshold=0.5)
    with pytest.raises(ValueError, match="probabilities"):
        stream.push(np.full((3, 1), 2.0))
    with pytest.raises(ValueError, match="threshold"):
        EventStream(STEP, ["a"], threshold=1.5)
    with pytest.raises(ValueError, match="min_duration_seconds"):
        EventStream(STEP, ["a"], min_duration_seconds=float("nan"))
    stream.finish()
    with pytest.raises(RuntimeError, match="finished"):
        stream.push(np.zeros((1, 1)))


# ------------------------------------------------------------------ all classes at once = class by class
def reference_events(scores, step, labels, threshold=0.5, median_filter_seconds=None, min_duration_seconds=0.0,
                     min_gap_seconds=0.0, hysteresis=None, upsample="repeat", upsample_factor=None,
                     offset_seconds=0.0, duration_seconds=None):
    """`frames_to_events` written out one class at a time with plain loops, in the module docstring's order:
    the oracle for the implementation that works on all classes at once."""
    from scipy.ndimage import median_filter

    num_steps, num_classes = scores.shape
    factor = upsample_factor or (1 if upsample == "repeat" else 5)
    frame = step / factor
    thresholds = threshold if isinstance(threshold, list) else [threshold] * num_classes
    medians = (median_filter_seconds if isinstance(median_filter_seconds, list)
               else [median_filter_seconds] * num_classes)
    events = []
    for k in range(num_classes):
        values = scores[:, k].astype(np.float64)
        if upsample == "repeat":
            values = np.repeat(values, factor)
        elif num_steps:
            values = np.interp((np.arange(num_steps * factor) + 0.5) / factor, np.arange(num_steps) + 0.5, values)
        length = None if medians[k] is None else round(medians[k] / frame)
        window = 1 if length is None else max(1, length + 1 - length % 2)  # odd
        if window > 1 and len(values):
            values = median_filter(values, size=window, mode="reflect")
        level = hysteresis[1] if hysteresis else thresholds[k]
        runs, i = [], 0
        while i < len(values):
            if values[i] > level:
                j = i
                while j < len(values) and values[j] > level:
                    j += 1
                if hysteresis is None or values[i:j].max() > hysteresis[0]:
                    runs.append([i, j])
                i = j
            else:
                i += 1
        merged = []
        for run in (r for r in runs if r[1] - r[0] >= min_duration_seconds / frame - 1e-9):
            if merged and min_gap_seconds > 0 and run[0] - merged[-1][1] <= min_gap_seconds / frame + 1e-9:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        for start, end in merged:
            onset, offset = offset_seconds + start * frame, offset_seconds + end * frame
            if duration_seconds is not None:
                if onset >= duration_seconds:
                    continue
                offset = min(offset, duration_seconds)
            events.append({"label": labels[k], "onset": round(onset, 6), "offset": round(offset, 6),
                           "score": float(values[start:end].max())})
    return sorted(events, key=lambda event: (event["onset"], labels.index(event["label"])))


def random_settings(rng: np.random.Generator, num_classes: int, num_steps: int) -> dict:
    settings = {}
    if rng.random() < 0.5:
        settings["threshold"] = rng.uniform(0, 1, num_classes).tolist() if rng.random() < 0.5 else float(rng.uniform())
    if rng.random() < 0.4:
        settings["median_filter_seconds"] = (
            [[None, 0.0, 0.3, 0.7, 1.2][i] for i in rng.integers(0, 5, num_classes)] if rng.random() < 0.5 else 0.5
        )
    if rng.random() < 0.3:
        settings["hysteresis"] = tuple(sorted(rng.uniform(0, 1, 2).tolist(), reverse=True))
    if rng.random() < 0.4:
        settings["upsample"] = "linear"
    if rng.random() < 0.2:
        settings["upsample_factor"] = int(rng.integers(1, 8))
    for key in ("min_duration_seconds", "min_gap_seconds"):
        if rng.random() < 0.4:
            settings[key] = float(rng.uniform(0, 1))
    if rng.random() < 0.3:
        settings["offset_seconds"] = float(rng.uniform(0, 100))
    if rng.random() < 0.4:
        settings["duration_seconds"] = float(rng.uniform(0, num_steps * STEP + 1))
    return settings


@pytest.mark.parametrize("pass_elements", [None, 64])  # all classes in one pass; a few classes per pass
def test_frames_to_events_equals_the_class_by_class_reference(monkeypatch, pass_elements):
    from htsat_hf import sed_postprocessing

    if pass_elements is not None:
        monkeypatch.setattr(sed_postprocessing, "PASS_ELEMENTS", pass_elements)
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(250):
        num_steps, num_classes = int(rng.integers(0, 70)), int(rng.integers(1, 9))
        scores = rng.uniform(0, 1, (num_steps, num_classes)) ** float(rng.uniform(0.3, 3))
        if rng.random() < 0.3:
            scores = np.round(scores, 1)  # ties: runs exactly at a threshold, equal peaks
        labels = [f"class{k}" for k in range(num_classes)]
        settings = random_settings(rng, num_classes, num_steps)
        expected = reference_events(scores, STEP, labels, **settings)
        assert frames_to_events(scores, STEP, labels, **settings) == expected, settings
        found += len(expected)
    assert found > 1000  # many events of every kind were compared


def test_interpolate_columns_is_np_interp_to_the_last_bit():
    rng = np.random.default_rng(4)
    for _ in range(50):
        xp = np.sort(rng.uniform(-5, 5, int(rng.integers(1, 12))))
        x = np.concatenate([rng.uniform(-7, 7, 40), xp])  # outside, between, and exactly at the points
        fp = rng.standard_normal((len(xp), 3))
        expected = np.stack([np.interp(x, xp, fp[:, k]) for k in range(3)], axis=1)
        assert np.array_equal(interpolate_columns(x, xp, fp), expected)


def test_median_filter_of_classes_sharing_a_window_equals_one_column_at_a_time():
    from scipy.ndimage import median_filter

    rng = np.random.default_rng(5)
    scores = rng.uniform(0, 1, (50, 6))
    windows = [1, 5, 3, 5, 1, 9]
    expected = np.stack(
        [median_filter(scores[:, k], size=w, mode="reflect") if w > 1 else scores[:, k] for k, w in enumerate(windows)],
        axis=1,
    )
    assert np.array_equal(apply_median_filter(scores, windows), expected)
