"""A corpus run: every input annotated exactly once, across processes, crashes and restarts.

Inputs are numbered in their source's order and grouped into shards of `rows_per_shard`; shard n belongs to process
n % world_size. Each process decodes its inputs in DataLoader workers (FFmpeg and the log-mel front end, overlapped
with the model), packs windows of many inputs into each forward pass, and commits a shard when all of its inputs are
done (see `store.py`). Starting the same run again skips the committed shards, whatever the number of processes,
after checking them. One run at a time holds the output folder (`lock.py`; process 0 for all of a run's processes).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .annotator import AnnotationError, Annotator
from .sources import InputSource
from .lock import FolderLock
from .store import (
    FORMAT,
    RUN_DIR,
    OutputFolderError,
    check_resumable,
    committed_shards,
    foreign_entries,
    marker_range,
    model_fingerprint,
    read_manifest,
    read_markers,
    remove_outputs,
    remove_unfinished,
    shard_problem,
    summarize,
    uncommit,
    write_failure,
    write_manifest,
    write_shard,
)
from .windows import WindowCutter, WindowItem


@dataclass
class Processes:
    """This process's place among the run's processes (rank, world size) and a barrier across them."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def from_accelerate(cls, state: Any) -> Processes:
        """From an `accelerate.PartialState` (one process per GPU or CPU rank under `accelerate launch`)."""
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Wanted:
    """Which input indices this process still has to do: its shards that are not committed."""

    def __init__(self, rows_per_shard: int, processes: Processes, committed: set[int]):
        self.rows_per_shard, self.rank, self.world = rows_per_shard, processes.rank, processes.world_size
        self.committed = committed

    def __call__(self, index: int) -> bool:
        shard = index // self.rows_per_shard
        return shard % self.world == self.rank and shard not in self.committed

    def anyone(self, index: int) -> bool:
        """Whether some process of the run still has to do this input."""
        return index // self.rows_per_shard not in self.committed


class _WindowItems(torch.utils.data.IterableDataset):
    """The window items of this process's inputs; DataLoader worker w of W cuts every W-th of them."""

    def __init__(self, source: InputSource, wanted: _Wanted, cutter: WindowCutter, limit: int | None):
        self.source, self.wanted, self.cutter, self.limit = source, wanted, cutter, limit

    def __iter__(self) -> Iterator[WindowItem]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, (index, input_id, audio) in enumerate(self.source.records(self.wanted, self.limit)):
            if position % workers == worker:
                yield from self.cutter.items(index, input_id, audio)


def _pass_through(item: Any) -> Any:
    return item


DECODER_NICENESS = 19  # measured on 2 cores: 0 -> 67, 10 -> 67, 19 -> 71-75 h of audio per hour (2 workers)


def _lower_priority(worker_id: int) -> None:
    """Decoding workers (and any ffmpeg they start) yield the CPU to the model's threads: a preempted OpenMP thread stalls the
    whole parallel region, while a preempted decoder only drains the prefetched windows a little."""
    os.nice(DECODER_NICENESS)


