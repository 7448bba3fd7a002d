"""One rule for every way audio arrives (file, bytes, dict, array): the first audio stream, each channel resampled by
FFmpeg's libswresample, the channels averaged; paths are paths; damaged files warn."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from transformers import pipeline

from conftest import needs_torchcodec, save_tiny_classifier, save_tiny_detector
from htsat_hf.audio_decoding import AudioInputError, decode_file
from htsat_hf.pipeline_htsat import audio_source

RATE = 32000
TOLERANCE = 1e-5  # scores of the same audio, whichever way it arrives (the averaged mono differs by float rounding)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return str(save_tiny_detector(tmp_path_factory.mktemp("detector")))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return str(save_tiny_classifier(tmp_path_factory.mktemp("classifier")))


def channels(seconds: float, rate: int, count: int) -> np.ndarray:
    """(samples, count) float32: a different sound in each channel."""
    rng = np.random.default_rng(count)
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 / (c + 1) * np.sin(2 * np.pi * (300 + 700 * c) * t) * (np.sin(2 * np.pi * t / (c + 2)) > 0)
                     + 0.01 * rng.standard_normal(t.size) for c in range(count)], axis=1).astype(np.float32)


def decoded(path, warnings=None) -> np.ndarray:
    return np.concatenate(list(decode_file(str(path), RATE, 30 * RATE, warnings)))


@pytest.fixture(params=["in process", "command"])
def decoder(request, monkeypatch):
    """Both decoders of a file: torchcodec in process, and the `ffmpeg` command (torchcodec hidden)."""
    if request.param == "command":
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    return request.param


def test_the_same_stereo_audio_scores_the_same_whichever_way_it_arrives(tmp_path, detector, classifier):
    """The issue's check: a stereo file, its bytes, the same channels as a dict (either way round) and the mono
    average that the README tells array users to make give the same scores, within `TOLERANCE`."""
    stereo = channels(4.0, 44100, 2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    inputs = {
        "path": str(path), "Path": path, "bytes": path.read_bytes(),
        "dict (samples, channels)": {"array": stereo, "sampling_rate": 44100},
        "dict (channels, samples)": {"array": stereo.T.copy(), "sampling_rate": 44100},
        "mono average": {"array": stereo.mean(axis=1), "sampling_rate": 44100},
    }
    detect = pipeline("sound-event-detection", model=detector)
    classify = pipeline("audio-classification", model=classifier)
    reference = detect(str(path), return_frame_scores=True)["frame_scores"]
    tags = {item["label"]: item["score"] for item in classify(str(path), top_k=5)}
    for name, given in inputs.items():
        np.testing.assert_allclose(detect(given, return_frame_scores=True)["frame_scores"], reference, rtol=0,
                                   atol=TOLERANCE, err_msg=name)
        for item in classify(given, top_k=5):
            assert item["score"] == pytest.approx(tags[item["label"]], abs=TOLERANCE), name


def test_a_5_1_file_is_the_plain_average_of_its_channels_lfe_included(tmp_path, decoder):
    """Not FFmpeg's -ac 1 matrix (+3 dB for stereo, +7.7 dB for 5.1, the LFE dropped): every channel weighs the same,
    in a file and in a dict alike."""
    six = channels(2.0, 48000, 6)
    path = tmp_path / "surround.wav"
    sf.write(path, six, 48000, subtype="FLOAT")
    from_file = decoded(path)
    np.testing.assert_array_equal(from_file, audio_source({"array": six, "sampling_rate": 48000}, RATE).array)
    lfe_only = np.zeros_like(six)
    lfe_only[:, 3] = 0.6 * np.sin(2 * np.pi * 80 * np.arange(len(six)) / 48000)  # an 80-Hz tone in the LFE channel
    sf.write(path, lfe_only, 48000, subtype="FLOAT")
    rms = np.sqrt(np.mean(np.square(decoded(path)[RATE // 4 : -RATE // 4], dtype=np.float64)))
    assert rms == pytest.approx(0.6 / np.sqrt(2) / 6, rel=1e-3)


@pytest.mark.parametrize("rate", [15999, 44101])
def test_an_unusual_rate_is_resampled_as_its_file_is_with_bounded_memory(tmp_path, rate):
    """torchaudio built a kernel for the rates' ratio (gigabytes for 44,101 Hz); libswresample's memory does not depend
    on it. The array gives exactly its file's samples."""
    audio = channels(1.0, rate, 2)
    path = tmp_path / "odd.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    array = audio_source({"array": audio, "sampling_rate": rate}, RATE).array
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"resampling 1 s at {rate} Hz raised the peak memory by {grown_mb:.0f} MB"
    np.testing.assert_array_equal(array, decoded(path))
    assert len(array) == RATE


