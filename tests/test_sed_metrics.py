"""DCASE task 4 metrics: reproduce the published numbers on the shared DESED fixtures, known answers on tiny
synthetic cases, input errors, the `evaluate` module and the command-line script."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

from htsat_hf.metrics import sed_metrics as m

# README of fixtures/desed_htsat: per-class intersection F1 (%), its macro average; notes: collar and segment F1 (%)
HTSAT_TABLE = {
    "htsat-test_outputmap.tsv": (
        [48.6, 52.9, 67.7, 25.0, 48.0, 42.9, 60.3, 43.0, 46.8, 49.1], 48.42, 6.76, 69.80
    ),
    "htsat-test-ensemble_outputmap.tsv": (
        [47.5, 55.1, 72.4, 30.9, 49.7, 41.9, 63.2, 44.3, 51.3, 50.6], 50.67, 8.02, 70.64
    ),
}
README_ORDER = ["Alarm_bell_ringing", "Blender", "Cat", "Dishes", "Dog", "Electric_shaver_toothbrush", "Frying",
                "Running_water", "Speech", "Vacuum_cleaner"]


def baseline(*parts):
    return shared_path("fixtures", "desed_dcase2021_baseline", *parts)


def events(*rows, filename="a.wav"):
    return pd.DataFrame([(filename, *row) for row in rows], columns=list(m.EVENT_COLUMNS))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.mark.parametrize("predictions", sorted(HTSAT_TABLE))
def test_htsat_desed_paper_numbers(predictions):
    folder = shared_path("fixtures", "desed_htsat")
    gt, durations, det = folder / "answer.tsv", folder / "answer_meta.tsv", folder / predictions
    per_class, macro, collar, segment = HTSAT_TABLE[predictions]
    result = m.intersection_f1(gt, det, durations)
    assert 100 * result["macro"] == pytest.approx(macro, abs=0.005)
    for label, expected in zip(README_ORDER, per_class):
        assert 100 * result["per_class"][label] == pytest.approx(expected, abs=0.05 + 1e-9), label
    assert 100 * m.collar_f1(gt, det, durations=durations)["macro"] == pytest.approx(collar, abs=0.005)
    assert 100 * m.segment_f1(gt, det, durations)["macro"] == pytest.approx(segment, abs=0.005)


def test_dcase2021_baseline_f_scores():
    gt, durations, det = baseline("validation.tsv"), baseline("validation_durations.tsv"), baseline(
        "student_predictions0.5.csv")
    assert 100 * m.intersection_f1(gt, det, durations)["macro"] == pytest.approx(63.74, abs=0.005)
    segment = m.segment_f1(gt, det, durations)
    assert 100 * segment["macro"] == pytest.approx(69.35, abs=0.005)
    assert 100 * segment["micro"] == pytest.approx(75.47, abs=0.005)
    collar = m.collar_f1(gt, det, durations=durations)
    # published (older sed_eval) 39.83 / 40.92; sed_eval 0.2.1 39.87 / 40.95; sed_scores_eval 39.8954 / 40.9766
    assert 100 * collar["macro"] == pytest.approx(39.8954, abs=0.0005)
    assert 100 * collar["micro"] == pytest.approx(40.9766, abs=0.0005)
    assert abs(100 * collar["macro"] - 39.83) < 0.1 and abs(100 * collar["macro"] - 39.87) < 0.1
    assert collar["counts"]["Speech"]["tp"] + collar["counts"]["Speech"]["fn"] == 1752  # Nref of the report


@pytest.fixture(scope="module")
def baseline_operating_points():
    return m.read_operating_points(baseline("student_ops"))


def test_dcase2021_baseline_psds_from_operating_points(baseline_operating_points):
    assert len(baseline_operating_points) == 50
    evaluation = m.evaluation_set(baseline("validation.tsv"), baseline("validation_durations.tsv"))
    values = m.psds1_and_psds2(evaluation, operating_points=baseline_operating_points)
    assert values["psds1"] == pytest.approx(0.3345, abs=0.0001)  # psds_eval / sed_scores_eval; published 0.334
    assert values["psds2"] == pytest.approx(0.5281, abs=0.0001)


def scores_from_operating_points(operating_points, evaluation, step=0.064, frames=157):
    """Piecewise-constant frame scores: score = highest threshold whose detections cover the frame."""
    classes = {c: k for k, c in enumerate(evaluation.classes)}
    grid = np.zeros((len(evaluation.files), frames, len(classes)))
    for threshold, table in operating_points.items():
        table = table[table.event_label.notna()]
        file = table.filename.map(evaluation.file_index).to_numpy()
        first = np.round(table.onset.to_numpy() / step).astype(int)
        last = np.round(table.offset.to_numpy() / step).astype(int)
        label = table.event_label.map(classes).to_numpy()
        count = last - first
        frame = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        np.maximum.at(grid, (np.repeat(file, count), frame, np.repeat(label, count)), threshold)
    return {
        f.removesuffix(".wav"): m.scores_dataframe(grid[i], step, evaluation.classes)
        for i, f in enumerate(evaluation.files)
    }


def test_psds_from_frame_scores_matches_operating_points(baseline_operating_points):
    evaluation = m.evaluation_set(baseline("validation.tsv"), baseline("validation_durations.tsv"))
    scores = scores_from_operating_points(baseline_operating_points, evaluation)
    thresholds = [t - 0.01 for t in baseline_operating_points]  # score > t - 0.01  <=>  score >= t
    values = m.psds1_and_psds2(evaluation, scores=scores, thresholds=thresholds)
    assert values["psds1"] == pytest.approx(0.3345, abs=0.0001)
    assert values["psds2"] == pytest.approx(0.5281, abs=0.0001)


# ------------------------------------------------------------------------------------------------ known answers
def test_collar_uses_optimal_matching_and_offset_rate():
    gt = pd.concat([events((0.0, 0.1, "Dog"), (0.15, 0.3, "Dog")), events((0.0, 10.0, "Cat"), filename="b.wav")])
    # X fits both references, Y only the first: taking X for the first reference (as a greedy pass in either
    # order would) leaves the second unmatched; the optimal matching pairs both.
    # On b.wav the offset is 1.5 s off, inside 20 % of the 10-s reference.
    det = pd.concat([events((0.1, 0.25, "Dog"), (0.0, 0.05, "Dog")), events((0.1, 8.5, "Cat"), filename="b.wav")])
    result = m.collar_f1(gt, det)
    assert result["macro"] == 1.0 and result["counts"]["Dog"]["tp"] == 2
    assert m.collar_f1(gt, det, offset_collar_rate=0.1)["per_class"]["Cat"] == 0.0


def test_collar_boundary_is_not_lost_to_float_error():
    gt = events((4.0, 5.0, "Dog"))
    assert m.collar_f1(gt, events((4.2, 5.2, "Dog")))["macro"] == 1.0  # 4.2 - 4.0 = 0.2000000000000002
    assert m.collar_f1(gt, events((4.2000011, 5.0, "Dog")))["macro"] == 0.0


def test_intersection_counts_dtc_gtc_and_cross_triggers():
    gt = events((0.0, 2.0, "Dog"), (4.0, 6.0, "Cat"))
    det = events(
        (0.5, 2.5, "Dog"),  # 75 % inside Dog, covers 75 % of it: TP
        (4.0, 6.0, "Dog"),  # entirely on Cat: FP (and a cross-trigger)
        (8.0, 9.0, "Cat"),  # on nothing: FP; Cat stays missed
    )
    result = m.intersection_f1(gt, det, {"a.wav": 10.0})
    assert result["counts"]["Dog"] == {"tp": 1, "fp": 1, "fn": 0}
    assert result["counts"]["Cat"] == {"tp": 0, "fp": 1, "fn": 1}
    assert result["per_class"]["Dog"] == pytest.approx(2 / 3) and result["macro"] == pytest.approx(1 / 3)
    evaluation = m.evaluation_set(gt, {"a.wav": 10.0})
    counts = m.intersection_counts(evaluation, m.encode_predictions(det, evaluation), 0.5, 0.5, 0.3)
    assert counts.cross_triggers.tolist() == [[0, 0], [1, 0]]  # (detected Dog, true Cat), classes sorted Cat, Dog
    strict = m.intersection_f1(gt, det, {"a.wav": 10.0}, dtc=0.8)
    assert strict["counts"]["Dog"] == {"tp": 0, "fp": 2, "fn": 1}


def test_exact_half_coverage_passes_despite_float_error():
    gt = events((0.007, 0.011, "Dog"))
    det = events((0.007, 0.009, "Dog"))  # covers exactly half: (0.009 - 0.007) / 0.004 = 0.4999999999999999
    assert m.intersection_f1(gt, det)["counts"]["Dog"] == {"tp": 1, "fp": 0, "fn": 0}


def test_segment_f1_known_answer():
    gt = events((1.1, 3.1, "Dog"))  # segments 1, 2, 3
    result = m.segment_f1(gt, events((1.0, 3.0, "Dog")), segment_seconds=1.0)  # segments 1, 2
    assert result["counts"]["Dog"] == {"tp": 2, "fp": 0, "fn": 1} and result["macro"] == pytest.approx(0.8)


def test_perfect_detections_give_psds_one():
    gt = pd.concat([events((i, i + 1.0, "Dog"), filename=f"{i}.wav") for i in range(5)])
    durations = {f"{i}.wav": 3600.0 for i in range(5)}
    result = m.psds(gt, durations, {0.5: gt, 0.7: gt.iloc[:2]}, dtc_threshold=0.7, gtc_threshold=0.7)
    assert result.value == pytest.approx(1.0) and result.efpr[0] == 0.0


def test_empty_predictions_give_zero_scores(tmp_path):
    gt = events((0.0, 1.0, "Dog"), (2.0, 3.0, "Cat"))
    empty_file = tmp_path / "det.tsv"
    empty_file.write_text("filename\tonset\toffset\tevent_label\n")
    for predictions in (empty_file, [], events().iloc[:0]):
        flat = m.compute_sed_metrics(gt, predictions, {"a.wav": 10.0}, operating_points={0.5: predictions})
        assert all(value == 0.0 for value in flat.values()), flat


def test_files_without_events_and_predictions_elsewhere(tmp_path):
    gt = tmp_path / "gt.tsv"
    gt.write_text("filename\tonset\toffset\tevent_label\na.wav\t0\t1\tDog\nb.wav\t\t\t\n")
    det = pd.concat([events((0.0, 1.0, "Dog")), events((0.0, 1.0, "Dog"), filename="b.wav"),
                     events((0.0, 1.0, "Dog"), filename="zzz.wav")])
    with pytest.warns(UserWarning, match="not in the evaluation set"):
        result = m.intersection_f1(gt, det)
    assert result["counts"]["Dog"] == {"tp": 1, "fp": 1, "fn": 0}  # the b.wav detection is a false positive


# ------------------------------------------------------------------------------------------------ bad input
def write(tmp_path, text, name="table.tsv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("a.wav\t0\t1\tDog\na.wav\tabc\t2\tDog\n", "line 3: onset is not a number"),
        ("a.wav\t0\t1\tDog\nb.wav\t0\t1\tDog\na.wav\t3\t2\tCat\n", "line 4: onset is after offset"),
        ("a.wav\t-1\t1\tDog\n", "line 2: onset is negative"),
        ("a.wav\t0\t1\tDog\na.wav\t0\t\tCat\n", "line 3: offset is not a number"),
        ("a.wav\t0\t1\tDog\na.wav\t0.5\t2\tDog\n", "line 3: Dog event in a.wav overlaps or touches the one at line 2"),
        ("a.wav\t1\t2\tDog\na.wav\t0\t1\tDog\n", "line 2: .* touches the one at line 3"),
    ],
)
def test_malformed_ground_truth_names_file_and_line(tmp_path, body, message):
    path = write(tmp_path, "filename\tonset\toffset\tevent_label\n" + body)
    with pytest.raises(ValueError, match=f"table.tsv, {message}"):
        m.read_ground_truth(path)


def test_other_malformed_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['event_label'\]"):
        m.read_predictions(write(tmp_path, "filename\tonset\toffset\na.wav\t0\t1\n"))
    with pytest.raises(ValueError, match=r"line 3: unknown event label 'Cow'"):
        m.read_predictions(write(tmp_path, "filename\tonset\toffset\tevent_label\na\t0\t1\tDog\na\t0\t1\tCow\n"),
                           labels=["Dog", "Cat"])
    with pytest.raises(ValueError, match="durations.tsv, line 3: duration must be"):
        m.read_durations(write(tmp_path, "filename\tduration\na.wav\t10\nb.wav\tten\n", "durations.tsv"))
    with pytest.raises(ValueError, match="row 2: onset is after offset"):
        m.read_predictions([{"filename": "a", "onset": 0, "offset": 1, "label": "Dog"},
                            {"filename": "a", "onset": 2, "offset": 1, "label": "Dog"}])
    with pytest.raises(ValueError, match="have no duration"):
        m.intersection_f1(events((0.0, 1.0, "Dog")), events(), {"b.wav": 10.0})
    with pytest.raises(ValueError, match="file not found"):
        m.read_ground_truth(tmp_path / "missing.tsv")


def test_score_files_round_trip(tmp_path):
    frame = m.scores_dataframe(np.array([[0.1, 0.9], [0.6, 0.2]]), 0.5, ["Cat", "Dog"])
    frame.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    loaded = m.read_frame_scores(tmp_path)
    assert list(loaded) == ["a"] and np.allclose(loaded["a"].to_numpy(), frame.to_numpy())
    evaluation = m.evaluation_set(events((0.0, 0.5, "Dog"), (0.5, 1.0, "Cat")), {"a.wav": 1.0})
    ops = m.frame_scores_to_operating_points(loaded, evaluation, thresholds=[0.5])
    found = sorted(zip(ops[0.5].onset, ops[0.5].offset, np.array(evaluation.classes)[ops[0.5].label]))
    assert found == [(0.0, 0.5, "Dog"), (0.5, 1.0, "Cat")]
    frame.iloc[1, 0] = 0.7  # gap between frames
    frame.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="a.tsv, line 3: frames must be contiguous"):
        m.read_frame_scores(tmp_path)


# ------------------------------------------------------------------------------------------------ interfaces
def test_evaluate_module_loads_offline(repo_root):
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(repo_root / "src" / "htsat_hf" / "metrics" / "sed"))
    result = metric.compute(
        predictions=[[{"onset": 1.0, "offset": 3.0, "event_label": "Dog"}], []],
        references=[[{"onset": 1.1, "offset": 3.1, "event_label": "Dog"}],
                    [{"onset": 0.5, "offset": 2.0, "event_label": "Cat"}]],
        per_class=True,
    )
    assert result["collar_f1/Dog"] == 1.0 and result["collar_f1"] == 0.5
    assert result["intersection_f1"] == 0.5 and result["segment_f1/Dog"] == pytest.approx(0.8)


def test_cli_prints_one_json_object(repo_root):
    folder = shared_path("fixtures", "desed_htsat")
    command = [sys.executable, "-m", "htsat_hf", "evaluate", "--ground-truth",
               str(folder / "answer.tsv"), "--durations", str(folder / "answer_meta.tsv"), "--predictions",
               str(folder / "htsat-test_outputmap.tsv")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"intersection_f1", "collar_f1", "segment_f1"} <= set(report)
    assert 100 * report["intersection_f1"]["macro"] == pytest.approx(48.42, abs=0.005)
    assert 100 * report["intersection_f1"]["per_class"]["Cat"] == pytest.approx(67.7, abs=0.05)
    assert 100 * report["collar_f1"]["macro"] == pytest.approx(6.76, abs=0.005)
    assert 100 * report["segment_f1"]["macro"] == pytest.approx(69.80, abs=0.005)
    assert "psds1" not in report and report["num_files"] == 692


def test_cli_reports_bad_input_and_psds(repo_root, capsys):
    from htsat_hf.commands import evaluate as script

    arguments = ["--ground-truth", str(baseline("validation.tsv")), "--durations",
                 str(baseline("validation_durations.tsv")), "--predictions"]
    assert script.main(arguments + [str(baseline() / "missing.tsv")]) == 2
    assert "file not found" in capsys.readouterr().err
    ops = baseline("student_ops")
    assert script.main(arguments + [str(baseline("student_predictions0.5.csv")), "--operating-points", str(ops)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["psds1"] == pytest.approx(0.3345, abs=0.0001) and report["psds2"] == pytest.approx(0.5281, abs=1e-4)


def test_cli_prints_each_warning_once(repo_root, tmp_path):
    """The three F-scores read the same predictions; a warning about them is printed once, not three times."""
    (tmp_path / "gt.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t2.0\tDog\n")
    (tmp_path / "durations.tsv").write_text("filename\tduration\na.wav\t10.0\n")
    (tmp_path / "det.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t2.0\tDog\n"
                                      "other.wav\t1.0\t2.0\tDog\n")
    command = [sys.executable, "-m", "htsat_hf", "evaluate", "--ground-truth",
               str(tmp_path / "gt.tsv"), "--durations", str(tmp_path / "durations.tsv"), "--predictions",
               str(tmp_path / "det.tsv")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Ignoring predictions for 1 file(s)") == 1, result.stderr
    assert json.loads(result.stdout)["intersection_f1"]["macro"] == 1.0
