"""`pipeline("sound-event-detection")`: timed events from HTS-AT's token-semantic maps, for audio of any length.

Audio longer than one window is read as a stream (files are decoded block by block, see `audio_decoding`, so an hour
of audio is never held in memory whole), cut into the model's overlapping 10-s windows, and the windows' step logits
are stitched onto one time grid exactly as `HTSATForSoundEventDetection` does for a long input (for a single-label
model with each window's clip logits, which cap its frame scores: `scores.frame_scores`). Steps that no later
window reaches are post-processed into events as they are complete (`EventStream`), so memory does not grow with the
recording; with `return_frame_scores=True` the whole grid is kept and returned.
"""

from __future__ import annotations

import difflib
import inspect
import json
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .audio_decoding import (
    AudioInputError,
    channels_first,
    decode_bytes_blocks,
    decode_file,
    probe_duration,
    resample,
    whole_rate,
)
from .feature_extraction_htsat import pcm_to_float
from .inference_checks import check_inference_ready
from .scores import labelled_frame_scores, with_window_clip_logits
from .sed_postprocessing import (
    EventSettings,
    EventStream,
    frames_to_events,
    label_mapping_from,
    resolve_label_mapping,
)
from .time_axis import (  # noqa: F401  (SampleSpan, span_features: names this module has always offered)
    READ_BLOCK_SECONDS,
    SampleSpan,
    StepStitcher,
    WindowStream,
    check_positive_int,
    span_features,
)

logger = logging.get_logger(__name__)

PROGRESS_MIN_SECONDS = 120.0
# Taken by Transformers' `Pipeline.__call__` itself (and `Pipeline.__init__`), before `_sanitize_parameters`.
PIPELINE_CALL_ARGUMENTS = ("batch_size", "num_workers")
# A CLAP model's phrases and their calibration (`modeling_htsat_clap.text_query_model`).
TEXT_QUERY_ARGUMENTS = ("candidate_labels", "hypothesis_template", "calibration", "background_label", "calibration_bias")


def keyword_names(function: Callable) -> list[str]:
    """The named keyword parameters of `function` (not `self`, `*args` or `**kwargs`)."""
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]


def reject_unknown_arguments(task: str, unknown: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """A TypeError, as a Python call raises it, naming each keyword argument the pipeline does not take (with the
    closest accepted name) and listing those it takes; Transformers' `Pipeline` would otherwise drop them silently."""
    if not unknown:
        return
    accepted = sorted(set(accepted) | set(PIPELINE_CALL_ARGUMENTS))
    named = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, accepted, n=1)
        named.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise TypeError(f'pipeline("{task}") got unexpected keyword argument{"s" if len(named) > 1 else ""} '
                    f"{', '.join(named)}; it takes: {', '.join(accepted)}.")




