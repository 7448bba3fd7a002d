"""`pipeline("zero-shot-audio-classification")` for `HTSATClapModel`: Transformers' arguments (`candidate_labels`,
`hypothesis_template`) and output (a list of {"score", "label"}, highest first, scores a softmax of
`logits_per_audio` over the candidate labels), for inputs of any length.

Inputs follow the rule of every htsat-hf pipeline (`pipeline_htsat.audio_source`: a file path, bytes, `{"array",
"sampling_rate"}` resampled by FFmpeg's libswresample, or a 1-D array at the model's rate). Up to 10 s the features
are CLAP's (repeat-padded, `HTSATClapFeatureExtractor`) and the scores equal Transformers' CLAP pipeline on the same
weights; longer inputs are not cropped at random as CLAP's `rand_trunc` does but cut into the model's overlapping
10-s windows, whose pooled embeddings are averaged before the projection (`modeling_htsat_clap`). Any other model
takes Transformers' own code unchanged. Importing `htsat_hf` installs this class as the task's implementation.
"""

from __future__ import annotations

from typing import Any

from transformers.pipelines.zero_shot_audio_classification import ZeroShotAudioClassificationPipeline

from .modeling_htsat_clap import DEFAULT_TEMPLATE
from .pipeline_htsat import audio_source, one_waveform


class HTSATZeroShotAudioClassificationPipeline(ZeroShotAudioClassificationPipeline):
    """Zero-shot audio classification; for an `HTSATClapModel` with htsat-hf's inputs and windows (any length)."""

    def _is_htsat_clap(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "htsat_clap"

    def __call__(self, audios: Any, **kwargs: Any) -> Any:
        return super().__call__(one_waveform(audios) if self._is_htsat_clap() else audios, **kwargs)

    def preprocess(self, audio, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE):
        if not self._is_htsat_clap():
            return super().preprocess(audio, candidate_labels, hypothesis_template)
        if isinstance(candidate_labels, str):
            candidate_labels = [candidate_labels]
        if not candidate_labels:
            raise ValueError("Pass candidate_labels=[...]: the phrases to score the audio against.")
        rate = self.feature_extractor.sampling_rate
        samples = audio_source(audio, rate).samples()
        inputs = self.feature_extractor(samples, sampling_rate=rate, return_tensors="pt")
        inputs = inputs.to(self.dtype)
        inputs["candidate_labels"] = list(candidate_labels)
        sequences = [hypothesis_template.format(x) for x in candidate_labels]
        inputs["text_inputs"] = [self.tokenizer(sequences, return_tensors="pt", padding=True)]
        return inputs


def install() -> None:
    """Makes this class the implementation of "zero-shot-audio-classification" (Transformers' own for other models).
    Set in place, so that the task's defaults stay and no 'already registered' warning is printed."""
    from transformers.pipelines import SUPPORTED_TASKS

    SUPPORTED_TASKS["zero-shot-audio-classification"]["impl"] = HTSATZeroShotAudioClassificationPipeline


__all__ = ["HTSATZeroShotAudioClassificationPipeline", "install"]
