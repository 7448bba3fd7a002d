"""Tags and sound events on a live stream, with a bounded delay.

    detector = LiveDetector("path/to/htsat-folder", hop_seconds=1.0, lookahead_seconds=2.0, threshold=0.3)
    for block in microphone_blocks():            # float32 (or int PCM) samples at the model's rate, any block size
        for update in detector.push(block):      # one update per hop
            print(update.time, update.tags, update.events)
    for update in detector.flush():              # the stream has ended: last windows, open events closed
        ...

Every `hop_seconds` of audio the model runs on the latest `clip_seconds` window (the model's own 10-s window, never
stretched; before the stream is that long, the missing start is digital silence, so times stay true). The windows'
step logits are averaged onto one time grid (`StepStitcher`, as offline). A step is emitted at the first hop at
which `lookahead_seconds` of audio after its end has been seen: its score is the mean over the windows run by then,
and it goes through the same post-processing as `pipeline("sound-event-detection")` (`EventStream`). An event is
emitted once its offset is final: it has ended and no later event can still merge with it (`min_gap_seconds`).

Identity with the offline pipeline: with `hop_seconds == config.long_input_hop_seconds`, `pad_start=False` and
`lookahead_seconds >= clip_seconds`, every window that covers a step has run before the step is emitted, the windows
are the offline pipeline's, and so the steps' scores and the events equal `pipeline("sound-event-detection")`'s on a
recording longer than one image (`image_frames` frames, 10.24 s for the paper's model; shorter ones are stretched
offline). With the padded start (the default), the scores of steps that start at or after
`clip_seconds - hop_seconds` are the offline ones under the same conditions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..annotation.text_queries import split_window_logits, window_logits
from ..audio_decoding import downmix
from ..feature_extraction_htsat import pcm_to_float
from ..inference_models import combine_members, is_ensemble, load_job_model, model_members
from ..pipeline_htsat import AudioInputError
from ..scores import is_exclusive, labelled_frame_scores, stitched_channels, top_tags, with_window_clip_logits
from ..sed_postprocessing import (
    EventSettings,
    EventStream,
    label_mapping_from,
    resolve_label_mapping,
    sorted_events,
)
from ..time_axis import StepStitcher, StreamFrames, check_positive_int, grid_steps


READ_SECONDS = 0.1  # audio per read from a live source (`htsat-hf listen` reads ffmpeg so): the delay the reading adds

@dataclass
class LiveUpdate:
    """What one hop produced.

    time: stream time (s) at the end of the window that ran. tags: top-k {label, score} of that window's clip
    scores. events: events whose offsets became final, {label, onset, offset, score} in stream seconds.
    first_step / step_scores: the steps emitted at this hop (grid steps `first_step ...`, probabilities
    (steps, labels) after any label mapping, sigmoid or softmax as the config's `problem_type` says, a single-label
    model's capped by the window clip score, like the offline pipeline's); step `i` covers [i, i + 1) * step_seconds.
    """

    time: float
    tags: list[dict]
    events: list[dict]
    first_step: int
    step_scores: np.ndarray = field(repr=False)


class LiveDetector:
    """
    An online HTS-AT detector (see the module docstring for the timing rules).

    Args:
        model: an HTS-AT folder or a loaded `HTSATForSoundEventDetection` / `HTSATForAudioClassification` with the
            token-semantic head, or an `HTSATEnsembleModel` whose members all have it on one time grid (each window
            runs through every member; step logits and tags combined as the ensemble's forward combines them).
            feature_extractor: defaults to the folder's (or one matching the config).
        hop_seconds: audio between two runs of the model (a whole number of feature hops, at most `clip_seconds`).
        lookahead_seconds: audio seen after a step before its score is emitted (more is closer to offline).
        top_k: tags per hop. pad_start: run from the first hop on a start padded with silence (default); False waits
            for one full window (and gives the offline windows).
        sampling_rate: the rate of the pushed samples; it must be the model's (resample upstream, e.g. `ffmpeg -ar`).
        channels: samples per frame of pushed blocks; blocks of several channels are (samples, channels) and are
            averaged to mono.
        window_batch_size: windows per forward pass when a block completes several windows.
        event_settings: the SED pipeline's post-processing, as one `sed_postprocessing.EventSettings`; threshold,
            median_filter_seconds, min_duration_seconds, min_gap_seconds, hysteresis, upsample: its fields one by
            one (given, they replace those of `event_settings`). label_mapping: as for the pipeline.
        device, trust_remote_code, bf16: as for `Annotator`.
        text_labels, hypothesis_template, calibration, background_label, calibration_bias, tokenizer: for a CLAP
            model (`HTSATClapModel`), the phrases to detect and their calibration, as for `Annotator`.
    """

    def __init__(
        self,
        model: Any,
        feature_extractor: Any = None,
        *,
        hop_seconds: float = 1.0,
        lookahead_seconds: float = 0.0,
        top_k: int = 5,
        pad_start: bool = True,
        sampling_rate: int | None = None,
        channels: int = 1,
        window_batch_size: int = 8,
        event_settings: EventSettings | None = None,
        threshold: Any = None,
        median_filter_seconds: Any = None,
        min_duration_seconds: float | None = None,
        min_gap_seconds: float | None = None,
        hysteresis: tuple[float, float] | None = None,
        upsample: str | None = None,
        label_mapping: Mapping | str | None = None,
        device: str | torch.device | None = None,
        bf16: bool = False,
        trust_remote_code: bool = False,
        text_labels: Any = None,
        hypothesis_template: str | None = None,
        calibration: str | None = None,
        background_label: str | None = None,
        calibration_bias: float | None = None,
        tokenizer: Any = None,
    ):
        self.model, self.feature_extractor = load_job_model(
            model, feature_extractor, device, trust_remote_code, text_labels, tokenizer=tokenizer,
            hypothesis_template=hypothesis_template, calibration=calibration, background_label=background_label,
            calibration_bias=calibration_bias)
        config = self.config = self.model.config
        self.members = model_members(self.model)
        if not config.use_token_semantic_head:
            raise ValueError("Live detection needs the token-semantic head; " + (
                "this ensemble's members do not all have it on one time grid." if is_ensemble(self.model)
                else "this model uses the pooled head (use_token_semantic_head=False)."))
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        if sampling_rate is not None and float(sampling_rate) != self.sampling_rate:  # 32000.5 is not 32000
            raise ValueError(f"The stream is at {sampling_rate} Hz but the model takes {self.sampling_rate} Hz: "
                             f"resample it upstream (e.g. ffmpeg ... -ar {self.sampling_rate}; htsat-hf listen does).")
        hop_length = config.hop_length
        self.frame_seconds = hop_length / self.sampling_rate
        self.hop_frames = _whole_frames(hop_seconds, self.sampling_rate, hop_length, "hop_seconds")
        self.window_frames = config.clip_frames
        if not 0 < self.hop_frames <= self.window_frames - 1:
            raise ValueError(f"hop_seconds must be > 0 and at most the window ({config.clip_seconds} s), "
                             f"got {hop_seconds}.")
        if not lookahead_seconds >= 0:
            raise ValueError(f"lookahead_seconds must be >= 0, got {lookahead_seconds}.")
        self.hop_seconds = self.hop_frames * self.frame_seconds
        self.lookahead_seconds = float(lookahead_seconds)
        self.top_k = min(check_positive_int(top_k, "top_k"), config.num_labels)
        self.channels = check_positive_int(channels, "channels")
        self.window_batch_size = check_positive_int(window_batch_size, "window_batch_size")
        self.bf16 = bool(bf16)
        self.device = next(self.model.parameters()).device
        self.step_seconds = self.model.frame_step_seconds(config.image_frames + 1)  # any windowed input's step
        self.model_labels = [config.id2label[i] for i in range(config.num_labels)]
        self.label_mapping = label_mapping_from(label_mapping)
        self.labels = (list(resolve_label_mapping(self.label_mapping, self.model_labels)) if self.label_mapping
                       else self.model_labels)
        self.event_settings = EventSettings.merged(
            event_settings, threshold=threshold, median_filter_seconds=median_filter_seconds,
            min_duration_seconds=min_duration_seconds, min_gap_seconds=min_gap_seconds, hysteresis=hysteresis,
            upsample=upsample,
        )
        self.events = EventStream(self.step_seconds, self.labels, **self.event_settings.keywords())
        self.frames = StreamFrames(self.feature_extractor, config.num_mel_bins)
        # for a single-label model, each window's clip logits are stitched beside its step logits (2 x labels)
        channels = stitched_channels(config.num_labels, config.problem_type)
        self.stitcher = StepStitcher(None, self.step_seconds, channels, drop_handed_out=True)
        # window k starts at frame k * hop_frames; the first one ends at the first hop (or at one full window)
        self.next_window = -((self.window_frames - 1) // self.hop_frames) + 1 if pad_start else 0
        self.windows_run = 0
        self.finished = False

    # ------------------------------------------------------------------------------------------------ stream
    @property
    def seconds_seen(self) -> float:
        return self.frames.num_samples / self.sampling_rate

    def push(self, samples: Any, sampling_rate: int | None = None) -> list[LiveUpdate]:
        """Adds the next block (1-D, or (samples, channels) with `channels > 1`; float or integer PCM) and returns
        one update per window it completes."""
        if self.finished:
            raise RuntimeError("This stream was flushed; start a new LiveDetector.")
        if sampling_rate is not None and float(sampling_rate) != self.sampling_rate:  # 32000.5 is not 32000
            raise ValueError(f"A block at {sampling_rate} Hz in a stream at {self.sampling_rate} Hz: the sampling rate "
                             "cannot change within a stream; resample it, or start a new LiveDetector.")
        block = self._as_mono(samples)
        if len(block) == 0:
            return []
        self.frames.append(block)
        self.frames.compute_ready()
        return self._run_ready()

    def flush(self) -> list[LiveUpdate]:
        """Ends the stream: runs the last windows (the last one ending at the stream's end, as offline), emits every
        remaining step and closes the open events."""
        if self.finished:
            return []
        self.finished = True
        if self.frames.num_samples == 0:
            return []
        try:
            self.feature_extractor.check_length(self.frames.num_samples, what="The stream")
        except ValueError as error:
            raise AudioInputError("too_short", str(error)) from error
        self.frames.finish()
        updates = self._run_ready()
        total = self.frames.total_frames()
        last_start = total - self.window_frames
        if self.windows_run == 0 or (self.next_window - 1) * self.hop_frames < last_start:
            updates += self._run_windows([last_start])  # the end-aligned window, as offline
        first_step = self.stitcher.offset
        rest = self.stitcher.result(grid_steps(self.config, total))
        scores = self._step_scores(rest)
        self.events.push(scores)
        events = self.events.finish(self.frames.num_samples / self.sampling_rate)
        if updates:
            last = updates[-1]
            last.step_scores = np.concatenate([last.step_scores, scores])
            last.events = sorted_events(last.events + events, self.labels)
        else:
            updates.append(LiveUpdate(self.seconds_seen, [], events, first_step, scores))
        return updates

    # ------------------------------------------------------------------------------------------------ windows
    def _run_ready(self) -> list[LiveUpdate]:
        """Runs every window whose frames are all known."""
        starts = []
        while self.next_window * self.hop_frames + self.window_frames <= self.frames.frames_end:
            starts.append(self.next_window * self.hop_frames)
            self.next_window += 1
        return self._run_windows(starts)

    def _run_windows(self, starts: list[int]) -> list[LiveUpdate]:
        updates = []
        for first in range(0, len(starts), self.window_batch_size):
            batch = starts[first : first + self.window_batch_size]
            features = torch.stack([self.frames.window(start, self.window_frames) for start in batch])
            for start, member_logits in zip(batch, self.step_logits(features)):
                updates.append(self._after_window(start, member_logits))
        if starts:  # the end-aligned last window starts after the last one run, maybe before the next one
            self.frames.drop_before((self.next_window - 1) * self.hop_frames)
        return updates

    def step_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(windows, clip_frames, mel) log-mel windows -> (windows, members, token steps, labels) float32 step logits
        on the CPU: the token-semantic head of each member (one for a single model) on each window, as the model
        runs a 10-s input (for phrases, each window's clip logits after its steps: `text_queries.window_logits`)."""
        member_steps = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for member in self.members:
                images = member.htsat.window_images(features.to(self.device, member.dtype))
                member_steps.append(window_logits(member, member.htsat.encode_images(images)).float().cpu())
        return torch.stack(member_steps, dim=1)

    def _after_window(self, start: int, member_logits: torch.Tensor) -> LiveUpdate:
        """Adds one window's (members, steps, labels) logits; emits the steps `lookahead_seconds` behind its end."""
        self.windows_run += 1
        exclusive = is_exclusive(self.config.problem_type)
        member_logits, phrase_clip_logits = split_window_logits(self.model, member_logits)
        logits = combine_members(self.model, list(member_logits), exclusive)  # per window, as offline
        clip_logits = (combine_members(self.model, [member.mean(dim=0) for member in member_logits], exclusive)
                       if phrase_clip_logits is None else phrase_clip_logits[0])
        values = with_window_clip_logits(logits, self.config.problem_type, clip_logits)
        self.stitcher.add(values[None], [start * self.frame_seconds])
        end_seconds = (start + self.window_frames - 1) * self.frame_seconds
        first_step = self.stitcher.offset
        emit_before = self.stitcher.first_step(end_seconds - self.lookahead_seconds)
        scores = self._step_scores(self.stitcher.pop_final(emit_before))
        self.events.push(scores)
        tags = top_tags(clip_logits, self.model_labels, self.config.problem_type, self.top_k)
        return LiveUpdate(end_seconds, tags, self.events.pop_final_events(), first_step, scores)

    def _step_scores(self, stitched: torch.Tensor) -> np.ndarray:
        """Step scores of stitched steps as the config's problem_type says (`scores.frame_scores`: a single-label
        model's capped by the window clip score), mapped when a mapping is given."""
        return labelled_frame_scores(stitched, self.config.problem_type, self.model_labels, self.label_mapping)[0]

    def _as_mono(self, samples: Any) -> np.ndarray:
        array = np.asarray(samples)
        if array.dtype.kind not in "iuf":
            raise ValueError(f"Audio blocks must be numeric arrays, got dtype {array.dtype}.")
        expected = "(samples,)" if self.channels == 1 else f"(samples, {self.channels})"
        shape_ok = array.ndim == 1 if self.channels == 1 else (array.ndim == 2 and array.shape[1] == self.channels)
        if not shape_ok:
            raise ValueError(f"A block of shape {array.shape}; this stream takes {expected} blocks "
                             f"(LiveDetector(channels={self.channels})).")
        array = downmix(pcm_to_float(array, "The block").reshape(len(array), -1).T)  # as a file's channels are
        if not np.isfinite(array).all():
            raise AudioInputError("invalid_audio", f"A block of the stream (at {self.seconds_seen:.2f} s) contains "
                                  "NaN or Inf samples.")
        return np.ascontiguousarray(array, dtype=np.float32)


def _whole_frames(seconds: float, sampling_rate: int, hop_length: int, what: str) -> int:
    frames = seconds * sampling_rate / hop_length
    if not math.isfinite(frames) or abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"{what} must be a whole number of feature hops ({hop_length / sampling_rate} s), "
                         f"got {seconds}.")
    return int(round(frames))


__all__ = ["LiveDetector", "LiveUpdate"]