@pytest.mark.parametrize("rate", [44100.5, "44.1 kHz", 0, -16000])
def test_a_rate_that_is_not_a_whole_number_of_hz_is_refused(detector, rate):
    with pytest.raises(ValueError, match=r"sampling_rate=.* is not a positive whole number of Hz"):
        audio_source({"array": np.zeros(RATE, np.float32), "sampling_rate": rate}, RATE)
    assert len(audio_source({"array": np.zeros(RATE, np.float32), "sampling_rate": 16000.0}, RATE).array) == 2 * RATE


def test_resample_is_linear_in_the_channels():
    """Averaging then resampling equals resampling then averaging, to float rounding: the README's `x.mean()`
    for arrays is the same rule."""
    from htsat_hf.audio_decoding import resample

    audio = channels(1.0, 22050, 3).T.copy()
    np.testing.assert_allclose(resample(audio, 22050, RATE), resample(audio.mean(axis=0)[None], 22050, RATE),
                               atol=1e-6)


@pytest.mark.parametrize("name", ["2024-01-01T12:00:00.wav", "file:x.wav", "http:y.wav"])
def test_a_path_is_a_path_whatever_its_name(tmp_path, monkeypatch, decoder, name):
    """A relative name with a colon is a file, not a protocol ("Protocol not found"); `file:x.wav` is that file, not
    `x.wav`."""
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "x.wav", channels(1.0, RATE, 1), RATE, subtype="FLOAT")
    own = channels(1.0, RATE, 1)[:, 0] * -0.5
    sf.write(tmp_path / name, own, RATE, subtype="FLOAT")
    np.testing.assert_array_equal(decoded(name), own)
    np.testing.assert_array_equal(decoded(Path(name)), own)


def test_a_missing_file_with_a_protocol_like_name_is_not_another_file(tmp_path, monkeypatch, decoder):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "x.wav", channels(1.0, RATE, 1), RATE, subtype="FLOAT")
    with pytest.raises(AudioInputError, match="ffmpeg could not decode file:x.wav") as error:
        decoded("file:x.wav")
    assert "No such file" in str(error.value)


def test_a_list_of_numbers_and_a_path_object_are_inputs(tmp_path, detector, classifier):
    audio = channels(2.0, RATE, 1)[:, 0]
    path = tmp_path / "mono.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    detect = pipeline("sound-event-detection", model=detector)
    classify = pipeline("audio-classification", model=classifier)
    expected = detect(audio, return_frame_scores=True)["frame_scores"]
    np.testing.assert_array_equal(detect(audio.tolist(), return_frame_scores=True)["frame_scores"], expected)
    np.testing.assert_array_equal(detect(path, return_frame_scores=True)["frame_scores"], expected)
    assert classify(audio.tolist(), top_k=3) == classify(audio, top_k=3) == classify(path, top_k=3)


