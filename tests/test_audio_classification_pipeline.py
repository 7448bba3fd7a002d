"""`pipeline("audio-classification")` with the installed package: resampling, sigmoid scores, long audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from transformers import pipeline

from conftest import save_tiny_classifier
from htsat_hf import HTSATFeatureExtractor, HTSATForAudioClassification


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("model"), num_labels=5)


def test_scores_are_sigmoid_of_logits_after_resampling(folder):
    classify = pipeline("audio-classification", model=str(folder))
    rng = np.random.default_rng(0)
    audio_16k = (rng.standard_normal(16000 * 5) * 0.1).astype(np.float32)
    result = classify({"array": audio_16k, "sampling_rate": 16000}, top_k=5)
    resampled = torchaudio.functional.resample(torch.from_numpy(audio_16k), 16000, 32000).numpy()
    model = HTSATForAudioClassification.from_pretrained(folder).eval()
    features = HTSATFeatureExtractor.from_pretrained(folder)(resampled, sampling_rate=32000, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**features).logits.sigmoid()[0]
    for item in result:
        index = model.config.label2id[item["label"]]
        assert item["score"] == pytest.approx(probabilities[index].item(), abs=1e-5)


def test_long_audio_is_classified_whole(folder):
    classify = pipeline("audio-classification", model=str(folder))
    rng = np.random.default_rng(1)
    thirty_seconds = (rng.standard_normal(32000 * 30) * 0.1).astype(np.float32)
    assert len(classify(thirty_seconds, top_k=2)) == 2
