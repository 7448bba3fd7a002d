"""The shipped AudioSet -> DESED mapping, and label mapping through the SED pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

import htsat_hf
from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection
from htsat_hf.sed_postprocessing import load_label_mapping, map_scores

MAPPINGS = Path(htsat_hf.__file__).parent / "label_mappings"


def test_desed_mapping_groups_audioset_classes():
    from conftest import shared_path
    import csv

    names = [row["display_name"] for row in csv.DictReader(open(shared_path("data", "audioset_class_labels_indices.csv")))]
    mapping = load_label_mapping(MAPPINGS / "desed_from_audioset.json")
    assert len(mapping) == 10
    scores = np.full((4, 527), 0.01)
    scores[1, names.index("Bark")] = 0.9
    scores[2, names.index("Meow")] = 0.8
    mapped, labels = map_scores(scores, mapping, names)
    assert labels[labels.index("Dog")] == "Dog" and mapped.shape == (4, 10)
    assert mapped[1, labels.index("Dog")] == 0.9 and mapped[2, labels.index("Cat")] == 0.8
    assert mapped[0].max() == 0.01
    thresholds = json.loads((MAPPINGS / "desed_thresholds.json").read_text())
    assert set(thresholds) == set(labels)


def test_pipeline_applies_a_label_mapping(tmp_path):
    torch.manual_seed(0)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=4,
                         id2label={0: "Dog", 1: "Bark", 2: "Meow", 3: "Engine"})
    HTSATForSoundEventDetection(config).save_pretrained(tmp_path)
    HTSATFeatureExtractor().save_pretrained(tmp_path)
    detector = pipeline("sound-event-detection", model=str(tmp_path))
    audio = np.random.default_rng(0).standard_normal(32000 * 10).astype(np.float32) * 0.05
    plain = detector(audio, return_frame_scores=True)
    mapped = detector(audio, return_frame_scores=True, label_mapping={"Canine": ["Dog", "Bark"], "Feline": [2]})
    assert mapped["labels"] == ["Canine", "Feline"]
    np.testing.assert_allclose(mapped["frame_scores"][:, 0], plain["frame_scores"][:, :2].max(axis=1))
    np.testing.assert_allclose(mapped["frame_scores"][:, 1], plain["frame_scores"][:, 2])
