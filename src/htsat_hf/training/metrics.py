"""`compute_metrics` factories for the `Trainer`, backed by the local (offline) `evaluate` modules in
`htsat_hf/metrics/`: accuracy for single-label tasks, mAP / mean AUC / d' for multi-label tagging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import evaluate
import numpy as np
from transformers import EvalPrediction

from ..metrics import metric_path


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a local metric module (`accuracy`, `audio_tagging`) without the Hub, kept in memory (no cache files, so
    several processes can compute it at once)."""
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def _logits(predictions: Any) -> np.ndarray:
    return np.asarray(predictions[0] if isinstance(predictions, (tuple, list)) else predictions)


def accuracy_metrics() -> Callable[[EvalPrediction], dict[str, float]]:
    """Single-label: `accuracy` of the arg-max class. References may be class indices or one-hot rows."""
    metric = load_metric("accuracy")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = _logits(prediction.predictions)
        references = np.asarray(prediction.label_ids)
        if references.ndim == 2:
            references = references.argmax(axis=1)
        return metric.compute(predictions=logits.argmax(axis=1), references=references.astype(np.int64))

    return compute_metrics


def tagging_metrics() -> Callable[[EvalPrediction], dict[str, float]]:
    """Multi-label: `mAP`, `mAUC`, `dprime` (the per-class AP is dropped; the Trainer logs scalars only)."""
    metric = load_metric("audio_tagging")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        scores = _logits(prediction.predictions)
        references = (np.asarray(prediction.label_ids) >= 0.5).astype(np.int64)
        result = metric.compute(predictions=scores, references=references)
        return {key: result[key] for key in ("mAP", "mAUC", "dprime")}

    return compute_metrics


def compute_metrics_for(problem_type: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """The factory matching a config's `problem_type`."""
    if problem_type == "multi_label_classification":
        return tagging_metrics()
    if problem_type == "single_label_classification":
        return accuracy_metrics()
    raise ValueError(f"No default metrics for problem_type={problem_type!r}.")


def default_metric_name(problem_type: str) -> str:
    """Name of the headline metric (for `metric_for_best_model`)."""
    return "mAP" if problem_type == "multi_label_classification" else "accuracy"
