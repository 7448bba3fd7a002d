"""Scores from logits, as the model's `problem_type` says: the one rule for clip and frame (step) scores alike.

- `"multi_label_classification"`: a sigmoid per label. Labels are independent; a frame score is the probability that
  the label is active in that step, and several labels can be active at once.
- `"single_label_classification"` (and no problem_type, as Transformers' audio-classification pipeline reads it):
  a softmax over the labels. Labels exclude each other; a step's scores sum to 1, and a frame score is the share of
  that step the model gives the label among all of them.
- `"regression"`: the logits as they are.

Relative imports only: this module travels with the remote-code pipeline (`add_remote_sed_pipeline`).
"""

from __future__ import annotations

import torch

MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"
REGRESSION = "regression"


def score_function(problem_type: str | None) -> str:
    """"sigmoid", "softmax" or "none": what `pipeline("audio-classification")` applies for this problem_type."""
    if problem_type == MULTI_LABEL:
        return "sigmoid"
    if problem_type == REGRESSION:
        return "none"
    return "softmax"


def is_exclusive(problem_type: str | None) -> bool:
    """True where labels exclude each other (scores are a softmax over them)."""
    return score_function(problem_type) == "softmax"


def logits_to_scores(logits: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """
    float32 scores of (..., labels) logits (a clip's, or steps') as `problem_type` says: sigmoid for multi-label,
    softmax over the labels (the last axis) for single-label, the logits for regression.

    Computed in float64 and rounded to float32, so that a step's score does not depend on the tensor's length or
    the step's place in it: PyTorch's float32 sigmoid differs by an ulp between its vectorised loop and its scalar
    tail (seen on AVX2), so blocks streamed one by one would otherwise score a step differently from the whole grid.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()
    function = score_function(problem_type)
    if function == "sigmoid":
        scores = torch.sigmoid(logits)
    elif function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = logits
    return scores.float()


__all__ = ["MULTI_LABEL", "REGRESSION", "SINGLE_LABEL", "is_exclusive", "logits_to_scores", "score_function"]
