"""Log-mel frames of a live stream, computed as the samples arrive and equal to the whole recording's frames."""

from __future__ import annotations

import numpy as np
import torch

from ..feature_extraction_htsat import AMIN


class LiveFrames:
    """
    The log-mel frames of a stream whose length is not known yet. A frame is computed once the stream holds its
    right-hand context (two hops, see `HTSATFeatureExtractor.context_samples`), so it equals the frame of the whole
    recording's spectrogram; at `finish` the last frames get the STFT's reflect padding of the recording's end, as
    offline. Frames before time 0 (the padded start of a stream) are digital silence: the log-mel floor.
    Only the samples and frames that later frames and windows still need are kept.
    """

    def __init__(self, feature_extractor, num_mel_bins: int):
        self.feature_extractor = feature_extractor
        self.hop = feature_extractor.hop_length
        self.margin = feature_extractor.context_samples
        self.silence = float(10.0 * np.log10(AMIN))
        self.num_samples = 0
        self.finished = False
        self._samples = np.zeros(0, dtype=np.float32)  # stream samples from `_samples_start` on
        self._samples_start = 0
        self._frames = torch.zeros(0, num_mel_bins)  # frames from `_frames_start` on (>= 0)
        self._frames_start = 0

    @property
    def frames_end(self) -> int:
        """Frames [0, frames_end) are known (computed, or dropped after use)."""
        return self._frames_start + len(self._frames)

    def total_frames(self) -> int:
        """Frames of the whole recording (once finished): the centred STFT's `samples // hop + 1`."""
        return self.num_samples // self.hop + 1

    def add(self, samples: np.ndarray) -> None:
        """Appends float32 mono samples and computes every frame they complete."""
        self._samples = np.concatenate([self._samples, samples])
        self.num_samples += len(samples)
        if self.num_samples >= self.margin:
            self._compute(min((self.num_samples - self.margin) // self.hop + 1, self.total_frames()), final=False)

    def finish(self) -> None:
        """The stream has ended: computes its last frames with the end's reflect padding."""
        self.finished = True
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
        padding = real.new_full((-start, real.shape[1]), self.silence)
        return torch.cat([padding, real])

    def drop_before(self, frame: int) -> None:
        """Forgets the frames before `frame` (no later window needs them)."""
        if frame > self._frames_start:
            self._frames = self._frames[frame - self._frames_start :].clone()
            self._frames_start = frame

    def _compute(self, end_frame: int, final: bool) -> None:
        first = self.frames_end
        if end_frame <= first:
            return
        with torch.no_grad():
            frames = self.feature_extractor.frame_range(
                torch.from_numpy(self._samples), self._samples_start, first, end_frame,
                self.num_samples if final else None,
            )
        self._frames = torch.cat([self._frames, frames])
        keep_from = max(0, self.frames_end * self.hop - self.margin)  # the context of the next frames
        self._samples = self._samples[keep_from - self._samples_start :]
        self._samples_start = keep_from
