"""The output folder of a corpus run: Parquet shards committed atomically, errors beside them, a manifest.

    OUT/part-<rank>-<shard>.parquet                     results of the inputs of shard <shard> (none if all failed)
    OUT/__annotation__/errors-<rank>-<shard>.jsonl      the inputs of that shard that failed: {"id", "stage", "message"}
    OUT/__annotation__/shard-<rank>-<shard>.done        the shard's commit marker: counts, index range, file digests
    OUT/__annotation__/shard-<rank>-<shard>.pending     while the shard's files are written (or withdrawn)
    OUT/__annotation__/manifest.json                    model, settings, inputs, counts, audio hours, wall time, rate
    OUT/__annotation__/lock.json                        the live run holding the folder (`lock.py`)

The run's own files sit in `__annotation__/` because `datasets.load_dataset("parquet", data_dir=OUT)` reads every
file of the folder as Parquet except those under a `__`-prefixed folder, and pyarrow / pandas skip `_`-prefixed
names: so OUT loads as one table with either.

Shard n holds inputs [n * rows_per_shard, (n + 1) * rows_per_shard) of the input order, whichever process ran it (a
run with a limit commits the shard the limit cuts with the inputs below it, and its marker says which). A shard's
pending note is written first, so that the folder knows the files it names are its own; each file is written under a
hidden temporary name and renamed into place; the marker comes last and is the commit, recording the inputs
[start, stop) the shard holds and each file's size and SHA-256. The next run deletes the files of shards with a
pending note and no marker (a run killed mid-shard), checks every committed shard it needs (a shorter range, a file
missing, truncated or changed, a damaged marker) and withdraws those, then redoes exactly the shards not committed:
every input ends up in exactly one committed shard. Files that no pending note or marker names are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .annotator import AnnotationError
from .schema import result_schema, typed_column

MANIFEST = "manifest.json"
RUN_DIR = "__annotation__"
FORMAT = "htsat-hf-annotations/1"
PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
ERRORS = re.compile(r"^errors-(\d+)-(\d+)\.jsonl$")
MARKER = re.compile(r"^shard-(\d+)-(\d+)\.done$")


class ManifestMismatchError(ValueError):
    """The output folder holds a run made with another model, settings or inputs."""


def rows_to_table(rows: list[dict], tasks: Iterable[str]) -> pa.Table:
    """Result row dicts -> a table of `result_schema(tasks)`."""
    schema = result_schema(tasks)
    return pa.table({name: typed_column(name, [row.get(name) for row in rows]) for name in schema.names}, schema=schema)


class OutputFolderError(RuntimeError):
    """The output folder cannot be written or read as it is; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------------ shards
def shard_name(rank: int, shard: int) -> str:
    """The `<rank>-<shard>` part of a shard's file names."""
    return f"{rank}-{shard:05d}"


def shard_paths(out: Path, rank: int, shard: int) -> dict[str, Path]:
    """The files a shard may have: part, errors, marker (the commit) and pending (its files are being written)."""
    name, runs = shard_name(rank, shard), out / RUN_DIR
    return {"part": out / f"part-{name}.parquet", "errors": runs / f"errors-{name}.jsonl",
            "marker": runs / f"shard-{name}.done", "pending": runs / f"shard-{name}.pending"}


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@dataclass
class ShardMarker:
    """A commit marker found in the folder: its shard, the rank that wrote it, its contents (None when damaged)."""

    rank: int
    shard: int
    data: dict | None


def read_markers(out: Path) -> list[ShardMarker]:
    """Every commit marker of `out`, damaged ones included (data None), in shard order."""
    markers = []
    for path in (out / RUN_DIR).glob("shard-*.done"):
        match = MARKER.match(path.name)
        if match is None:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        ok = isinstance(data, dict) and all(isinstance(data.get(key), int) for key in ("rows", "errors"))
        markers.append(ShardMarker(int(match.group(1)), int(match.group(2)), data if ok else None))
    return sorted(markers, key=lambda marker: (marker.shard, marker.rank))


