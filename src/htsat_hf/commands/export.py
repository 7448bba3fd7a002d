"""`htsat-hf export`: an HTS-AT checkpoint as ONNX (log-mel features of any length in, dynamic batch: short inputs
stretched to one window, long ones windowed and stitched, as in PyTorch), checked with onnxruntime against PyTorch on
4, 10, 25 and 60 s (`htsat_hf.deployment`).

Examples:
    htsat-hf export path/to/htsat-audioset htsat.onnx                 # audio classification
    htsat-hf export path/to/htsat-audioset htsat_sed.onnx --sed       # + frame_logits
    htsat-hf export --random htsat_random.onnx                        # paper config, random weights
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a saved HTS-AT folder (omit with --random)")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--sed", action="store_true", help="export HTSATForSoundEventDetection (logits + frame_logits)")
    parser.add_argument("--random", action="store_true", help="paper config with random weights (no checkpoint)")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed |onnxruntime - PyTorch| (default 1e-4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.random == bool(args.model):
        parser.error("give a model folder or --random (not both)")
    from .. import HTSATConfig, HTSATForAudioClassification, HTSATForSoundEventDetection
    from ..deployment.onnx_check import export_and_check

    cls = HTSATForSoundEventDetection if args.sed else HTSATForAudioClassification
    model = cls(HTSATConfig()) if args.random else cls.from_pretrained(args.model)
    path, worst = export_and_check(model.eval(), args.output)
    print(f"wrote {path}; max |onnxruntime - PyTorch| over 4, 10, 25 and 60 s: {worst:.2e}")
    if worst > args.atol:
        print(f"difference {worst:.2e} exceeds --atol {args.atol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
