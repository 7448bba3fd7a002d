"""`pipeline("audio-classification")` for HTS-AT models: audio of any length window by window, with bounded memory.

Transformers' pipeline reads a whole file, decodes it in one piece (ffmpeg's messages silenced) and runs every
window of it in one forward pass: an hour of audio needed 5-6 GB. For HTS-AT models (and ensembles of them on one
token-semantic grid) this subclass runs the same windows through `htsat_hf.annotation.Annotator` instead (files
streamed through ffmpeg, windows in batches of `window_batch_size`, ffmpeg's complaints about a damaged file logged
as warnings, a progress bar for audio over two minutes); the scores are those of the model's own long-input path.
Any other model takes Transformers' code unchanged. Importing `htsat_hf` installs it as the task's implementation.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pipelines.audio_classification import AudioClassificationPipeline
from transformers.utils import logging

from .inference_checks import check_inference_ready
from .scores import top_tags
from .pipeline_htsat import (
    PROGRESS_MIN_SECONDS,
    AudioSource,
    audio_source,
    check_flag,
    check_positive_int,
    keyword_names,
    one_waveform,
    reject_unknown_arguments,
)

logger = logging.get_logger(__name__)


class HTSATAudioClassificationPipeline(AudioClassificationPipeline):
    """Audio classification; for HTS-AT models windowed as the model does, in batches of `window_batch_size`."""

    def __init__(self, *args, **kwargs):
        """As Transformers' pipeline; an HTS-AT model whose weights were not loaded, or whose feature extractor
        disagrees with its config, is refused (`inference_checks.check_inference_ready`)."""
        super().__init__(*args, **kwargs)
        if self._is_htsat():
            check_inference_ready(self.model, self.feature_extractor)

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
        """Transformers' arguments (`top_k`, `function_to_apply`, and any the parent class takes) and ours; any other
        name is a TypeError (the parent would ignore a misspelt `topk=`)."""
        parents = set(keyword_names(AudioClassificationPipeline._sanitize_parameters))
        reject_unknown_arguments("audio-classification", {k: v for k, v in kwargs.items() if k not in parents},
                                 parents | set(keyword_names(type(self)._sanitize_parameters)))
        if top_k is not None:
            top_k = check_positive_int(top_k, "top_k")
        preprocess, forward, postprocess = super()._sanitize_parameters(top_k, function_to_apply, **kwargs)
        if window_batch_size is not None:
            forward["window_batch_size"] = check_positive_int(window_batch_size, "window_batch_size")
        if progress is not None:
            forward["progress"] = check_flag(progress, "progress")
        return preprocess, forward, postprocess

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(one_waveform(inputs), *args, **kwargs)

    def preprocess(self, inputs: Any):
        if not self._is_htsat():
            return super().preprocess(inputs)
        return {"source": audio_source(inputs, self.feature_extractor.sampling_rate)}

    def _forward(self, model_inputs: dict, window_batch_size: int = 8, progress: bool | None = None):
        """(inputs, labels) clip logits of one input, or with `batch_size=` of the inputs Transformers' DataLoader
        collated (their sources come as a list); the windows of a batch's inputs share forward passes."""
        if not self._is_htsat():
            return super()._forward(model_inputs)
        from .annotation import AnnotationError, Annotator

        sources = model_inputs["source"]
        sources = sources if isinstance(sources, list) else [sources]
        annotator = Annotator(self.model, self.feature_extractor, tasks=("tags",), batch_size=window_batch_size)
        items = chain.from_iterable(self._source_items(annotator, key, source, progress)
                                    for key, source in enumerate(sources))
        logits: dict[int, torch.Tensor] = {}
        for row in annotator.annotate_items(items):
            if isinstance(row, AnnotationError):
                raise ValueError(row.message)
            if row["warning"]:
                logger.warning(row["warning"])
            logits[row["key"]] = row["clip_logits"]
        return SequenceClassifierOutput(logits=torch.stack([logits[key] for key in range(len(sources))]))

    def _source_items(self, annotator, key: int, source: AudioSource, progress: bool | None):
        """The annotator's window items of one source, counted by a progress bar when one is asked for (default: for
        audio over two minutes)."""
        items = annotator.cutter.source_items(key, "input", source)
        show = progress if progress is not None else (source.duration_hint or 0) > PROGRESS_MIN_SECONDS
        return _with_progress(items, source, self.model.config) if show else items

    def postprocess(self, model_outputs, top_k: int = 5, function_to_apply: str | None = None):
        """Top-k {label, score}; an HTS-AT model's scores by `scores.logits_to_scores` (as the annotator, the live
        detector and the SED pipeline make theirs), unless `function_to_apply` asks for another function."""
        if function_to_apply is not None or not self._is_htsat():
            return super().postprocess(model_outputs, top_k=top_k, function_to_apply=function_to_apply)
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        return top_tags(model_outputs.logits[0], labels, self.model.config.problem_type, top_k)


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
