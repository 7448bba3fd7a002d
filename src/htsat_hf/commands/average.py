"""`htsat-hf average`: the weight average of several checkpoints of one run, as one model folder (the released HTS-AT
models are such averages; `htsat_hf.training.averaging.average_checkpoints`).

    htsat-hf average averaged-model run/checkpoint-9000 run/checkpoint-9500 run/checkpoint-10000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf average", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("checkpoints", nargs="+", help="model folders or Trainer checkpoint-N folders")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..training.averaging import average_checkpoints

    try:
        output = average_checkpoints(args.checkpoints, args.output_dir)
    except (OSError, ValueError) as error:  # a folder without weights, checkpoints of different models
        parser.error(str(error))
    print(f"averaged {len(args.checkpoints)} checkpoints into {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
