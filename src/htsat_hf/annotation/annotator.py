"""The engine-agnostic core: a batch of audio in, one row per input out, windows of many inputs packed per forward.

    annotator = Annotator("path/to/htsat-folder", tasks=("tags", "events"), threshold=0.3)
    rows = list(annotator.annotate([("a.wav", "a.wav"), ("b", {"array": x, "sampling_rate": 16000})]))
    dataset = dataset.map(annotator, batched=True, with_rank=True)        # columns in, columns out

Each row equals what `pipeline("audio-classification")` (tags, embedding) and `pipeline("sound-event-detection")`
(events, frame scores) give for that input; see `windows.py` for how the windows are cut.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..inference_models import combine_members, is_ensemble, load_job_model, model_members
from ..time_axis import SampleSpan, check_positive_int, span_features
from ..scores import is_exclusive, labelled_frame_scores, top_tags, with_window_clip_logits
from ..sed_postprocessing import EventSettings, frames_to_events, label_mapping_from, resolve_label_mapping
from .embeddings import stored_embeddings, window_embedding_rows
from .schema import task_columns, typed_column
from .text_queries import is_text_query, text_query_settings
from .windows import (
    CLIP_TASKS,
    TASKS,
    TIMELINE,
    TIMELINE_TASKS,
    InputEnd,
    InputFailed,
    WindowChunk,
    WindowCutter,
    WindowItem,
    clip_view,
)

DEFAULT_TASKS = ("tags", "events")
POSTPROCESSING_KEYS = (
    "threshold", "median_filter_seconds", "min_duration_seconds", "min_gap_seconds", "hysteresis", "upsample",
)


@dataclass
class AnnotationError:
    """An input that could not be annotated: its id, the stage that found the problem and the message."""

    id: str
    stage: str
    message: str
    key: int = -1


@dataclass
class _InputState:
    """Outputs gathered for one input while its windows are in flight."""

    queued: int = 0
    done: int = 0
    timeline: list[tuple[int, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)  # start, steps, tokens
    clip: list[tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    end: InputEnd | None = None


class Annotator:
    """
    Tags, events, embeddings and frame scores for batches of audio, with one HTS-AT model.

    Args:
        model: an HTS-AT folder or Hub id, or a loaded `HTSATForAudioClassification` / `HTSATForSoundEventDetection`
            / `HTSATEnsembleModel` (members on one time grid; combined as the ensemble's forward combines them).
        feature_extractor: defaults to the folder's (or one matching the model's config).
        tasks: any of "tags", "events", "embeddings", "frame_scores", "window_embeddings" (each window's embedding
            with its span, `embeddings.py`).
        top_k: tags per input. Tags and frame scores alike are sigmoid or softmax scores as the config's
            `problem_type` says (`scores.logits_to_scores`), like the pipelines; a single-label model's frame scores
            are capped by their window's clip score (`scores.frame_scores`).
        batch_size: windows per forward pass, packed across inputs.
        event_settings: the SED pipeline's post-processing (`sed_postprocessing.frames_to_events`), as one
            `sed_postprocessing.EventSettings`; threshold, median_filter_seconds, min_duration_seconds,
            min_gap_seconds, hysteresis, upsample: its fields one by one (given, they replace those of
            `event_settings`).
        label_mapping: a dict or JSON/YAML path mapping new labels to groups of the model's labels (events and frame
            scores; tags keep the model's labels).
        device: where the model runs (default: the model's device, or CUDA when a path is given and one exists).
        bf16: bfloat16 autocast for the forward pass.
        features_on: where the log-mel features are computed: "workers" (where the audio is decoded, e.g. DataLoader
            workers), "device" (in this process, on the model's device, in one batch per forward pass: decoding
            workers then only decode, which keeps a GPU fed), or "auto" ("device" for a model on a GPU).
        audio_column, id_column: the columns `__call__` reads (batched `datasets.map`, Ray `map_batches`).
        trust_remote_code: for loading a folder whose model code travels with it.
        text_labels: for a CLAP model (`HTSATClapModel`, folder or loaded): the phrases to detect (a list, or a file
            of them one per line), which then stand for the labels in tags and events (`text_queries.py`), with
            hypothesis_template, calibration, background_label, calibration_bias (the SED pipeline's options) and
            tokenizer (default: the folder's). With "embeddings" the stored embedding is CLAP's joint-space one.
    """

    def __init__(
        self,
        model: Any,
        feature_extractor: Any = None,
        *,
        tasks: Iterable[str] = DEFAULT_TASKS,
        top_k: int = 5,
        batch_size: int = 16,
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
        features_on: str = "auto",
        audio_column: str = "audio",
        id_column: str | None = None,
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
        self.config = self.model.config
        self.tasks = _check_tasks(tasks)
        self.ensemble = is_ensemble(self.model)
        self.members = model_members(self.model)
        if self.ensemble:
            if not self.config.use_token_semantic_head:
                raise ValueError("The annotator takes ensembles whose members all have the token-semantic head on one "
                                 "time grid; this one mixes heads or grids (use pipeline('audio-classification')).")
            if {"embeddings", "window_embeddings"} & set(self.tasks):
                raise ValueError("An ensemble has no single pooled embedding: drop 'embeddings' from the tasks, or "
                                 "annotate with one member.")
        if TIMELINE_TASKS & set(self.tasks) and not self.config.use_token_semantic_head:
            raise ValueError(
                "events and frame_scores need the token-semantic head; this model uses the pooled head "
                "(use_token_semantic_head=False): ask for tags and embeddings only."
            )
        self.top_k = min(check_positive_int(top_k, "top_k"), self.config.num_labels)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.bf16 = bool(bf16)
        self.audio_column, self.id_column = audio_column, id_column
        self.model_labels = [self.config.id2label[i] for i in range(self.config.num_labels)]
        self.label_mapping = label_mapping_from(label_mapping)
        self.event_labels = (
            list(resolve_label_mapping(self.label_mapping, self.model_labels)) if self.label_mapping else self.model_labels
        )
        self.event_settings = EventSettings.merged(
            event_settings, threshold=threshold, median_filter_seconds=median_filter_seconds,
            min_duration_seconds=min_duration_seconds, min_gap_seconds=min_gap_seconds,
            hysteresis=tuple(hysteresis) if hysteresis is not None else None, upsample=upsample,
        )
        self.postprocessing = self.event_settings.keywords()
        if "events" in self.tasks:  # settings that do not fit the labels fail now, not at the first input
            self.event_settings.resolve(0.1, self.event_labels)
        if features_on not in ("auto", "workers", "device"):
            raise ValueError(f'features_on must be "auto", "workers" or "device", got {features_on!r}.')
        if features_on == "auto":
            features_on = "device" if self.device.type == "cuda" else "workers"
        self.features_on = features_on
        self.cutter = WindowCutter(self.config, self.feature_extractor, self.tasks,
                                   features_in_workers=features_on == "workers")
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """Everything that decides the rows (for a run's manifest): tasks, top_k, post-processing, mapping, bf16, and
        where the features are computed (another device rounds differently)."""
        return {
            "tasks": list(self.tasks),
            "top_k": self.top_k,
            **{key: _plain(self.postprocessing[key]) for key in POSTPROCESSING_KEYS},
            # only when set: manifests written before it was a setting here stay resumable
            **({"upsample_factor": self.event_settings.upsample_factor}
               if self.event_settings.upsample_factor is not None else {}),
            "label_mapping": self.label_mapping,
            "bf16": self.bf16,
            "features_on": self.features_on,
            **({"text_query": text_query_settings(self.model)} if is_text_query(self.model) else {}),
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------------------------------------------- inputs
    def annotate(self, inputs: Iterable[tuple[str, Any]]) -> Iterator[dict | AnnotationError]:
        """(id, audio) pairs -> one row dict or `AnnotationError` per input, as inputs complete (windows of
        neighbouring inputs share forward passes). Audio: anything `pipeline_htsat.audio_source` takes (a decoded
        `datasets` Audio cell is read from the bytes or file it was decoded from, as the command line reads files)."""
        items = (item for key, (input_id, audio) in enumerate(inputs)
                 for item in self.cutter.items(key, input_id, audio))
        yield from self.annotate_items(items)

    def annotate_items(self, items: Iterable[WindowItem]) -> Iterator[dict | AnnotationError]:
        """`WindowCutter` items (e.g. from decoding workers, any interleaving of inputs) -> rows, each with the input's
        `key`, as soon as all of its windows have run."""
        self._check_process()
        states: dict[int, _InputState] = {}
        pending: list[tuple[int, str, int, torch.Tensor]] = []  # key, view, start, (frames, mel)
        for item in items:
            if isinstance(item, WindowChunk):
                state = states.setdefault(item.key, _InputState())
                for start, features in zip(item.starts, item.features):
                    pending.append((item.key, item.view, start, features))
                    state.queued += 1
                while len(pending) >= self.batch_size:
                    self._run(pending[: self.batch_size], states)
                    pending = pending[self.batch_size :]
                    yield from self._finished(states)
            elif isinstance(item, InputEnd):
                states.setdefault(item.key, _InputState()).end = item
                yield from self._finished(states)
            elif isinstance(item, InputFailed):
                states.pop(item.key, None)
                pending = [window for window in pending if window[0] != item.key]
                yield AnnotationError(item.id, item.stage, item.message, item.key)
            else:
                raise TypeError(f"Unexpected item {type(item).__name__}.")
        if pending:
            self._run(pending, states)
        yield from self._finished(states)
        if states:
            raise RuntimeError(f"Inputs {sorted(states)} sent windows but never ended: the item stream was cut short.")

    def __call__(self, batch: Mapping[str, Any], rank: int | None = None) -> pa.Table:
        """Columns in, an Arrow table out (batched `datasets.map(..., with_rank=True)`, Ray `map_batches`): one row
        per input row: the batch's other columns as they were (the audio column is dropped), then `duration_s`, the
        task columns, `warning` and `error` ("stage: message", with empty results, where an input failed). Typed
        Arrow columns, so a batch in which nothing failed still gives `error` its string type."""
        if rank is not None:
            self._place_for_rank(rank)
        self._check_columns(batch)
        audio = list(batch[self.audio_column])
        ids = [str(i) for i in batch[self.id_column]] if self.id_column else [str(i) for i in range(len(audio))]
        rows: dict[int, dict | AnnotationError] = {}
        for row in self.annotate(zip(ids, audio)):
            rows[row.key if isinstance(row, AnnotationError) else row["key"]] = row
        table = rows_to_arrow([rows[key] for key in range(len(audio))], self.tasks)
        kept = [name for name in batch if name != self.audio_column and name not in table.column_names]
        for position, name in enumerate(kept):
            values = batch[name]
            table = table.add_column(position, name, pa.array(values.tolist() if hasattr(values, "tolist") else
                                                              list(values)))
        return table

    def _check_columns(self, batch: Mapping[str, Any]) -> None:
        """The batch has the columns this annotator reads, else a ValueError naming the setting to change."""
        for setting, name in (("audio_column", self.audio_column), ("id_column", self.id_column)):
            if name is not None and name not in batch:
                raise ValueError(f"The batch has no column {name!r} ({setting}); its columns are {list(batch)}: "
                                 f"pass Annotator(..., {setting}=...) with one of them.")

    def _check_process(self) -> None:
        """In a process forked from the one that built the annotator (`datasets.map(num_proc=N)`), torch's OpenMP
        thread pool did not survive the fork and a parallel region would hang: run single-threaded there, as
        DataLoader workers do (the N processes share the cores)."""
        if os.getpid() != self._pid:
            torch.set_num_threads(1)
            self._pid = os.getpid()

    def _place_for_rank(self, rank: int) -> None:
        """One GPU per `datasets.map` worker: rank r runs on cuda:(r % GPUs) when CUDA is there."""
        if torch.cuda.is_available() and self.device.type == "cuda":
            target = torch.device("cuda", rank % torch.cuda.device_count())
            if self.device != target:
                self.model.to(target)

    # ---------------------------------------------------------------------------------------------------- model
    def _run(self, windows: list[tuple[int, str, int, torch.Tensor]], states: dict[int, _InputState]) -> None:
        """One forward pass (per ensemble member) over windows of any inputs: step logits (members, steps, labels)
        and the first member's mean tokens back to each input's state."""
        device = self.device
        window_features = self._features([features for _, _, _, features in windows])
        by_frames: dict[int, list[int]] = {}
        for index, features in enumerate(window_features):
            by_frames.setdefault(features.shape[0], []).append(index)
        member_steps, token_means = [], None
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=self.bf16):
            for member in self.members:
                htsat, images = member.htsat, [None] * len(windows)
                for indices in by_frames.values():  # windows of one length fold together (stretching as the model does)
                    features = torch.stack([window_features[i] for i in indices]).to(device, member.dtype)
                    for i, image in zip(indices, htsat.window_images(features)):
                        images[i] = image
                tokens = htsat.encode_images(torch.stack(images))
                if self.config.use_token_semantic_head:
                    member_steps.append(member.classifier(tokens).float().cpu())
                if token_means is None:
                    token_means = tokens.float().mean(dim=1).cpu()
        steps = torch.stack(member_steps, dim=1) if member_steps else None  # (windows, members, steps, labels)
        for index, (key, view, start, _) in enumerate(windows):
            state = states.get(key)
            if state is None:  # the input failed while its windows waited
                continue
            step = steps[index] if steps is not None else None
            if view == TIMELINE:
                state.timeline.append((start, step, token_means[index]))
            else:
                state.clip.append((step, token_means[index]))
            state.done += 1

    def _features(self, entries: list[torch.Tensor | SampleSpan]) -> list[torch.Tensor]:
        """Each window's (frames, mel) features: as they came, or computed on the model's device from `SampleSpan`s
        (`features_on="device"`), in float32 outside any autocast."""
        spans = [index for index, entry in enumerate(entries) if isinstance(entry, SampleSpan)]
        if not spans:
            return entries
        computed = span_features([entries[i] for i in spans], self.feature_extractor, self.device)
        features = list(entries)
        for index, window in zip(spans, computed):
            features[index] = window
        return features

    def _finished(self, states: dict[int, _InputState]) -> Iterator[dict]:
        for key in [k for k, s in states.items() if s.end is not None and s.done == s.queued]:
            yield self._row(key, states.pop(key))

    # ------------------------------------------------------------------------------------------------- results
    def _row(self, key: int, state: _InputState) -> dict:
        end = state.end
        row: dict[str, Any] = {"key": key, "id": end.id, "duration_s": end.num_samples / end.sampling_rate}
        state.timeline.sort(key=lambda window: window[0])
        starts = [start for start, _, _ in state.timeline]
        stitched = member_frames = None
        if state.timeline and self.config.use_token_semantic_head:
            steps = torch.stack([step for _, step, _ in state.timeline]).transpose(0, 1)  # members, windows, ...

            def stitch(window_steps: torch.Tensor) -> torch.Tensor:
                return (self.model.stitch_window_steps(window_steps, starts, end.num_frames) if end.windowed
                        else window_steps[0])

            combined = self._combine(list(steps), self._exclusive)  # combined per window, then stitched
            # for a single-label model with each window's clip logits beside the steps' (they cap the frame scores)
            clips = (self.model.clip_logits(torch.stack([tokens for _, _, tokens in state.timeline]))
                     if is_text_query(self.model)  # a CLAP window's clip logits come from its pooled embedding
                     else self._combine([member.mean(dim=-2) for member in steps], self._exclusive))  # each window's
            stitched = stitch(with_window_clip_logits(combined, self.config.problem_type, clips))
            frame_logits = stitched[..., : combined.shape[-1]]
            member_frames = [stitch(member) for member in steps] if self.ensemble else [frame_logits]
        if CLIP_TASKS & set(self.tasks):
            if clip_view(end, self.feature_extractor.max_length_samples) == TIMELINE:
                clip_steps, clip_tokens = member_frames, [tokens for _, _, tokens in state.timeline]
            else:
                clip_steps = list(state.clip[0][0]) if state.clip[0][0] is not None else None
                clip_tokens = [state.clip[0][1]]
            embedding = torch.stack(clip_tokens).mean(dim=0)
            if "tags" in self.tasks:
                logits = (self._combine([member.mean(dim=0) for member in clip_steps], self._exclusive)
                          if clip_steps is not None and not is_text_query(self.model)
                          else self._pooled_logits(embedding))
                row["tags"] = self._tags(logits)
                row["clip_logits"] = logits  # not a column: for `pipeline("audio-classification")`
            if "embeddings" in self.tasks:  # a CLAP model's in the joint space (`embeddings.py`)
                row["embedding"] = stored_embeddings(self.model, embedding)
            if "window_embeddings" in self.tasks:
                timeline = clip_view(end, self.feature_extractor.max_length_samples) == TIMELINE
                row["window_embeddings"] = window_embedding_rows(
                    self.model, clip_tokens, starts if timeline else [0], row["duration_s"], end.windowed)
        if TIMELINE_TASKS & set(self.tasks):
            scores, _ = labelled_frame_scores(stitched, self.config.problem_type, self.model_labels,
                                              self.label_mapping or None)
            step_seconds = self.model.frame_step_seconds(end.num_frames)
            if "events" in self.tasks:
                row["events"] = frames_to_events(
                    scores, step_seconds, self.event_labels, duration_seconds=row["duration_s"], **self.postprocessing
                )
            if "frame_scores" in self.tasks:
                row["frame_scores"] = scores
                row["frame_step_s"] = step_seconds
        row["warning"] = end.warning
        return row

    @property
    def _exclusive(self) -> bool:
        return is_exclusive(self.config.problem_type)

    def _combine(self, member_logits: list[torch.Tensor], exclusive: bool) -> torch.Tensor:
        return combine_members(self.model, member_logits, exclusive)

    def _pooled_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Clip logits of the pooled-head ablation from the mean token; for phrases (a CLAP model) the calibrated
        clip logits of the input's pooled embedding."""
        head = self.model.clip_logits if is_text_query(self.model) else self.model.classifier
        with torch.inference_mode():
            return head(embedding.to(self.device, self.model.dtype)[None])[0].float().cpu()

    def _tags(self, logits: torch.Tensor) -> list[dict]:
        return top_tags(logits, self.model_labels, self.config.problem_type, self.top_k)


def rows_to_arrow(rows: list[dict | AnnotationError], tasks: tuple[str, ...]) -> pa.Table:
    """Rows (results or errors) -> an Arrow table of typed columns (so a batch without errors still types `error`):
    `duration_s`, the task columns, `warning` and `error` ("stage: message", None where the input succeeded)."""
    names = ["duration_s", *task_columns(tasks), "warning"]
    columns = {
        name: typed_column(name, [None if isinstance(row, AnnotationError) else row.get(name) for row in rows])
        for name in names
    }
    columns["error"] = typed_column(
        "error", [f"{row.stage}: {row.message}" if isinstance(row, AnnotationError) else None for row in rows]
    )
    return pa.table(columns)


def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"Unknown or no tasks {unknown or list(tasks)}: choose from {list(TASKS)}.")
    return tuple(task for task in TASKS if task in tasks)


def _plain(value: Any) -> Any:
    """JSON-friendly settings (tuples -> lists)."""
    return list(value) if isinstance(value, tuple) else value


__all__ = ["AnnotationError", "Annotator", "rows_to_arrow"]
