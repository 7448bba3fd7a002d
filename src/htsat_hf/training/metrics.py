"""`compute_metrics` factories for the `Trainer`, backed by the local (offline) `evaluate` modules in
`htsat_hf/metrics/`: accuracy for single-label tasks, mAP / mean AUC / d' for multi-label tagging, and for
sound event detection on strong labels the tagging metrics plus frame-level mAP and F1."""

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


def sound_event_metrics(threshold: float = 0.5) -> Callable[[EvalPrediction], dict[str, float]]:
    """
    Strong labels (`HTSATForSoundEventDetection` with `labels` and `frame_labels`): the clip tagging metrics (`mAP`,
    `mAUC`, `dprime`) plus, on the token-semantic steps, `frame_mAP` (every step of every clip one sample) and
    `frame_f1` (micro-averaged F1 of sigmoid(frame logits) >= `threshold` against step targets >= 0.5).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
    tagging = tagging_metrics()
    metric = load_metric("audio_tagging")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions, label_ids = prediction.predictions, prediction.label_ids
        if not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2:
            raise ValueError("Sound event metrics need (labels, frame_labels) references; give the model frame_labels.")
        logits, frame_logits = np.asarray(predictions[0]), np.asarray(predictions[1])
        result = tagging(EvalPrediction(predictions=logits, label_ids=np.asarray(label_ids[0])))
        num_labels = frame_logits.shape[-1]
        scores = frame_logits.reshape(-1, num_labels)
        references = (np.asarray(label_ids[1]).reshape(-1, num_labels) >= 0.5).astype(np.int64)
        result["frame_mAP"] = metric.compute(predictions=scores, references=references)["mAP"]
        detected = scores >= np.log(threshold / (1.0 - threshold))  # sigmoid(x) >= threshold
        true_positives = float((detected & (references == 1)).sum())
        total = float(detected.sum() + references.sum())
        result["frame_f1"] = 2.0 * true_positives / total if total else 0.0
        return result

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
