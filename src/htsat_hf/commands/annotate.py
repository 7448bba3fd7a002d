"""`htsat-hf annotate`: a corpus run from the command line, one process or many under `accelerate launch`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..sed_postprocessing import (
    add_event_arguments,
    check_event_arguments,
    non_negative_int,
    positive_int,
)
from ..annotation.text_queries import add_text_query_arguments, text_query_from_arguments
from ..annotation.windows import TASKS

if TYPE_CHECKING:
    from ..annotation.sources import InputSource

EXAMPLES = """examples:
  htsat-hf annotate --model_name_or_path htsat-audioset --files a.wav b.flac --output_dir out
  htsat-hf annotate --model_name_or_path htsat-audioset --dataset_name ./recordings --output_dir out \\
      --tasks tags events embeddings --num_workers 2
  htsat-hf annotate --model_name_or_path htsat-audioset --file_list all.txt --output_dir out \\
      --device cpu --num_processes auto                # one model process per CPU core (as memory allows)
  accelerate launch --num_processes 4 -m htsat_hf.commands.annotate --model_name_or_path htsat-audioset --file_list all.txt \\
      --output_dir out --bf16
  htsat-hf annotate --model_name_or_path clap-folder --files a.wav --output_dir out \\
      --text_labels "a dog barking" "a siren" --tasks tags events embeddings   # a CLAP model: phrases
Running the same command again continues an interrupted run; the output loads with
datasets.load_dataset("parquet", data_dir=OUT) or pandas.read_parquet(OUT)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf annotate", description="Tags, events and embeddings for every file of a corpus, as Parquet shards.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True, help="HTS-AT folder or Hub id")
    model.add_argument("--trust_remote_code", action="store_true")
    inputs = parser.add_argument_group("inputs (files, or a datasets source)")
    inputs.add_argument("--files", nargs="+", metavar="PATH", help="audio files (anything ffmpeg reads)")
    inputs.add_argument("--file_list", metavar="TXT", help="a text file with one audio path per line")
    inputs.add_argument("--dataset_name", help="Hub dataset id or local folder (as htsat-hf train loads data)")
    inputs.add_argument("--dataset_config_name")
    inputs.add_argument("--split", help="the split to annotate (needed when the source has several)")
    inputs.add_argument("--audio_column_name", default="audio")
    inputs.add_argument("--id_column_name", help="column with each row's id (default: the row index)")
    inputs.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    inputs.add_argument("--limit", type=positive_int, help="annotate only the first N inputs")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True)
    output.add_argument("--overwrite", action="store_true", help="delete a previous run's output and start over")
    output.add_argument("--wait", action="store_true",
                        help="when another run holds --output_dir, wait for it to finish instead of stopping")
    output.add_argument("--rows_per_shard", type=positive_int, default=256, help="inputs per Parquet shard (commit unit)")
    tasks = parser.add_argument_group("tasks and post-processing")
    tasks.add_argument("--tasks", nargs="+", choices=TASKS, default=["tags", "events"])
    tasks.add_argument("--top_k", type=positive_int, default=5, help="tags per input")
    add_event_arguments(tasks)
    add_text_query_arguments(parser)
    run = parser.add_argument_group("execution")
    run.add_argument("--batch_size", type=positive_int, default=16, help="windows per forward pass, packed across files")
    run.add_argument("--num_workers", type=non_negative_int, default=2,
                     help="decoding processes per model process (0: decode in the main process)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: this process's GPU, else the CPU)")
    run.add_argument("--features_on", choices=["auto", "workers", "device"], default="auto",
                     help="where log-mel features are computed: in the decoding workers, or batched on the model's "
                     "device (auto: the device for a GPU, so that the workers only decode)")
    run.add_argument(
        "--num_processes", default="1", type=_process_count,
        help="model processes on this machine, sharing the inputs as under `accelerate launch`: N, or auto (one per "
        "CPU core, each with one thread, on the CPU, fewer where memory would not hold them; one per GPU); ignored "
        "when already started by a launcher",
    )
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`htsat-hf annotate`: `run` (which prints the run's summary); the exit status 0 (errors end it through
    SystemExit with a message)."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict:
    """The corpus run of the command line `argv`; returns its counts (as `annotate_corpus` does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    event_settings = check_event_arguments(parser, args)  # bad settings are usage errors, before any process starts
    if bool(args.files or args.file_list) == bool(args.dataset_name):
        raise SystemExit("error: give either --files / --file_list or --dataset_name.")
    source = input_source(args)  # bad inputs end here, once, before any process starts
    on_cpu = _runs_on_cpu(args.device)
    processes = _resolve_process_count(args.num_processes, on_cpu)
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # not under a launcher yet: become one
        return _launch(argv, processes, on_cpu, args.output_dir)
    from accelerate import PartialState

    from ..annotation.annotator import Annotator
    from ..annotation.corpus import Processes, annotate_corpus
    from ..annotation.sources import InputError
    from ..annotation.store import ManifestMismatchError, OutputFolderError

    state = PartialState(cpu=on_cpu)
    device = args.device or str(state.device)
    try:
        annotator = Annotator(
            args.model_name_or_path, tasks=args.tasks, top_k=args.top_k, batch_size=args.batch_size, device=device,
            bf16=args.bf16, features_on=args.features_on, trust_remote_code=args.trust_remote_code,
            event_settings=event_settings, label_mapping=args.label_mapping, **text_query_from_arguments(args),
        )
    except ValueError as error:  # bad settings, weights that do not fit, config files that disagree
        raise SystemExit(f"error: {error}") from None
    try:
        return annotate_corpus(
            annotator, source, args.output_dir, model_name=args.model_name_or_path, rows_per_shard=args.rows_per_shard,
            num_workers=args.num_workers, limit=args.limit, overwrite=args.overwrite, wait=args.wait,
            processes=Processes.from_accelerate(state), progress=not args.no_progress,
        )
    except (ManifestMismatchError, OutputFolderError) as error:
        raise SystemExit(f"error: {error}") from None
    except InputError as error:  # found while reading a stream (repeated ids), maybe in a decoding worker
        raise SystemExit(f"error: {original_message(error)}") from None


def input_source(args: argparse.Namespace) -> InputSource:
    """The run's inputs from the parsed arguments; inputs that cannot be read as given (a missing --file_list,
    repeated paths or ids, a missing column or split, a dataset that cannot be loaded) end the command with the
    reason."""
    from ..annotation.sources import dataset_source, file_source

    try:
        if args.dataset_name:
            return dataset_source(
                args.dataset_name, args.dataset_config_name, args.split, args.audio_column_name, args.id_column_name,
                args.streaming,
            )
        return file_source(args.files, args.file_list)
    except (ValueError, FileNotFoundError) as error:  # InputError, and datasets' own (DatasetNotFoundError ...)
        raise SystemExit(f"error: {error}") from None


def original_message(error: BaseException) -> str:
    """An exception's own message, without the traceback a DataLoader worker's re-raised copy carries ahead of it."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    return text.rsplit(marker, 1)[-1].strip() if "Original Traceback" in text and marker in text else text


