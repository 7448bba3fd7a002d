"""The model a job runs (the annotator, the live detector): loaded for inference and checked, and the single HTS-AT
models inside it (an ensemble's members), whose logits are combined as the ensemble's own forward combines them."""

from __future__ import annotations

from typing import Any

import torch

from .inference_checks import check_inference_ready
from .modeling_htsat_ensemble import combine_logits


def load_for_inference(model: Any, feature_extractor: Any, device: Any, trust_remote_code: bool,
                       allow_ensemble: bool = False) -> tuple[Any, Any]:
    """The model (a path, Hub id or model) in eval mode on its device, and its feature extractor: what the
    `Annotator` and the `LiveDetector` run. Ensembles (`HTSATEnsembleModel`) only
    where `allow_ensemble`. A model whose weights were not loaded, or whose feature extractor disagrees with its
    config, is refused (`check_inference_ready`)."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from .feature_extraction_htsat import HTSATFeatureExtractor

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        name = str(model)
        model = AutoModelForAudioClassification.from_pretrained(name, trust_remote_code=trust_remote_code)
        if feature_extractor is None:
            feature_extractor = AutoFeatureExtractor.from_pretrained(name, trust_remote_code=trust_remote_code)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    single = hasattr(model, "htsat") and hasattr(model.htsat, "encode_images") and hasattr(model, "classifier")
    if not single and not (allow_ensemble and is_ensemble(model)):
        raise ValueError(
            f"{type(model).__name__} is not a single HTS-AT model (HTSATForAudioClassification or "
            "HTSATForSoundEventDetection)" + ("; ensembles are not supported here." if is_ensemble(model) else ".")
        )
    if feature_extractor is None:
        feature_extractor = HTSATFeatureExtractor.for_model_config(model.config)
    check_inference_ready(model, feature_extractor)
    if device is not None:
        model = model.to(device)
    return model.eval(), feature_extractor


def load_job_model(model: Any, feature_extractor: Any, device: Any, trust_remote_code: bool, text_labels: Any = None,
                   **text_query_options: Any) -> tuple[Any, Any]:
    """What the `Annotator` and the `LiveDetector` run: a CLAP model asked about `text_labels` (phrases, with the
    text-query options of `annotation.text_queries.text_query_for`), else the model as given; then
    `load_for_inference` with ensembles allowed."""
    from .annotation.text_queries import text_query_for

    model, feature_extractor = text_query_for(model, text_labels, feature_extractor, device=device,
                                              trust_remote_code=trust_remote_code, **text_query_options)
    return load_for_inference(model, feature_extractor, device, trust_remote_code, allow_ensemble=True)


def model_members(model: Any) -> list:
    """The single HTS-AT models whose outputs `combine_members` combines: an ensemble's members, else the model."""
    return list(model.members) if is_ensemble(model) else [model]


def combine_members(model: Any, member_logits: list[torch.Tensor], exclusive: bool) -> torch.Tensor:
    """One model's logits as they are; an ensemble's members' combined as its forward combines them."""
    if not is_ensemble(model):
        return member_logits[0]
    return combine_logits(member_logits, model.config.average, exclusive)


def is_ensemble(model: Any) -> bool:
    """An `HTSATEnsembleModel` (also loaded as remote code): members that are single HTS-AT models."""
    members = getattr(model, "members", None)
    return members is not None and all(hasattr(m, "htsat") and hasattr(m, "classifier") for m in members)


__all__ = ["combine_members", "is_ensemble", "load_for_inference", "load_job_model", "model_members"]
