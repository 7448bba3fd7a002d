"""`htsat-hf init`: an HTS-AT model folder whose weights start from a Swin (ImageNet) or CLAP checkpoint, for
`htsat-hf train --model_name_or_path` (`htsat_hf.weights.pretrained_init`).

    htsat-hf init swin path/to/swin-tiny-patch4-window7-224 htsat-from-swin --num_labels 50 --single_label
    htsat-hf init clap path/to/clap-htsat-unfused htsat-from-clap --labels_csv class_labels_indices.csv
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# keys of a saved config.json that describe the file, not the model
FILE_KEYS = ("model_type", "transformers_version", "architectures", "auto_map", "custom_pipelines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source_type", choices=["swin", "clap"])
    parser.add_argument("source", help="Transformers folder or .safetensors file of the Swin / CLAP model")
    parser.add_argument("output_dir")
    parser.add_argument("--config", help="HTSATConfig JSON to start from (default: the paper's AudioSet settings)")
    parser.add_argument("--num_labels", type=int, help="number of classes (default: the config's)")
    parser.add_argument("--labels_csv", help="AudioSet-style index,mid,display_name CSV for id2label")
    parser.add_argument("--single_label", action="store_true", help="softmax classes (ESC-50, Speech Commands)")
    parser.add_argument("--rgb_reduction", choices=["sum", "mean"], default="mean")
    parser.add_argument("--allow_pickle", action="store_true", help="read a trusted .bin/.pth with weights_only=True")
    return parser


def config_settings(args: argparse.Namespace) -> dict[str, Any]:
    """HTSATConfig keyword arguments: `--config`'s file without its file keys, then the label options over it."""
    from ..weights.convert_original import read_audioset_labels

    settings: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    for key in FILE_KEYS:
        settings.pop(key, None)
    if args.labels_csv:
        id2label = read_audioset_labels(args.labels_csv)
        settings.update(id2label=id2label, label2id={name: i for i, name in id2label.items()})
        settings.pop("num_labels", None)
    elif args.num_labels:
        settings.update(num_labels=args.num_labels)
        settings.pop("id2label", None)
        settings.pop("label2id", None)
    if args.single_label:
        settings["problem_type"] = "single_label_classification"
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..configuration_htsat import HTSATConfig
    from ..feature_extraction_htsat import HTSATFeatureExtractor
    from ..weights.pretrained_init import initialise_model

    try:
        config = HTSATConfig(**config_settings(args))
        report = initialise_model(config, rgb_reduction=args.rgb_reduction, allow_pickle=args.allow_pickle,
                                  **{f"init_from_{args.source_type}_path": args.source})
    except (OSError, ValueError) as error:  # no such checkpoint, a config or checkpoint that does not fit
        parser.error(str(error))
    report.model.save_pretrained(args.output_dir)
    HTSATFeatureExtractor.for_model_config(report.model.config).save_pretrained(args.output_dir)
    print(report.summary())
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
