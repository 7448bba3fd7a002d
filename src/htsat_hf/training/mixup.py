"""Mixup for HTS-AT: per-sample Beta(alpha, alpha) weights and a collator that adds them to each training batch.

The model mixes the spectrograms itself (after BatchNorm and SpecAugment): `x * lam + x.flip(0) * (1 - lam)`.
The collator only draws `lam` and, with `mix_targets=True`, mixes the labels the same way.

Default: `mix_targets=True` (standard mixup, Zhang et al. 2018). The mixed input then gets the matching mixed target,
which is the consistent objective for single-label data (ESC-50, Speech Commands), where an unmixed one-hot target
for a 50/50 mixture teaches the model to ignore half of what it hears. The original HTS-AT AudioSet code leaves the
targets unmixed on purpose ("AudioSet is not a perfect data, so adding noise might be better"); pass
`mix_targets=False` (`--mix_targets False` in `htsat-hf train`) to reproduce it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch


def sample_mixup_lambda(batch_size: int, alpha: float = 0.5, generator: np.random.Generator | None = None) -> torch.Tensor:
    """(batch_size,) float32 mixing weights, one per sample, drawn from Beta(alpha, alpha)."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}.")
    draw = generator.beta if generator is not None else np.random.beta
    return torch.from_numpy(np.asarray(draw(alpha, alpha, size=batch_size), dtype=np.float32))


def mix_targets(labels: torch.Tensor, mixup_lambda: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """
    Mix targets the way the model mixes inputs: `y * lam + y.flip(0) * (1 - lam)`.

    `labels` is either (batch,) class indices (turned into one-hot rows first; needs `num_labels`), (batch, classes)
    multi-hot / soft targets, or (batch, steps, classes) frame targets. Returns float32 of the (one-hot) shape.
    """
    if labels.ndim == 1:
        if num_labels is None:
            raise ValueError("num_labels is needed to mix class-index labels (they are one-hot encoded first).")
        labels = torch.nn.functional.one_hot(labels.long(), num_labels)
    labels = labels.float()
    lam = mixup_lambda.to(labels.dtype).view(-1, *([1] * (labels.ndim - 1)))
    return labels * lam + labels.flip(0) * (1.0 - lam)


@dataclass
class HTSATDataCollator:
    """
    Stacks `input_features` (frames, mel) into (batch, frames, mel), `labels` into (batch,) long class indices
    or (batch, classes) float multi-hot targets, and strong-label `frame_labels` (steps, classes) into (batch, steps,
    classes) floats. When `mixup_alpha > 0` it adds `mixup_lambda` (batch,) for the model and, if `mix_targets`,
    mixes the labels and the frame labels with the same weights and partners as the inputs (see the module
    docstring for the default).

    Use mixup for training batches only. Called on its own, the collator draws from NumPy's global generator (`seed`
    gives it a private one). Under `HTSATTrainer` the loaders collate without mixup and the trainer mixes each
    training batch itself, drawing from a generator keyed by (seed, optimizer step, micro-batch, process): the draws
    do not depend on how far a DataLoader had prefetched, so resuming from any checkpoint repeats them exactly.
    """

    num_labels: int | None = None
    mixup_alpha: float = 0.0
    mix_targets: bool = True
    seed: int | None = None
    input_name: str = "input_features"

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}.")
        self._rng = np.random.default_rng(self.seed) if self.seed is not None else None

    def for_eval(self) -> HTSATDataCollator:
        """The same collator without mixup (for evaluation and prediction)."""
        return replace(self, mixup_alpha=0.0)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("Cannot collate an empty batch.")
        inputs = [torch.as_tensor(np.asarray(f[self.input_name]), dtype=torch.float32) for f in features]
        shapes = {tuple(x.shape) for x in inputs}
        if len(shapes) > 1:
            raise ValueError(
                f"Examples of one batch have different feature shapes {sorted(shapes)}: crop clips to the same "
                "length (e.g. --eval_crop center) or use a batch size of 1."
            )
        batch: dict[str, torch.Tensor] = {self.input_name: torch.stack(inputs)}
        if "labels" in features[0]:
            labels = torch.stack([torch.as_tensor(np.asarray(f["labels"])) for f in features])
            batch["labels"] = labels.float() if labels.ndim == 2 or labels.is_floating_point() else labels.long()
        if "frame_labels" in features[0]:
            batch["frame_labels"] = torch.stack(
                [torch.as_tensor(np.asarray(f["frame_labels"]), dtype=torch.float32) for f in features]
            )
        return self.mix(batch, self._rng)

    def mix(self, batch: dict[str, torch.Tensor], generator: np.random.Generator | None = None) -> dict:
        """Adds `mixup_lambda` drawn from `generator` (NumPy's global one when None) and, with `mix_targets`, mixes
        the labels and frame labels; a no-op without mixup or for a batch of one. Lambdas go to the batch's device."""
        size = batch[self.input_name].shape[0]
        if self.mixup_alpha <= 0 or size < 2:
            return batch
        lam = sample_mixup_lambda(size, self.mixup_alpha, generator).to(batch[self.input_name].device)
        batch["mixup_lambda"] = lam
        if self.mix_targets:
            for name in ("labels", "frame_labels"):
                if name in batch:
                    batch[name] = mix_targets(batch[name], lam, self.num_labels)
        return batch
