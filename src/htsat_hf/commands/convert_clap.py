"""`htsat-hf convert-clap`: a Transformers CLAP folder (unfused) -> an htsat-hf `HTSATClapModel` folder
(`weights/clap.py`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf convert-clap",
        description="Convert a Transformers CLAP folder (ClapModel weights and config, ClapFeatureExtractor, RoBERTa "
        "tokenizer; unfused) to an HTSATClapModel folder that the Auto classes and pipelines load.",
    )
    parser.add_argument("clap_dir", help="the CLAP folder, e.g. a local copy of laion/clap-htsat-unfused")
    parser.add_argument("output_dir")
    parser.add_argument("--allow_pickle", action="store_true", help="read a trusted pytorch_model.bin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..weights.clap import convert_clap_folder

    try:
        convert_clap_folder(args.clap_dir, args.output_dir, args.allow_pickle)
    except (OSError, ValueError) as error:  # not a CLAP folder, the fused variant, weights that do not fit
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
