"""Where in this corpus does <phrase> happen? Text search over an annotated folder's CLAP joint-space embeddings.

    hits = search("out", ["a dog barking", "a siren"], top_k=10)      # out: annotated by a CLAP model with embeddings
    for hit in hits["a dog barking"]:
        print(hit.rank, hit.score, hit.id, hit.onset, hit.offset)

A folder annotated by a CLAP model (`Annotator(..., text_labels=...)`, `--text_labels`) with the
"window_embeddings" (or "embeddings") task holds CLAP's normalised audio embedding of each window of each input (of
the whole input): `HTSATClapModel.get_audio_features`, the window's pooled tokens (the mean of the windows' pooled
tokens) projected and normalised (`annotation/embeddings.py`). A query embeds each phrase with the CLAP text tower
only (`get_text_features`, formatted with the folder's hypothesis template), and ranks the stored rows by cosine
similarity, the `score` (CLAP's zero-shot logit is `exp(logit_scale_a)` times it): no audio model runs.

How, for millions of rows: the first search of a folder gathers its committed Parquet shards' `id`, `duration_s` and
`embedding` columns through pyarrow into one Arrow IPC file beside the run's files
(`OUT/__annotation__/search/index-<digest>.arrow`, the digest over the shards' SHA-256s from their commit markers,
so a folder that grows or changes gets a new index), with the embeddings as fixed-size lists. Every search
memory-maps that file: each record batch's embedding column is a zero-copy (rows, dim) float32 NumPy view, scored
against all phrases at once with one matrix product per batch, and the best `top_k` of each batch are kept with
`np.argpartition` (O(rows), not a sort), then merged and sorted. `benchmarks/search.py` times it on 1,000,000 rows.

A hit's time span is the stored row's. With the `window_embeddings` task (`--tasks ... window_embeddings`) a row is
one of the model's 10-s windows of an input (hopping `long_input_hop_seconds`, the last one ending with the input;
an input of one window is one row), so hits are files and the 10-s spans where the phrase fits best; with only
`embeddings`, one row per input spanning [0, duration_s]. Windows are searched when the folder has both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..modeling_htsat_clap import DEFAULT_TEMPLATE, check_phrases, phrase_embeddings
from .store import RUN_DIR, committed_shards, read_manifest

INDEX_FORMAT = "htsat-hf-search-index-1"
INDEX_DIR = "search"
BATCH_ROWS = 1 << 16  # rows per record batch of the index: the unit one matrix product scores


@dataclass
class SearchHit:
    """One stored row ranked for one phrase: its input `id`, the span [onset, offset) s it covers, and `score`, the
    cosine similarity of its joint-space embedding with the phrase's text embedding."""

    phrase: str
    rank: int
    id: str
    onset: float
    offset: float
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


