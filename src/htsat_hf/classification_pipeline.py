"""`pipeline("audio-classification")` for HTS-AT models: audio of any length window by window, with bounded memory.

Transformers' pipeline reads a whole file, decodes it in one piece (ffmpeg's messages silenced) and runs every
window of it in one forward pass: an hour of audio needed 5-6 GB. For HTS-AT models (and ensembles of them on one
token-semantic grid) this subclass runs the same windows through `htsat_hf.annotation.Annotator` instead (files
streamed through ffmpeg, windows in batches of `window_batch_size`, ffmpeg's complaints about a damaged file logged
as warnings, a progress bar for audio over two minutes); the scores are those of the model's own long-input path.
Any other model takes Transformers' code unchanged. Importing `htsat_hf` installs it as the task's implementation.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pipelines.audio_classification import AudioClassificationPipeline
from transformers.utils import logging

from .pipeline_htsat import PROGRESS_MIN_SECONDS, audio_source, one_waveform

logger = logging.get_logger(__name__)


class HTSATAudioClassificationPipeline(AudioClassificationPipeline):
    """Audio classification; for HTS-AT models windowed as the model does, in batches of `window_batch_size`."""

    def _is_htsat(self) -> bool:
        """An HTS-AT model, or an ensemble whose members share one token-semantic grid (both stream through the
        annotator's windows); anything else takes Transformers' own path."""
        config = self.model.config
        model_type = getattr(config, "model_type", None)
        if model_type == "htsat_ensemble":
            return bool(getattr(config, "use_token_semantic_head", False)) and hasattr(self.model, "members")
        return model_type == "htsat" and hasattr(self.model, "htsat")

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, window_batch_size=None, progress=None,
                             **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(top_k, function_to_apply, **kwargs)
        if window_batch_size is not None:
            forward["window_batch_size"] = int(window_batch_size)
        if progress is not None:
            forward["progress"] = progress
        return preprocess, forward, postprocess

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(one_waveform(inputs), *args, **kwargs)

    def preprocess(self, inputs: Any):
        if not self._is_htsat():
            return super().preprocess(inputs)
        return {"source": audio_source(inputs, self.feature_extractor.sampling_rate)}

    def _forward(self, model_inputs: dict, window_batch_size: int = 8, progress: bool | None = None):
        if not self._is_htsat():
            return super()._forward(model_inputs)
        from .annotation import AnnotationError, Annotator

        source = model_inputs["source"]
        annotator = Annotator(self.model, self.feature_extractor, tasks=("tags",), batch_size=window_batch_size)
        show = progress if progress is not None else (source.duration_hint or 0) > PROGRESS_MIN_SECONDS
        items = annotator.cutter.source_items(0, "input", source)
        if show:
            items = _with_progress(items, source, self.model.config)
        (row,) = list(annotator.annotate_items(items))
        if isinstance(row, AnnotationError):
            raise ValueError(row.message)
        if row["warning"]:
            logger.warning(row["warning"])
        return SequenceClassifierOutput(logits=row["clip_logits"][None])


def _with_progress(items, source, config):
    """Passes the window items on while a bar counts the seconds of audio they start at."""
    from tqdm.auto import tqdm

    frame_seconds = config.hop_length / config.sampling_rate
    with tqdm(total=round(source.duration_hint or 0, 1) or None, unit="s", desc="audio classification") as bar:
        for item in items:
            starts = getattr(item, "starts", None)
            if starts:
                bar.update(max(0.0, round(max(starts) * frame_seconds - bar.n, 1)))
            yield item
        if bar.total:
            bar.update(bar.total - bar.n)


def install() -> None:
    """Makes this class the implementation of the "audio-classification" task (it defers to Transformers' own for
    models that are not HTS-AT). Set in place, so that the task's defaults stay and no 'already registered' warning
    is printed."""
    from transformers.pipelines import SUPPORTED_TASKS

    SUPPORTED_TASKS["audio-classification"]["impl"] = HTSATAudioClassificationPipeline


__all__ = ["HTSATAudioClassificationPipeline", "install"]
