"""Where a corpus run's inputs come from: files and file lists, or a `datasets` split (also streamed)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

Record = tuple[int, str, Any]  # (input index, id, audio: a path, bytes or anything `audio_source` takes)


class InputError(ValueError):
    """Inputs that cannot be annotated as given (a missing file list, repeated ids, a missing column): the message says
    what was wrong and what to do. `htsat-hf annotate` prints it and exits."""


class InputSource:
    """An ordered sequence of inputs: by index where the source allows it (files, a `datasets.Dataset`), else by
    iteration (a streamed dataset). `description` identifies it in a run's manifest."""

    def __init__(
        self,
        description: dict,
        length: int | None,
        get: Callable[[int], tuple[str, Any]] | None = None,
        iterate: Callable[[], Iterator[tuple[str, Any]]] | None = None,
    ):
        if (get is None) == (iterate is None):
            raise ValueError("Give exactly one of get (random access) or iterate (a stream).")
        self.description = description
        self.length = length
        self._get, self._iterate = get, iterate

    def records(self, wanted: Callable[[int], bool], limit: int | None = None) -> Iterator[Record]:
        """The inputs whose index `wanted` accepts, in order, among the first `limit` (all when None)."""
        end = self.length if limit is None else limit if self.length is None else min(limit, self.length)
        if self._get is not None:
            for index in range(end):
                if wanted(index):
                    yield (index, *self._get(index))
            return
        for index, (input_id, audio) in enumerate(self._iterate()):
            if end is not None and index >= end:
                return
            if wanted(index):
                yield index, input_id, audio


def file_source(files: list[str] | None = None, file_list: str | None = None) -> InputSource:
    """Audio files named on the command line and/or one per line in a text file (blank lines and # comments are
    skipped); each file's id is its path as given."""
    paths = list(files or [])
    if file_list:
        paths += read_file_list(file_list)
    if not paths:
        raise InputError("No input files: pass --files PATH... or --file_list TXT (one path per line).")
    check_unique_ids(paths, "Inputs listed more than once (each path is its row's id)",
                     "list each file once")
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return InputSource({"files": len(paths), "sha256": digest}, len(paths), get=lambda i: (paths[i], paths[i]))


def read_file_list(file_list: str) -> list[str]:
    """The paths of a text file, one per line (blank lines and # comments skipped)."""
    try:
        text = Path(file_list).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"--file_list {file_list}: no such file; give a text file with one audio path per line."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--file_list {file_list} cannot be read as UTF-8 text ({error}); give a text file with one "
                         "audio path per line.") from None
    return listed_lines(text)


