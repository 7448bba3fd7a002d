"""Frame scores follow the config's problem_type exactly as clip scores do, in every entry point (issue #32): a
single-label (softmax) model must not report events for classes its clip scores rule out."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import pipeline

from htsat_hf import HTSATConfig, HTSATEnsembleModel, HTSATFeatureExtractor, HTSATForSoundEventDetection
from htsat_hf.scores import frame_scores, logits_to_scores, with_window_clip_logits
from htsat_hf.sed_postprocessing import map_scores

RATE = 32000
LABELS = {0: "go", 1: "yes", 2: "no"}
# Step logits of about (2, 0.7, -3): sigmoid 0.88 / 0.67 / 0.05 (two "events" at 0.5), softmax 0.78 / 0.21 / 0.005.
HEAD_BIAS = (2.0, 0.7, -3.0)


def single_label_detector(seed: int = 0, bias: tuple[float, ...] = HEAD_BIAS) -> HTSATForSoundEventDetection:
    """A tiny softmax-trained-style detector whose step logits stay near `bias` whatever the audio."""
    torch.manual_seed(seed)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=3, id2label=LABELS,
                         problem_type="single_label_classification")
    model = HTSATForSoundEventDetection(config).eval()
    with torch.no_grad():
        model.classifier.conv.weight.mul_(0.01)
        model.classifier.conv.bias.copy_(torch.tensor(bias))
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keywords")
    single_label_detector().save_pretrained(path)
    HTSATFeatureExtractor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(RATE * 12) * 0.05).astype(np.float32)


def event_labels(events: list[dict]) -> set[str]:
    return {event["label"] for event in events}


def test_logits_to_scores_follows_problem_type():
    logits = torch.tensor([[2.0, 0.7, -3.0]])
    np.testing.assert_allclose(logits_to_scores(logits, "multi_label_classification"), logits.sigmoid(), rtol=1e-6)
    np.testing.assert_allclose(logits_to_scores(logits, "single_label_classification"), logits.softmax(-1), rtol=1e-6)
    np.testing.assert_allclose(logits_to_scores(logits, None), logits.softmax(-1), rtol=1e-6)  # as the pipeline
    assert torch.equal(logits_to_scores(logits, "regression"), logits)


def test_no_event_for_a_class_the_clip_scores_rule_out_in_any_entry_point(folder, audio, tmp_path):
    """pipeline, annotator, live detector and htsat-hf detect: events only for "go", whose clip score is 0.78; a
    sigmoid on the softmax-trained logits gave "yes" (clip score 0.21) an event over the whole file."""
    from htsat_hf.commands import detect
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    clip = {tag["label"]: tag["score"] for tag in pipeline("audio-classification", model=str(folder))(audio)}
    assert clip["go"] > 0.5 > clip["yes"] > clip["no"]
    assert sum(clip.values()) == pytest.approx(1.0, abs=1e-5)

    detected = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5, return_frame_scores=True)
    assert event_labels(detected["events"]) == {"go"}
    sums = detected["frame_scores"].sum(axis=1)  # a softmax over labels, capped by the window clip scores
    assert (sums <= 1 + 1e-5).all() and (sums > 0.99).all()
    streamed = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5)
    assert streamed["events"] == detected["events"]

    (row,) = Annotator(str(folder), tasks=("tags", "events", "frame_scores"), threshold=0.5).annotate([("a", audio)])
    assert event_labels(row["events"]) == {"go"}
    np.testing.assert_allclose(row["frame_scores"], detected["frame_scores"], atol=1e-6)

    live = LiveDetector(str(folder), hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False, threshold=0.5)
    updates = live.push(audio) + live.flush()
    assert event_labels([event for update in updates for event in update.events]) == {"go"}
    live_sums = np.concatenate([u.step_scores for u in updates]).sum(axis=1)
    assert (live_sums <= 1 + 1e-5).all() and (live_sums > 0.99).all()

    wav, out = tmp_path / "clip.wav", tmp_path / "events.tsv"
    sf.write(wav, audio, RATE, subtype="FLOAT")
    assert detect.main([str(wav), "--model", str(folder), "--threshold", "0.5", "--output", str(out)]) == 0
    with open(out, newline="") as handle:
        assert {row["event_label"] for row in csv.DictReader(handle, delimiter="\t")} == {"go"}


def test_a_single_label_ensemble_averages_frame_probabilities_by_softmax():
    members = [single_label_detector(seed=0), single_label_detector(seed=1, bias=(0.0, 1.5, -1.0))]
    ensemble = HTSATEnsembleModel.from_members(members, average="probabilities")
    features = HTSATFeatureExtractor()(np.random.default_rng(1).standard_normal(RATE * 10).astype(np.float32) * 0.05,
                                       sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        combined = ensemble(input_features=features).frame_logits
        expected = torch.stack([m(input_features=features).frame_logits.softmax(-1) for m in members]).mean(0)
    scores = logits_to_scores(combined, ensemble.config.problem_type)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_mapped_single_label_scores_add_up_within_a_group():
    """Exclusive classes share a step's probability: a group is active with the sum of its members' scores (the max
    would say neither of two equally likely keywords of a group is there)."""
    scores = np.array([[0.4, 0.4, 0.2], [0.1, 0.0, 0.9]], dtype=np.float32)
    mapping = {"command": ["go", "yes"], "no": ["no"]}
    mapped, labels = map_scores(scores, mapping, list(LABELS.values()), exclusive=True)
    assert labels == ["command", "no"]
    np.testing.assert_allclose(mapped, [[0.8, 0.2], [0.1, 0.9]], rtol=1e-6)
    independent, _ = map_scores(scores, mapping, list(LABELS.values()))
    np.testing.assert_allclose(independent[:, 0], [0.4, 0.1])


def test_the_sed_pipeline_maps_single_label_scores_by_sum(folder, audio):
    detector = pipeline("sound-event-detection", model=str(folder))
    plain = detector(audio, return_frame_scores=True)
    mapped = detector(audio, return_frame_scores=True, label_mapping={"command": ["go", "yes"], "no": ["no"]})
    np.testing.assert_allclose(mapped["frame_scores"][:, 0], plain["frame_scores"][:, :2].sum(axis=1), rtol=1e-6)


def test_the_classification_pipeline_makes_clip_scores_as_the_annotator(folder, audio):
    """One rule for clip scores: the pipeline's tags are the annotator's exactly; `function_to_apply` still overrides
    it, as in Transformers."""
    from htsat_hf.annotation import Annotator

    classify = pipeline("audio-classification", model=str(folder))
    (row,) = Annotator(str(folder), tasks=("tags",), top_k=3).annotate([("a", audio)])
    assert classify(audio, top_k=3) == row["tags"]
    as_sigmoid = {tag["label"]: tag["score"] for tag in classify(audio, top_k=3, function_to_apply="sigmoid")}
    assert as_sigmoid["go"] > 0.85 and as_sigmoid["yes"] > 0.6  # independent scores: what frames must not use


# ---------------------------------------------------------------------------------------------------------------------
# Window clip scores cap a single-label model's frame scores (issue #32: the demo's keyword model reported events, at a
# window's first or last step, for classes whose clip score was below 0.1).

EDGE_BIAS = (2.0, 4.0, -3.0)  # go, yes, no
EDGE_DROP = 10.0  # "yes" loses this much wherever the step has a left neighbour: all steps but a window's first


def edge_detector(problem_type: str) -> HTSATForSoundEventDetection:
    """A tiny detector whose every window has the same step logits, whatever the audio: the final norm makes every
    token 1, and the head's left tap takes EDGE_DROP off "yes", except at the window's first step (zero-padded).
    Step logits: (2, 4, -3) at a window's first step (softmax "yes" 0.88), (2, -6, -3) elsewhere; the window's
    clip logits give "yes" a softmax of 0.0005 (and a sigmoid model an event for "yes" at each window's first step)."""
    model = single_label_detector(bias=EDGE_BIAS)
    model.config.problem_type = problem_type
    with torch.no_grad():
        model.htsat.norm.weight.zero_()
        model.htsat.norm.bias.fill_(1.0)
        weight = model.classifier.conv.weight  # (labels, hidden, frequency groups, 3 time taps)
        weight.zero_()
        weight[1, :, :, 0] = -EDGE_DROP / (weight.shape[1] * weight.shape[2])
    return model


def edge_window_logits(model: HTSATForSoundEventDetection) -> torch.Tensor:
    """(token_steps, labels) step logits of any window of `edge_detector`."""
    steps = torch.tensor(EDGE_BIAS).repeat(model.config.token_steps, 1)
    steps[1:, 1] -= EDGE_DROP
    return steps


@pytest.fixture(scope="module")
def edge_folders(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for problem_type in ("single_label_classification", "multi_label_classification"):
        path = tmp_path_factory.mktemp(problem_type)
        edge_detector(problem_type).save_pretrained(path)
        HTSATFeatureExtractor().save_pretrained(path)
        folders[problem_type] = path
    return folders


def test_frame_scores_are_capped_by_the_window_clip_score():
    window = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [-4.0, 0.0]])  # clip logits (-4/3, 0)
    stitched = with_window_clip_logits(window, "single_label_classification")
    assert stitched.shape == (3, 4)
    torch.testing.assert_close(stitched[:, 2:], torch.tensor([[-4 / 3, 0.0]]).expand(3, 2))
    scores = frame_scores(stitched, "single_label_classification")
    clip = torch.tensor([-4 / 3, 0.0]).softmax(-1)
    torch.testing.assert_close(scores, torch.minimum(window.softmax(-1), clip), atol=1e-6, rtol=1e-6)
    assert scores[0, 0] == pytest.approx(clip[0].item(), rel=1e-6) and window.softmax(-1)[0, 0] > 0.98
    for problem_type in ("multi_label_classification", "regression"):  # unchanged: the logits' own scores
        assert with_window_clip_logits(window, problem_type) is window
        assert torch.equal(frame_scores(window, problem_type), logits_to_scores(window, problem_type))


