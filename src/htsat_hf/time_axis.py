"""The model's time axis: how an input of any length is cut into the model's windows (`window_layout`), the time grid
their step outputs share (`grid_steps`), the stitching of overlapping windows onto it (`stitch_on_grid`,
`StepStitcher`), and the streaming of audio into those windows with bounded memory (`StreamFrames`, `WindowStream`).

Shared by the model, the pipelines, the annotator and the live detector; it travels with the model as remote code
(relative imports only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .audio_decoding import AudioInputError
from .feature_extraction_htsat import AMIN

if TYPE_CHECKING:
    from .configuration_htsat import HTSATConfig

READ_BLOCK_SECONDS = 30.0  # audio read per block by a `WindowStream`


def check_positive_int(value: Any, name: str) -> int:
    """`value` as an int >= 1, or a ValueError naming the setting (a bool, a fraction or a number < 1)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    return int(value)


# ----------------------------------------------------------------------------------------------- windows
def window_starts(num_frames: int, window_frames: int, hop_frames: int) -> list[int]:
    """Start frames of overlapping windows covering every frame; the last window ends at the last frame."""
    if num_frames <= window_frames:
        return [0]
    last = num_frames - window_frames
    starts = list(range(0, last, hop_frames))
    if starts[-1] != last:
        starts.append(last)
    return starts


def long_input_hop_frames(config: HTSATConfig) -> int:
    """Frames between the starts of the overlapping windows of a long input (`long_input_hop_seconds`)."""
    return max(1, int(round(config.long_input_hop_seconds * config.sampling_rate / config.hop_length)))


def window_layout(config: HTSATConfig, num_frames: int) -> tuple[list[int], int]:
    """Start frames of the windows an input of `num_frames` frames is cut into, and the frames per window: one
    window of all frames (stretched to the image) up to `image_frames`, else `clip_frames` windows."""
    if num_frames <= config.image_frames:
        return [0], num_frames
    return window_starts(num_frames, config.clip_frames, long_input_hop_frames(config)), config.clip_frames


def window_start_frames(config: HTSATConfig, num_frames: int) -> tuple[torch.Tensor, int]:
    """`window_layout` as a tensor computed from the length alone (no Python loop over values), so that an exported
    graph takes inputs of any length: (windows,) start frames and the frames per window."""
    if num_frames <= config.image_frames:
        return torch.zeros(1, dtype=torch.long), num_frames
    window, hop = config.clip_frames, long_input_hop_frames(config)
    count = (num_frames - window + hop - 1) // hop + 1  # ceil((num_frames - window) / hop) hops, plus the last window
    return (torch.arange(count) * hop).clamp(max=num_frames - window), window


def grid_steps(config: HTSATConfig, num_frames: int) -> int:
    """Steps of the windows' time grid (steps of `clip_frames` windows) that cover `num_frames` frames:
    ceil((num_frames - 1) frames / frames per step), in integers, so exact, and a shape expression when exported."""
    per_window = config.clip_frames - 1
    return ((num_frames - 1) * config.token_steps + per_window - 1) // per_window


def step_seconds(config: HTSATConfig, num_frames: int) -> float:
    """Seconds of one step of the token-semantic time axis for an input of `num_frames` feature frames: a window's
    span (the input itself when it fits one image, else a `clip_frames` window) over `token_steps`."""
    frame_seconds = config.hop_length / config.sampling_rate
    window_frames = num_frames if num_frames <= config.image_frames else config.clip_frames
    return (window_frames - 1) * frame_seconds / config.token_steps


def total_steps(config: HTSATConfig, num_frames: int) -> int:
    """Steps of the time axis for an input of `num_frames` frames: one window's own, or the stitched grid's."""
    if num_frames <= config.image_frames:  # one window
        return config.token_steps
    return grid_steps(config, num_frames)


def stitch_window_steps(
    config: HTSATConfig, step_values: torch.Tensor, starts: torch.Tensor | list[int], num_frames: int
) -> torch.Tensor:
    """Per-window step values ([batch,] windows, steps, labels), windows starting at frames `starts` of an input of
    `num_frames` frames -> ([batch,] total steps, labels) on one time grid of `step_seconds` steps."""
    frame_seconds = config.hop_length / config.sampling_rate
    start_seconds = torch.as_tensor(starts, dtype=torch.float64) * frame_seconds
    start_steps = start_seconds / step_seconds(config, num_frames)
    return stitch_on_grid(step_values, start_steps, total_steps(config, num_frames))


