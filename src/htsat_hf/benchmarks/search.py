"""Time of a text search over 1,000,000 stored rows (`htsat-hf benchmark search`).

Generates an annotated output folder in the annotator's on-disk format (Parquet shards of `result_schema`'s
`id`, `duration_s`, `embedding`, `warning` columns, commit markers with the files' SHA-256, a manifest saying the
embeddings are a CLAP model's, `--text_labels`), with random normalised 512-dimensional embeddings (CLAP's
projection size), then times:
- building the folder's search index from its Parquet shards (once per folder state; later searches reuse it),
- opening the memory-mapped index (each `search` call without a held index does it),
- one query (one phrase's text embedding against every row, top 10), and a batch of 8 phrases, warm (median of
  repeats) and the first one after opening.
The text tower's forward for the phrase itself (a few ms for one sentence) is not in these numbers.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..annotation.schema import result_schema
from ..modeling_htsat_clap import DEFAULT_TEMPLATE
from ..annotation.search import EmbeddingIndex
from ..annotation.store import FORMAT, file_digest, run_dir, shard_paths, write_manifest

TASKS = ("embeddings",)


def write_embedding_corpus(out: str | Path, embeddings: np.ndarray, durations: np.ndarray | None = None,
                           rows_per_shard: int = 65536, text_query: dict | None = None, model_name: str = "clap"
                           ) -> Path:
    """An annotated output folder holding `embeddings` (rows, dim) as the annotator writes them: shards
    `part-0-<n>.parquet` with ids `input-<i>`, committed by markers, and a manifest whose settings say the
    embeddings are a CLAP model's (`text_query`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_dir(out)
    rows, dim = embeddings.shape
    durations = np.full(rows, 10.0) if durations is None else np.asarray(durations, dtype=np.float64)
    schema = result_schema(TASKS)
    shards = 0
    for shard, start in enumerate(range(0, rows, rows_per_shard)):
        stop = min(rows, start + rows_per_shard)
        values = pa.array(np.ascontiguousarray(embeddings[start:stop], dtype=np.float32).ravel())
        offsets = pa.array(np.arange(0, (stop - start) * dim + 1, dim, dtype=np.int32))
        table = pa.table({
            "id": pa.array([f"input-{i}" for i in range(start, stop)], pa.string()),
            "duration_s": pa.array(durations[start:stop], pa.float64()),
            "embedding": pa.ListArray.from_arrays(offsets, values).cast(schema.field("embedding").type),
            "warning": pa.nulls(stop - start, pa.string()),
        }, schema=schema)
        paths = shard_paths(out, 0, shard)
        pq.write_table(table, paths["part"])
        marker = {"rows": stop - start, "errors": 0, "audio_seconds": float(durations[start:stop].sum()),
                  "failed_by_stage": {}, "start": start, "stop": stop, "stream_end": stop == rows,
                  "files": {paths["part"].name: file_digest(paths["part"])}}
        paths["marker"].write_text(json.dumps(marker))
        shards += 1
    settings = {"tasks": list(TASKS), "text_query": text_query or {
        "candidate_labels": ["a dog barking"], "hypothesis_template": DEFAULT_TEMPLATE,
        "calibration": "softmax", "background_label": None, "calibration_bias": 0.0}}
    write_manifest(out, {"format": FORMAT, "fingerprint": {"model": {"name_or_path": model_name}, "settings": settings,
                                                           "rows_per_shard": rows_per_shard},
                         "shard_rows": rows_per_shard, "counts": {"done": rows}})
    assert runs.is_dir()
    return out


def random_embeddings(rows: int, dim: int, seed: int = 0, chunk: int = 1 << 16) -> np.ndarray:
    """(rows, dim) float32 unit vectors, drawn in chunks (memory: the result only)."""
    rng = np.random.default_rng(seed)
    result = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        block = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        result[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return result


def run(rows: int = 1_000_000, dim: int = 512, top_k: int = 10, repeats: int = 20, folder: str | None = None
        ) -> dict:
    """The benchmark's numbers (seconds), on a generated folder (a temporary one unless `folder`)."""
    temporary = folder is None
    out = Path(tempfile.mkdtemp(prefix="search-bench-") if temporary else folder)
    try:
        started = time.perf_counter()
        embeddings = random_embeddings(rows, dim)
        write_embedding_corpus(out, embeddings)
        del embeddings
        written = time.perf_counter() - started
        started = time.perf_counter()
        EmbeddingIndex.open(out)  # builds the index file
        build = time.perf_counter() - started
        started = time.perf_counter()
        index = EmbeddingIndex.open(out)
        open_seconds = time.perf_counter() - started
        queries = random_embeddings(8, dim, seed=1)
        started = time.perf_counter()
        index.search_embeddings(["q"], queries[:1], top_k)
        first = time.perf_counter() - started
        one, eight = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            index.search_embeddings(["q"], queries[:1], top_k)
            one.append(time.perf_counter() - started)
            started = time.perf_counter()
            index.search_embeddings([f"q{i}" for i in range(8)], queries, top_k)
            eight.append(time.perf_counter() - started)
        return {"rows": len(index), "dim": dim, "top_k": top_k, "write_corpus_s": written, "build_index_s": build,
                "open_index_s": open_seconds, "first_query_s": first, "query_1_phrase_s": statistics.median(one),
                "query_8_phrases_s": statistics.median(eight),
                "index_bytes": index.path.stat().st_size}
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)


def report(result: dict) -> str:
    """The benchmark's result as JSON, then one summary line."""
    return json.dumps(result, indent=2) + (
        f"\nsearch: {result['rows']:,} rows x {result['dim']}: {result['query_1_phrase_s'] * 1000:.1f} ms per query "
        f"(1 phrase, top {result['top_k']}), {result['query_8_phrases_s'] * 1000:.1f} ms for 8 phrases; "
        f"index built once in {result['build_index_s']:.1f} s, opened (memory-mapped) in "
        f"{result['open_index_s'] * 1000:.1f} ms"
    )


__all__ = ["random_embeddings", "report", "run", "write_embedding_corpus"]

