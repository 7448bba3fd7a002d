"""`htsat-hf detect`: sound event detection on audio files, written as DCASE task 4 TSV rows.

A file that cannot be read is reported and skipped, the others are still processed, and the run exits non-zero with
a summary. `--output` is written to a temporary file beside it and renamed into place at the end, so a failed or
interrupted run never leaves a half-written file or destroys the previous one.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..sed_postprocessing import (
    add_event_arguments,
    check_event_arguments,
    positive_int,
)

HEADER = ["filename", "onset", "offset", "event_label", "score"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf detect",
        description="Sound event detection on audio files of any length with an HTS-AT folder.",
        epilog="example: htsat-hf detect recording.wav --model htsat-audioset --threshold 0.3 "
        "--median-filter 0.5 --output events.tsv --plot events.png",
    )
    parser.add_argument("audio", nargs="+", help="audio files (anything ffmpeg reads)")
    parser.add_argument("--model", required=True, help="HTS-AT folder or Hub id")
    add_event_arguments(parser)
    parser.add_argument("--window-batch-size", type=positive_int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default=None, help="e.g. cuda:0")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--output", help="TSV file for the events (default: stdout)")
    parser.add_argument("--plot", help="PNG of class activity with the events (one file: this path; several: a folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the detection; returns the exit status (1 when any file failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    event_settings = check_event_arguments(parser, args)
    check_output_paths(parser, args)
    import htsat_hf  # noqa: F401  (registers the "sound-event-detection" pipeline)
    from transformers import pipeline

    try:  # settings are checked against the model's labels, and the model folder is checked, before any file is read
        detector = pipeline(
            "sound-event-detection", model=args.model, device=args.device, trust_remote_code=args.trust_remote_code,
            event_settings=event_settings, label_mapping=args.label_mapping, window_batch_size=args.window_batch_size,
            return_frame_scores=bool(args.plot),
        )
    except ValueError as error:  # bad settings, weights that do not fit, config files that disagree: nothing can run
        print(f"[detect] cannot run with the model {args.model}: {error}", file=sys.stderr)
        return 2
    failures: list[tuple[str, str]] = []
    events_written = 0
    temporary = None
    if args.output:
        output = Path(args.output)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent or ".")
        handle = os.fdopen(descriptor, "w", newline="")
    else:
        handle = sys.stdout
    try:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(HEADER)
        for audio in args.audio:
            try:
                result = detector(audio)
            except ValueError as error:  # unreadable, empty, too short...: report, go on with the other files
                failures.append((audio, str(error)))
                print(f"[detect] skipped {audio}: {error}", file=sys.stderr)
                continue
            for event in result["events"]:
                writer.writerow([Path(audio).name, f"{event['onset']:.3f}", f"{event['offset']:.3f}", event["label"],
                                 f"{event['score']:.4f}"])
            events_written += len(result["events"])
            if args.plot:
                _plot(result, args.plot, audio, several=len(args.audio) > 1)
        if temporary is not None:
            handle.close()
            os.replace(temporary, args.output)
            temporary = None
    finally:
        if temporary is not None:  # interrupted: the previous output stays as it was
            handle.close()
            os.unlink(temporary)
    done = len(args.audio) - len(failures)
    print(f"[detect] {len(args.audio)} files: {done} done ({events_written} events), {len(failures)} failed"
          + "".join(f"\n  {path}: {message}" for path, message in failures), file=sys.stderr)
    return 1 if failures else 0


def check_output_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` before any work when `--output` or `--plot` cannot be written as asked: the results of every
    file would otherwise be computed and then lost."""
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            parser.error(f"argument --output: {output} is a directory; give a file name for the TSV "
                         f"(e.g. {output / 'events.tsv'}).")
        folder = output.parent
        if not folder.is_dir():
            parser.error(f"argument --output: the folder {folder} does not exist; create it first.")
        if not os.access(folder, os.W_OK):
            parser.error(f"argument --output: the folder {folder} is not writable.")
    if args.plot:
        plot = Path(args.plot)
        if len(args.audio) == 1 and plot.is_dir():
            parser.error(f"argument --plot: {plot} is a directory; for one file give the PNG's name "
                         f"(e.g. {plot / (Path(args.audio[0]).stem + '.png')}).")
        if len(args.audio) > 1 and plot.exists() and not plot.is_dir():
            parser.error(f"argument --plot: with several files it names a folder for one PNG each, but {plot} is a "
                         "file.")


def _plot(result: dict, plot: str, audio: str, several: bool) -> None:
    from ..visualization import plot_sound_events

    target = Path(plot)
    if several:
        target.mkdir(parents=True, exist_ok=True)
        target = target / (Path(audio).stem + ".png")
    plot_sound_events(result, target, title=Path(audio).name)
    print(f"wrote {target}", file=sys.stderr)


__all__ = ["build_parser", "check_output_paths", "main"]


if __name__ == "__main__":
    sys.exit(main())