def _runs_on_cpu(device: str | None) -> bool:
    """`--device cpu`, `ACCELERATE_USE_CPU` set (as `--num_processes` sets it for its processes), or no GPU."""
    wants_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return wants_cpu or not _cuda_available()


def _process_count(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1 or auto, got {value!r}")
    return count


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Memory one CPU model process takes with its 2 decoding workers: the paper-size model at batch 16 measured 1.2-1.4 GiB
# (PSS of the process tree, README's annotation benchmark); `--num_processes auto` starts no more than fit.
PROCESS_MEMORY_BYTES = int(1.5 * 2**30)


def _resolve_process_count(requested: int | str, on_cpu: bool) -> int:
    if requested != "auto":
        return requested
    if not on_cpu:
        import torch

        return max(1, torch.cuda.device_count())
    cores, available = _usable_cores(), _available_memory()
    if available is None or available >= cores * PROCESS_MEMORY_BYTES:
        return cores
    fits = max(1, int(available // PROCESS_MEMORY_BYTES))
    print(f"[annotate] --num_processes auto: {fits} process(es) rather than one per core ({cores}): "
          f"{available / 2**30:.1f} GiB of memory is available and each takes about "
          f"{PROCESS_MEMORY_BYTES / 2**30:.1f} GiB; give --num_processes N to choose.")
    return fits


def _available_memory() -> int | None:
    """Bytes of memory still available: Linux's MemAvailable, within a cgroup v2 limit (a container's) where there
    is one; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def _launch(argv: list[str], processes: int, on_cpu: bool, output_dir: str) -> dict:
    """Runs this command in `processes` processes through torch's launcher (`torchrun --standalone`), each with its
    share of the CPU's threads, and returns the run's counts from the manifest they wrote."""
    from ..annotation.store import read_manifest

    env = dict(os.environ)
    if on_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, _usable_cores() // processes)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
        str(processes), "--module", "htsat_hf.commands.annotate", *_without_process_count(argv),
    ]
    print(f"[annotate] starting {processes} processes" + (f" of {env['OMP_NUM_THREADS']} thread(s)" if on_cpu else ""))
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: the {processes} annotation processes stopped with exit status {result.returncode}; "
                         "their messages are above. Run the same command again to continue.")
    manifest = read_manifest(Path(output_dir))
    run = manifest["runs"][-1]  # as `annotate_corpus` returns it in one process
    return dict(manifest["counts"], wall_time_s=run["wall_time_s"], run_audio_hours=run["audio_hours"],
                audio_hours_per_hour=run["audio_hours_per_hour"])


def _without_process_count(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--num_processes":
            skip = True
        elif not argument.startswith("--num_processes="):
            kept.append(argument)
    return kept


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["build_parser", "input_source", "main", "original_message", "run"]

if __name__ == "__main__":  # the processes `--num_processes` (or `accelerate launch -m`) starts
    main()
