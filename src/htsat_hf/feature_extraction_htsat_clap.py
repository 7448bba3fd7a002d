"""The front end of CLAP's unfused checkpoints for the HTS-AT path: `ClapFeatureExtractor`'s features, computed by
`HTSATFeatureExtractor`.

What Transformers' `ClapFeatureExtractor` does for the unfused layout (`truncation="rand_trunc"`, as
`laion/clap-htsat-unfused` ships it), and how this class gives the same features:

- 48 kHz audio, Hann window of 1024 samples (periodic), hop 480, centred STFT with reflect padding, power spectrum,
  64 Slaney-scale mel filters with Slaney normalisation (`mel_filters_slaney`, 50 Hz - 14 kHz for the checkpoint),
  `10 * log10(max(x, 1e-10))`, no top_db. `HTSATFeatureExtractor` computes exactly this (its Slaney filter bank is the
  same `mel_filter_bank` call); only the STFT differs in rounding (CLAP's numpy STFT is stored as complex64).
- `padding="repeatpad"`: a clip shorter than `max_length_s` (10 s) is tiled `int(max_samples / len)` times and the
  rest filled with zeros (silence, -100 dB frames). `HTSATFeatureExtractor`'s own `"repeat"` fills the rest with a
  cut repetition instead; this class repeat-pads as CLAP does (`repeat_to_length`).
- Longer clips: CLAP cuts one random 10-s crop (`rand_trunc`); this class keeps the whole clip and the model windows
  it (overlapping 10-s windows, `HTSATModel.window_layout`), so a long input is used whole, deterministically.

So for inputs of up to 10 s the features equal CLAP's (within float32 rounding), 1001 frames of 64 mel bins, which
both models stretch bicubically to 1024 frames and fold into one 256 x 256 image in the same order (CLAP's
`reshape_mel2img` and HTS-AT's `fold_spectrogram` both put time chunk c's mel bins at image rows c * 64 ... c * 64 +
63; checked by tests/test_clap.py).

Relative imports only: this module travels with saved folders as remote code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .feature_extraction_htsat import HTSATFeatureExtractor


class HTSATClapFeatureExtractor(HTSATFeatureExtractor):
    """`HTSATFeatureExtractor` with CLAP's "repeatpad" padding and CLAP's default front end (48 kHz, hop 480)."""

    def __init__(self, feature_size: int = 64, sampling_rate: int = 48000, n_fft: int = 1024, hop_length: int = 480,
                 f_min: float = 50.0, f_max: float = 14000.0, max_length_seconds: float = 10.0, **kwargs: Any):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, n_fft=n_fft, hop_length=hop_length,
                         f_min=f_min, f_max=f_max, max_length_seconds=max_length_seconds, **kwargs)

    @classmethod
    def from_clap_feature_extractor(cls, clap_extractor: Any) -> HTSATClapFeatureExtractor:
        """The same front end as a `ClapFeatureExtractor` (or its dict); "fusion" truncation is refused."""
        from .configuration_htsat_clap import front_end_of

        settings = clap_extractor.to_dict() if hasattr(clap_extractor, "to_dict") else dict(clap_extractor)
        if settings.get("padding", "repeatpad") != "repeatpad":
            raise ValueError(f"ClapFeatureExtractor padding={settings.get('padding')!r} is not supported; "
                             "the CLAP checkpoints use 'repeatpad'.")
        front = front_end_of(settings)
        return cls(feature_size=int(settings.get("feature_size", 64)), sampling_rate=front["sampling_rate"],
                   n_fft=front["n_fft"], hop_length=front["hop_length"], f_min=front["f_min"], f_max=front["f_max"],
                   max_length_seconds=front["clip_seconds"])

    def repeat_to_length(self, waveform: np.ndarray) -> np.ndarray:
        """CLAP's "repeatpad": a clip shorter than `max_length_seconds` tiled int(target / length) times, then zeros up
        to the target; longer clips unchanged."""
        target = self.max_length_samples
        if len(waveform) >= target:
            return waveform
        tiled = np.tile(waveform, target // len(waveform))
        return np.pad(tiled, (0, target - len(tiled)), mode="constant", constant_values=0)


HTSATClapFeatureExtractor.register_for_auto_class()

__all__ = ["HTSATClapFeatureExtractor"]
