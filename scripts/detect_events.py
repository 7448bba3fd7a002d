#!/usr/bin/env python
"""Sound event detection on audio files of any length with an HTS-AT folder.

Example:
    python scripts/detect_events.py recording.wav --model htsat-audioset --threshold 0.3 \
        --median-filter 0.5 --output events.tsv --plot events.png
Writes DCASE task 4 TSV rows (filename, onset, offset, event_label, score) to --output (or prints them).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import htsat_hf  # noqa: F401  (registers the "sound-event-detection" pipeline)
from htsat_hf.sed_postprocessing import add_postprocessing_arguments, postprocessing_from_arguments
from transformers import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", nargs="+", help="audio files (anything ffmpeg reads)")
    parser.add_argument("--model", required=True, help="HTS-AT folder or Hub id")
    add_postprocessing_arguments(parser)
    parser.add_argument("--window-batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="e.g. cuda:0")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--output", help="TSV file for the events (default: stdout)")
    parser.add_argument("--plot", help="PNG of class activity with the events (one file: this path; several: a folder)")
    args = parser.parse_args()

    detector = pipeline(
        "sound-event-detection", model=args.model, device=args.device, trust_remote_code=args.trust_remote_code
    )
    handle = open(args.output, "w", newline="") if args.output else sys.stdout
    writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
    writer.writerow(["filename", "onset", "offset", "event_label", "score"])
    for audio in args.audio:
        result = detector(
            audio,
            **postprocessing_from_arguments(args),
            window_batch_size=args.window_batch_size,
            return_frame_scores=bool(args.plot),
        )
        for event in result["events"]:
            writer.writerow([Path(audio).name, f"{event['onset']:.3f}", f"{event['offset']:.3f}", event["label"],
                             f"{event['score']:.4f}"])
        if args.plot:
            from htsat_hf.visualization import plot_sound_events

            target = Path(args.plot)
            if len(args.audio) > 1:
                target.mkdir(parents=True, exist_ok=True)
                target = target / (Path(audio).stem + ".png")
            plot_sound_events(result, target, title=Path(audio).name)
            print(f"wrote {target}", file=sys.stderr)
    if args.output:
        handle.close()


if __name__ == "__main__":
    main()
