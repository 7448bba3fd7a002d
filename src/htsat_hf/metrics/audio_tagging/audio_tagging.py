"""Multi-label audio tagging metrics as AudioSet papers report them (a local, offline `evaluate` module):
mean average precision (mAP), mean ROC AUC, d-prime, and per-class AP."""

import datasets
import evaluate
import numpy as np
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

_DESCRIPTION = """
Per-class average precision (AP) and ROC AUC of clip-level scores against multi-hot references, averaged over the
classes (macro). Classes with no positive reference have no AP and are left out of the means (their per-class AP is
NaN); classes whose references are all positive (or all negative) are left out of the AUC mean. d' = sqrt(2) *
Phi^-1(mean AUC), as in the AudioSet literature (HTS-AT, PANNs, AST).
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): (examples, classes) scores; logits or probabilities (rank-based metrics
        give the same result for both).
    references (`list` of `list` of `int`): (examples, classes) multi-hot targets.
Returns:
    mAP (`float`), mAUC (`float`), dprime (`float`), per_class_ap (`list` of `float`, NaN where undefined),
    num_classes_scored (`int`): classes with at least one positive.
"""
_CITATION = """
@inproceedings{chen2022hts,
  title={HTS-AT: A Hierarchical Token-Semantic Audio Transformer for Sound Classification and Detection},
  author={Chen, Ke and Du, Xingjian and Zhu, Bilei and Ma, Zejun and Berg-Kirkpatrick, Taylor and Dubnov, Shlomo},
  booktitle={ICASSP}, year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AudioTagging(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        targets = np.asarray(references, dtype=np.int64)
        if scores.shape != targets.shape or scores.ndim != 2:
            raise ValueError(f"predictions {scores.shape} and references {targets.shape} must both be (examples, classes).")
        positives = targets.sum(axis=0)
        per_class_ap = np.full(targets.shape[1], np.nan)
        per_class_auc = np.full(targets.shape[1], np.nan)
        for c in np.flatnonzero(positives > 0):
            per_class_ap[c] = average_precision_score(targets[:, c], scores[:, c])
            if positives[c] < targets.shape[0]:
                per_class_auc[c] = roc_auc_score(targets[:, c], scores[:, c])
        scored = int((positives > 0).sum())
        mean_auc = float(np.nanmean(per_class_auc)) if np.isfinite(per_class_auc).any() else float("nan")
        return {
            "mAP": float(np.nanmean(per_class_ap)) if scored else float("nan"),
            "mAUC": mean_auc,
            "dprime": float(np.sqrt(2.0) * norm.ppf(mean_auc)) if np.isfinite(mean_auc) else float("nan"),
            "per_class_ap": per_class_ap.tolist(),
            "num_classes_scored": scored,
        }
