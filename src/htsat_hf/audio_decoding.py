"""Audio files, bytes and arrays -> mono float32 samples at the model's rate, block by block, with FFmpeg.

One rule for every input: the first audio stream is decoded to its own channels, each channel is resampled by FFmpeg's
libswresample with its defaults (files, bytes, and arrays at another rate alike: `resample`), and the channels are
averaged in our code (`downmix`, every channel with the same weight, LFE included; not FFmpeg's -ac 1 matrix, which
is +3 dB for stereo and drops the LFE). libswresample is also the better resampler for this front end: flat to 14 kHz
(-0.4 dB where torchaudio's default sinc is -1.8 dB), -26 dB aliasing just above 16 kHz (torchaudio -11 dB), and its
memory and time do not depend on the rates' ratio (torchaudio's kernel for 44,101 -> 32,000 Hz takes gigabytes).

Two decoders give the same samples (both are FFmpeg's decoders and libswresample with its defaults):
- in process, with torchcodec (the FFmpeg binding `datasets` decodes audio with): no process to start per file, which
  is most of the cost of a 10-s to 2-min file read through the command line (2-4x faster on 30-s blocks);
- the `ffmpeg` command, for what torchcodec cannot open or stops in (a corrupt or truncated file), for sources that
  are not files (live devices, URLs) and where torchcodec is not installed. Its messages become the error or warning.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

MAX_CHANNELS = 8  # a 2-D array of one recording: the side this short (or shorter) is the channels
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # what a URL passed on purpose starts with


class AudioInputError(ValueError):
    """Audio that cannot be used, with the `stage` where that was found: "decode" (unreadable, or an unsupported
    input), "empty" (no samples), "too_short" (fewer samples than one STFT frame needs), "invalid_audio" (NaN/Inf)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def downmix(channels: np.ndarray) -> np.ndarray:
    """(channels, samples) -> mono float32: the plain average of the channels, summed in float64 in channel order, so
    that the result does not depend on the array's memory layout (a file, a dict and a live block agree bit for bit).
    One channel is returned as it is (float32, not copied)."""
    if len(channels) == 1:
        return channels[0].astype(np.float32, copy=False)
    total = channels[0].astype(np.float64)
    for channel in channels[1:]:
        total += channel
    return (total / len(channels)).astype(np.float32)


def channels_first(array: np.ndarray) -> np.ndarray:
    """One recording as (channels, samples): 1-D is mono; of a 2-D array the side of at most `MAX_CHANNELS` is the
    channels, (channels, samples) or (samples, channels). Anything else is refused, saying what was expected."""
    if array.ndim == 1:
        return array[None]
    if array.ndim == 2:
        rows, columns = array.shape
        if rows <= MAX_CHANNELS < columns:
            return array
        if columns <= MAX_CHANNELS < rows:
            return array.T
    raise AudioInputError(
        "decode",
        f"Got an array of shape {array.shape} for one recording: expected (samples,), (channels, samples) or "
        f"(samples, channels) with at most {MAX_CHANNELS} channels and more samples than channels.",
    )