def test_no_entry_point_reports_a_label_the_window_clip_score_rules_out(edge_folders, tmp_path):
    """A one-window clip: "yes" has a softmax of 0.88 at the first step but a clip score of 0.0005; no entry point
    reports it, and no frame score exceeds the clip score."""
    from htsat_hf.commands import detect
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    folder = edge_folders["single_label_classification"]
    audio = (np.random.default_rng(2).standard_normal(RATE * 10) * 0.05).astype(np.float32)
    clip = {tag["label"]: tag["score"] for tag in pipeline("audio-classification", model=str(folder))(audio)}
    assert clip["yes"] < 0.001 and clip["go"] > 0.99
    window = edge_window_logits(single_label_detector())
    assert window.softmax(-1)[0, 1] > 0.85  # the step the old rule gave an event for "yes"
    clip_scores = np.array([clip[label] for label in LABELS.values()], dtype=np.float32)

    detected = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5, return_frame_scores=True)
    assert event_labels(detected["events"]) == {"go"}
    assert (detected["frame_scores"] <= clip_scores + 1e-6).all()
    expected = np.minimum(window.softmax(-1).numpy(), clip_scores)
    np.testing.assert_allclose(detected["frame_scores"], expected, atol=1e-5)
    assert pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5)["events"] == detected["events"]

    (row,) = Annotator(str(folder), tasks=("events", "frame_scores"), threshold=0.5).annotate([("a", audio)])
    assert row["events"] == detected["events"]
    np.testing.assert_allclose(row["frame_scores"], detected["frame_scores"], atol=1e-6)

    for pad_start in (False, True):
        live = LiveDetector(str(folder), hop_seconds=1.0, lookahead_seconds=10.0, pad_start=pad_start, threshold=0.5)
        updates = live.push(audio) + live.flush()
        assert event_labels([event for update in updates for event in update.events]) == {"go"}
        live_scores = np.concatenate([update.step_scores for update in updates])
        assert live_scores[:, 1].max() < 0.001  # every window's clip score rules "yes" out

    wav, out = tmp_path / "clip.wav", tmp_path / "events.tsv"
    sf.write(wav, audio, RATE, subtype="FLOAT")
    assert detect.main([str(wav), "--model", str(folder), "--threshold", "0.5", "--output", str(out)]) == 0
    with open(out, newline="") as handle:
        assert {row["event_label"] for row in csv.DictReader(handle, delimiter="\t")} == {"go"}


