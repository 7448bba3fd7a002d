"""Decoding and window cutting: one input -> the model's windows as feature tensors, with no model involved.

This is the part of annotation that runs where the audio is decoded (DataLoader workers, a Ray actor, a `datasets.map`
process). It computes the windows' log-mel features there, or (`features_in_workers=False`, for a model on a GPU)
sends each window as the samples its features are computed from (`SampleSpan`), for the model's process to compute
them in batches on its device. Windows are cut exactly as the pipelines do:
- the *timeline* view is what `pipeline("sound-event-detection")` runs: an input of more than one image is cut into
  10-s windows every `long_input_hop_seconds` (features with real audio context, as `WindowStream` computes them), a
  shorter one is one window of all its frames (the model stretches it to the image);
- the *clip* view is what `pipeline("audio-classification")` runs: the same windows, except that a clip shorter than
  `max_length_seconds` is repeated end to end to that length first (the feature extractor's `padding="repeat"`).
  Only short clips need it as a window of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..pipeline_htsat import AudioInputError, AudioSource, audio_source
from ..time_axis import SampleSpan, WindowStream, window_layout

TIMELINE = "timeline"
CLIP = "clip"
# window_embeddings: each window's embedding with its span, from the windows the clip results come from (the timeline
# windows of a long input, the one window of a short one)
CLIP_TASKS = frozenset({"tags", "embeddings", "window_embeddings"})
TIMELINE_TASKS = frozenset({"events", "frame_scores"})
TASKS = ("tags", "events", "embeddings", "frame_scores", "window_embeddings")


@dataclass
class WindowChunk:
    """Consecutive windows of one input, all of one view: features (windows, frames, mel) or one `SampleSpan` per
    window, and their start frames."""

    key: int
    view: str
    features: torch.Tensor | list[SampleSpan]
    starts: list[int]


@dataclass
class InputEnd:
    """All windows of input `key` have been sent; what the results need to know about its audio."""

    key: int
    id: str
    num_samples: int
    sampling_rate: int
    num_frames: int  # frames of the timeline view
    windowed: bool  # cut into windows (else one stretched window)
    warning: str | None = None


@dataclass
class InputFailed:
    """Input `key` cannot be annotated: the stage that found it and why. Windows already sent for it are void."""

    key: int
    id: str
    stage: str
    message: str


WindowItem = WindowChunk | InputEnd | InputFailed


class WindowCutter:
    """Turns inputs into `WindowItem`s for the tasks asked: picklable, holds only the config and feature extractor.
    `features_in_workers=False`: windows as `SampleSpan`s (features computed by the consumer)."""

    def __init__(self, config: Any, feature_extractor: Any, tasks: tuple[str, ...], chunk_windows: int = 16,
                 features_in_workers: bool = True):
        self.config = config
        self.feature_extractor = feature_extractor
        self.needs_clip = bool(CLIP_TASKS & set(tasks))
        self.needs_timeline = bool(TIMELINE_TASKS & set(tasks))
        self.chunk_windows = chunk_windows
        self.features_in_workers = features_in_workers

    def items(self, key: int, input_id: str, audio: Any) -> Iterator[WindowItem]:
        """The windows of one input, then `InputEnd`; or, at any point, `InputFailed` (never an exception for bad
        audio: the caller records it and goes on)."""
        try:
            source = audio_source(audio, self.feature_extractor.sampling_rate, probe=False)
        except AudioInputError as error:
            yield InputFailed(key, input_id, error.stage, str(error))
            return
        except Exception as error:  # noqa: BLE001 - an input that cannot even be opened is recorded, not fatal
            yield InputFailed(key, input_id, "decode", f"{type(error).__name__}: {error}")
            return
        yield from self.source_items(key, input_id, source)

    def source_items(self, key: int, input_id: str, source: AudioSource) -> Iterator[WindowItem]:
        """`items` for audio already turned into an `AudioSource`."""
        rate = self.feature_extractor.sampling_rate
        warnings: list[str] = []
        try:
            source.warnings = warnings
            stream = WindowStream(self.config, self.feature_extractor, source, spans=not self.features_in_workers)
            for features, starts in stream.window_batches(self.chunk_windows):
                if stream.windowed:
                    yield WindowChunk(key, TIMELINE, features, list(starts))
            if not stream.windowed:
                yield from self._short_input_windows(key, stream)
        except AudioInputError as error:
            yield InputFailed(key, input_id, error.stage, str(error))
            return
        except Exception as error:  # noqa: BLE001 - any other failure of one input is recorded, not fatal
            yield InputFailed(key, input_id, "decode", f"{type(error).__name__}: {error}")
            return
        yield InputEnd(
            key, input_id, stream.num_samples, rate, stream.num_frames, stream.windowed,
            "\n".join(warnings) if warnings else None,
        )

    def _short_input_windows(self, key: int, stream: WindowStream) -> Iterator[WindowChunk]:
        """An input of one image: the stretched window of its own frames (timeline), and for a clip shorter than
        `max_length_seconds` the window of the clip repeated to that length (clip), each only where a task needs it."""
        audio = stream.whole_audio
        extractor = self.feature_extractor
        timeline, clip = short_input_views(len(audio), extractor.max_length_samples, self.needs_clip,
                                           self.needs_timeline)
        for view, wanted, padding in ((TIMELINE, timeline, False), (CLIP, clip, "repeat")):
            if not wanted:
                continue
            if self.features_in_workers:
                features = extractor(audio, sampling_rate=extractor.sampling_rate, padding=padding, return_tensors="pt")
                yield WindowChunk(key, view, features["input_features"], [0])
            else:
                samples = extractor.repeat_to_length(audio) if padding else audio
                span = SampleSpan(torch.from_numpy(samples), 0, extractor.num_frames(len(samples)))
                yield WindowChunk(key, view, [span], [0])


def short_input_views(num_samples: int, max_length_samples: int, needs_clip: bool, needs_timeline: bool
                      ) -> tuple[bool, bool]:
    """(timeline, clip): which windows an input of one image needs. The clip view (repeated to
    `max_length_samples`) only for a shorter clip; a clip at least that long takes its clip results from the
    timeline window."""
    repeated = num_samples < max_length_samples
    return needs_timeline or (needs_clip and not repeated), needs_clip and repeated


def count_windows(num_samples: int, config: Any, feature_extractor: Any, tasks: tuple[str, ...]) -> int:
    """Windows `WindowCutter` sends for an input of `num_samples` samples at the model's rate (for throughput
    accounting: the model's work per hour of audio)."""
    starts, _ = window_layout(config, feature_extractor.num_frames(num_samples))
    if len(starts) > 1:
        return len(starts)
    views = short_input_views(num_samples, feature_extractor.max_length_samples, bool(CLIP_TASKS & set(tasks)),
                              bool(TIMELINE_TASKS & set(tasks)))
    return sum(views)


def clip_view(end: InputEnd, max_length_samples: int) -> str:
    """Which view an input's clip results (tags, embedding) come from."""
    return TIMELINE if end.windowed or end.num_samples >= max_length_samples else CLIP


__all__ = ["CLIP", "TASKS", "TIMELINE", "InputEnd", "InputFailed", "WindowChunk", "WindowCutter", "clip_view", "count_windows"]
