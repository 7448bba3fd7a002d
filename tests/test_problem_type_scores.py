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
from htsat_hf.scores import logits_to_scores
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
    """pipeline, annotator, live detector and detect_events.py: events only for "go", whose clip score is 0.78; a
    sigmoid on the softmax-trained logits gave "yes" (clip score 0.21) an event over the whole file."""
    from htsat_hf import detection_cli
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    clip = {tag["label"]: tag["score"] for tag in pipeline("audio-classification", model=str(folder))(audio)}
    assert clip["go"] > 0.5 > clip["yes"] > clip["no"]
    assert sum(clip.values()) == pytest.approx(1.0, abs=1e-5)

    detected = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5, return_frame_scores=True)
    assert event_labels(detected["events"]) == {"go"}
    np.testing.assert_allclose(detected["frame_scores"].sum(axis=1), 1.0, atol=1e-5)  # a softmax over labels
    streamed = pipeline("sound-event-detection", model=str(folder))(audio, threshold=0.5)
    assert streamed["events"] == detected["events"]

    (row,) = Annotator(str(folder), tasks=("tags", "events", "frame_scores"), threshold=0.5).annotate([("a", audio)])
    assert event_labels(row["events"]) == {"go"}
    np.testing.assert_allclose(row["frame_scores"], detected["frame_scores"], atol=1e-6)

    live = LiveDetector(str(folder), hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False, threshold=0.5)
    updates = live.push(audio) + live.flush()
    assert event_labels([event for update in updates for event in update.events]) == {"go"}
    np.testing.assert_allclose(np.concatenate([u.step_scores for u in updates]).sum(axis=1), 1.0, atol=1e-5)

    wav, out = tmp_path / "clip.wav", tmp_path / "events.tsv"
    sf.write(wav, audio, RATE, subtype="FLOAT")
    assert detection_cli.main([str(wav), "--model", str(folder), "--threshold", "0.5", "--output", str(out)]) == 0
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