class SearchError(ValueError):
    """The folder cannot be searched as it is; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- the index
class EmbeddingIndex:
    """An annotated folder's stored rows as record batches (`id`, `onset`, `offset`, `embedding` as a fixed-size list
    of float32), usually memory-mapped from the folder's index file (`open`)."""

    def __init__(self, batches: Sequence[pa.RecordBatch], manifest: dict | None = None, path: Path | None = None):
        self.batches = [batch for batch in batches if batch.num_rows]
        self.manifest = manifest or {}
        self.path = path
        types = {batch.schema.field("embedding").type for batch in self.batches}
        if len(types) > 1:
            raise SearchError(f"The stored embeddings differ in size ({sorted(map(str, types))}).")
        self.dim = types.pop().list_size if types else 0
        self._views = [_matrix(batch) for batch in self.batches]

    def __len__(self) -> int:
        return sum(batch.num_rows for batch in self.batches)

    @classmethod
    def open(cls, output_dir: str | os.PathLike, *, require_joint_space: bool = True) -> EmbeddingIndex:
        """The folder's index, memory-mapped; built from its committed shards first when there is none for them yet.
        `require_joint_space`: refuse a folder whose embeddings are not CLAP joint-space ones (annotated without
        phrases, or without the embeddings task)."""
        out = Path(output_dir)
        manifest = read_manifest(out)
        if manifest is None:
            raise SearchError(f"{out} holds no annotation run (no {RUN_DIR}/manifest.json): annotate it first.")
        settings = (manifest.get("fingerprint") or {}).get("settings") or {}
        tasks = settings.get("tasks", [])
        if "embeddings" not in tasks and "window_embeddings" not in tasks:
            raise SearchError(f"{out} was annotated without embeddings: annotate it with --tasks ... "
                              "window_embeddings (or embeddings; a CLAP model and --text_labels) to search it.")
        column = "window_embeddings" if "window_embeddings" in tasks else "embedding"  # finer spans first
        if require_joint_space and not settings.get("text_query"):
            raise SearchError(f"{out} was annotated by a label model: its embeddings are the audio tower's, not CLAP's "
                              "joint space; annotate it with a CLAP model (--text_labels) to search it with phrases.")
        parts = _committed_parts(out)
        digest = hashlib.sha256(json.dumps([INDEX_FORMAT, column, parts], sort_keys=True).encode()).hexdigest()[:20]
        path = out / RUN_DIR / INDEX_DIR / f"index-{digest}.arrow"
        if not path.exists():
            build_index_file(out, [name for name, _ in parts], path, column)
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        return cls(batches, manifest, path)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(phrases, dim) normalised query embeddings -> (phrases, k') row numbers and scores (cosine), best first,
        k' = min(k, rows): one matrix product per record batch, the best k of each kept with argpartition, then
        merged."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise SearchError(f"Query embeddings of size {queries.shape[1]}; the stored ones have {self.dim}.")
        k = min(int(k), len(self))
        if k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        best_rows, best_scores, first = [], [], 0
        for matrix in self._views:
            scores = queries @ matrix.T  # (phrases, rows of the batch)
            if scores.shape[1] > k:
                keep = np.argpartition(scores, -k, axis=1)[:, -k:]
                scores = np.take_along_axis(scores, keep, axis=1)
            else:
                keep = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            best_rows.append(keep + first)
            best_scores.append(scores)
            first += len(matrix)
        rows, scores = np.concatenate(best_rows, axis=1), np.concatenate(best_scores, axis=1)
        keep = np.argpartition(scores, -k, axis=1)[:, -k:] if scores.shape[1] > k else np.broadcast_to(
            np.arange(scores.shape[1]), scores.shape)
        rows, scores = np.take_along_axis(rows, keep, axis=1), np.take_along_axis(scores, keep, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def rows(self, numbers: Iterable[int]) -> list[dict]:
        """The stored rows' id, onset and offset by row number."""
        starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        found = []
        for number in numbers:
            which = int(np.searchsorted(starts, number, side="right") - 1)
            batch, at = self.batches[which], int(number - starts[which])
            found.append({name: batch.column(name)[at].as_py() for name in ("id", "onset", "offset")})
        return found

    def search_embeddings(self, phrases: Sequence[str], queries: np.ndarray, top_k: int = 10
                          ) -> dict[str, list[SearchHit]]:
        """Ranked hits of each phrase, given its normalised text embedding (a row of `queries`)."""
        numbers, scores = self.top_k(queries, top_k)
        hits = {}
        for phrase, phrase_rows, phrase_scores in zip(phrases, numbers, scores):
            hits[phrase] = [SearchHit(phrase, rank, row["id"], row["onset"], row["offset"], float(score))
                            for rank, (row, score) in enumerate(zip(self.rows(phrase_rows), phrase_scores), 1)]
        return hits


def _matrix(batch: pa.RecordBatch) -> np.ndarray:
    """A record batch's embedding column as a (rows, dim) float32 view of its buffer (no copy)."""
    column = batch.column("embedding")
    values = column.values.to_numpy(zero_copy_only=True)
    dim = column.type.list_size
    return values[column.offset * dim : (column.offset + len(column)) * dim].reshape(len(column), dim)


def _committed_parts(out: Path) -> list[tuple[str, str]]:
    """(file name, SHA-256) of every committed Parquet shard of the folder, in shard order."""
    parts = []
    for marker in sorted(committed_shards(out).values(), key=lambda m: m.get("start", 0)):
        for name, digest in sorted((marker.get("files") or {}).items()):
            if name.endswith(".parquet"):
                parts.append((name, (digest or {}).get("sha256", "")))
    if not parts:
        raise SearchError(f"{out} holds no committed rows yet.")
    return parts


def stored_rows(table: pa.Table, column: str) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """A shard's searchable rows as (id, onset, offset, embedding) arrays: one per input from `embedding` (spanning
    the input), or one per window from `window_embeddings` (each with its span)."""
    if column == "embedding":
        ids, durations = table.column("id").combine_chunks(), table.column("duration_s").combine_chunks()
        return ids, pa.array(np.zeros(len(ids)), pa.float64()), durations, table.column("embedding").combine_chunks()
    windows = table.column(column).combine_chunks()
    flat = windows.flatten()
    ids = table.column("id").combine_chunks().take(pc.list_parent_indices(windows))
    return ids, flat.field("onset"), flat.field("offset"), flat.field("embedding")


def build_index_file(out: Path, part_names: Sequence[str], path: Path, column: str = "embedding") -> None:
    """Gathers the shards' rows (`stored_rows`) into the index file (record batches of `BATCH_ROWS` rows), written
    under a temporary name and renamed into place; older indexes of the folder go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer, dim = None, None
    try:
        for name in part_names:
            table = pq.read_table(out / name, columns=["id", "duration_s", column], memory_map=True)
            ids, onsets, offsets, embeddings = stored_rows(table, column)
            for start in range(0, len(ids), BATCH_ROWS):
                embedding = embeddings.slice(start, BATCH_ROWS)
                if embedding.null_count:
                    raise SearchError(f"{name} has rows without an embedding.")
                lengths = np.diff(embedding.offsets.to_numpy())
                dim = int(lengths[0]) if dim is None and len(lengths) else dim
                if len(lengths) and (lengths != dim).any():
                    sizes = sorted(set(lengths.tolist()))
                    raise SearchError(f"{name} has embeddings of sizes {sizes}; expected {dim}.")
                values = embedding.flatten().cast(pa.float32())
                indexed = pa.record_batch(
                    [ids.slice(start, BATCH_ROWS), onsets.slice(start, BATCH_ROWS), offsets.slice(start, BATCH_ROWS),
                     pa.FixedSizeListArray.from_arrays(values, dim)],
                    names=["id", "onset", "offset", "embedding"])
                if writer is None:
                    writer = pa.ipc.new_file(str(temporary), indexed.schema)
                writer.write_batch(indexed)
        if writer is None:
            raise SearchError(f"{out} holds no rows.")
        writer.close()
        writer = None
        for old in path.parent.glob("index-*.arrow"):
            old.unlink()
        os.replace(temporary, path)
    finally:
        if writer is not None:
            writer.close()
        if temporary.exists():
            temporary.unlink()


# ----------------------------------------------------------------------------------------------------- phrases
def text_embeddings(model: Any, phrases: Sequence[str], tokenizer: Any = None,
                    hypothesis_template: str = DEFAULT_TEMPLATE) -> np.ndarray:
    """(phrases, projection_dim) normalised CLAP text embeddings of the phrases, each formatted with
    `hypothesis_template`: the text tower only (`phrase_embeddings`). `model`: an `HTSATClapModel` or its folder."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModel, AutoTokenizer

        name = str(model)
        model = AutoModel.from_pretrained(name)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    if not hasattr(model, "get_text_features") or not hasattr(model, "text_query"):
        raise SearchError(f"Phrases are embedded by a CLAP model (HTSATClapModel), not {type(model).__name__}.")
    return phrase_embeddings(model.eval(), phrases, tokenizer, hypothesis_template).float().cpu().numpy()


def search(output_dir: str | os.PathLike, phrases: str | Sequence[str], *, model: Any = None, tokenizer: Any = None,
           hypothesis_template: str | None = None, top_k: int = 10, index: EmbeddingIndex | None = None
           ) -> dict[str, list[SearchHit]]:
    """
    Where in the annotated folder `output_dir` each phrase happens: {phrase: hits, best first} (see the module
    docstring). `model`: the CLAP model (a folder or a loaded `HTSATClapModel`) whose text tower embeds the phrases;
    default: the one the folder was annotated with (its manifest's name). `hypothesis_template`: default the one the
    folder was annotated with. `index`: an `EmbeddingIndex.open(output_dir)` to reuse across searches.
    """
    try:
        phrases = check_phrases(phrases, "The phrases searched for")
    except ValueError as error:
        raise SearchError(str(error)) from None
    index = index or EmbeddingIndex.open(output_dir)
    fingerprint = index.manifest.get("fingerprint") or {}
    query = (fingerprint.get("settings") or {}).get("text_query") or {}
    if model is None:
        model = (fingerprint.get("model") or {}).get("name_or_path")
        if not model or not Path(model).exists() and "/" not in str(model):
            raise SearchError("Name the CLAP model that annotated the folder (model=...): its manifest names none "
                              "that can be loaded here.")
    template = hypothesis_template or query.get("hypothesis_template") or DEFAULT_TEMPLATE
    return index.search_embeddings(phrases, text_embeddings(model, phrases, tokenizer, template), top_k)


__all__ = ["EmbeddingIndex", "SearchError", "SearchHit", "build_index_file", "search", "text_embeddings"]
