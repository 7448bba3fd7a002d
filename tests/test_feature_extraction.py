"""HTSATFeatureExtractor: the original front end, length handling and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from htsat_hf import HTSATFeatureExtractor


@pytest.fixture(scope="module")
def extractor() -> HTSATFeatureExtractor:
    return HTSATFeatureExtractor()


def tone(seconds: float, rate: int = 32000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_ten_seconds_give_1001_frames(extractor):
    out = extractor(tone(10.0), sampling_rate=32000, return_tensors="pt")
    assert out["input_features"].shape == (1, 1001, 64)
    assert out["input_features"].dtype == torch.float32


def test_tone_energy_lands_in_the_right_mel_bin(extractor):
    features = extractor(tone(10.0, freq=1000.0), sampling_rate=32000, return_tensors="np")["input_features"][0]
    centre_hz = extractor.mel_filters().argmax(dim=0).numpy() * 32000 / 1024
    assert abs(centre_hz[features.mean(0).argmax()] - 1000.0) < 100


def test_short_clip_is_repeated_to_ten_seconds(extractor):
    clip = tone(4.0, freq=300.0) * np.linspace(0.1, 1.0, 128000, dtype=np.float32)
    repeated = extractor(clip, sampling_rate=32000, return_tensors="pt")["input_features"]
    by_hand = extractor(np.tile(clip, 3)[:320000], sampling_rate=32000, padding=False, return_tensors="pt")
    assert repeated.shape == (1, 1001, 64)
    torch.testing.assert_close(repeated, by_hand["input_features"])


def test_padding_false_keeps_exactly_the_audio(extractor):
    out = extractor(tone(4.0), sampling_rate=32000, padding=False, return_tensors="pt")
    assert out["input_features"].shape == (1, 401, 64)


def test_long_clip_is_never_cut(extractor):
    out = extractor(tone(25.0), sampling_rate=32000, return_tensors="pt")
    assert out["input_features"].shape == (1, 2501, 64)


def test_batched_equals_one_by_one(extractor):
    clips = [tone(10.0, freq=f) for f in (200.0, 900.0, 3000.0)]
    batch = extractor(clips, sampling_rate=32000, return_tensors="pt")["input_features"]
    for index, clip in enumerate(clips):
        single = extractor(clip, sampling_rate=32000, return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(batch[index], single)
    assert torch.is_tensor(extractor(torch.from_numpy(clips[0]), sampling_rate=32000, return_tensors="pt")["input_features"])


def test_save_and_reload(extractor, tmp_path):
    custom = HTSATFeatureExtractor(sampling_rate=16000, hop_length=160, f_max=8000.0)
    custom.save_pretrained(tmp_path)
    reloaded = HTSATFeatureExtractor.from_pretrained(tmp_path)
    assert (reloaded.sampling_rate, reloaded.hop_length, reloaded.f_max) == (16000, 160, 8000.0)
    torch.testing.assert_close(reloaded.mel_filters(), custom.mel_filters())


@pytest.mark.parametrize(
    "audio, kwargs, message",
    [
        (tone(1.0), dict(sampling_rate=16000), "sampled at 16000 Hz but this model expects 32000 Hz"),
        (tone(1.0), dict(), "Pass `sampling_rate=`"),
        (np.zeros(0, dtype=np.float32), dict(sampling_rate=32000), "empty"),
        (np.array([0.0, np.nan, 0.1] * 1000, dtype=np.float32), dict(sampling_rate=32000), "NaN or Inf"),
        (np.array([0.0, np.inf] * 1000, dtype=np.float32), dict(sampling_rate=32000), "NaN or Inf"),
        (np.zeros((2, 2, 1000), dtype=np.float32), dict(sampling_rate=32000), "multi-channel audio"),
        ([np.zeros((2, 32000), dtype=np.float32)], dict(sampling_rate=32000), "only mono audio"),
        ([tone(12.0), tone(11.0)], dict(sampling_rate=32000), "never cut"),
        (tone(0.01), dict(sampling_rate=32000, padding=False), "fewer than the 513"),
        (tone(1.0), dict(sampling_rate=32000, padding="zeros"), "padding='zeros' is not supported"),
        ("clip.wav", dict(sampling_rate=32000), "pipeline"),
    ],
)
def test_bad_input_raises_with_advice(extractor, audio, kwargs, message):
    with pytest.raises(ValueError, match=message):
        extractor(audio, **kwargs)


def test_long_clips_are_computed_in_blocks_with_the_same_frames(extractor):
    rng = np.random.default_rng(4)
    audio = (rng.standard_normal(32000 * 75 + 123) * 0.1).astype(np.float32)
    blocked = extractor(audio, sampling_rate=32000, return_tensors="pt")["input_features"]
    whole = extractor.log_mel(torch.from_numpy(audio)[None])
    assert blocked.shape == whole.shape == (1, extractor.num_frames(len(audio)), 64)
    torch.testing.assert_close(blocked, whole, atol=1e-4, rtol=0)
    small = extractor.log_mel_in_blocks(torch.from_numpy(audio)[None], block_frames=997)  # block edges everywhere
    torch.testing.assert_close(small, whole, atol=1e-4, rtol=0)


def test_f_max_above_nyquist_warns_once_per_setting():
    """A 16-kHz model with f_max above 8 kHz (the original Speech Commands model) is legal: the warning says so once,
    not at every extractor a pipeline, trainer or DataLoader worker builds."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    logger = logging.get_logger("htsat_hf.feature_extraction_htsat")
    with CaptureLogger(logger) as first:
        HTSATFeatureExtractor(sampling_rate=16000, hop_length=160, f_max=14001.5)
    with CaptureLogger(logger) as second:
        HTSATFeatureExtractor(sampling_rate=16000, hop_length=160, f_max=14001.5)
    assert "above the Nyquist frequency" in first.out and second.out == ""