def test_a_zero_byte_cell_is_empty_audio_not_its_path(tmp_path, monkeypatch, detector):
    """An undecoded `datasets` cell with empty bytes used to fall back to its `path`, resolved from the current
    folder: an unrelated file was annotated in its place."""
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "unrelated.wav", channels(2.0, RATE, 1), RATE)
    with pytest.raises(AudioInputError, match=r"empty.*0 bytes.*unrelated.wav") as error:
        audio_source({"bytes": b"", "path": "unrelated.wav"}, RATE)
    assert error.value.stage == "empty"
    with pytest.raises(ValueError, match="0 bytes"):
        pipeline("sound-event-detection", model=detector)({"bytes": b"", "path": "unrelated.wav"})


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """name -> (path, what the warning must say) for damaged files that FFmpeg still decodes."""
    root = tmp_path_factory.mktemp("damaged")
    audio = channels(6.0, 44100, 2)
    sf.write(root / "good.wav", audio, 44100, subtype="PCM_16")
    good = (root / "good.wav").read_bytes()
    (root / "truncated.wav").write_bytes(good[: 44 + 4 * 100000])  # whole frames: only the header tells

    def ffmpeg(*args):
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", *args], check=True)

    ffmpeg("-i", str(root / "good.wav"), str(root / "good.mp3"))
    mp3 = (root / "good.mp3").read_bytes()
    (root / "truncated.mp3").write_bytes(mp3[: len(mp3) // 2])
    ffmpeg("-i", str(root / "good.wav"), str(root / "good.ogg"))
    ogg = bytearray((root / "good.ogg").read_bytes())
    ogg[len(ogg) // 2] ^= 0xFF
    (root / "crc.ogg").write_bytes(bytes(ogg))
    ffmpeg("-i", str(root / "good.wav"), "-i", str(root / "good.mp3"), "-map", "0:a", "-map", "1:a", "-c:a",
           "pcm_s16le", str(root / "two.mkv"))
    # healthy, but its header's duration is an estimate 1 s too long (VBR without a Xing header): no false alarm
    t = np.arange(20 * 44100) / 44100
    loud = 0.5 * np.random.default_rng(0).standard_normal(t.size)
    quiet_then_loud = np.where(t < 10, 0.001 * np.sin(2 * np.pi * 440 * t), loud)
    sf.write(root / "vbr.wav", quiet_then_loud.astype(np.float32), 44100)
    ffmpeg("-i", str(root / "vbr.wav"), "-q:a", "9", "-write_xing", "0", str(root / "good-vbr.mp3"))
    return {
        "truncated.wav": "truncated|corrupt input packet",
        "truncated.mp3": "filesize and duration do not match",
        "crc.ogg": "CRC mismatch",
        "two.mkv": r"2 audio streams; only the first \(stream #0\) is decoded",
    }, root


@pytest.mark.parametrize("name", ["truncated.wav", "truncated.mp3", "crc.ogg", "two.mkv"])
def test_damaged_files_warn(damaged, decoder, name):
    expected, root = damaged
    warnings: list[str] = []
    assert len(decoded(root / name, warnings)) > RATE
    assert any(re.search(expected[name], w) for w in warnings), warnings
    for healthy in ("good.wav", "good.mp3", "good.ogg", "good-vbr.mp3"):
        quiet: list[str] = []
        decoded(root / healthy, quiet)
        assert quiet == [], (healthy, quiet)


def test_a_damaged_cell_warns_in_its_row(damaged, detector):
    """The annotator's rows carry the warning of bytes too (a `datasets` cell), not only of paths."""
    from htsat_hf.annotation import Annotator

    _, root = damaged
    cell = {"bytes": (root / "crc.ogg").read_bytes(), "path": "crc.ogg"}
    (row,) = list(Annotator(detector, tasks=("tags",)).annotate([("cell", cell)]))
    assert row["warning"] and "CRC mismatch" in row["warning"] and "the bytes given" in row["warning"]
    assert str(root) not in row["warning"] and "htsat-bytes-" not in row["warning"]


@needs_torchcodec
def test_a_decoded_datasets_cell_is_read_from_its_file_in_the_pipelines(tmp_path):
    """`datasets` decodes an Audio column with torchcodec, resampled to the column's rate; the pipelines (like the
    annotator) read such a cell from the file it was decoded from, so it scores as that file does."""
    from datasets import Audio, Dataset

    stereo = (np.random.default_rng(8).standard_normal((2, 22050 * 3)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "a.wav", stereo.T, 22050)
    cells = Dataset.from_dict({"audio": [str(tmp_path / "a.wav")]}).cast_column("audio", Audio(sampling_rate=16000))
    cell = cells[0]["audio"]
    assert type(cell).__name__ == "AudioDecoder"
    np.testing.assert_array_equal(audio_source(cell, RATE).samples(), audio_source(tmp_path / "a.wav", RATE).samples())
