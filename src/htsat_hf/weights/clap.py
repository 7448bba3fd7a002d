"""A CLAP folder in Transformers' layout (`ClapModel` weights and config, `ClapFeatureExtractor`, RoBERTa tokenizer,
e.g. a local copy of `laion/clap-htsat-unfused`) -> an htsat-hf folder (`HTSATClapModel`, `HTSATClapFeatureExtractor`,
the same tokenizer) that the Auto classes, the pipelines and `trust_remote_code=True` load.

Command line:
    python -m htsat_hf.weights.clap CLAP_DIR OUTPUT_DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..feature_extraction_htsat_clap import HTSATClapFeatureExtractor
from ..modeling_htsat_clap import HTSATClapModel


def convert_clap_folder(clap_dir: str | Path, output_dir: str | Path, allow_pickle: bool = False) -> HTSATClapModel:
    """Writes `output_dir` from the CLAP folder `clap_dir` (see the module); returns the model."""
    from transformers import AutoTokenizer, ClapFeatureExtractor

    clap_dir = Path(clap_dir)
    clap_extractor = ClapFeatureExtractor.from_pretrained(clap_dir)
    model = HTSATClapModel.from_clap(clap_dir, clap_extractor, allow_pickle=allow_pickle)
    model.save_pretrained(output_dir)
    HTSATClapFeatureExtractor.from_clap_feature_extractor(clap_extractor).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(clap_dir).save_pretrained(output_dir)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Transformers CLAP folder (unfused) to HTSATClapModel.")
    parser.add_argument("clap_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--allow_pickle", action="store_true", help="read a trusted pytorch_model.bin")
    args = parser.parse_args(argv)
    convert_clap_folder(args.clap_dir, args.output_dir, args.allow_pickle)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()


__all__ = ["convert_clap_folder"]