def committed_shards(out: Path) -> dict[int, dict]:
    """shard index -> its commit marker ({"rows", "errors", "audio_seconds", "start", "stop", "files", ...}), for
    every committed shard in `out` whose marker is readable."""
    return {marker.shard: marker.data for marker in read_markers(out) if marker.data is not None}


def file_digest(path: Path) -> dict:
    """{"size", "sha256"} of a file, as a commit marker records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Writes `path` under a temporary name, syncs it and renames it into place; a failed write (a full disk, no
    permission) raises `OutputFolderError` saying what to do, and leaves no temporary file behind."""
    temporary = _temporary(path)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise OutputFolderError(write_failure(path, error)) from error


def write_failure(path: Path, error: OSError) -> str:
    """The message for a write into the output folder that failed."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    reason = "the disk is full (or the quota is used up)" if full else f"{error.strerror or error}"
    return (f"Could not write {path}: {reason}. What was committed before is kept: "
            + ("free some space" if full else "fix the cause") + " and run the same command again to continue.")


def write_shard(out: Path, rank: int, shard: int, rows: list[dict], errors: list[AnnotationError],
                tasks: Iterable[str], start: int, stop: int, stream_end: bool = False) -> None:
    """Commits one shard, inputs [start, stop) of the input order: a pending note first (so that a killed run's files
    are known to be this folder's), its errors, its results (when any input succeeded), its commit marker (counts,
    index range, size and SHA-256 of each file), then the pending note goes. `stream_end`: the source ended at
    `stop` (a streamed source's last shard)."""
    paths = shard_paths(out, rank, shard)
    _write_atomically(paths["pending"], lambda path: path.write_text("{}"))
    for key, stale in (("errors", not errors), ("part", not rows)):  # an earlier attempt's, which this one replaces
        if stale:
            with contextlib.suppress(FileNotFoundError):
                paths[key].unlink()
    lines = "".join(json.dumps({"id": e.id, "stage": e.stage, "message": e.message}) + "\n" for e in errors)
    files = {}
    if errors:
        _write_atomically(paths["errors"], lambda path: path.write_text(lines, encoding="utf-8"))
        files[f"{RUN_DIR}/{paths['errors'].name}"] = file_digest(paths["errors"])
    if rows:  # an empty Parquet file would not load with datasets
        _write_atomically(paths["part"], lambda path: pq.write_table(rows_to_table(rows, tasks), path))
        files[paths["part"].name] = file_digest(paths["part"])
    marker = {
        "rows": len(rows), "errors": len(errors), "audio_seconds": sum(row["duration_s"] for row in rows),
        "failed_by_stage": dict(Counter(error.stage for error in errors)), "start": start, "stop": stop,
        "stream_end": stream_end, "files": files,
    }
    _write_atomically(paths["marker"], lambda path: path.write_text(json.dumps(marker)))
    paths["pending"].unlink()


def marker_range(marker: ShardMarker, rows_per_shard: int) -> tuple[int, int]:
    """The input indices [start, stop) a marker holds (markers written before they recorded it: counted from the
    shard's first index)."""
    data = marker.data or {}
    start = data.get("start", marker.shard * rows_per_shard)
    return start, data.get("stop", start + data.get("rows", 0) + data.get("errors", 0))


def shard_problem(out: Path, marker: ShardMarker, rows_per_shard: int, end: int | None) -> str | None:
    """Why a committed shard cannot stand for its inputs among the first `end` (all when None), or None when it can:
    a damaged marker, a range that stops short (a `--limit` run's last shard), or a file missing, of another size or
    with another SHA-256 than its marker recorded."""
    if marker.data is None:
        return "its commit marker is damaged"
    first = marker.shard * rows_per_shard
    needed = first + rows_per_shard if end is None else min(first + rows_per_shard, end)
    start, stop = marker_range(marker, rows_per_shard)
    if start != first or marker.data["rows"] + marker.data["errors"] != stop - start:
        return f"its marker's counts do not match its inputs {start}-{stop}"
    if stop < needed and not marker.data.get("stream_end"):
        return f"it holds inputs {start}-{stop - 1} only (a run with --limit), this run needs up to {needed - 1}"
    files = marker.data.get("files")
    if files is None:  # a marker from before markers recorded their files: the part file's row count
        return _legacy_part_problem(shard_paths(out, marker.rank, marker.shard)["part"], marker.data["rows"])
    for name, recorded in files.items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded["size"]:
            return f"{name} has {path.stat().st_size} bytes, its marker recorded {recorded['size']}"
        if file_digest(path)["sha256"] != recorded["sha256"]:
            return f"{name} differs from what was written (SHA-256)"
    return None


def _legacy_part_problem(part: Path, rows: int) -> str | None:
    if rows == 0:
        return None
    try:
        found = pq.ParquetFile(part).metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        return f"{part.name} is missing or unreadable ({error})"
    return None if found == rows else f"{part.name} has {found} rows, its marker recorded {rows}"


def uncommit(out: Path, rank: int, shard: int) -> None:
    """Withdraws a committed shard so that it is done again: pending note, marker, files, pending note, in that order
    (a kill in between leaves a pending note, and the next run removes the rest)."""
    paths = shard_paths(out, rank, shard)
    _write_atomically(paths["pending"], lambda path: path.write_text("{}"))
    for key in ("marker", "part", "errors", "pending"):
        with contextlib.suppress(FileNotFoundError):
            paths[key].unlink()


def run_dir(out: Path) -> Path:
    """The folder of the run's own files (errors, manifest), created when missing."""
    path = out / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_unfinished(out: Path) -> list[str]:
    """Deletes what killed runs of this folder left of the shards they were writing (the files a pending note names,
    and their temporary files); nothing else. Returns the names deleted."""
    removed = []
    for path in sorted((out / RUN_DIR).glob("shard-*.pending")):
        rank, shard = (int(part) for part in path.name[len("shard-"): -len(".pending")].split("-"))
        paths = shard_paths(out, rank, shard)
        committed = paths["marker"].exists()  # killed after its commit: keep the shard
        doomed = [_temporary(p) for p in paths.values()] + ([] if committed else [paths["part"], paths["errors"]])
        for file in [*doomed, paths["pending"]]:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                removed.append(file.name)
    return sorted(removed)


def remove_outputs(out: Path) -> None:
    """Deletes the files this folder's runs wrote (the shards its markers and pending notes name, the manifest,
    progress notes), for --overwrite; other files are left alone."""
    runs = out / RUN_DIR
    shards = {(marker.rank, marker.shard) for marker in read_markers(out)}
    for path in runs.glob("shard-*.pending"):
        shards.add(tuple(int(part) for part in path.name[len("shard-"): -len(".pending")].split("-")))
    for rank, shard in shards:
        for path in shard_paths(out, rank, shard).values():
            for file in (path, _temporary(path)):
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
    for path in [runs / MANIFEST, _temporary(runs / MANIFEST), *runs.glob("progress-*.json")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that no run of this folder wrote (everything but the run folder and the files its markers and
    pending notes name)."""
    ours = {RUN_DIR}
    for marker in read_markers(out):
        ours.add(shard_paths(out, marker.rank, marker.shard)["part"].name)
    return sorted(path.name for path in out.iterdir() if path.name not in ours) if out.is_dir() else []


def read_errors(out: str | Path) -> list[dict]:
    """Every committed error row of an output folder: {"id", "stage", "message"}."""
    out = Path(out)
    committed = {(marker.rank, marker.shard): marker.data for marker in read_markers(out) if marker.data is not None}
    rows = []
    for path in sorted((out / RUN_DIR).glob("errors-*.jsonl")):
        match = ERRORS.match(path.name)
        marker = committed.get((int(match.group(1)), int(match.group(2)))) if match else None
        if marker is not None and f"{RUN_DIR}/{path.name}" in marker.get("files", {f"{RUN_DIR}/{path.name}": None}):
            with open(path, encoding="utf-8") as handle:
                rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def summarize(out: Path) -> dict[str, Any]:
    """Counts over the committed shards: inputs done and failed (by stage), audio hours."""
    markers = committed_shards(out).values()
    by_stage: Counter = Counter()
    for marker in markers:
        by_stage.update(marker["failed_by_stage"])
    done = sum(marker["rows"] for marker in markers)
    failed = sum(marker["errors"] for marker in markers)
    return {
        "inputs": done + failed, "done": done, "failed": failed, "failed_by_stage": dict(sorted(by_stage.items())),
        "audio_hours": sum(marker["audio_seconds"] for marker in markers) / 3600.0, "shards": len(markers),
    }


# ---------------------------------------------------------------------------------------------------- manifest
def read_manifest(out: Path) -> dict | None:
    """The folder's manifest, None where there is none; a damaged one raises `OutputFolderError` saying what to do."""
    path = out / RUN_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        manifest = error
    if not isinstance(manifest, dict):
        detail = f" ({manifest})" if isinstance(manifest, Exception) else ""
        raise OutputFolderError(
            f"{path} is damaged{detail}, so the run in {out} cannot be resumed safely: restore the file from a "
            "copy, or pass --overwrite to start over, or choose another --output_dir."
        )
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _write_atomically(run_dir(out) / MANIFEST, lambda path: path.write_text(text))


# Settings that joined the fingerprint after runs had begun, with the value every earlier run used: a manifest that
# lacks one was written with that value, so its run resumes under it (and only under it).
LATER_SETTINGS = {"features_on": "workers"}


def _with_later_settings(fingerprint: dict) -> dict:
    settings = fingerprint.get("settings")
    if not isinstance(settings, dict):
        return fingerprint
    return {**fingerprint, "settings": {**LATER_SETTINGS, **settings}}


def check_resumable(out: Path, fingerprint: dict) -> dict | None:
    """The folder's manifest when it was written with this fingerprint (or there is none); else a clear error. A
    manifest from before a setting existed counts as written with its earlier value (`LATER_SETTINGS`)."""
    manifest = read_manifest(out)
    if manifest is None:
        if committed_shards(out):
            raise ManifestMismatchError(
                f"{out} holds annotation shards but no {RUN_DIR}/{MANIFEST}: it cannot be resumed safely. Pass --overwrite to "
                "start over, or choose another --output_dir."
            )
        return None
    if manifest.get("format") != FORMAT:  # checked before anything else is read from it
        raise ManifestMismatchError(f"{out / RUN_DIR / MANIFEST} is not an htsat-hf annotation manifest ({FORMAT}).")
    if not isinstance(manifest.get("fingerprint"), dict):
        raise OutputFolderError(f"{out / RUN_DIR / MANIFEST} is damaged (it has no fingerprint): restore it from a "
                                "copy, or pass --overwrite to start over, or choose another --output_dir.")
    differences = _differences(_with_later_settings(manifest["fingerprint"]), fingerprint)
    if differences:
        raise ManifestMismatchError(
            f"{out} was written by a run with other settings, so it cannot be continued:\n  "
            + "\n  ".join(differences)
            + "\nRun the same command again to resume it, pass --overwrite to start over, or choose another --output_dir."
        )
    return manifest


def _differences(before: Any, now: Any, where: str = "") -> list[str]:
    """'key.sub: old then, new now' for every leaf that differs between two fingerprints."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [
            line for key in sorted(set(before) | set(now), key=str)
            for line in _differences(before.get(key), now.get(key), f"{where}.{key}" if where else str(key))
        ]
    if before == now:
        return []
    return [f"{where}: {_short(before)} in the manifest, now {_short(now)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def model_fingerprint(model: Any, name: str) -> dict:
    """Identity of a model: its name and a SHA-256 over its config and every tensor of its state dict."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"name_or_path": name, "sha256": digest.hexdigest()}


__all__ = [
    "ManifestMismatchError", "OutputFolderError", "ShardMarker", "check_resumable", "committed_shards", "file_digest",
    "foreign_entries", "marker_range", "model_fingerprint", "read_errors", "read_manifest", "read_markers",
    "remove_outputs", "remove_unfinished", "result_schema", "rows_to_table", "run_dir", "shard_name", "shard_paths",
    "shard_problem", "summarize", "uncommit", "write_failure", "write_manifest", "write_shard",
]
