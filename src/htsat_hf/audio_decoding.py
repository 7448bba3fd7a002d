"""Audio files and bytes -> mono float32 samples at the model's rate, block by block, with FFmpeg.

Two decoders give the same samples (both are FFmpeg's decoders and libswresample with its defaults):
- in process, with torchcodec (the FFmpeg binding `datasets` decodes audio with): no process to start per file, which
  is most of the cost of a 10-s to 2-min file read through the command line (2-4x faster on 30-s blocks);
- the `ffmpeg` command, for what torchcodec cannot open or stops in (a corrupt or truncated file), for sources that
  are not files (live devices, URLs) and where torchcodec is not installed. Its messages become the error or warning.
"""

from __future__ import annotations

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


class AudioInputError(ValueError):
    """Audio that cannot be used, with the `stage` where that was found: "decode" (unreadable, or an unsupported
    input), "empty" (no samples), "too_short" (fewer samples than one STFT frame needs), "invalid_audio" (NaN/Inf)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def stream_with_ffmpeg(
    path: str, sampling_rate: int, block_samples: int, warnings: list[str] | None = None
) -> Iterator[np.ndarray]:
    """Decodes any file ffmpeg reads to mono float32 at `sampling_rate`, block by block. ffmpeg's complaints about a
    file it could still decode (e.g. a truncated FLAC) are appended to `warnings` when given, else logged."""
    if shutil.which("ffmpeg") is None:
        raise ValueError("ffmpeg was not found: install it (e.g. apt-get install ffmpeg) to read audio files.")
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", path, "-ac", "1",
               "-ar", str(sampling_rate), "-f", "f32le", "pipe:1"]
    messages = yield from ffmpeg_blocks(command, block_samples)
    if messages:
        message = f"ffmpeg reported problems decoding {path} (the audio may be incomplete); its last messages:\n{messages}"
        if warnings is None:
            logger.warning(message)
        else:
            warnings.append(message)


def ffmpeg_blocks(command: list[str], block_samples: int, stdin: Any = None) -> Iterator[np.ndarray]:
    """Runs an ffmpeg `command` that writes float32 samples to stdout and yields them block by block. Returns
    (as the generator's value) ffmpeg's last messages when it succeeded; raises `AudioInputError("decode")` with
    them when it failed. A consumer that stops early stops ffmpeg too. `stdin`: what ffmpeg reads as `pipe:0`."""
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
            yield np.frombuffer(chunk[: len(chunk) // 4 * 4], dtype=np.float32)
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
        source = command[command.index("-i") + 1] if "-i" in command else "the input"
        raise AudioInputError("decode", f"ffmpeg could not decode {source}: {error or 'unknown error'}")
    return error

def decode_file(
    path: str, sampling_rate: int, block_samples: int, warnings: list[str] | None = None
) -> Iterator[np.ndarray]:
    """A file of any format ffmpeg reads -> mono float32 blocks of `block_samples` at `sampling_rate` (the last one
    shorter), decoded in process where torchcodec can; where it cannot open the file or fails part way, the `ffmpeg`
    command reads it and its blocks continue exactly where torchcodec's stopped (it would have decoded the same samples
    up to there), so a damaged file gets ffmpeg's warning or error as before."""
    sent = 0
    in_process = _decode_in_process(path, sampling_rate, block_samples)
    while True:
        try:
            block = next(in_process)
        except StopIteration as finished:
            if finished.value:
                return
            break
        sent += len(block)
        yield block
    yield from _skip_samples(stream_with_ffmpeg(path, sampling_rate, block_samples, warnings), sent)


def decode_bytes(data: bytes, sampling_rate: int) -> np.ndarray:
    """The bytes of an audio file -> mono float32 samples at `sampling_rate`, the same samples as the file gives:
    torchcodec in process, else (torchcodec missing, or the bytes not decodable by it) the `ffmpeg` command on a
    temporary copy, whose error says what ffmpeg found. (Fed through a pipe, as Transformers' `ffmpeg_read` does,
    ffmpeg cannot seek back to an MP3's encoder-delay header and keeps the encoder's padding: a few hundred samples
    more at the start, which would shift every event of that input.)"""
    try:
        from torchcodec.decoders import AudioDecoder

        return AudioDecoder(data, sample_rate=sampling_rate, num_channels=1).get_all_samples().data[0].numpy()
    except Exception:  # noqa: BLE001, S110 - the ffmpeg command decodes it or says why not
        pass
    warnings: list[str] = []
    with tempfile.NamedTemporaryFile(prefix="htsat-bytes-") as copy:
        copy.write(data)
        copy.flush()
        try:
            blocks = list(stream_with_ffmpeg(copy.name, sampling_rate, 1 << 20, warnings))
        except AudioInputError as error:
            raise AudioInputError(error.stage, str(error).replace(copy.name, "the bytes given")) from error
        except ValueError as error:  # no ffmpeg command
            raise AudioInputError("decode", f"ffmpeg could not decode the bytes given: {error}") from error
    for message in warnings:
        logger.warning(message.replace(copy.name, "the bytes given"))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def _decode_in_process(path: str, sampling_rate: int, block_samples: int) -> Generator[np.ndarray, None, bool]:
    """torchcodec's blocks of the file; returns True when it decoded all of it, False when it could not (then the
    caller reads the rest with the ffmpeg command). Blocks are consecutive time ranges, except that from two blocks
    before the stream's stated end everything left is decoded at once: a stated duration can be an estimate (a VBR
    MP3 without a header), and asking for a range past the real end is an error."""
    try:
        from torchcodec.decoders import AudioDecoder

        decoder = AudioDecoder(path, sample_rate=sampling_rate, num_channels=1)
        duration = decoder.metadata.duration_seconds
        end = (decoder.metadata.begin_stream_seconds or 0.0) + duration
    except Exception:  # noqa: BLE001 - not installed, or a file it cannot open: the ffmpeg command decides
        return False
    step = block_samples / sampling_rate
    held = np.zeros(0, np.float32)  # ranges start at the stream's first sample: blocks are cut as the command's are
    complete = False
    for index in range(int(end / step) + 2):
        start = index * step
        last = start + 2 * step >= end
        try:
            samples = decoder.get_samples_played_in_range(start, None if last else start + step).data[0].numpy()
        except Exception:  # noqa: BLE001 - a damaged file (or a range past an overstated end)
            break
        held = np.concatenate([held, samples]) if len(held) else samples
        while len(held) >= block_samples:
            yield held[:block_samples]
            held = held[block_samples:]
        if last:
            complete = True
            break
    if len(held):
        yield held
    return complete


def _skip_samples(blocks: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """`blocks` without their first `count` samples."""
    for block in blocks:
        if count >= len(block):
            count -= len(block)
            continue
        yield block[count:]
        count = 0


def probe_duration(path: str) -> float | None:
    """Duration from the container header (for the progress bar), or None."""
    try:
        from torchcodec.decoders import AudioDecoder

        return AudioDecoder(path).metadata.duration_seconds_from_header
    except Exception:  # noqa: BLE001 - only a progress hint
        return None


__all__ = ["AudioInputError", "decode_bytes", "decode_file", "ffmpeg_blocks", "probe_duration", "stream_with_ffmpeg"]