GRID_TOLERANCE = 1e-6  # in steps: a time within this of a step boundary falls on the later step


def step_overlaps(position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window steps at `position` (float64, in grid steps) -> the first grid step each overlaps (the second is the
    next one) and the share of the step that falls on the second."""
    first = torch.floor(position + GRID_TOLERANCE)
    return first.long(), (position - first).clamp(min=0.0, max=1.0)


def stitch_on_grid(values: torch.Tensor, start_steps: torch.Tensor, total_steps: int) -> torch.Tensor:
    """([batch,] windows, steps, labels) window step values, window starts in grid steps (float64) ->
    ([batch,] total_steps, labels) overlap-weighted means on the grid; computed from shapes only (no loop over the
    batch or the windows), so an exported graph takes any batch and length."""
    *_, steps, labels = values.shape
    position = start_steps.reshape(-1, 1) + torch.arange(steps, dtype=torch.float64, device=start_steps.device)
    first, fraction = step_overlaps(position)
    flat = values.flatten(-3, -2)  # ([batch,] windows * steps, labels)
    sums = flat.new_zeros(*flat.shape[:-2], total_steps + 1, labels)
    weights = flat.new_zeros(total_steps + 1, 1)
    for index, weight in ((first, 1.0 - fraction), (first + 1, fraction)):
        weight = weight.reshape(-1, 1).to(values.device, values.dtype)
        index = index.clamp(max=total_steps).reshape(-1).to(values.device)
        sums = sums.index_add(-2, index, flat * weight)
        weights = weights.index_add(0, index, weight)
    return sums[..., :total_steps, :] / weights[:total_steps].clamp(min=1e-12)


class StepStitcher:
    """
    Averages the step outputs of overlapping windows onto one uniform time grid.

    Each window step covers `[start + j * step, start + (j + 1) * step)` seconds; it contributes to the (at most two)
    grid steps it overlaps, weighted by the overlap. Windows that start on the grid reduce to a plain average.
    Accumulates window by window; with `pop_final`, steps no later window can reach are handed out and dropped, so
    memory stays bounded for audio of any length.
    """

    GRID_TOLERANCE = GRID_TOLERANCE

    def __init__(
        self, total_steps: int | None, step_seconds: float, num_labels: int, device=None, dtype=torch.float32,
        drop_handed_out: bool = False,
    ):
        """total_steps None: the grid grows with the windows added (a stream of unknown length); `result` then takes
        the final number of steps, and steps at or past it are dropped, as a known length would clamp them.
        drop_handed_out: a window reaching steps already handed out by `pop_final` adds nothing to them (a live
        stream hands steps out before every window covering them has run); by default that is an error. Parts of
        windows before time 0 (a stream's padded start) are always dropped."""
        self.drop_handed_out = drop_handed_out
        self.total_steps = total_steps
        self.step_seconds = step_seconds
        rows = (total_steps if total_steps is not None else 1024) + 1
        self.sums = torch.zeros(rows, num_labels, device=device, dtype=dtype)
        self.weights = torch.zeros(rows, 1, device=device, dtype=dtype)
        self.offset = 0  # grid step of row 0: the steps before it were handed out by `pop_final`

    def first_step(self, start_seconds: float) -> int:
        """The earliest grid step a window starting at `start_seconds` adds to."""
        return max(0, math.floor(start_seconds / self.step_seconds + self.GRID_TOLERANCE))

    def add(self, values: torch.Tensor, start_seconds: torch.Tensor | list[float]) -> None:
        """values: (windows, steps, labels); start_seconds: (windows,) window start times."""
        windows, steps, _ = values.shape
        starts = torch.as_tensor(start_seconds, dtype=torch.float64).reshape(windows, 1)
        position = starts / self.step_seconds + torch.arange(steps, dtype=torch.float64)
        first, fraction = step_overlaps(position)
        second = first + 1
        if self.total_steps is None:
            self._reserve(int(second.max()) + 1)
        else:
            first, second = first.clamp(max=self.total_steps), second.clamp(max=self.total_steps)
        reached = int(first[first >= 0].min()) if bool((first >= 0).any()) else self.offset
        if reached < self.offset and not self.drop_handed_out:
            raise ValueError(f"A window reaches step {reached}, before step {self.offset} already handed out.")
        flat_values = values.reshape(windows * steps, -1).to(self.sums.dtype)
        for index, weight in ((first, 1.0 - fraction), (second, fraction)):
            weight = torch.where(index >= self.offset, weight, 0.0)  # before time 0, or already handed out
            index = index.clamp(min=self.offset)
            weight = weight.reshape(-1, 1).to(self.sums.device, self.sums.dtype)
            index = (index.reshape(-1) - self.offset).to(self.sums.device)
            self.sums.index_add_(0, index, flat_values * weight)
            self.weights.index_add_(0, index, weight)

    def _reserve(self, steps: int) -> None:
        """Grows the grid to hold steps up to `steps` (by half its size at least, so growing stays linear overall)."""
        rows = steps - self.offset
        if rows > self.sums.shape[0]:
            extra = max(rows, self.sums.shape[0] * 3 // 2) - self.sums.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            self.weights = torch.cat([self.weights, self.weights.new_zeros(extra, 1)])

    def pop_final(self, before_step: int) -> torch.Tensor:
        """(steps, labels) weighted means of the steps from the last one handed out up to `before_step` (exclusive),
        which the caller guarantees no later window reaches; they are dropped from the grid."""
        count = min(before_step - self.offset, self.sums.shape[0])
        if count <= 0:
            return self.sums[:0].clone()
        final = self.sums[:count] / self.weights[:count].clamp(min=1e-12)
        self.sums, self.weights = self.sums[count:].clone(), self.weights[count:].clone()
        self.offset += count
        return final

    def result(self, total_steps: int | None = None) -> torch.Tensor:
        """(total_steps - steps handed out, labels) weighted mean of every window step over each remaining grid step."""
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None:
            raise ValueError("This stitcher grows with its input: pass the final number of steps to result().")
        self._reserve(total)
        rows = max(0, total - self.offset)
        return self.sums[:rows] / self.weights[:rows].clamp(min=1e-12)


# -------------------------------------------------------------------------------------------- streaming
@dataclass
class SampleSpan:
    """One window's features as samples to compute them from: `log_mel(samples)[offset : offset + frames]`."""

    samples: torch.Tensor  # (samples,) float32
    offset: int
    frames: int


def span_features(spans: list[SampleSpan], feature_extractor, device: torch.device | str) -> list[torch.Tensor]:
    """(frames, mel) log-mel features of each span, computed on `device` in one batch per span shape."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, span in enumerate(spans):
        groups.setdefault((len(span.samples), span.offset, span.frames), []).append(index)
    features: list[torch.Tensor | None] = [None] * len(spans)
    with torch.inference_mode():
        for (_, offset, frames), indices in groups.items():
            waveforms = torch.stack([spans[i].samples for i in indices]).to(device, torch.float32)
            for i, window in zip(indices, feature_extractor.log_mel(waveforms)[:, offset : offset + frames]):
                features[i] = window
    return features


class StreamFrames:
    """
    The log-mel frames of audio that arrives block by block, equal to the whole recording's frames: a frame is
    computed once the samples hold its right-hand context (two hops, `HTSATFeatureExtractor.context_samples`), and at
    `finish` the last frames get the STFT's reflect padding of the recording's end. Only the samples later frames
    still need, and the frames not yet dropped, are kept. Frames before 0 (a live stream's padded start) read as
    digital silence, the log-mel floor.
    """

    def __init__(self, feature_extractor, num_mel_bins: int):
        self.feature_extractor = feature_extractor
        self.hop = feature_extractor.hop_length
        self.margin = feature_extractor.context_samples
        self.silence = float(10.0 * np.log10(AMIN))
        self.num_samples = 0
        self.samples = np.zeros(0, dtype=np.float32)  # the recording from sample `samples_start` on
        self.samples_start = 0
        self._frames = torch.zeros(0, num_mel_bins)  # frames from `_frames_start` on (>= 0)
        self._frames_start = 0

    @property
    def frames_end(self) -> int:
        """Frames [0, frames_end) are known (computed, or dropped after use)."""
        return self._frames_start + len(self._frames)

    def total_frames(self) -> int:
        """Frames of the whole recording (once finished): the centred STFT's `samples // hop + 1`."""
        return self.num_samples // self.hop + 1

    def append(self, samples: np.ndarray) -> None:
        """Appends float32 mono samples (frames are computed by `compute_ready`)."""
        self.samples = np.concatenate([self.samples, samples])
        self.num_samples += len(samples)

    def compute_ready(self) -> None:
        """Computes every frame whose right-hand context has arrived."""
        if self.num_samples >= self.margin:
            self._compute((self.num_samples - self.margin) // self.hop + 1, final=False)

    def finish(self) -> None:
        """The recording has ended: computes its last frames with the end's reflect padding."""
        if self.num_samples > 0:
            self._compute(self.total_frames(), final=True)

    def window(self, start: int, length: int) -> torch.Tensor:
        """Frames [start, start + length); those before 0 are silence. Needs `start + length <= frames_end`."""
        if start + length > self.frames_end or max(start, 0) < self._frames_start:
            raise IndexError(f"frames [{start}, {start + length}) are not held (held: "
                             f"[{self._frames_start}, {self.frames_end})).")
        real = self._frames[max(start, 0) - self._frames_start : start + length - self._frames_start]
        if start >= 0:
            return real
        return torch.cat([real.new_full((-start, real.shape[1]), self.silence), real])

    def drop_before(self, frame: int) -> None:
        """Forgets the frames before `frame` (no later window needs them)."""
        if frame > self._frames_start:
            self._frames = self._frames[frame - self._frames_start :].clone()
            self._frames_start = frame

    def sample_span(self, first: int, last: int, final: bool) -> SampleSpan:
        """The samples frames [first, last) are computed from (`frame_span`), for a reader that computes them itself
        (e.g. on a GPU); `final`: the recording has ended (its end is reflected, as the whole spectrogram does)."""
        start, end, offset = self.feature_extractor.frame_span(first, last, self.num_samples if final else None)
        if start < self.samples_start or end > self.samples_start + len(self.samples):
            raise IndexError(f"samples [{start}, {end}) are not held (held: [{self.samples_start}, "
                             f"{self.samples_start + len(self.samples)})).")
        samples = self.samples[start - self.samples_start : end - self.samples_start]
        return SampleSpan(torch.from_numpy(samples.copy()), offset, last - first)

    def drop_samples_before(self, sample: int) -> None:
        """Forgets the samples before `sample` (a span reader, which computes no frames here)."""
        if sample > self.samples_start:
            self.samples = self.samples[sample - self.samples_start :]
            self.samples_start = sample

    def _compute(self, end_frame: int, final: bool) -> None:
        """Appends frames up to `end_frame` (exclusive), then drops the samples no later frame needs."""
        first = self.frames_end
        if end_frame <= first:
            return
        with torch.no_grad():
            frames = self.feature_extractor.frame_range(
                torch.from_numpy(self.samples), self.samples_start, first, end_frame,
                self.num_samples if final else None,
            )
        self._frames = torch.cat([self._frames, frames])
        keep_from = max(0, self.frames_end * self.hop - self.margin)  # the context of the next frames
        self.samples = self.samples[keep_from - self.samples_start :]
        self.samples_start = keep_from


class WindowStream:
    """
    Cuts streamed audio into the model's windows. The log-mel frames are computed block by block, each block with two
    hops of real audio context on each side, so they equal the frames of the whole recording's spectrogram; windows
    are slices of those frames (each frame computed once, though windows overlap). The result is the same as running
    the model on the whole input at once, with bounded memory. `spans=True`: windows come as the `SampleSpan`s their
    frames are computed from, so that the consumer computes them (in batches, on its device), and no frame is
    computed here.
    """

    def __init__(self, config, feature_extractor, source: Any, spans: bool = False):  # source: an AudioSource
        self.config = config
        self.feature_extractor = feature_extractor
        self.source = source
        self.hop = config.hop_length
        self.window_frames = config.clip_frames
        self.hop_frames = long_input_hop_frames(config)
        self.long_after = config.image_frames * self.hop  # from this many samples on, the model windows the input
        self.num_frames = 0
        self.windowed = False  # True once the input is known to be longer than one image (cut into windows)
        self.whole_audio: np.ndarray | None = None  # an input of one window keeps its samples here, once read
        self.frames = StreamFrames(feature_extractor, config.num_mel_bins)
        self.spans = spans

    @property
    def num_samples(self) -> int:
        return self.frames.num_samples

    @property
    def seconds_read(self) -> float:
        return self.num_samples / self.source.sampling_rate

    def window_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor | list[SampleSpan], list[int]]]:
        """The windows in batches of `batch_size` (the last one smaller), with their start frames, as the audio
        streams in. A batch size below 1 would never fill a batch and hold every window of the recording."""
        batch_size = check_positive_int(batch_size, "window_batch_size")
        next_frame = 0
        done: set[int] = set()
        pending, pending_starts = [], []
        block = int(READ_BLOCK_SECONDS * self.source.sampling_rate)
        for samples in self.source.blocks(block):
            if not np.isfinite(samples).all():
                raise AudioInputError("invalid_audio", "The audio contains NaN or Inf samples.")
            self.frames.append(samples)
            self.windowed = self.num_samples >= self.long_after
            if not self.windowed:  # a short input keeps all its samples: it may be one stretched window
                continue
            while self._ready_frames() >= next_frame + self.window_frames:
                pending.append(self._window(next_frame, final=False))
                pending_starts.append(next_frame)
                done.add(next_frame)
                next_frame += self.hop_frames
                if len(pending) == batch_size:
                    yield self._batch(pending), pending_starts
                    pending, pending_starts = [], []
            # the end-aligned last window starts after the last window done, but maybe before next_frame
            if self.spans:
                self.frames.drop_samples_before(
                    max(0, (next_frame - self.hop_frames) * self.hop - self.feature_extractor.context_samples))
            else:
                self.frames.drop_before(next_frame - self.hop_frames)
        if self.num_samples == 0:
            raise AudioInputError("empty", "The audio is empty: no samples were decoded.")
        try:
            self.feature_extractor.check_length(self.num_samples)
        except ValueError as error:
            raise AudioInputError("too_short", str(error)) from error
        self.num_frames = self.num_samples // self.hop + 1
        starts, window_frames = window_layout(self.config, self.num_frames)
        self.windowed = len(starts) > 1
        if len(starts) == 1:  # short input: the model stretches all of its frames into one window
            self.whole_audio = self.frames.samples
            if self.spans:
                yield [SampleSpan(torch.from_numpy(self.whole_audio), 0, self.num_frames)], [0]
                return
            features = self.feature_extractor(self.whole_audio, sampling_rate=self.source.sampling_rate, padding=False,
                                              return_tensors="pt")["input_features"]
            yield features, [0]
            return
        if not self.spans:
            self.frames.finish()
        for start_frame in starts:
            if start_frame in done:
                continue
            pending.append(self._window(start_frame, final=True))
            pending_starts.append(start_frame)
            if len(pending) == batch_size:
                yield self._batch(pending), pending_starts
                pending, pending_starts = [], []
        if pending:
            yield self._batch(pending), pending_starts

    def _ready_frames(self) -> int:
        """Frames [0, n) can be had now: their right-hand context has arrived."""
        if not self.spans:
            self.frames.compute_ready()
            return self.frames.frames_end
        margin = self.feature_extractor.context_samples
        return (self.num_samples - margin) // self.hop + 1 if self.num_samples >= margin else 0

    def _window(self, start_frame: int, final: bool) -> torch.Tensor | SampleSpan:
        if self.spans:
            return self.frames.sample_span(start_frame, start_frame + self.window_frames, final)
        return self.frames.window(start_frame, self.window_frames)

    def _batch(self, windows: list) -> torch.Tensor | list[SampleSpan]:
        return windows if self.spans else torch.stack(windows)


__all__ = [
    "GRID_TOLERANCE", "READ_BLOCK_SECONDS", "SampleSpan", "StepStitcher", "StreamFrames", "WindowStream",
    "check_positive_int", "grid_steps", "long_input_hop_frames", "span_features", "step_overlaps", "step_seconds",
    "stitch_on_grid", "stitch_window_steps", "total_steps", "window_layout", "window_start_frames", "window_starts",
]
