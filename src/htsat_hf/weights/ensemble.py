"""Ensembles of saved HTS-AT models (safetensors only: no pickle is ever loaded).

`build_ensemble`: several models (any encoder sizes; the same front end, time axis and labels) combined into one
`HTSATEnsembleModel` (the paper's six-model ensemble), savable, loadable with `trust_remote_code` and usable in the
pipelines. Weight averaging of the checkpoints of one run (the released models are such averages) is
`htsat_hf.training.averaging.average_checkpoints`; average first, then ensemble the averaged models.

Command line:
    python -m htsat_hf.weights.ensemble OUTPUT_DIR MODEL_A MODEL_B ... [--average logits]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..modeling_htsat import HTSATForAudioClassification, HTSATForSoundEventDetection
from ..modeling_htsat_ensemble import HTSATEnsembleModel


def load_member(folder: str | Path):
    """An HTS-AT model (with its head) from a folder, read from safetensors only (`use_safetensors=True`)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") != "htsat":
        raise ValueError(f"{folder} is a {config.get('model_type')!r} model; ensemble members must be HTS-AT models.")
    model_class = HTSATForSoundEventDetection if config.get("use_token_semantic_head", True) else (
        HTSATForAudioClassification
    )
    return model_class.from_pretrained(folder, use_safetensors=True)


def build_ensemble(
    folders: Sequence[str | Path], output_dir: str | Path | None = None, average: str = "probabilities"
) -> HTSATEnsembleModel:
    """An `HTSATEnsembleModel` of the models in `folders`; with `output_dir`, saved there with the first member's
    feature extractor (all members must use the same front end, which the ensemble config checks)."""
    from ..feature_extraction_htsat import HTSATFeatureExtractor

    ensemble = HTSATEnsembleModel.from_members([load_member(folder) for folder in folders], average=average)
    if output_dir is not None:
        ensemble.save_pretrained(output_dir)
        first = Path(folders[0])
        if (first / "preprocessor_config.json").exists():
            HTSATFeatureExtractor.from_pretrained(first).save_pretrained(output_dir)
    return ensemble


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Combine HTS-AT models into one ensemble model folder.")
    parser.add_argument("output_dir")
    parser.add_argument("folders", nargs="+", help="HTS-AT model folders (model.safetensors + config.json)")
    parser.add_argument("--average", choices=["probabilities", "logits"], default="probabilities",
                        help="how members are combined (default: probabilities, as the paper's ensemble)")
    args = parser.parse_args(argv)
    build_ensemble(args.folders, args.output_dir, args.average)
    print(f"wrote an ensemble of {len(args.folders)} models to {args.output_dir}")


if __name__ == "__main__":
    main()


__all__ = ["build_ensemble", "load_member"]
