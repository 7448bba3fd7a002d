"""`htsat-hf evaluate`: sound event detections on DCASE task 4 metrics, printed as one JSON object.

    htsat-hf evaluate --ground-truth gt.tsv --durations durations.tsv --predictions det.tsv \
        [--operating-points DIR_OF_predictions_th_*.tsv] [--scores DIR_OF_<audio_id>.tsv]

Prints intersection_f1 (dtc = gtc = 0.5, cttc = 0.3), collar_f1 (200 ms onset collar, offset collar
max(200 ms, 20 % of the event length)) and segment_f1 (1-s segments), each with macro, micro and per-class values,
plus psds1 and psds2 when operating points or frame scores are given. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ground-truth", required=True, help="TSV: filename onset offset event_label")
    parser.add_argument("--durations", required=True, help="TSV: filename duration")
    parser.add_argument("--predictions", required=True, help="TSV of detections at one operating point")
    parser.add_argument("--operating-points", help="folder of predictions_th_<threshold>.tsv files (for PSDS)")
    parser.add_argument("--scores", help="folder of per-clip <audio_id>.tsv frame scores (for PSDS)")
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (0: one line)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..metrics.sed_metrics import evaluate_files

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = evaluate_files(
                args.ground_truth, args.durations, args.predictions, args.operating_points, args.scores
            )
    except ValueError as error:
        print_warnings(caught)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_warnings(caught)
    print(json.dumps(report, indent=args.indent or None))
    return 0


def print_warnings(caught) -> None:
    """Each distinct warning once: the three F-scores read the same predictions and would repeat it."""
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
