"""`htsat-hf publish`: an HTS-AT model folder (trained, converted or an ensemble) as a Hub repository (model card,
remote code, safetensors), uploaded (`htsat_hf.weights.publishing`).

Examples:
    # see what would be sent (no network)
    htsat-hf publish htsat-esc50 --repo_id you/htsat-esc50 --output_dir hub/htsat-esc50 \
        --dataset_id ashraq/esc50 --dataset_name ESC-50 --dry_run
    # upload (log in first: `hf auth login`, or set HF_TOKEN)
    htsat-hf publish runs/audioset --repo_id you/htsat-audioset --dataset_id agkphysics/AudioSet \
        --dataset_name AudioSet --dataset_split test
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source_dir", help="model folder: config.json + model.safetensors (+ preprocessor config)")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. you/htsat-audioset")
    parser.add_argument("--output_dir", help="folder to write the repository to (default: SOURCE_DIR-hub)")
    parser.add_argument("--dry_run", action="store_true", help="prepare the folder and list what would be sent")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--license", default="mit", help="license id for the card (default: mit)")
    parser.add_argument("--dataset_id", help="Hub dataset id for the card metadata, e.g. agkphysics/AudioSet")
    parser.add_argument("--dataset_name", help="dataset display name, e.g. AudioSet")
    parser.add_argument("--dataset_split", default="test", help="split the results were measured on (default: test)")
    parser.add_argument("--results", help="all_results.json / cv_results.json (default: found in SOURCE_DIR)")
    parser.add_argument("--base_model", help="Hub id of the model the run started from")
    parser.add_argument("--description", help="a paragraph on where the weights come from")
    parser.add_argument("--intended_use", help="replaces the default intended-use paragraph")
    parser.add_argument("--tags", nargs="*", default=[], help="extra card tags")
    parser.add_argument("--template", default="htsat_audio_classification.md", help="model card template (name/path)")
    parser.add_argument("--commit_message", default="Upload HTS-AT model")
    parser.add_argument("--convert_trusted_pickle", action="store_true",
                        help="the source has only pytorch_model.bin and you trust it: convert it to safetensors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..weights.publishing import CardSettings, publish

    settings = CardSettings(
        repo_id=args.repo_id, license=args.license, dataset_id=args.dataset_id, dataset_name=args.dataset_name,
        dataset_split=args.dataset_split, base_model=args.base_model, description=args.description,
        intended_use=args.intended_use, tags=args.tags,
    )
    output_dir = args.output_dir or f"{Path(args.source_dir).resolve()}-hub"
    prepared, uploaded = publish(
        args.source_dir, output_dir, settings, dry_run=args.dry_run, private=args.private or None,
        results_file=args.results, template=args.template, convert_trusted_pickle=args.convert_trusted_pickle,
        commit_message=args.commit_message,
    )
    for note in prepared.notes:
        print(f"note: {note}")
    print(f"repository folder: {prepared.folder}")
    print(uploaded.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