def annotate_corpus(
    annotator: Annotator,
    source: InputSource,
    output_dir: str | Path,
    *,
    model_name: str,
    rows_per_shard: int = 256,
    num_workers: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    wait: bool = False,
    processes: Processes | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
    on_progress: Callable[[int, int | None, float], None] | None = None,
) -> dict[str, Any]:
    """
    Annotates every input of `source` (the first `limit`) into `output_dir`, resuming what is there.

    The folder is held by one run at a time (`lock.FolderLock`, by process 0 for all of them): another live run's
    folder is refused with its holder named, or waited for with `wait`; a dead run's is taken over. Returns the summary
    written to the manifest: counts of inputs done and failed (by stage), audio hours, this run's wall time and hours
    of audio per hour. `on_commit(shard)` is called after each shard is committed and
    `on_progress(inputs_done, inputs_total, audio_seconds)` after each input (this process's counts).
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    processes = processes or Processes()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out / RUN_DIR).acquire(wait=wait) if processes.is_main else None
    try:
        return _annotate_held(annotator, source, out, model_name, rows_per_shard, num_workers, limit, overwrite,
                              processes, progress, on_commit, on_progress, lock)
    finally:
        if lock is not None:
            lock.release()


def shard_rows(rows_per_shard: int, length: int | None, world_size: int) -> int:
    """The commit unit of a new folder: `rows_per_shard`, smaller where the source has fewer inputs than processes x
    shard, so that every process gets work (ceil(inputs / processes)). Sized on the whole source, not a `--limit`:
    the unit stays for the folder's later runs."""
    if length is None or length < 1:
        return rows_per_shard
    return max(1, min(rows_per_shard, -(-length // world_size)))


def _annotate_held(annotator, source, out, model_name, rows_per_shard, num_workers, limit, overwrite, processes,
                   progress, on_commit, on_progress, lock) -> dict[str, Any]:
    started = time.time()
    fingerprint = {
        "model": model_fingerprint(annotator.model, model_name),
        "settings": annotator.settings(),
        "inputs": source.description,
        "rows_per_shard": rows_per_shard,
    }
    previous = None
    if not overwrite:
        previous = check_resumable(out, fingerprint)  # every process checks: all of them stop on a mismatch
    end = source.length if limit is None else limit if source.length is None else min(limit, source.length)
    processes.barrier()
    if processes.is_main:
        _prepare(out, fingerprint, annotator, previous, processes, overwrite, end, source.length)
    processes.barrier()
    manifest = read_manifest(out)
    rows_per_shard = manifest.get("shard_rows", rows_per_shard)
    before = summarize(out)
    committed = set(committed_shards(out))
    _run(annotator, source, out, _Wanted(rows_per_shard, processes, committed), limit, end, rows_per_shard,
         num_workers, processes, progress, on_commit, on_progress, lock)
    processes.barrier()
    summary = summarize(out)
    wall = time.time() - started
    run_hours = summary["audio_hours"] - before["audio_hours"]
    summary.update(
        wall_time_s=wall,
        run_audio_hours=run_hours,
        audio_hours_per_hour=run_hours / (wall / 3600.0) if wall > 0 else None,
    )
    if processes.is_main:
        manifest = read_manifest(out)
        complete = covers_source(out, rows_per_shard, source.length, source.length is None and limit is None)
        manifest.update(status="complete" if complete else "incomplete", counts=summary)
        manifest["runs"].append({
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 3), "audio_hours": run_hours, "processes": processes.world_size,
            "audio_hours_per_hour": summary["audio_hours_per_hour"], "limit": limit,
        })
        write_manifest(out, manifest)
        remove_progress_notes(out)
        stages = ", ".join(f"{stage}: {count}" for stage, count in summary["failed_by_stage"].items())
        print(
            f"[annotate] {summary['inputs']} inputs: {summary['done']} annotated, {summary['failed']} failed"
            + (f" ({stages})" if stages else "")
            + f"; {summary['audio_hours']:.3f} h of audio; this run {run_hours:.3f} h in {wall:.1f} s"
            + (f" = {summary['audio_hours_per_hour']:.0f} h of audio per hour" if run_hours > 0 else "")
            + (f"; errors in {out / RUN_DIR}/errors-*.jsonl" if summary["failed"] else "")
            + ("" if complete else "; the source is not done yet: run without --limit to continue" if limit is not None
               else "")
        )
    return summary


def _prepare(out: Path, fingerprint: dict, annotator: Annotator, previous: dict | None, processes: Processes,
             overwrite: bool, end: int | None, length: int | None) -> None:
    """Process 0, holding the folder: starts over (`overwrite`), refuses a folder of other files, removes what killed
    runs left unfinished, withdraws committed shards that are damaged or stop short of this run's inputs, and writes
    the manifest (with the commit unit, fixed at a run's first start)."""
    if overwrite:
        remove_outputs(out)
    if read_manifest(out) is None and foreign_entries(out):
        names = foreign_entries(out)
        raise OutputFolderError(
            f"{out} already holds files that no annotation run wrote ({', '.join(names[:5])}"
            + (f" and {len(names) - 5} more" if len(names) > 5 else "") + "); Parquet files among them would be "
            "read as rows of the output. Choose an empty or new --output_dir."
        )
    removed = remove_unfinished(out)
    if removed:
        print(f"[annotate] removed {len(removed)} files of shards a stopped run left unfinished")
    strays = [name for name in foreign_entries(out) if name.endswith(".parquet")]
    if strays:
        print(f"[annotate] warning: {out} holds Parquet files no commit of this run names ({', '.join(strays[:5])}"
              + (f" and {len(strays) - 5} more" if len(strays) > 5 else "") + "); they are left alone, but "
              "pandas and datasets read every Parquet file of the folder as rows: move them away if they are not yours")
    manifest = _manifest(fingerprint, annotator, previous, processes)
    manifest.setdefault("shard_rows", fingerprint["rows_per_shard"] if previous is not None  # begun before it was kept
                        else shard_rows(fingerprint["rows_per_shard"], length, processes.world_size))
    for marker in read_markers(out):
        if end is not None and marker.shard * manifest["shard_rows"] >= end:
            continue  # not among this run's inputs: checked when a run needs it
        problem = shard_problem(out, marker, manifest["shard_rows"], end)
        if problem is not None:
            print(f"[annotate] shard {marker.shard} is done again: {problem}")
            uncommit(out, marker.rank, marker.shard)
    remove_progress_notes(out)
    manifest["status"] = "running"
    write_manifest(out, manifest)


def covers_source(out: Path, rows_per_shard: int, length: int | None, stream_exhausted: bool = False) -> bool:
    """Whether the committed shards hold every input of the source: each shard up to its end (a known length, a
    shard that saw a stream end, or the last shard of a run that read its stream to the end) holds its whole index
    range."""
    markers = {marker.shard: marker for marker in read_markers(out) if marker.data is not None}
    shard = 0
    while shard in markers:
        start, stop = marker_range(markers[shard], rows_per_shard)
        if start != shard * rows_per_shard:
            return False
        if (length is not None and stop >= length) or markers[shard].data.get("stream_end"):
            return True
        if stop < start + rows_per_shard:
            return False
        shard += 1
    return length == 0 or (stream_exhausted and not any(later > shard for later in markers))


def _run(annotator, source, out, wanted, limit, end, rows_per_shard, num_workers, processes, progress, on_commit,
         on_progress, lock) -> None:
    """Annotates this process's inputs and commits its shards as they complete."""
    items: Any = _WindowItems(source, wanted, annotator.cutter, limit)
    if num_workers > 0:
        items = torch.utils.data.DataLoader(
            items, batch_size=None, num_workers=num_workers, collate_fn=_pass_through, prefetch_factor=4,
            worker_init_fn=_lower_priority,
        )
    expected = {}  # shard -> its number of inputs, where the source's length is known
    everyone = 0  # the inputs of every process, where known
    if end is not None:
        for index in range(end):
            if wanted.anyone(index):
                everyone += 1
                if wanted(index):
                    expected[index // rows_per_shard] = expected.get(index // rows_per_shard, 0) + 1
    mine = None if end is None else sum(expected.values())
    rows: dict[int, list] = {}
    errors: dict[int, list] = {}
    tracker = RunProgress(out, processes, None if end is None else everyone) if progress else None
    done, failures, seconds = 0, 0, 0.0

    def commit(shard: int, stream_end: bool = False) -> None:
        if lock is not None:
            lock.check()
        results = sorted(rows.pop(shard, []), key=lambda row: row["key"])
        failed_inputs = sorted(errors.pop(shard, []), key=lambda error: error.key)
        start = shard * rows_per_shard
        write_shard(out, processes.rank, shard, results, failed_inputs, annotator.tasks, start,
                    start + len(results) + len(failed_inputs), stream_end)
        if on_commit is not None:
            on_commit(shard)

    for row in annotator.annotate_items(items):
        failed = isinstance(row, AnnotationError)
        key = row.key if failed else row["key"]
        shard = key // rows_per_shard
        (errors if failed else rows).setdefault(shard, []).append(row)
        rows.setdefault(shard, [])
        done += 1
        failures += failed
        seconds += 0.0 if failed else row["duration_s"]
        count = len(rows[shard]) + len(errors.get(shard, []))
        if count == (expected.get(shard) if end is not None else rows_per_shard):
            commit(shard)
        if tracker is not None:
            tracker.update(done, failures, seconds)
        if on_progress is not None:
            on_progress(done, mine, seconds)
    for shard in sorted(rows):  # a streamed source's last shard (known lengths commit every shard above)
        count = len(rows[shard]) + len(errors.get(shard, []))
        if end is not None:
            raise RuntimeError(f"Shard {shard} got {count} of its {expected[shard]} inputs.")
        stop = shard * rows_per_shard + count
        commit(shard, stream_end=limit is None or stop < limit)  # fewer than a shard, not cut by the limit
    if tracker is not None:
        tracker.finish(done, failures, seconds)


PROGRESS_NOTE_S = 1.0  # how often a process writes its counts, and process 0 reads the others'


class RunProgress:
    """The progress of every process of a run: each writes its counts to `__annotation__/progress-<rank>.json`
    (about once a second, and when it is done); process 0 shows one bar over all of them, kept until all are done."""

    def __init__(self, out: Path, processes: Processes, total: int | None):
        self.out, self.processes = out, processes
        self.began = self.noted = time.perf_counter()
        self.bar = None
        if processes.is_main:
            from tqdm.auto import tqdm

            where = f" ({processes.world_size} processes)" if processes.world_size > 1 else ""
            self.bar = tqdm(total=total, unit="file", desc=f"annotating{where}")

    def note_path(self, rank: int) -> Path:
        return self.out / RUN_DIR / f"progress-{rank}.json"

    def update(self, done: int, failures: int, seconds: float, finished: bool = False) -> None:
        """This process's counts; written (other processes) or shown with the others' (process 0) about once a
        second, and always when `finished`."""
        if self.processes.world_size == 1:
            self._show(done, failures, seconds)
            return
        now = time.perf_counter()
        if not finished and now - self.noted < PROGRESS_NOTE_S:
            return
        self.noted = now
        if self.processes.is_main:
            self._show_all(done, failures, seconds)
        else:
            note = {"done": done, "failed": failures, "seconds": seconds, "finished": finished}
            _write_note(self.note_path(self.processes.rank), note)

    def finish(self, done: int, failures: int, seconds: float) -> None:
        """Reports this process done; process 0 keeps its bar until every process has reported done, then closes it."""
        self.update(done, failures, seconds, finished=True)
        if self.bar is None:
            return
        while self.processes.world_size > 1 and not self._show_all(done, failures, seconds):
            time.sleep(PROGRESS_NOTE_S / 4)
        self.bar.close()

    def _show_all(self, done: int, failures: int, seconds: float) -> bool:
        """Shows process 0's counts with the others' notes; whether every other process has reported done."""
        notes = []
        for rank in range(1, self.processes.world_size):
            try:
                notes.append(json.loads(self.note_path(rank).read_text()))
            except (OSError, ValueError):
                continue  # not written yet
        self._show(done + sum(n["done"] for n in notes), failures + sum(n["failed"] for n in notes),
                   seconds + sum(n["seconds"] for n in notes))
        return len(notes) == self.processes.world_size - 1 and all(n["finished"] for n in notes)

    def _show(self, done: int, failures: int, seconds: float) -> None:
        if self.bar is None:
            return
        hours = seconds / 3600.0
        rate = hours / max((time.perf_counter() - self.began) / 3600.0, 1e-9)
        self.bar.set_postfix_str(f"{hours:.2f} h audio, {rate:.0f} h audio/h, {failures} failed", refresh=False)
        self.bar.update(done - self.bar.n)


def _write_note(path: Path, note: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(note))
        os.replace(temporary, path)
    except OSError as error:
        raise OutputFolderError(write_failure(path, error)) from error


def remove_progress_notes(out: Path) -> None:
    """Deletes the progress notes of a run's processes (and their temporary files)."""
    for path in [*(out / RUN_DIR).glob("progress-*.json"), *(out / RUN_DIR).glob(".progress-*.json.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _manifest(fingerprint: dict, annotator: Annotator, previous: dict | None, processes: Processes) -> dict:
    manifest = dict(previous or {})
    manifest.update(
        format=FORMAT,
        fingerprint=fingerprint,
        tag_labels=annotator.model_labels,
        event_labels=annotator.event_labels,
        device=str(annotator.device),
        processes=processes.world_size,
    )
    manifest.setdefault("runs", [])
    return manifest


__all__ = ["Processes", "RunProgress", "annotate_corpus", "covers_source", "remove_progress_notes", "shard_rows"]