@pytest.mark.parametrize("seconds", [10.0, 27.3])
def test_a_multi_label_models_frame_scores_stay_the_plain_sigmoid(edge_folders, seconds):
    """The paper's per-step sigmoid, uncapped: "yes" at a window's first step is an event of its own."""
    from htsat_hf.annotation import Annotator

    folder = edge_folders["multi_label_classification"]
    audio = (np.random.default_rng(3).standard_normal(int(RATE * seconds)) * 0.05).astype(np.float32)
    model = HTSATForSoundEventDetection.from_pretrained(folder).eval()
    features = HTSATFeatureExtractor.from_pretrained(folder)(audio, sampling_rate=RATE, padding=False,
                                                             return_tensors="pt")
    with torch.no_grad():
        expected = model(**features).frame_logits[0].double().sigmoid().float().numpy()
    detected = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5, return_frame_scores=True)
    np.testing.assert_allclose(detected["frame_scores"], expected, atol=1e-5)
    assert "yes" in event_labels(detected["events"])
    (row,) = Annotator(str(folder), tasks=("events", "frame_scores"), threshold=0.5).annotate([("a", audio)])
    np.testing.assert_allclose(row["frame_scores"], expected, atol=1e-5)
    assert row["events"] == detected["events"]


def test_a_long_single_label_input_is_capped_window_by_window_and_streams_as_its_grid(edge_folders, monkeypatch):
    """Several overlapping windows: each step is capped by its windows' stitched clip logits (here every window's are
    the same, so by the one window clip score); streamed events equal the returned grid's, and the annotator's."""
    import htsat_hf.pipeline_htsat as pipeline_module
    from htsat_hf.annotation import Annotator
    from htsat_hf.sed_postprocessing import frames_to_events

    monkeypatch.setattr(pipeline_module, "READ_BLOCK_SECONDS", 3.0)  # many blocks, windows straddle them
    folder = edge_folders["single_label_classification"]
    audio = (np.random.default_rng(4).standard_normal(int(RATE * 31.7)) * 0.05).astype(np.float32)
    model = HTSATForSoundEventDetection.from_pretrained(folder).eval()
    features = HTSATFeatureExtractor.from_pretrained(folder)(audio, sampling_rate=RATE, padding=False,
                                                             return_tensors="pt")
    with torch.no_grad():
        stitched_logits = model(**features).frame_logits[0]
    clip_scores = edge_window_logits(model).mean(0).softmax(-1).numpy()
    expected = np.minimum(logits_to_scores(stitched_logits, "single_label_classification").numpy(), clip_scores)

    detector = pipeline("sound-event-detection", model=str(folder))
    for threshold in (0.5, 0.1, 0.0001):
        detected = detector(audio, threshold=threshold, return_frame_scores=True, window_batch_size=2)
        np.testing.assert_allclose(detected["frame_scores"], expected, atol=1e-5)
        assert (detected["frame_scores"] <= clip_scores + 1e-6).all()
        assert detector(audio, threshold=threshold, window_batch_size=2)["events"] == detected["events"]
        grid_events = frames_to_events(detected["frame_scores"], detected["frame_times"][1], detected["labels"],
                                       threshold=threshold, duration_seconds=len(audio) / RATE)
        assert detected["events"] == grid_events
        (row,) = Annotator(str(folder), tasks=("events", "frame_scores"), threshold=threshold).annotate([("a", audio)])
        assert row["events"] == detected["events"]
        np.testing.assert_allclose(row["frame_scores"], detected["frame_scores"], atol=1e-6)
    assert event_labels(detector(audio, threshold=0.5)["events"]) == {"go"}
    uncapped = logits_to_scores(stitched_logits, "single_label_classification").numpy()
    assert uncapped[0, 1] > 0.85  # the grid's first step: only window 0's first step covers it


