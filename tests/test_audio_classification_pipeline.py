"""`pipeline("audio-classification")` with the installed package: resampling, sigmoid scores, long audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

from conftest import save_tiny_classifier
from htsat_hf import HTSATFeatureExtractor, HTSATForAudioClassification
from htsat_hf.audio_decoding import resample


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("model"), num_labels=5)


def test_scores_are_sigmoid_of_logits_after_resampling(folder):
    classify = pipeline("audio-classification", model=str(folder))
    rng = np.random.default_rng(0)
    audio_16k = (rng.standard_normal(16000 * 5) * 0.1).astype(np.float32)
    result = classify({"array": audio_16k, "sampling_rate": 16000}, top_k=5)
    resampled = resample(audio_16k[None], 16000, 32000)  # libswresample, as a file at 16 kHz is
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


def test_long_audio_scores_are_the_models_own_long_input_path(folder):
    classify = pipeline("audio-classification", model=str(folder))
    assert type(classify).__name__ == "HTSATAudioClassificationPipeline"
    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(32000 * 47) * 0.1).astype(np.float32)
    model = HTSATForAudioClassification.from_pretrained(folder).eval()
    features = HTSATFeatureExtractor.from_pretrained(folder)(audio, sampling_rate=32000, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**features).logits.sigmoid()[0]
    for item in classify(audio, top_k=5, window_batch_size=3):
        assert item["score"] == pytest.approx(probabilities[model.config.label2id[item["label"]]].item(), abs=1e-5)


def test_progress_bar_past_two_minutes(folder, capsys):
    classify = pipeline("audio-classification", model=str(folder))
    classify(np.zeros(32000 * 130, np.float32) + 0.01, top_k=1)
    assert "audio classification" in capsys.readouterr().err
    classify(np.zeros(32000 * 30, np.float32) + 0.01, top_k=1)
    assert "audio classification" not in capsys.readouterr().err


def test_damaged_files_warn_or_raise_as_in_the_sed_pipeline(folder, tmp_path, caplog):
    import soundfile as sf

    rng = np.random.default_rng(3)
    sf.write(tmp_path / "whole.flac", (rng.standard_normal(32000 * 60) * 0.1).astype(np.float32), 32000)
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.flac").write_bytes(b"fLaC" + bytes(500))
    classify = pipeline("audio-classification", model=str(folder))
    with caplog.at_level("WARNING"):
        assert len(classify(str(tmp_path / "truncated.flac"), top_k=2)) == 2
    assert "may be incomplete" in caplog.text and "truncated.flac" in caplog.text
    with pytest.raises(ValueError, match="could not decode"):
        classify(str(tmp_path / "garbage.flac"))