def check_flag(value: Any, name: str) -> bool:
    """`value` as a bool, or a ValueError naming the setting (a string such as "no" would otherwise count as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


@dataclass
class AudioSource:
    """Mono audio at the model's rate: an in-memory array, a file decoded block by block (`decode_file`), or the
    bytes of a file, decoded as that file would be (`decode_bytes_blocks`)."""

    sampling_rate: int
    array: np.ndarray | None = None
    path: str | None = None
    duration_hint: float | None = None
    warnings: list[str] | None = None  # where ffmpeg's warnings go instead of the log (see `decode_file`)
    data: bytes | None = None

    def blocks(self, block_samples: int) -> Iterator[np.ndarray]:
        if self.array is not None:
            for start in range(0, len(self.array), block_samples):
                yield self.array[start : start + block_samples]
            return
        if self.data is not None:
            yield from decode_bytes_blocks(self.data, self.sampling_rate, block_samples, self.warnings)
            return
        yield from decode_file(self.path, self.sampling_rate, block_samples, self.warnings)

    def samples(self) -> np.ndarray:
        """All of the audio at once (an array as it is; a file or bytes decoded whole)."""
        if self.array is not None:
            return self.array
        blocks = list(self.blocks(int(READ_BLOCK_SECONDS * self.sampling_rate)))
        return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def audio_source(inputs: Any, sampling_rate: int, probe: bool = True) -> AudioSource:
    """Any input the pipelines take -> an `AudioSource` of mono audio at `sampling_rate`, by one rule (see
    `audio_decoding`: the first audio stream, each channel resampled by FFmpeg's libswresample, channels averaged):
    a file path (`str` or `os.PathLike`; streamed with FFmpeg; a `scheme://` string naming no file is a URL), bytes of
    a file, `{"array"|"raw", "sampling_rate"}` (mono, or one recording's channels either way round), an undecoded
    `datasets` Audio cell `{"bytes", "path"}` (its bytes when it has them, even empty), a torchcodec `AudioDecoder`,
    or a 1-D array / tensor / list of numbers at the rate. `probe`: read a file's duration from its header first (a
    progress-bar hint)."""
    rate = sampling_rate
    inputs = encoded_audio_cell(inputs)  # a decoded `datasets` cell: the bytes or file it was decoded from
    if isinstance(inputs, dict) and not ({"array", "raw"} & set(inputs)) and ({"bytes", "path"} & set(inputs)):
        inputs = _cell_audio(inputs)  # an undecoded `datasets` Audio cell
    if isinstance(inputs, (str, os.PathLike)):
        return AudioSource(rate, path=inputs if isinstance(inputs, str) else os.fspath(inputs),
                           duration_hint=probe_duration(inputs) if probe else None)
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        data = bytes(inputs)
        if not data:
            raise AudioInputError("empty", "The audio is empty: the bytes given hold 0 bytes.")
        return AudioSource(rate, data=data, duration_hint=probe_duration(data) if probe else None)
    if type(inputs).__name__ == "AudioDecoder":  # what `datasets` gives for a decoded Audio column
        samples = inputs.get_all_samples()
        inputs = {"array": samples.data.numpy(), "sampling_rate": samples.sample_rate}
    if isinstance(inputs, dict):
        if "sampling_rate" not in inputs or not ({"array", "raw"} & set(inputs)):
            raise AudioInputError("decode", 'A dict input needs "array" (or "raw") and "sampling_rate" keys.')
        given = whole_rate(inputs["sampling_rate"])
        channels = channels_first(_as_float(_as_numpy(inputs.get("array", inputs.get("raw")))))
        if given != rate:
            logger.info(f"resampling audio from {given} Hz to {rate} Hz")
        array = resample(channels, given, rate)
    else:
        array = _as_numpy(inputs)
        _check_mono(array)
        array = _as_float(array)
    return AudioSource(rate, array=array, duration_hint=len(array) / rate)


def encoded_audio_cell(audio: Any) -> Any:
    """A decoded `datasets` Audio cell (torchcodec `AudioDecoder`) as the bytes or local file it was decoded from, so
    that it is decoded as the command line decodes files (FFmpeg, resampled by libswresample to the model's rate)
    whatever the column's `Audio(sampling_rate=..., num_channels=...)` says; anything else as it is. A decoder that
    `datasets` did not make, or one of a remote file, stays a decoder (`audio_source` reads its samples)."""
    if type(audio).__name__ != "AudioDecoder":
        return audio
    encoded = getattr(audio, "_hf_encoded", None)  # what `datasets.Audio.decode_example` decoded (its encode_example)
    if not isinstance(encoded, dict):
        return audio
    if encoded.get("bytes"):
        return {"bytes": encoded["bytes"], "path": encoded.get("path")}
    path = encoded.get("path")
    return path if isinstance(path, str) and os.path.isfile(path) else audio


def _cell_audio(cell: dict) -> Any:
    """An undecoded `datasets` Audio cell's audio: its bytes whenever it has them (empty bytes are empty audio, not
    a reason to read its path), else its path."""
    if cell.get("bytes") is not None:
        if len(cell["bytes"]) == 0:
            raise AudioInputError("empty", f"The audio is empty: the cell's bytes hold 0 bytes (its path, "
                                           f"{cell.get('path')!r}, is not read in their place).")
        return cell["bytes"]
    if cell.get("path") is None:
        raise AudioInputError("decode", 'An Audio cell with neither "bytes" nor "path".')
    return cell["path"]


def _as_numpy(samples: Any) -> np.ndarray:
    """An array, tensor, or (nested) list of numbers as a numpy array; anything else is an unsupported input."""
    if isinstance(samples, torch.Tensor):
        return samples.detach().cpu().numpy()
    if isinstance(samples, (np.ndarray, list, tuple)):
        array = np.asarray(samples)
        if array.dtype.kind in "iuf":
            return array
    raise AudioInputError(
        "decode",
        f"Unsupported input {type(samples).__name__}: pass a file path, bytes, a 1-D array (or list of numbers) at "
        'the model\'s rate, or {"array": ..., "sampling_rate": ...}.',
    )


def one_waveform(inputs: Any) -> Any:
    """A list of numbers is one waveform (as a numpy array), not a batch of single numbers, which the pipelines'
    `__call__` would otherwise make of any list; anything else is returned as it is."""
    if isinstance(inputs, list) and inputs and all(isinstance(x, numbers.Real) for x in inputs):
        return np.asarray(inputs)
    return inputs


def _check_mono(array: np.ndarray) -> None:
    if array.ndim != 1:
        raise AudioInputError(
            "decode",
            f"Expected mono audio (samples,) at the model's rate, got shape {array.shape}. For one recording's "
            'channels pass {"array": x, "sampling_rate": rate} (the channels are averaged, as a file\'s are); pass '
            "the clips of a batch as a list, one by one.",
        )


def _as_float(array: np.ndarray) -> np.ndarray:
    try:
        return pcm_to_float(array)
    except ValueError as error:
        raise AudioInputError("decode", str(error)) from error


class SoundEventDetectionPipeline(Pipeline):
    """
    Detects sound events: `{"events": [{"label", "onset", "offset", "score"}, ...]}` in seconds from the start of the
    audio, plus `frame_scores` (steps, labels), `frame_times` (step onsets in seconds) and `labels` when
    `return_frame_scores=True`. Frame scores follow the config's `problem_type` as clip scores do
    (`scores.logits_to_scores`): a sigmoid per label for a multi-label model; for a single-label one a softmax over
    the labels capped by the clip score of the window the step lies in (`scores.frame_scores`), so no event is
    reported for a label the window's clip score rules out.

    Inputs: a file path (`str` or `pathlib.Path`), raw bytes of a file, `{"array"|"raw": np.ndarray, "sampling_rate":
    int}` (mono or one recording's channels), or a 1-D array (or list of numbers) already at the model's rate. Every
    input follows one rule: channels averaged, other rates resampled by FFmpeg's libswresample (`audio_decoding`).

    Post-processing (see `sed_postprocessing.frames_to_events`): `threshold` (float, per-class list or dict),
    `median_filter_seconds`, `min_duration_seconds`, `min_gap_seconds`, `hysteresis=(onset, offset)`,
    `upsample="repeat"` (the original's step holding) or `"linear"`, `upsample_factor`; or all of them as one
    `event_settings=sed_postprocessing.EventSettings(...)` (keywords given beside it replace its fields). `label_mapping`: a JSON/YAML path or dict mapping
    new labels to groups of the model's labels (e.g. DESED classes from AudioSet classes). `window_batch_size`: windows
    per forward pass. `progress`: show a progress bar (default: for audio over two minutes). A list of inputs takes
    Transformers' `batch_size=` and `num_workers=`. Any other keyword is a TypeError naming it; a bad value a
    ValueError naming the setting, before any audio is read.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = True
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        """As `Pipeline`; refuses a model whose weights were not loaded or whose feature extractor disagrees with its
        config (`inference_checks.check_inference_ready`). A CLAP model (`HTSATClapModel`) takes phrases as its labels
        (`TEXT_QUERY_ARGUMENTS`, here or in a call): it then runs as `text_query_model(model, candidate_labels, ...)`,
        through the same windows, stitching and post-processing as a label model."""
        query = {key: kwargs.pop(key) for key in TEXT_QUERY_ARGUMENTS if key in kwargs}
        super().__init__(*args, **kwargs)
        self.clap_model = self.model if hasattr(self.model, "text_query") else None
        if self.clap_model is not None and query:
            self.model = self.clap_model.text_query(tokenizer=self.tokenizer, **query)
        elif query:
            raise ValueError(f"{', '.join(sorted(query))}: phrases need a CLAP model (HTSATClapModel), not "
                             f"{type(self.model).__name__}.")
        check_inference_ready(self.model, self.feature_extractor)

    def _sanitize_parameters(
        self,
        threshold=None,
        median_filter_seconds=None,
        min_duration_seconds=None,
        min_gap_seconds=None,
        hysteresis=None,
        upsample=None,
        upsample_factor=None,
        event_settings=None,
        label_mapping=None,
        return_frame_scores=None,
        window_batch_size=None,
        progress=None,
        **unknown,
    ):
        reject_unknown_arguments("sound-event-detection", unknown, keyword_names(type(self)._sanitize_parameters))
        forward = {}
        if window_batch_size is not None:
            forward["window_batch_size"] = check_positive_int(window_batch_size, "window_batch_size")
        if progress is not None:
            forward["progress"] = check_flag(progress, "progress")
        given = dict(
            threshold=threshold,
            median_filter_seconds=median_filter_seconds,
            min_duration_seconds=min_duration_seconds,
            min_gap_seconds=min_gap_seconds,
            hysteresis=hysteresis,
            upsample=upsample,
            upsample_factor=upsample_factor,
        )
        post = {key: value for key, value in given.items() if value is not None}  # None: not given
        if event_settings is not None:  # one EventSettings, whole (its None fields are "off", and replace what was
            # given at construction); keywords given beside it replace its fields
            post = EventSettings.merged(event_settings, **given).keywords()
        if return_frame_scores is not None:
            post["return_frame_scores"] = return_frame_scores
        if label_mapping is not None:
            post["label_mapping"] = label_mapping_from(label_mapping)
        # a call's settings go with those given at construction (Transformers merges the dicts it is returned key by
        # key, so this whole dict would replace the constructor's), and are checked together: a call's threshold
        # dict may name the labels of a mapping given then
        merged = {**getattr(self, "_postprocess_params", {}), **post}
        self.check_postprocessing(merged)
        forward["postprocessing"] = merged  # events are found while the audio streams, unless frame scores are wanted
        return {}, forward, post

    def check_postprocessing(self, postprocessing: Mapping[str, Any]) -> None:
        """A ValueError naming the setting when post-processing settings do not fit the model:
        `EventSettings.resolve`'s checks against the model's labels (or the mapped ones), so that a bad setting fails
        before any audio is read."""
        settings = dict(postprocessing)
        if "return_frame_scores" in settings:
            check_flag(settings.pop("return_frame_scores"), "return_frame_scores")
        mapping = settings.pop("label_mapping", None)
        labels = self._labels() if mapping is None else list(resolve_label_mapping(mapping, self._labels()))
        EventSettings(**settings).resolve(1.0, labels)  # any step: what is checked is the settings against the labels

    # ------------------------------------------------------------------------------------------------- input
    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """A call's phrases (`TEXT_QUERY_ARGUMENTS`, for a CLAP model) hold for that call (give a generator's phrases
        at construction: its results are produced after the call returns)."""
        query = {key: kwargs.pop(key) for key in TEXT_QUERY_ARGUMENTS if key in kwargs}
        if self.clap_model is None:
            if query:
                raise ValueError(f"{', '.join(sorted(query))}: phrases need a CLAP model (HTSATClapModel).")
            return super().__call__(one_waveform(inputs), *args, **kwargs)
        if not query and self.model is self.clap_model:
            raise ValueError("A CLAP model detects the phrases it is given: pass candidate_labels=[...].")
        held = self.model
        if query:
            self.model = self.clap_model.text_query(tokenizer=self.tokenizer, **{**getattr(held, "query", {}), **query})
        try:
            return super().__call__(one_waveform(inputs), *args, **kwargs)
        finally:
            self.model = held

    def preprocess(self, inputs: Any) -> dict:
        return {"source": audio_source(inputs, self.feature_extractor.sampling_rate)}

    # ----------------------------------------------------------------------------------------------- forward
    def _forward(
        self,
        model_inputs: dict,
        window_batch_size: int = 8,
        progress: bool | None = None,
        postprocessing: dict | None = None,
    ) -> dict:
        """One input's outputs, or with `batch_size=` (Transformers' DataLoader collates the inputs' sources into a
        list) a dict of per-input lists, which Transformers hands to `postprocess` one input at a time. The stitched
        step values (`detect_source`) come with a leading batch axis of one, as Transformers' unbatching gives them."""
        sources = model_inputs["source"]
        if not isinstance(sources, list):
            output = self.detect_source(sources, window_batch_size, progress, postprocessing)
            return {**output, "stitched": output["stitched"][None]} if "stitched" in output else output
        outputs = [self.detect_source(source, window_batch_size, progress, postprocessing) for source in sources]
        return {key: [output[key] for output in outputs] for key in outputs[0]}

    def detect_source(
        self,
        source: AudioSource,
        window_batch_size: int = 8,
        progress: bool | None = None,
        postprocessing: dict | None = None,
    ) -> dict:
        """Runs the windows as the audio streams in and stitches their step logits (for a single-label model with
        each window's clip logits beside them: `scores.with_window_clip_logits`). Steps that no later window reaches
        go straight into an `EventStream`, so memory does not grow with the recording; with `return_frame_scores`
        the whole grid of scores is kept (it is part of the answer)."""
        settings = dict(postprocessing or {})
        keep_scores = settings.pop("return_frame_scores", False)
        label_mapping = settings.pop("label_mapping", None)
        stream = WindowStream(self.model.config, self.feature_extractor, source)
        window_step = self.model.frame_step_seconds(self.model.config.image_frames + 1)  # any windowed input's step
        labels = self._labels() if label_mapping is None else list(resolve_label_mapping(label_mapping, self._labels()))
        events = None if keep_scores else EventStream(window_step, labels, **settings)
        show = progress if progress is not None else (source.duration_hint or 0) > PROGRESS_MIN_SECONDS
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=round(source.duration_hint or 0, 1) or None, unit="s", desc="sound event detection")
        frame_seconds = self.model.config.hop_length / self.model.config.sampling_rate
        problem_type = self.model.config.problem_type
        stitcher, stitched = None, None
        for features, batch_starts in stream.window_batches(window_batch_size):
            with torch.no_grad():
                output = self.model(input_features=features.to(self.device, self.model.dtype))
            # (windows, steps, labels) per window (an ensemble's members combined per window), then the windows'
            # clip logits beside them for a single-label model
            values = with_window_clip_logits(output.frame_logits.float().cpu(), problem_type, output.logits.float().cpu())
            if not stream.windowed:  # an input of at most one image: one window, already on its own grid
                stitched = values[0]
            else:
                if stitcher is None:
                    stitcher = StepStitcher(None, window_step, values.shape[-1])
                start_seconds = [start * frame_seconds for start in batch_starts]
                stitcher.add(values, start_seconds)
                if events is not None:  # windows come in time order: no later one reaches before the newest's start
                    final = stitcher.pop_final(stitcher.first_step(max(start_seconds)))
                    events.push(self._scores(final, label_mapping)[0])
            if bar is not None:
                bar.update(round(stream.seconds_read - bar.n, 1))
        if bar is not None:
            bar.close()
        if stitcher is not None:
            stitched = stitcher.result(self.model.total_steps(stream.num_frames))
        duration = stream.num_samples / source.sampling_rate
        step_seconds = self.model.frame_step_seconds(stream.num_frames)
        if events is None:
            return {"stitched": stitched, "step_seconds": step_seconds, "duration": duration}
        if not stream.windowed:  # one stretched window: its own step length
            events = EventStream(step_seconds, events.labels, **settings)
        events.push(self._scores(stitched, label_mapping)[0])
        return {"events": events.finish(duration)}

    def _labels(self) -> list[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def _scores(self, stitched: torch.Tensor, label_mapping: dict | None) -> tuple[np.ndarray, list[str]]:
        """Frame scores of stitched steps (`scores.frame_scores`: as the config's problem_type says, capped by the
        window clip score for a single-label model) and their labels, mapped to the target labels when a mapping is
        given (`labelled_frame_scores`)."""
        return labelled_frame_scores(stitched, self.model.config.problem_type, self._labels(), label_mapping)

    # ----------------------------------------------------------------------------------------------- output
    def postprocess(
        self,
        model_outputs: dict,
        threshold: float | list | dict = 0.5,
        median_filter_seconds: float | dict | None = None,
        min_duration_seconds: float = 0.0,
        min_gap_seconds: float = 0.0,
        hysteresis: tuple[float, float] | None = None,
        upsample: str = "repeat",
        upsample_factor: int | None = None,
        label_mapping: dict | None = None,
        return_frame_scores: bool = False,
    ) -> dict:
        if "events" in model_outputs:  # found while streaming (see `_forward`)
            return {"events": model_outputs["events"]}
        scores, labels = self._scores(model_outputs["stitched"][0], label_mapping)
        settings = EventSettings(
            threshold=threshold, median_filter_seconds=median_filter_seconds,
            min_duration_seconds=min_duration_seconds, min_gap_seconds=min_gap_seconds, hysteresis=hysteresis,
            upsample=upsample, upsample_factor=upsample_factor,
        )
        events = frames_to_events(scores, model_outputs["step_seconds"], labels,
                                  duration_seconds=model_outputs["duration"], **settings.keywords())
        result = {"events": events}
        if return_frame_scores:
            result["frame_scores"] = scores
            result["frame_times"] = np.arange(scores.shape[0]) * model_outputs["step_seconds"]
            result["labels"] = labels
        return result


REMOTE_PIPELINE = {
    "impl": "pipeline_htsat.SoundEventDetectionPipeline",
    "pt": ["AutoModelForAudioFrameClassification"],
    "tf": [],
    "type": "audio",
}


def add_remote_sed_pipeline(folder: str | Path) -> None:
    """
    Makes `pipeline("sound-event-detection", model=folder, trust_remote_code=True)` work where `htsat_hf` is not
    installed: copies this module (and its relative imports) beside the weights and declares it in `config.json`.

    Plain `save_pretrained` does not do this, because Transformers then asks for `trust_remote_code=True` even where
    the package is installed; published repositories (htsat-hf publish) do it.
    """
    from transformers.dynamic_module_utils import custom_object_save

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ValueError(f"{folder} has no config.json: save the model there first.")
    custom_object_save(SoundEventDetectionPipeline, folder)
    config = json.loads(config_path.read_text())
    config.setdefault("custom_pipelines", {})["sound-event-detection"] = REMOTE_PIPELINE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["AudioInputError", "SampleSpan", "SoundEventDetectionPipeline", "add_remote_sed_pipeline", "audio_source",
           "encoded_audio_cell", "one_waveform", "span_features"]