def listed_lines(text: str) -> list[str]:
    """The entries of a list file: its lines stripped, blank lines and lines starting with '#' left out."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def check_unique_ids(ids: Iterable[str] | pa.ChunkedArray, what: str, advice: str) -> None:
    """Refuses repeated ids (a corpus run's rows are keyed by id), naming up to five of them with their counts. `ids`:
    strings, or an Arrow column (counted by pyarrow, without Python objects per row)."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        counts = pc.value_counts(ids)
        counts = counts.filter(pc.greater(counts.field("counts"), 1))
        repeated = sorted(zip(map(str, counts.field("values").to_pylist()), counts.field("counts").to_pylist()))
    else:
        repeated = sorted((input_id, count) for input_id, count in Counter(ids).items() if count > 1)
    if repeated:
        shown = ", ".join(f"{input_id!r} ({count} times)" for input_id, count in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise InputError(f"{what}: {shown}{more}; {advice}.")


def dataset_source(
    dataset_name: str,
    dataset_config_name: str | None = None,
    split: str | None = None,
    audio_column: str = "audio",
    id_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | None = None,
) -> InputSource:
    """A split of a Hub dataset or local folder, loaded as `htsat-hf train` loads data; the audio is decoded by
    FFmpeg from each row's bytes or path (`audio_decoding`). Ids: `id_column`'s values, else the row index."""
    from ..training.data import load_source

    splits = load_source(
        dataset_name, dataset_config_name, audio_column=audio_column, streaming=streaming, cache_dir=cache_dir,
        token=token,
    )
    if split is None:
        if len(splits) != 1:
            raise InputError(f"{dataset_name} has the splits {sorted(splits)}: choose one with --split.")
        split = next(iter(splits))
    if split not in splits:
        raise InputError(f"{dataset_name} has no split {split!r}; its splits are {sorted(splits)}.")
    data = splits[split]
    columns = list(data.features) if data.features is not None else None
    if id_column is not None and columns is not None and id_column not in columns:
        raise InputError(f"Split {split!r} has no id column {id_column!r} (columns: {columns}); pass "
                         "--id_column_name with one of them, or leave it out to use row numbers.")
    if id_column is not None and not streaming:
        check_dataset_ids(data.with_format("arrow")[id_column], id_column)

    def entry(row: dict, index: int) -> tuple[str, Any]:
        if id_column is None:
            return str(index), row[audio_column]
        if row[id_column] is None:
            raise InputError(f"Row {index} has no {id_column!r} (null): every row needs an id; fill the column in, "
                             "or leave --id_column_name out to use row numbers.")
        return str(row[id_column]), row[audio_column]

    description = {
        "dataset": dataset_name, "config": dataset_config_name, "split": split, "audio_column": audio_column,
        "id_column": id_column, "streaming": streaming,
    }
    if streaming:
        def iterate() -> Iterator[tuple[str, Any]]:
            entries = (entry(row, i) for i, row in enumerate(_rows(data)))
            return unique_stream_ids(entries, id_column) if id_column else entries

        return InputSource(description, None, iterate=iterate)
    description["num_rows"] = len(data)
    return InputSource(description, len(data), get=lambda i: entry(data[i], i))


def check_dataset_ids(ids: pa.ChunkedArray, id_column: str) -> None:
    """A split's id column, refused where a value is null or repeated."""
    if ids.null_count:
        first = pc.index(pc.is_null(ids), True).as_py()
        raise InputError(f"{ids.null_count} row(s) have no {id_column!r} (null; the first is row {first}): every "
                         "row needs an id; fill the column in, or leave --id_column_name out to use row numbers.")
    check_unique_ids(
        ids, f"Ids repeated in the column {id_column!r} (each row's id must be unique)",
        "choose a column whose values are unique with --id_column_name, or leave it out to use row numbers",
    )


def unique_stream_ids(entries: Iterable[tuple[str, Any]], id_column: str) -> Iterator[tuple[str, Any]]:
    """A streamed split's (id, audio) entries, stopped with `InputError` at the first id seen before (a stream cannot
    be counted up front; the ids read so far are kept to compare)."""
    seen: dict[str, int] = {}
    for index, (input_id, audio) in enumerate(entries):
        first = seen.setdefault(input_id, index)
        if first != index:
            raise InputError(f"Ids repeated in the column {id_column!r}: rows {first} and {index} are both "
                             f"{input_id!r} (each row's id must be unique); choose a column whose values are unique "
                             "with --id_column_name, or leave it out to use row numbers.")
        yield input_id, audio


def _rows(stream: Any, batch_size: int = 64) -> Iterator[dict]:
    """Every row of a streamed dataset in order, wherever it is iterated. (Iterated directly inside a DataLoader
    worker, a `datasets.IterableDataset` hands each worker only some of its file shards: the row numbers, which decide
    the commit shards, would then differ between workers.)"""
    for batch in stream.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[name] for name in columns)):
            yield dict(zip(columns, values))


__all__ = [
    "InputError", "InputSource", "Record", "check_dataset_ids", "check_unique_ids", "dataset_source",
    "file_source", "listed_lines", "read_file_list", "unique_stream_ids",
]