def test_a_single_label_ensemble_is_capped_the_same_way_in_every_entry_point(tmp_path):
    """Members combined per window first, then the window clip cap: the annotator's rows and the live detector's
    steps (in its offline-identity settings) equal the SED pipeline's grid, streamed events the grid's."""
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    members = [edge_detector("single_label_classification"), single_label_detector(seed=1, bias=(0.0, 1.5, -1.0))]
    HTSATEnsembleModel.from_members(members, average="probabilities").save_pretrained(tmp_path)
    HTSATFeatureExtractor().save_pretrained(tmp_path)
    audio = (np.random.default_rng(5).standard_normal(int(RATE * 23.1)) * 0.05).astype(np.float32)
    detector = pipeline("sound-event-detection", model=str(tmp_path))
    detected = detector(audio, threshold=0.3, return_frame_scores=True)
    assert detector(audio, threshold=0.3)["events"] == detected["events"]
    assert detected["events"] and (detected["frame_scores"].sum(axis=1) <= 1 + 1e-5).all()
    (row,) = Annotator(str(tmp_path), tasks=("events", "frame_scores"), threshold=0.3).annotate([("a", audio)])
    assert row["events"] == detected["events"]
    np.testing.assert_allclose(row["frame_scores"], detected["frame_scores"], atol=1e-5)
    live = LiveDetector(str(tmp_path), hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False, threshold=0.3)
    updates = live.push(audio) + live.flush()
    np.testing.assert_allclose(np.concatenate([u.step_scores for u in updates]), detected["frame_scores"], atol=1e-5)
    assert sorted((e["label"], e["onset"]) for u in updates for e in u.events) == sorted(
        (e["label"], e["onset"]) for e in detected["events"])


def test_an_ensembles_frame_scores_never_exceed_its_own_clip_score(tmp_path):
    """The cap is the ensemble's clip score (the members' clip logits combined), not a score of the combined steps'
    mean: averaged probabilities make the two differ."""
    members = [edge_detector("single_label_classification"), single_label_detector(seed=1, bias=(0.0, 1.5, -1.0))]
    ensemble = HTSATEnsembleModel.from_members(members, average="probabilities")
    ensemble.save_pretrained(tmp_path)
    HTSATFeatureExtractor().save_pretrained(tmp_path)
    audio = (np.random.default_rng(6).standard_normal(RATE * 10) * 0.05).astype(np.float32)  # one window
    features = HTSATFeatureExtractor()(audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        clip = logits_to_scores(ensemble.eval()(input_features=features).logits[0], "single_label_classification")
    detected = pipeline("sound-event-detection", model=str(tmp_path))(audio, return_frame_scores=True)
    assert (detected["frame_scores"] <= clip.numpy() + 1e-6).all()
    assert np.isclose(detected["frame_scores"].max(axis=0), clip.numpy(), atol=1e-6).any()  # the cap is reached
