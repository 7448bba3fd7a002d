"""`htsat-hf convert`: a checkpoint of the original HTS-AT code as a Transformers folder (config, safetensors,
preprocessor config), through `htsat_hf.weights.convert_original`.

Example (the authors' AudioSet model):
    htsat-hf convert HTSAT_AudioSet_Saved_1.ckpt htsat-audioset --labels class_labels_indices.csv
Speech Commands models were trained at 16 kHz: add --sample-rate 16000 --hop-length 160 --single-label.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="original checkpoint (.ckpt Lightning dict or a bare state dict)")
    parser.add_argument("output_dir", help="folder to write config.json, model.safetensors, preprocessor_config.json")
    parser.add_argument("--sample-rate", type=int, default=32000, help="audio sample rate in Hz (default 32000)")
    parser.add_argument("--hop-length", type=int, default=320, help="STFT hop in samples (default 320)")
    parser.add_argument("--f-min", type=float, default=50.0, help="lowest mel frequency in Hz (default 50)")
    parser.add_argument("--f-max", type=float, default=14000.0, help="highest mel frequency in Hz (default 14000)")
    parser.add_argument("--single-label", action="store_true", help="softmax classes (ESC-50, Speech Commands)")
    parser.add_argument("--labels", help="AudioSet-style index,mid,display_name CSV for id2label")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..weights.convert_original import convert_original_checkpoint, describe_conversion

    model, feature_extractor, report = convert_original_checkpoint(
        args.checkpoint, sampling_rate=args.sample_rate, hop_length=args.hop_length, f_min=args.f_min,
        f_max=args.f_max, single_label=args.single_label, labels_csv=args.labels,
    )
    model.save_pretrained(args.output_dir)
    feature_extractor.save_pretrained(args.output_dir)
    print(describe_conversion(report))
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
