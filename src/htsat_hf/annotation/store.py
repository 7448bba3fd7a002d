"""The output folder of a corpus run: Parquet shards committed atomically, errors beside them, a manifest.

    OUT/part-<rank>-<shard>.parquet                     results of the inputs of shard <shard> (none if all failed)
    OUT/__annotation__/errors-<rank>-<shard>.jsonl      the inputs of that shard that failed: {"id", "stage", "message"}
    OUT/__annotation__/shard-<rank>-<shard>.done        the shard's commit marker: its counts, in JSON
    OUT/__annotation__/manifest.json                    model, settings, inputs, counts, audio hours, wall time, rate

The run's own files sit in `__annotation__/` because `datasets.load_dataset("parquet", data_dir=OUT)` reads every
file of the folder as Parquet except those under a `__`-prefixed folder, and pyarrow / pandas skip `_`-prefixed
names: so OUT loads as one table with either.

Shard n holds inputs [n * rows_per_shard, (n + 1) * rows_per_shard) of the input order, whichever process ran it.
Each file of a shard is written under a hidden temporary name and renamed into place; the marker comes last and is
the commit. The next run deletes the files of shards without a marker (a run killed mid-shard) and redoes exactly
those shards, so every input ends up in exactly one committed shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
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


# ------------------------------------------------------------------------------------------------------ shards
def committed_shards(out: Path) -> dict[int, dict]:
    """shard index -> its commit marker ({"rows", "errors", "audio_seconds"}), for every committed shard in `out`."""
    shards = {}
    for path in (out / RUN_DIR).glob("shard-*.done"):
        match = MARKER.match(path.name)
        if match:
            shards[int(match.group(2))] = json.loads(path.read_text())
    return shards


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_shard(out: Path, rank: int, shard: int, rows: list[dict], errors: list[AnnotationError],
                tasks: Iterable[str]) -> None:
    """Writes one shard: its errors, its results (when any input succeeded), then its commit marker."""
    name = f"{rank}-{shard:05d}"
    lines = "".join(json.dumps({"id": e.id, "stage": e.stage, "message": e.message}) + "\n" for e in errors)
    if errors:
        _write_atomically(run_dir(out) / f"errors-{name}.jsonl", lambda path: path.write_text(lines, encoding="utf-8"))
    if rows:  # an empty Parquet file would not load with datasets
        _write_atomically(out / f"part-{name}.parquet", lambda path: pq.write_table(rows_to_table(rows, tasks), path))
    marker = {
        "rows": len(rows), "errors": len(errors), "audio_seconds": sum(row["duration_s"] for row in rows),
        "failed_by_stage": dict(Counter(error.stage for error in errors)),
    }
    _write_atomically(run_dir(out) / f"shard-{name}.done", lambda path: path.write_text(json.dumps(marker)))


def run_dir(out: Path) -> Path:
    """The folder of the run's own files (errors, manifest), created when missing."""
    path = out / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_uncommitted(out: Path) -> list[str]:
    """Deletes temporary files and the files of shards that were never committed; returns their names."""
    committed = set(committed_shards(out))
    removed = []
    for path in [*out.iterdir(), *run_dir(out).iterdir()]:
        match = PART.match(path.name) or ERRORS.match(path.name)
        if path.name.endswith(".tmp") or (match is not None and int(match.group(2)) not in committed):
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def remove_outputs(out: Path) -> None:
    """Deletes a previous run's shards, errors and manifest (for --overwrite); other files are left alone."""
    for path in [*out.iterdir(), *run_dir(out).iterdir()]:
        if any(p.match(path.name) for p in (PART, ERRORS, MARKER)) or path.name == MANIFEST or path.name.endswith(".tmp"):
            path.unlink()


def read_errors(out: str | Path) -> list[dict]:
    """Every committed error row of an output folder: {"id", "stage", "message"}."""
    out = Path(out)
    committed = set(committed_shards(out))
    rows = []
    for path in sorted((out / RUN_DIR).glob("errors-*.jsonl")):
        match = ERRORS.match(path.name)
        if match and int(match.group(2)) in committed:
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
    path = out / RUN_DIR / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


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
    if manifest.get("format") != FORMAT:
        raise ManifestMismatchError(f"{out / RUN_DIR / MANIFEST} is not an htsat-hf annotation manifest ({FORMAT}).")
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
    "ManifestMismatchError", "check_resumable", "committed_shards", "model_fingerprint", "read_errors",
    "read_manifest", "remove_outputs", "remove_uncommitted", "result_schema", "rows_to_table", "run_dir", "summarize",
    "write_manifest", "write_shard",
]
