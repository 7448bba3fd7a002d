"""Ensembles of saved HTS-AT models (safetensors only: no pickle is ever loaded).

`build_ensemble`: several models (any encoder sizes; the same front end, time axis and labels) combined into one
`HTSATEnsembleModel` (the paper's six-model ensemble), savable, loadable with `trust_remote_code` and usable in the
pipelines. Weight averaging of the checkpoints of one run (the released models are such averages) is
`htsat_hf.training.averaging.average_checkpoints`; average first, then ensemble the averaged models.

Command line:
    htsat-hf ensemble OUTPUT_DIR MODEL_A MODEL_B ... [--average logits]
"""

from __future__ import annotations

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


__all__ = ["build_ensemble", "load_member"]
