"""`htsat-hf ensemble`: several saved HTS-AT models combined into one `HTSATEnsembleModel` folder, as the paper's
six-model ensemble (`htsat_hf.weights.ensemble.build_ensemble`). Average a run's checkpoints first
(`htsat-hf average`), then ensemble the averaged models.

    htsat-hf ensemble htsat-ensemble model-1 model-2 model-3 [--average logits]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("folders", nargs="+", help="HTS-AT model folders (model.safetensors + config.json)")
    parser.add_argument("--average", choices=["probabilities", "logits"], default="probabilities",
                        help="how members are combined (default: probabilities, as the paper's ensemble)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..weights.ensemble import build_ensemble

    try:
        build_ensemble(args.folders, args.output_dir, args.average)
    except (OSError, ValueError) as error:  # a folder without a model, members that do not fit together
        parser.error(str(error))
    print(f"wrote an ensemble of {len(args.folders)} models to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
