"""A corpus run: every input annotated exactly once, across processes, crashes and restarts.

Inputs are numbered in their source's order and grouped into shards of `rows_per_shard`; shard n belongs to process
n % world_size. Each process decodes its inputs in DataLoader workers (FFmpeg and the log-mel front end, overlapped
with the model), packs windows of many inputs into each forward pass, and commits a shard when all of its inputs are
done (see `store.py`). Starting the same run again skips the committed shards, whatever the number of processes.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .annotator import AnnotationError, Annotator
from .sources import InputSource
from .store import (
    FORMAT,
    RUN_DIR,
    check_resumable,
    committed_shards,
    model_fingerprint,
    read_manifest,
    remove_outputs,
    remove_uncommitted,
    summarize,
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
    processes: Processes | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
    on_progress: Callable[[int, int | None, float], None] | None = None,
) -> dict[str, Any]:
    """
    Annotates every input of `source` (the first `limit`) into `output_dir`, resuming what is there.

    Returns the summary written to the manifest: counts of inputs done and failed (by stage), audio hours, this run's
    wall time and hours of audio per hour. `on_commit(shard)` is called after each shard is committed and
    `on_progress(inputs_done, inputs_total, audio_seconds)` after each input (this process's counts).
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    processes = processes or Processes()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    processes.barrier()
    if processes.is_main:
        if overwrite:
            remove_outputs(out)
        removed = remove_uncommitted(out)
        if removed:
            print(f"[annotate] removed {len(removed)} files of shards a stopped run left unfinished")
        manifest = _manifest(fingerprint, annotator, previous, processes)
        manifest["status"] = "running"
        write_manifest(out, manifest)
    processes.barrier()
    before = summarize(out)
    committed = set(committed_shards(out))
    total = None if source.length is None else source.length if limit is None else min(limit, source.length)
    wanted = _Wanted(rows_per_shard, processes, committed)
    _run(annotator, source, out, wanted, limit, total, rows_per_shard, num_workers, processes, progress, on_commit,
         on_progress)
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
        complete = total is not None and summary["inputs"] == total
        manifest.update(status="complete" if complete or total is None else "incomplete", counts=summary)
        manifest["runs"].append({
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 3), "audio_hours": run_hours, "processes": processes.world_size,
            "audio_hours_per_hour": summary["audio_hours_per_hour"],
        })
        write_manifest(out, manifest)
        stages = ", ".join(f"{stage}: {count}" for stage, count in summary["failed_by_stage"].items())
        print(
            f"[annotate] {summary['inputs']} inputs: {summary['done']} annotated, {summary['failed']} failed"
            + (f" ({stages})" if stages else "")
            + f"; {summary['audio_hours']:.3f} h of audio; this run {run_hours:.3f} h in {wall:.1f} s"
            + (f" = {summary['audio_hours_per_hour']:.0f} h of audio per hour" if run_hours > 0 else "")
            + (f"; errors in {out / RUN_DIR}/errors-*.jsonl" if summary["failed"] else "")
        )
    return summary


def _run(annotator, source, out, wanted, limit, total, rows_per_shard, num_workers, processes, progress, on_commit,
         on_progress) -> None:
    """Annotates this process's inputs and commits its shards as they complete."""
    items: Any = _WindowItems(source, wanted, annotator.cutter, limit)
    if num_workers > 0:
        items = torch.utils.data.DataLoader(
            items, batch_size=None, num_workers=num_workers, collate_fn=_pass_through, prefetch_factor=4,
            worker_init_fn=_lower_priority,
        )
    expected = {}  # shard -> its number of inputs, where the source's length is known
    if total is not None:
        for index in range(total):
            if wanted(index):
                expected[index // rows_per_shard] = expected.get(index // rows_per_shard, 0) + 1
    mine = None if total is None else sum(expected.values())  # this process's inputs, where known
    rows: dict[int, list] = {}
    errors: dict[int, list] = {}
    bar = _progress_bar(progress and processes.is_main, mine, processes)
    done, failures, seconds, began = 0, 0, 0.0, time.perf_counter()

    def commit(shard: int) -> None:
        results = sorted(rows.pop(shard, []), key=lambda row: row["key"])
        failed_inputs = sorted(errors.pop(shard, []), key=lambda error: error.key)
        write_shard(out, processes.rank, shard, results, failed_inputs, annotator.tasks)
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
        if count == (expected.get(shard) if total is not None else rows_per_shard):
            commit(shard)
        if bar is not None:
            hours = seconds / 3600.0
            rate = hours / max((time.perf_counter() - began) / 3600.0, 1e-9)
            bar.set_postfix_str(f"{hours:.2f} h audio, {rate:.0f} h audio/h, {failures} failed", refresh=False)
            bar.update(1)
        if on_progress is not None:
            on_progress(done, mine, seconds)
    if bar is not None:
        bar.close()
    for shard in sorted(rows):  # a streamed source's last shard (known lengths commit every shard above)
        if total is not None:
            raise RuntimeError(f"Shard {shard} got {len(rows[shard])} of its {expected[shard]} inputs.")
        commit(shard)


def _progress_bar(show: bool, total: int | None, processes: Processes):
    if not show:
        return None
    from tqdm.auto import tqdm

    where = f" (process 1 of {processes.world_size})" if processes.world_size > 1 else ""
    return tqdm(total=total, unit="file", desc=f"annotating{where}")


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


__all__ = ["Processes", "annotate_corpus"]
