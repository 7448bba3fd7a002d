"""Feature extractor for HTS-AT: mono waveforms -> log-mel spectrograms, as the original front end computes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank
from transformers.utils import TensorType, logging

logger = logging.get_logger(__name__)

AMIN = 1e-10  # floor of the power mel spectrogram before the log (torchlibrosa's amin)


BLOCK_FRAMES = 6000  # 60 s at hop 320: longer clips get their log-mel frames block by block


def pcm_to_float(samples: np.ndarray, what: str = "The audio") -> np.ndarray:
    """float32 samples in [-1, 1): floats as they are, integer PCM scaled as soundfile and torchaudio read it
    (int16 / 32768, int32 / 2^31, uint8 centred on 128). Integer samples taken as floats come out 90 dB too loud."""
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if samples.dtype in (np.int8, np.int16, np.int32):
        return (samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    raise ValueError(
        f"{what} has dtype {samples.dtype}; pass floating-point samples in [-1, 1] or integer PCM (int8, int16, "
        "int32, uint8)."
    )


class HTSATFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns mono waveforms into the log-mel `input_features` (batch, frames, num_mel_bins) of the original HTS-AT front
    end: Hann-windowed STFT (`n_fft` samples, centred, reflect padding), power spectrum, Slaney-scale mel filters with
    Slaney area normalisation, `10 * log10(max(x, 1e-10))` (reference 1.0, no top_db). Computed with torch in one
    batched call.

    Length handling (`padding`):
        - `"repeat"` (default, also `True`): clips shorter than `max_length_seconds` are repeated end to end and the
          last repetition cut at exactly `max_length_seconds`, as the paper does for ESC-50 and Speech Commands.
          Clips that are longer are kept whole: nothing is cut. The model splits long inputs into overlapping
          windows. A batch whose clips end up with different lengths raises (pass long clips one at a time).
        - `False` / `"do_not_pad"`: the frames of exactly the audio given (clips of a batch must have equal length).

    Args:
        feature_size (`int`, 64): number of mel bins.
        sampling_rate (`int`, 32000): the rate the audio must have; other rates raise (resample first).
        n_fft (`int`, 1024): FFT size and window length. hop_length (`int`, 320).
        f_min (`float`, 50.0), f_max (`float`, 14000.0): mel filter range in Hz.
        max_length_seconds (`float`, 10.0): clip length the repeat padding fills.
        padding_value (`float`, 0.0): used only by generic padding utilities (pipeline batching).
    """

    model_input_names = ["input_features"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 32000,
        n_fft: int = 1024,
        hop_length: int = 320,
        f_min: float = 50.0,
        f_max: float = 14000.0,
        max_length_seconds: float = 10.0,
        padding_value: float = 0.0,
        return_attention_mask: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.f_min = f_min
        self.f_max = f_max
        self.max_length_seconds = max_length_seconds
        if f_max > sampling_rate / 2:
            logger.warning_once(
                f"f_max={f_max} Hz is above the Nyquist frequency of {sampling_rate} Hz audio: the top mel filters are "
                "all zero (as in the original Speech Commands model)."
            )

    @classmethod
    def for_model_config(cls, config: Any) -> HTSATFeatureExtractor:
        """The feature extractor matching an `HTSATConfig`'s front end (rate, FFT, hop, mel range, clip length)."""
        return cls(
            feature_size=config.num_mel_bins,
            sampling_rate=config.sampling_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            max_length_seconds=config.clip_seconds,
        )

    # --------------------------------------------------------------------------------------------------- helpers
    @property
    def max_length_samples(self) -> int:
        return int(round(self.max_length_seconds * self.sampling_rate))

    @property
    def min_samples(self) -> int:
        """The fewest samples a clip may have: the centred STFT's reflect padding needs more than n_fft // 2."""
        return self.n_fft // 2 + 1

    def check_length(self, num_samples: int, what: str = "The audio") -> None:
        """The one length rule of the extractor and both pipelines: at least `min_samples` samples, whatever the
        padding (repeating a few samples into 10 s would classify a click as a tone)."""
        if num_samples < self.min_samples:
            raise ValueError(
                f"{what} has {num_samples} samples ({num_samples / self.sampling_rate * 1000:.1f} ms), fewer than "
                f"the {self.min_samples} that one STFT frame needs (n_fft // 2 + 1, "
                f"{self.min_samples / self.sampling_rate * 1000:.0f} ms at {self.sampling_rate} Hz): pass longer audio."
            )

    def num_frames(self, num_samples: int) -> int:
        """Frames the centred STFT gives for a waveform of `num_samples` samples."""
        return num_samples // self.hop_length + 1

    def mel_filters(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n_fft // 2 + 1, num_mel_bins) Slaney mel filter bank, identical to `librosa.filters.mel`. Cached per
        device and dtype (building it costs more than the matmul that applies it)."""
        return self._cached("mel_filters", device, dtype, self._build_mel_filters)

    def _build_mel_filters(self) -> torch.Tensor:
        """Built in float64 and rounded once to the dtype asked for: a float32 construction (torchaudio's) is off by up
        to 1.6e-3 dB at 16 kHz / f_max 8 kHz, where librosa's float64 filters, as the authors used, are exact."""
        filters = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=self.feature_size,
            min_frequency=float(self.f_min),
            max_frequency=float(self.f_max),
            sampling_rate=self.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        return torch.from_numpy(filters)

    def _cached(self, name: str, device, dtype: torch.dtype, build) -> torch.Tensor:
        """A tensor built once per (parameters, device, dtype); kept out of `to_dict()` / the saved JSON."""
        cache = self.__dict__.setdefault("_tensor_cache", {})
        key = (name, self.n_fft, self.feature_size, self.sampling_rate, self.f_min, self.f_max, str(device), dtype)
        if key not in cache:
            cache[key] = build().to(device=device, dtype=dtype)
        return cache[key]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_tensor_cache", None)
        return output

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, samples) float waveforms -> (batch, frames, num_mel_bins) log-mel in dB."""
        device, dtype = waveforms.device, waveforms.dtype
        window = self._cached("window", device, dtype, lambda: torch.hann_window(self.n_fft, periodic=True))
        stft = torch.stft(
            waveforms,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = stft.real.square() + stft.imag.square()  # (batch, freq, frames)
        mel = torch.matmul(power.transpose(1, 2), self.mel_filters(device, dtype))
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))

    @property
    def context_samples(self) -> int:
        """Real audio a frame needs on each side to equal the whole spectrogram's frame: two hops (>= n_fft / 2)."""
        return 2 * self.hop_length

    def frame_range(
        self, samples: torch.Tensor, samples_start: int, first: int, last: int, recording_end: int | None = None
    ) -> torch.Tensor:
        """Log-mel frames [first, last) of a recording, equal to those of its whole spectrogram, from `samples` (1-D,
        the recording from sample `samples_start` on). Each frame gets two hops of real context on each side, or the
        recording's end (`recording_end`, its length, when the range reaches it), where the STFT reflects as it would
        for the whole recording."""
        start, end, offset = self.frame_span(first, last, recording_end)
        frames = self.log_mel(samples[start - samples_start : end - samples_start][None])[0]
        return frames[offset : offset + last - first]

    def frame_span(self, first: int, last: int, recording_end: int | None = None) -> tuple[int, int, int]:
        """The samples [start, end) that `frame_range` reads for frames [first, last), and the index of frame `first`
        in the log-mel of those samples: `log_mel(samples[start:end])[offset : offset + last - first]`."""
        margin = self.context_samples
        start = max(0, first * self.hop_length - margin)
        end = (last - 1) * self.hop_length + margin
        if recording_end is not None:
            end = min(end, recording_end)
        return start, end, (first * self.hop_length - start) // self.hop_length

    def log_mel_in_blocks(self, waveforms: torch.Tensor, block_frames: int = BLOCK_FRAMES) -> torch.Tensor:
        """`log_mel` computed `block_frames` frames at a time (`frame_range`): the same frames, while the complex STFT
        and power spectrum of an hour of audio (about 2 GB) never exist at once."""
        length = waveforms.shape[-1]
        frames = length // self.hop_length + 1
        if frames <= block_frames:
            return self.log_mel(waveforms)
        return torch.stack([
            torch.cat([self.frame_range(waveform, 0, first, min(first + block_frames, frames), length)
                       for first in range(0, frames, block_frames)])
            for waveform in waveforms
        ])

    def repeat_to_length(self, waveform: np.ndarray) -> np.ndarray:
        """Repeat a clip end to end until it is `max_length_seconds` long; longer clips are returned unchanged."""
        target = self.max_length_samples
        if len(waveform) >= target:
            return waveform
        repeats = -(-target // len(waveform))
        return np.tile(waveform, repeats)[:target]

    # ---------------------------------------------------------------------------------------------- validation
    def _as_mono_list(self, raw_speech: Any) -> list[np.ndarray]:
        if isinstance(raw_speech, torch.Tensor):
            raw_speech = raw_speech.detach().cpu().numpy()
        if isinstance(raw_speech, np.ndarray):
            if raw_speech.ndim == 1:
                clips = [raw_speech]
            elif raw_speech.ndim == 2:  # a batch of clips, as every Transformers feature extractor takes it
                clips = list(raw_speech)
            else:
                raise ValueError(
                    f"Got an array of shape {raw_speech.shape}; expected one mono waveform (samples,) or a batch "
                    "(batch, samples). For multi-channel audio, average the channels first, e.g. x.mean(axis=0), or "
                    'pass {"array": x, "sampling_rate": rate} to a pipeline, which averages them.'
                )
        elif isinstance(raw_speech, Sequence) and not isinstance(raw_speech, (str, bytes)):
            if len(raw_speech) == 0:
                raise ValueError("Got an empty batch: pass at least one waveform.")
            if all(np.isscalar(x) for x in raw_speech):
                clips = [np.asarray(raw_speech)]
            else:
                clips = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in raw_speech]
        else:
            raise ValueError(
                f"Expected a waveform as a numpy array, torch tensor or list of them, got {type(raw_speech).__name__}. "
                "To read a file, use pipeline('audio-classification') or decode it first (e.g. with torchaudio)."
            )
        checked = []
        for index, clip in enumerate(clips):
            if clip.ndim != 1:
                raise ValueError(
                    f"Waveform {index} has shape {clip.shape}: only mono audio is supported. Average the channels first "
                    "(e.g. x.mean(axis=0) for a (channels, samples) array)."
                )
            if clip.size == 0:
                raise ValueError(f"Waveform {index} is empty: pass at least one sample of audio.")
            clip = pcm_to_float(clip, f"Waveform {index}")
            if not np.isfinite(clip).all():
                raise ValueError(
                    f"Waveform {index} contains NaN or Inf samples; clean the audio (e.g. np.nan_to_num) before "
                    "extracting features."
                )
            checked.append(clip)
        return checked

    def _check_sampling_rate(self, sampling_rate: int | None) -> None:
        if sampling_rate is None:
            raise ValueError(
                f"Pass `sampling_rate=` with the audio: this feature extractor expects {self.sampling_rate} Hz audio and "
                "needs the rate to make sure the audio matches."
            )
        if float(sampling_rate) != self.sampling_rate:  # 32000.5 is not 32000 (int() would have said it was)
            raise ValueError(
                f"The audio is sampled at {sampling_rate} Hz but this model expects {self.sampling_rate} Hz. Resample it "
                f"first as the pipelines do (FFmpeg's libswresample), e.g. htsat_hf.audio_decoding.resample(x[None], "
                f"{sampling_rate}, {self.sampling_rate}), or load a `datasets` column with "
                f"Audio(sampling_rate={self.sampling_rate}); the pipelines take {{'array': x, 'sampling_rate': rate}} "
                "and resample it themselves."
            )

    # -------------------------------------------------------------------------------------------------- __call__
    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None,
        padding: bool | str = "repeat",
        return_tensors: str | TensorType | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Args:
            raw_speech: one mono waveform (1-D), a batch as a 2-D array (batch, samples), or a list of 1-D waveforms.
                A 2-D array is always a batch, as in every Transformers feature extractor: the extractor cannot know
                channels, so average one recording's channels first (`x.mean(axis=0)` for (channels, samples)), or
                give the pipelines `{"array": x, "sampling_rate": rate}`, which average them as they do a file's.
            sampling_rate: the rate of `raw_speech`; required, and must equal `self.sampling_rate`.
            padding: `"repeat"`/`True` (repeat short clips to `max_length_seconds`) or `False`/`"do_not_pad"`.
            return_tensors: `"pt"` for torch tensors, `"np"` or None for numpy arrays.
            device: where to compute the spectrogram (e.g. "cuda").

        Returns:
            `BatchFeature` with `input_features` of shape (batch, frames, num_mel_bins).
        """
        self._check_sampling_rate(sampling_rate)
        clips = self._as_mono_list(raw_speech)
        for index, clip in enumerate(clips):
            self.check_length(len(clip), f"Waveform {index}" if len(clips) > 1 else "The audio")
        if padding in (True, "repeat", "longest"):
            clips = [self.repeat_to_length(clip) for clip in clips]
        elif padding not in (False, "do_not_pad"):
            raise ValueError(f"padding={padding!r} is not supported; use 'repeat' (default) or False.")
        lengths = {len(clip) for clip in clips}
        if len(lengths) > 1:
            raise ValueError(
                f"The clips have different lengths after padding ({sorted(lengths)} samples). Clips longer than "
                f"{self.max_length_seconds} s are never cut, so pass them one at a time (or cut them yourself)."
            )
        stacked = clips[0][None] if len(clips) == 1 else np.stack(clips)  # one clip: a view, no copy of an hour
        waveforms = torch.from_numpy(np.ascontiguousarray(stacked)).to(device)
        with torch.no_grad():
            features = self.log_mel_in_blocks(waveforms)
        if return_tensors in ("pt", TensorType.PYTORCH):
            return BatchFeature({"input_features": features}, tensor_type=None)
        return BatchFeature({"input_features": features.cpu().numpy()}, tensor_type=return_tensors)


HTSATFeatureExtractor.register_for_auto_class()

__all__ = ["HTSATFeatureExtractor", "pcm_to_float"]
