"""Scores from logits, as the model's `problem_type` says: the one rule for clip and frame (step) scores alike.

- `"multi_label_classification"`: a sigmoid per label. Labels are independent; a frame score is the probability that
  the label is active in that step, and several labels can be active at once.
- `"single_label_classification"` (and no problem_type, as Transformers' audio-classification pipeline reads it):
  a softmax over the labels. Labels exclude each other; a step's softmax sums to 1, and is the share of that step
  the model gives each label among all of them (capped for frame scores, see below).
- `"regression"`: the logits as they are.

Frame (step) scores of a single-label model are also capped by the clip score of the window they lie in
(`with_window_clip_logits`, then `frame_scores`):

    score(t, c) = min(softmax(frame_logits[t])[c], softmax(window_clip_logits(t))[c])

where a window's clip logits are the mean of its step logits (what the model's clip `logits` are for one window), and
a step covered by several overlapping windows takes them stitched as its frame logits are (the same overlap
weighting). A single-label model decides one label per window: its frame scores say where in the window, never more
than the window's own clip score, so no event is reported for a label the window's clip score rules out (weak-label
masking, as the DCASE baselines mask frame predictions by clip predictions). Per-step logits of a clip-trained model
are unreliable, above all at a window's first and last steps; without the cap, a softmax there reported events for
classes whose clip score was below 0.1. For a one-window input the cap is exactly the clip score. Multi-label models
keep the paper's per-step sigmoid, uncapped.

Relative imports only: this module travels with the remote-code pipeline (`add_remote_sed_pipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .sed_postprocessing import map_scores

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


def capped_by_window_clip(problem_type: str | None) -> bool:
    """True where frame scores are capped by their window's clip score (single-label models, the softmax rule)."""
    return is_exclusive(problem_type)


def stitched_channels(num_labels: int, problem_type: str | None) -> int:
    """Channels of the values a `StepStitcher` stitches for a model of `num_labels` labels: the labels' step logits,
    and for a single-label model their window's clip logits after them (`with_window_clip_logits`)."""
    return 2 * num_labels if capped_by_window_clip(problem_type) else num_labels


def with_window_clip_logits(window_logits: torch.Tensor, problem_type: str | None,
                            clip_logits: torch.Tensor | None = None) -> torch.Tensor:
    """
    (..., steps, labels) step logits of one window each (an ensemble's members already combined per window) -> the
    values to stitch over time: for a single-label model, (..., steps, 2 * labels), each step's logits followed by
    its window's (..., labels) `clip_logits` (default: the mean over the window's steps, which is a single model's
    clip `logits`; an ensemble passes its own, the members' clip logits combined); otherwise the logits as they are.
    Stitch them as frame logits are (`StepStitcher`, `stitch_window_steps`), then score them with `frame_scores`.
    """
    if not capped_by_window_clip(problem_type):
        return window_logits
    clip = window_logits.mean(dim=-2) if clip_logits is None else clip_logits.to(window_logits.dtype)
    return torch.cat([window_logits, clip.unsqueeze(-2).expand_as(window_logits)], dim=-1)


def frame_scores(stitched: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """
    float32 (..., steps, labels) frame scores of stitched `with_window_clip_logits` values: for a single-label model
    min(softmax(step logits), softmax(window clip logits)) per label, so no step scores a label above its window's
    clip score; otherwise `logits_to_scores` of the step logits (the paper's sigmoid for multi-label).
    """
    if not capped_by_window_clip(problem_type):
        return logits_to_scores(stitched, problem_type)
    channels = stitched.shape[-1]
    if channels % 2:
        raise ValueError(f"Stitched single-label values have {channels} channels; expected step logits followed by "
                         "window clip logits (with_window_clip_logits), 2 x labels.")
    steps, clips = torch.as_tensor(stitched).split(channels // 2, dim=-1)
    return torch.minimum(logits_to_scores(steps, problem_type), logits_to_scores(clips, problem_type))


def labelled_frame_scores(
    stitched: Any, problem_type: str | None, model_labels: Sequence[str], mapping: Mapping | None = None
) -> tuple[np.ndarray, list[str]]:
    """(steps, labels) frame scores of stitched step values (`scores.frame_scores`: by `problem_type`, a single-label
    model's capped by the window clip score) and their labels; mapped to `mapping`'s labels when one is given
    (`map_scores`, summed for a single-label model). What the SED pipeline, the annotator and the live detector
    score their steps with."""
    scores = frame_scores(stitched, problem_type).numpy()
    if mapping is None:
        return scores, list(model_labels)
    return map_scores(scores, mapping, model_labels, exclusive=is_exclusive(problem_type))


def top_tags(logits: torch.Tensor, labels: list[str], problem_type: str | None, k: int) -> list[dict]:
    """Top-k {label, score} of one clip's logits, the score as `pipeline("audio-classification")` applies it
    (`logits_to_scores`: sigmoid for multi-label, identity for regression, else softmax)."""
    scores, ids = logits_to_scores(logits, problem_type).topk(k)
    return [{"label": labels[i], "score": s} for s, i in zip(scores.tolist(), ids.tolist())]


__all__ = [
    "MULTI_LABEL", "REGRESSION", "SINGLE_LABEL", "capped_by_window_clip", "frame_scores", "is_exclusive",
    "labelled_frame_scores", "logits_to_scores", "score_function", "stitched_channels", "top_tags",
    "with_window_clip_logits",
]