def whole_rate(value: Any) -> int:
    """A sampling rate as a positive whole number of Hz; a fractional one (44100.5) is refused, not rounded."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not (rate > 0 and rate.is_integer()):
        raise AudioInputError(
            "decode",
            f"sampling_rate={value!r} is not a positive whole number of Hz. Resampling needs the exact rate: round it "
            "if the fraction is a measurement error, or resample the audio to a whole rate first.",
        )
    return int(rate)


def ffmpeg_source(path: str | os.PathLike) -> str:
    """What FFmpeg opens for `path`: a path is always a file, given as `file:` + its absolute path, so that no part of
    its name is read as a protocol (`2024-01-01T12:00:00.wav`, `file:x.wav`). Only a string of the form
    `scheme://...` that names no file is passed on as a URL, as the user meant it."""
    text = os.fspath(path)
    if isinstance(path, str) and URL_SCHEME.match(text) and not os.path.exists(text):
        return text
    return "file:" + os.path.abspath(text)


def resample(channels: np.ndarray, orig_rate: int, sampling_rate: int) -> np.ndarray:
    """(channels, samples) float32 at `orig_rate` -> mono float32 at `sampling_rate`, by the same rule as a file:
    each channel resampled by FFmpeg's libswresample (a float WAV of the array decoded by `decode_bytes`), then
    averaged. Memory and time grow with the audio's length only, whatever the rates."""
    if orig_rate == sampling_rate:
        return downmix(channels)
    import soundfile  # here, not at the top: a remote-code folder's pipeline then loads without it

    buffer = io.BytesIO()
    container = "WAV" if channels.nbytes < 2**32 - 4096 else "RF64"  # RIFF sizes are 32-bit
    soundfile.write(buffer, channels.T, orig_rate, format=container, subtype="FLOAT")
    return decode_bytes(buffer.getvalue(), sampling_rate)


BENIGN_MESSAGES = re.compile(r"Guessed Channel Layout|Estimating duration from bitrate")  # notes, not damage
SHORT_BY = (0.5, 0.02)  # decoded audio this much shorter than the header says (seconds, and fraction): damaged


def report(message: str, warnings: list[str] | None) -> None:
    """A warning about an input: into `warnings` when given (a row's `warning` column), else the log."""
    if warnings is None:
        logger.warning(message)
    else:
        warnings.append(message)


def more_streams_message(name: str, count: int, used: int) -> str:
    return f"{name} has {count} audio streams; only the first (stream #{used}) is decoded."


def damage_messages(messages: str) -> str:
    """ffmpeg's messages without the notes that every healthy file of some formats gets."""
    return "\n".join(line for line in messages.splitlines() if not BENIGN_MESSAGES.search(line)).strip()


def probe_streams(path: str, input_options: list[str] | None = None) -> list[tuple[int, int]]:
    """(stream index, channels) of each audio stream of a file, read by ffprobe; a decode error when it cannot.
    `input_options`: ffmpeg's options for another kind of input instead (e.g. `-f pulse -i default`)."""
    if shutil.which("ffprobe") is None:
        raise ValueError("ffprobe was not found: install ffmpeg (e.g. apt-get install ffmpeg) to read audio files.")
    source = input_options if input_options is not None else ["-i", ffmpeg_source(path)]
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=index,channels", "-of", "json",
         *source], capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AudioInputError("decode", f"ffmpeg could not decode {path}: {result.stderr.strip() or 'unknown error'}")
    streams = [(int(s["index"]), int(s.get("channels") or 0)) for s in json.loads(result.stdout).get("streams", [])]
    if not streams or streams[0][1] < 1:
        raise AudioInputError("decode", f"ffmpeg could not decode {path}: it has no audio stream.")
    return streams


def stream_with_ffmpeg(
    path: str, sampling_rate: int, block_samples: int, warnings: list[str] | None = None
) -> Iterator[np.ndarray]:
    """Decodes any file ffmpeg reads to mono float32 at `sampling_rate`, block by block, by the module's rule (first
    audio stream, its channels resampled, then averaged). ffmpeg runs at the `warning` log level: its complaints
    about a file it could still decode (a truncated WAV or FLAC, an Ogg page with a CRC mismatch, a corrupt MP3
    frame) are appended to `warnings` when given, else logged; so is a second audio stream."""
    if shutil.which("ffmpeg") is None:
        raise ValueError("ffmpeg was not found: install it (e.g. apt-get install ffmpeg) to read audio files.")
    streams = probe_streams(path)
    if len(streams) > 1:
        report(more_streams_message(path, len(streams), streams[0][0]), warnings)
    channels = streams[0][1]
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning", "-i", ffmpeg_source(path), "-map",
               "0:a:0", "-ac", str(channels), "-ar", str(sampling_rate), "-f", "f32le", "pipe:1"]
    blocks = ffmpeg_blocks(command, block_samples * channels, frame=channels, name=str(path))
    messages = yield from _mono_blocks(blocks, channels)
    messages = damage_messages(messages or "")
    if messages:
        report(f"ffmpeg reported problems decoding {path} (the audio may be incomplete); its last messages:\n"
               f"{messages}", warnings)


