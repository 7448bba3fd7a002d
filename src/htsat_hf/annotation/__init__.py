"""Annotation at corpus scale: tags, events and embeddings for many inputs, windows packed across inputs.

- `Annotator`: the engine-agnostic core (a batch of audio in, one row per input out); a callable for batched
  `datasets.map(..., with_rank=True)` and a callable class for Ray Data `map_batches`.
- `corpus.annotate_corpus`: the resumable, exactly-once run over files or a `datasets` source, sharded over the
  processes of `accelerate launch`, written as Parquet shards (`htsat-hf annotate`).
"""

from .annotator import AnnotationError, Annotator, rows_to_arrow
from .schema import task_columns
from .windows import TASKS, WindowCutter

__all__ = ["TASKS", "AnnotationError", "Annotator", "WindowCutter", "rows_to_arrow", "task_columns"]
