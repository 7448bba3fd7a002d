"""Bad or unusual input through the feature extractor and both pipelines: integer PCM is scaled, channel-shaped
arrays are refused before anything is allocated, one length rule everywhere, and the front end's precision."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import pipeline

from conftest import save_tiny_classifier
from htsat_hf import HTSATFeatureExtractor

RATE = 32000


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("model"), num_labels=5)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    gate = (np.sin(2 * np.pi * t / 1.7) > 0).astype(np.float64)
    return 0.5 * gate * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)


@pytest.mark.parametrize("dtype, scale", [(np.int16, 2**15), (np.int32, 2**31)])
def test_integer_pcm_is_scaled_like_soundfile(folder, dtype, scale):
    audio = speech_like(12.0)
    pcm = np.clip(np.round(audio * scale), -scale, scale - 1).astype(dtype)
    as_float = (pcm.astype(np.float64) / scale).astype(np.float32)
    extractor = HTSATFeatureExtractor()
    np.testing.assert_array_equal(
        extractor(pcm, sampling_rate=RATE)["input_features"], extractor(as_float, sampling_rate=RATE)["input_features"]
    )
    classify = pipeline("audio-classification", model=str(folder))
    assert classify(pcm, top_k=3) == classify(as_float, top_k=3)
    detect = pipeline("sound-event-detection", model=str(folder))
    for given in (pcm, {"array": pcm, "sampling_rate": RATE}):
        assert detect(given, threshold=0.5)["events"] == detect(as_float, threshold=0.5)["events"]
    uint8 = (128 + np.round(100 * audio[:4000])).astype(np.uint8)
    np.testing.assert_array_equal(
        extractor(uint8, sampling_rate=RATE)["input_features"],
        extractor(((uint8.astype(np.float32) - 128) / 128), sampling_rate=RATE)["input_features"],
    )
    with pytest.raises(ValueError, match="int64"):
        extractor(np.zeros(2000, dtype=np.int64), sampling_rate=RATE)


def test_a_2d_array_is_a_batch_of_clips_as_in_transformers():
    """Transformers' feature extractors take a 2-D array as (batch, samples) (its common tests pass (3, 800)); the
    extractor cannot know channels, so it does not guess them. (The pipelines, given a dict, can: see below.)"""
    extractor = HTSATFeatureExtractor()
    rng = np.random.default_rng(0)
    batch = (0.1 * rng.standard_normal((3, 800))).astype(np.float32)
    features = extractor(batch, sampling_rate=RATE, padding=False)["input_features"]
    assert features.shape == (3, 3, 64)
    np.testing.assert_array_equal(features, extractor(list(batch), sampling_rate=RATE, padding=False)["input_features"])
    stereo = np.zeros((RATE, 2), dtype=np.float32)  # channels last: a batch of 32,000 two-sample clips, too short
    with pytest.raises(ValueError, match=r"Waveform 0 has 2 samples"):
        extractor(stereo, sampling_rate=RATE)
    with pytest.raises(ValueError, match=r"x.mean\(axis=0\)"):
        extractor(np.zeros((1, 2, RATE), np.float32), sampling_rate=RATE)


@pytest.mark.parametrize("rate", [16000, 32000.5, 31999.9])
def test_the_extractor_refuses_another_rate_even_a_fraction_off(rate):
    """int(32000.5) == 32000 let a fractional rate through as the model's."""
    with pytest.raises(ValueError, match=rf"sampled at {rate} Hz.*audio_decoding.resample"):
        HTSATFeatureExtractor()(np.zeros(RATE, np.float32), sampling_rate=rate)
    assert HTSATFeatureExtractor()(np.zeros(RATE, np.float32), sampling_rate=32000.0)["input_features"].shape[0] == 1


def test_channel_shaped_arrays_in_the_pipelines(folder):
    """A bare 2-D array is refused (channels, or a batch?); a dict is one recording, so its channels are averaged,
    either way round, as a file's are."""
    detect = pipeline("sound-event-detection", model=str(folder))
    with pytest.raises(ValueError, match=r'Expected mono audio.*"sampling_rate": rate\}.*averaged'):
        detect(np.zeros((RATE, 2), np.float32))
    stereo = np.stack([speech_like(3.0, 1), speech_like(3.0, 2)]).astype(np.float32)
    averaged = detect({"array": stereo.mean(axis=0), "sampling_rate": 16000}, return_frame_scores=True)
    for layout in (stereo, stereo.T):
        result = detect({"array": layout, "sampling_rate": 16000}, return_frame_scores=True)
        np.testing.assert_allclose(result["frame_scores"], averaged["frame_scores"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(9, 9\).*at most 8 channels"):
        detect({"array": np.zeros((9, 9), np.float32), "sampling_rate": RATE})


def test_one_length_rule_everywhere(folder):
    extractor = HTSATFeatureExtractor()
    message = r"1 samples \(0.0 ms\), fewer than the 513 that one STFT frame needs"
    for padding in ("repeat", False):
        with pytest.raises(ValueError, match=message):
            extractor(np.ones(1, np.float32), sampling_rate=RATE, padding=padding)
    with pytest.raises(ValueError, match=message):
        pipeline("audio-classification", model=str(folder))(np.ones(1, np.float32))
    with pytest.raises(ValueError, match=message) as raised:
        pipeline("sound-event-detection", model=str(folder))(np.ones(1, np.float32))
    assert "padding" not in str(raised.value)  # no option the pipeline does not take
    assert extractor(np.ones(513, np.float32), sampling_rate=RATE)["input_features"].shape == (1, 1001, 64)


def float64_log_mel(extractor: HTSATFeatureExtractor, audio: np.ndarray) -> np.ndarray:
    """The front end in float64 throughout (librosa's definition, with numpy)."""
    from transformers.audio_utils import mel_filter_bank

    n_fft, hop = extractor.n_fft, extractor.hop_length
    padded = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    filters = mel_filter_bank(n_fft // 2 + 1, extractor.feature_size, extractor.f_min, extractor.f_max,
                              extractor.sampling_rate, norm="slaney", mel_scale="slaney")
    return 10 * np.log10(np.maximum(power @ filters, 1e-10))


@pytest.mark.parametrize("rate, hop, f_min, f_max", [
    (32000, 320, 50, 14000), (16000, 160, 50, 8000), (32000, 320, 20, 16000), (48000, 480, 50, 14000),
])
def test_front_end_within_1e4_db_of_float64(rate, hop, f_min, f_max):
    extractor = HTSATFeatureExtractor(sampling_rate=rate, hop_length=hop, f_min=f_min, f_max=f_max)
    rng = np.random.default_rng(1)
    t = np.arange(3 * rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * 700 * t) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)
    ours = extractor(audio, sampling_rate=rate, padding=False)["input_features"][0]
    reference = float64_log_mel(extractor, audio)
    assert np.abs(ours - reference).max() < 1e-4
