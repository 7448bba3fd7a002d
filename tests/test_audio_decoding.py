"""In-process decoding (torchcodec) gives exactly the ffmpeg command's samples, and hands damaged files to it."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_torchcodec

from htsat_hf.audio_decoding import AudioInputError, decode_bytes, decode_file, stream_with_ffmpeg

RATE = 32000
BLOCK = 30 * RATE  # what the pipelines read
FILES = [("wav", 16000, 2, 75.3), ("flac", 48000, 1, 0.5), ("mp3", 44100, 2, 64.2), ("flac", 32000, 1, 12.0)]


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    rng = np.random.default_rng(int(seconds * 10) + rate)
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * t / 3) > 0) + 0.02 * rng.standard_normal(len(t))
    return np.repeat(mono[:, None], channels, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoding")
    paths = []
    for index, (fmt, rate, channels, seconds) in enumerate(FILES):
        path = root / f"a{index}.{fmt}"
        audio = _tone(seconds, rate, channels)
        if fmt == "mp3":
            wav = root / f"a{index}.tmp.wav"
            sf.write(wav, audio, rate)
            subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), str(path)], check=True)
        else:
            sf.write(path, audio, rate)
        paths.append(str(path))
    return paths


def by_command(path: str, block: int = BLOCK, warnings=None) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32), *stream_with_ffmpeg(path, RATE, block, warnings)])


def decoded(path: str, block: int = BLOCK, warnings=None) -> tuple[np.ndarray, list[int]]:
    blocks = list(decode_file(path, RATE, block, warnings))
    return np.concatenate([np.zeros(0, np.float32), *blocks]), [len(b) for b in blocks]


@pytest.mark.parametrize("block", [BLOCK, 12345])
def test_the_same_samples_as_the_ffmpeg_command(files, block):
    for path in files:
        samples, sizes = decoded(path, block)
        expected = by_command(path, block)
        assert samples.dtype == np.float32 and len(samples) == len(expected), path
        np.testing.assert_array_equal(samples, expected, err_msg=path)
        assert all(size == block for size in sizes[:-1]) and 0 < sizes[-1] <= block, (path, sizes)


@needs_torchcodec
def test_good_files_do_not_need_the_ffmpeg_command(files, monkeypatch):
    expected = [by_command(path) for path in files]
    monkeypatch.setenv("PATH", "")  # stream_with_ffmpeg would now raise "ffmpeg was not found"
    for path, samples in zip(files, expected):
        np.testing.assert_array_equal(decoded(path)[0], samples)


def test_without_torchcodec_the_command_decodes(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails
    for path in files:
        np.testing.assert_array_equal(decoded(path)[0], by_command(path))


@needs_torchcodec
@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_a_wrong_stated_duration_loses_and_repeats_nothing(files, monkeypatch, factor):
    """A duration from the header can be an estimate: too short, the rest is decoded at once; too long, the range past
    the real end fails and the command confirms that nothing is left."""
    from torchcodec.decoders import AudioDecoder

    class Misstated(AudioDecoder):
        @property
        def metadata(self):
            real = super().metadata
            return dataclasses.replace(real, duration_seconds=real.duration_seconds * factor)

    monkeypatch.setattr("torchcodec.decoders.AudioDecoder", Misstated)
    for path in files:
        np.testing.assert_array_equal(decoded(path, 5 * RATE)[0], by_command(path, 5 * RATE))


def test_a_truncated_file_continues_in_the_command_with_its_warning(tmp_path):
    truncated = tmp_path / "truncated.flac"
    sf.write(truncated, _tone(80.0, 48000, 1), 48000)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    ours, theirs = [], []
    samples, _ = decoded(str(truncated), warnings=ours)
    np.testing.assert_array_equal(samples, by_command(str(truncated), warnings=theirs))
    assert 20 * RATE < len(samples) < 60 * RATE
    assert ours and "may be incomplete" in ours[0]
    assert [re.sub("0x[0-9a-f]+", "", w) for w in ours] == [re.sub("0x[0-9a-f]+", "", w) for w in theirs]


def test_a_file_that_is_not_audio_is_a_decode_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("not audio at all")
    with pytest.raises(AudioInputError, match="ffmpeg could not decode .*notes.wav") as error:
        list(decode_file(str(path), RATE, BLOCK))
    assert error.value.stage == "decode"


@pytest.mark.parametrize("torchcodec", ["in process", "missing"])
def test_bytes_decode_as_the_file_does(files, monkeypatch, torchcodec):
    """An MP3's bytes give the file's samples, in process and through the command. (Transformers' `ffmpeg_read` pipes
    them to ffmpeg, which cannot seek back to the encoder-delay header there and keeps the padding.)"""
    if torchcodec == "missing":
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails
    else:
        pytest.importorskip("torchcodec.decoders")
    assert any(path.endswith(".mp3") for path in files)
    for path in files:
        np.testing.assert_array_equal(decode_bytes(open(path, "rb").read(), RATE), by_command(path))
    with pytest.raises(AudioInputError, match="ffmpeg could not decode the bytes given: ") as error:
        decode_bytes(b"not audio at all", RATE)
    assert error.value.stage == "decode"
    assert "htsat-bytes-" not in str(error.value)  # the temporary copy's name is not the user's business


def test_stopping_early_stops_cleanly(files):
    blocks = decode_file(files[0], RATE, RATE)
    first = next(blocks)
    blocks.close()
    np.testing.assert_array_equal(first, by_command(files[0])[:RATE])