def _mono_blocks(blocks: Generator[np.ndarray, None, str], channels: int) -> Generator[np.ndarray, None, str]:
    """Interleaved blocks of `channels` channels -> `downmix`ed blocks; returns what `blocks` returns."""
    try:
        while True:
            try:
                block = next(blocks)
            except StopIteration as done:
                return done.value
            yield downmix(block.reshape(-1, channels).T)
    finally:
        blocks.close()  # a consumer that stops early stops ffmpeg too


def ffmpeg_blocks(
    command: list[str], block_samples: int, stdin: Any = None, frame: int = 1, name: str | None = None
) -> Iterator[np.ndarray]:
    """Runs an ffmpeg `command` that writes float32 samples to stdout and yields them block by block (whole frames of
    `frame` samples). Returns (as the generator's value) ffmpeg's last messages when it succeeded; raises
    `AudioInputError("decode")` with them, naming the input as `name` (default: the command's `-i`), when it failed.
    A consumer that stops early stops ffmpeg too. `stdin`: what ffmpeg reads as `pipe:0`."""
    process = subprocess.Popen(command, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # ffmpeg's messages are drained as they come: unread, a file with many decoding warnings fills the stderr pipe and
    # ffmpeg blocks on it while we wait for samples. The last lines are kept for the error message.
    messages: deque[bytes] = deque(maxlen=20)
    drain = threading.Thread(target=lambda: messages.extend(process.stderr), daemon=True)
    drain.start()
    read_to_end = False
    try:
        while chunk := process.stdout.read(block_samples * 4):
            yield np.frombuffer(chunk[: len(chunk) // (4 * frame) * 4 * frame], dtype=np.float32)
        read_to_end = True
    finally:
        if not read_to_end:  # the consumer stopped early (an error downstream, Ctrl-C): stop ffmpeg too
            process.kill()
        process.stdout.close()
        returncode = process.wait()
        drain.join()
        process.stderr.close()
    error = b"".join(messages).decode(errors="replace").strip()
    if returncode != 0:
        source = name or (command[command.index("-i") + 1] if "-i" in command else "the input")
        raise AudioInputError("decode", f"ffmpeg could not decode {source}: {error or 'unknown error'}")
    return error


def decode_file(
    path: str, sampling_rate: int, block_samples: int, warnings: list[str] | None = None
) -> Iterator[np.ndarray]:
    """A file of any format ffmpeg reads -> mono float32 blocks of `block_samples` at `sampling_rate` (the last one
    shorter), decoded in process where torchcodec can; where it cannot open the file or fails part way, the `ffmpeg`
    command reads it and its blocks continue exactly where torchcodec's stopped (it would have decoded the same samples
    up to there), so a damaged file gets ffmpeg's warning or error as before. A file decoded in process that looks
    cut short gets ffmpeg's messages about it (`truncation_warning`)."""
    sent = 0
    notes: list[str] = []
    in_process = _decode_in_process(path, sampling_rate, block_samples, notes)
    while True:
        try:
            block = next(in_process)
        except StopIteration as finished:
            if finished.value is not None:
                for note in notes:
                    report(note, warnings)
                if message := truncation_warning(path, *finished.value):
                    report(message, warnings)
                return
            break
        sent += len(block)
        yield block
    yield from _skip_samples(stream_with_ffmpeg(path, sampling_rate, block_samples, warnings), sent)


def ffmpeg_messages(path: str) -> str:
    """What the `ffmpeg` command says (at the warning level, notes left out) while decoding the file's first audio
    stream to nothing: the words for damage found another way."""
    if shutil.which("ffmpeg") is None:
        return ""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning", "-i", ffmpeg_source(path), "-map", "0:a:0",
         "-f", "null", "-"], capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
    )
    return damage_messages(result.stderr)


def truncation_warning(path: str, seconds: float, stated: float | None) -> str:
    """The warning for a file decoded in process to `seconds` of audio, or "": a WAV whose data chunk is cut short
    (`wav_truncation`) always gets one; audio shorter than the header's `stated` duration by more than `SHORT_BY`
    (both the seconds and the fraction) gets one when ffmpeg confirms damage (a duration estimated from the bitrate,
    as for a VBR MP3 without a header, can be that far off in a healthy file). Either asks the `ffmpeg` command for
    its messages, so that both decoders report a damaged file in ffmpeg's words."""
    wav = wav_truncation(path)
    short = bool(stated) and stated - seconds > max(SHORT_BY[0], SHORT_BY[1] * stated)
    if not (wav or short):
        return ""
    messages = ffmpeg_messages(path)
    if wav:
        return wav + (f"; ffmpeg's messages:\n{messages}" if messages else ".")
    if not messages:
        return ""
    return (f"ffmpeg reported problems decoding {path} (the audio may be incomplete: {seconds:.2f} s decoded of the "
            f"{stated:.2f} s its header states); its last messages:\n{messages}")


def decode_bytes_blocks(
    data: bytes, sampling_rate: int, block_samples: int, warnings: list[str] | None = None
) -> Iterator[np.ndarray]:
    """The bytes of an audio file -> what `decode_file` gives for that file: they are decoded from a temporary copy,
    so that every input follows one rule (stream, channels, resampler, warnings), and an MP3's encoder delay is
    skipped as for its file. (Fed through a pipe, as Transformers' `ffmpeg_read` does, ffmpeg cannot seek back to the
    encoder-delay header and keeps the encoder's padding: a few hundred samples more at the start.) Messages name
    "the bytes given", not the copy."""
    if len(data) == 0:
        raise AudioInputError("empty", "The audio is empty: the bytes given hold 0 bytes.")
    with tempfile.NamedTemporaryFile(prefix="htsat-bytes-") as copy:
        copy.write(data)
        copy.flush()
        own: list[str] = []

        def named(message: str) -> str:
            return message.replace(ffmpeg_source(copy.name), "the bytes given").replace(copy.name, "the bytes given")

        try:
            yield from decode_file(copy.name, sampling_rate, block_samples, own)
        except AudioInputError as error:
            raise AudioInputError(error.stage, named(str(error))) from error
        except ValueError as error:  # no ffmpeg command
            raise AudioInputError("decode", f"ffmpeg could not decode the bytes given: {error}") from error
        finally:
            for message in own:
                report(named(message), warnings)


def decode_bytes(data: bytes, sampling_rate: int, warnings: list[str] | None = None) -> np.ndarray:
    """The bytes of an audio file -> all of its mono float32 samples at `sampling_rate` (`decode_bytes_blocks`)."""
    blocks = list(decode_bytes_blocks(data, sampling_rate, 1 << 20, warnings))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def audio_stream_indices(decoder: Any) -> list[int]:
    """The indices of a torchcodec decoder's container's audio streams. (torchcodec's public API names only the
    stream it opened; the container's are read with its core function, and a change there sends the file to the
    `ffmpeg` command, which probes them with ffprobe.)"""
    from torchcodec._core import get_container_metadata

    streams = get_container_metadata(decoder._decoder).streams
    return [stream.stream_index for stream in streams if stream.media_type == "audio"]


def _decode_in_process(
    path: str, sampling_rate: int, block_samples: int, notes: list[str]
) -> Generator[np.ndarray, None, tuple[float, float | None] | None]:
    """torchcodec's blocks of the file; returns None when it could not decode all of it (then the caller reads the
    rest with the ffmpeg command), else the seconds decoded and the duration the header states (or None). Notes (a
    second audio stream) go to `notes`. Blocks are consecutive time ranges, except that from two blocks before the
    stream's stated end everything left is decoded at once: a stated duration can be an estimate (a VBR MP3 without
    a header), and asking for a range past the real end is an error."""
    try:
        from torchcodec.decoders import AudioDecoder

        source = ffmpeg_source(path)
        decoder = AudioDecoder(source, sample_rate=sampling_rate)
        audio = audio_stream_indices(decoder)
        if decoder.stream_index != audio[0]:
            decoder = AudioDecoder(source, stream_index=audio[0], sample_rate=sampling_rate)
        duration = decoder.metadata.duration_seconds
        end = (decoder.metadata.begin_stream_seconds or 0.0) + duration
    except Exception:  # noqa: BLE001 - not installed, or a file it cannot open: the ffmpeg command decides
        return None
    if len(audio) > 1:
        notes.append(more_streams_message(path, len(audio), audio[0]))
    step = block_samples / sampling_rate
    held = np.zeros(0, np.float32)  # ranges start at the stream's first sample: blocks are cut as the command's are
    complete = False
    decoded = 0
    for index in range(int(end / step) + 2):
        start = index * step
        last = start + 2 * step >= end
        try:
            samples = downmix(decoder.get_samples_played_in_range(start, None if last else start + step).data.numpy())
        except Exception:  # noqa: BLE001 - a damaged file (or a range past an overstated end)
            break
        decoded += len(samples)
        held = np.concatenate([held, samples]) if len(held) else samples
        while len(held) >= block_samples:
            yield held[:block_samples]
            held = held[block_samples:]
        if last:
            complete = True
            break
    if len(held):
        yield held
    if not complete:
        return None
    return decoded / sampling_rate, decoder.metadata.duration_seconds_from_header


def wav_truncation(path: str) -> str:
    """A message when a RIFF WAV file's data chunk is shorter than its header says, else "". (FFmpeg and libsndfile
    both take such a file's length from its size, so no stated duration shows the loss; the command only notices a
    last packet cut short.) Streamed WAVs with an unknown size (0 or 0xFFFFFFFF) and other containers pass."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return ""
            size = os.fstat(file.fileno()).st_size
            while len(chunk := file.read(8)) == 8:
                length = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"data":
                    missing = length - (size - file.tell())
                    if 0 < missing and length not in (0, 0xFFFFFFFF):
                        return (f"{path} is a WAV file whose header states {length} bytes of audio, but {missing} of "
                                "them are missing: the file is truncated (the audio is incomplete)")
                    return ""
                file.seek(length + (length & 1), os.SEEK_CUR)
    except OSError:
        return ""
    return ""


def _skip_samples(blocks: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """`blocks` without their first `count` samples."""
    for block in blocks:
        if count >= len(block):
            count -= len(block)
            continue
        yield block[count:]
        count = 0


def probe_duration(path: str | os.PathLike | bytes) -> float | None:
    """Duration from the container header of a file or a file's bytes (for the progress bar), or None."""
    try:
        from torchcodec.decoders import AudioDecoder

        source = path if isinstance(path, bytes) else ffmpeg_source(path)
        return AudioDecoder(source).metadata.duration_seconds_from_header
    except Exception:  # noqa: BLE001 - only a progress hint
        return None


__all__ = ["MAX_CHANNELS", "AudioInputError", "channels_first", "decode_bytes", "decode_bytes_blocks", "decode_file",
           "downmix", "ffmpeg_blocks", "ffmpeg_messages", "ffmpeg_source", "probe_duration", "probe_streams",
           "resample", "stream_with_ffmpeg", "truncation_warning", "wav_truncation", "whole_rate"]
