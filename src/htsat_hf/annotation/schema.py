"""Column types of annotation rows, shared by the Parquet shards and the columns handed to datasets / Ray."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from .windows import TASKS

TAG = pa.struct([("label", pa.string()), ("score", pa.float64())])
EVENT = pa.struct([("label", pa.string()), ("onset", pa.float64()), ("offset", pa.float64()), ("score", pa.float64())])
# one window of an input: its span in seconds and its embedding (as `embedding`: the pooled latent of a label model,
# CLAP's joint-space audio embedding for a CLAP model)
WINDOW = pa.struct([("onset", pa.float64()), ("offset", pa.float64()), ("embedding", pa.list_(pa.float32()))])
COLUMN_TYPES = {
    "id": pa.string(),
    "duration_s": pa.float64(),
    "tags": pa.list_(TAG),
    "events": pa.list_(EVENT),
    "embedding": pa.list_(pa.float32()),  # of the whole input; a CLAP model's in the joint space (`embeddings.py`)
    "window_embeddings": pa.list_(WINDOW),
    "frame_scores": pa.list_(pa.list_(pa.float32())),
    "frame_step_s": pa.float64(),
    "warning": pa.string(),
    "error": pa.string(),  # "stage: message" in the columns of `Annotator.__call__`; shards keep errors apart
}
TASK_COLUMNS = {
    "tags": ["tags"], "events": ["events"], "embeddings": ["embedding"],
    "frame_scores": ["frame_scores", "frame_step_s"], "window_embeddings": ["window_embeddings"],
}


def task_columns(tasks: Iterable[str]) -> list[str]:
    """The result columns the tasks give, in a fixed order."""
    tasks = set(tasks)
    return [name for task in TASKS if task in tasks for name in TASK_COLUMNS[task]]


def result_schema(tasks: Iterable[str]) -> pa.Schema:
    """Columns of a results shard: id, duration_s, the tasks' columns, warning."""
    return pa.schema([(name, COLUMN_TYPES[name]) for name in ("id", "duration_s", *task_columns(tasks), "warning")])


def typed_column(name: str, values: list) -> pa.Array:
    """One column as an Arrow array of its fixed type (numpy arrays as lists), so a first batch of all-None values
    (e.g. no errors yet) still has the right type."""
    values = [value.tolist() if hasattr(value, "tolist") else value for value in values]
    return pa.array(values, type=COLUMN_TYPES[name])


__all__ = ["COLUMN_TYPES", "result_schema", "task_columns", "typed_column"]
