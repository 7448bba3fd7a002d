"""The original HTS-AT class-balanced sampler for (multi-label) training sets."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def class_indices(example_labels: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """For each class, the indices of the examples that carry it (an example with several labels is in several)."""
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    for index, labels in enumerate(example_labels):
        for label in labels:
            per_class[int(label)].append(index)
    return per_class


class ClassBalancedSampler(Sampler[int]):
    """
    Each epoch, builds a queue as the original HTS-AT `generate_queue` does: shuffle the list of classes, take one
    random example of each class, and repeat until the queue is as long as the dataset (then cut it there). Rare
    classes are therefore seen as often as common ones. Classes without any example are left out (with a warning).

    Args:
        example_labels: for every example, its class indices (one for single-label data, several for multi-label).
        num_classes: number of classes.
        num_samples: queue length per epoch (default: the dataset size).
        seed: the queue of epoch `e` depends only on `seed` and `e`, so every process builds the same one.
        num_replicas, rank: split the queue between processes (each rank takes every `num_replicas`-th item, the
            queue padded to a multiple of `num_replicas` first, as `DistributedSampler` does). Default: taken from
            `torch.distributed` when it is initialised, else a single process. Under the Transformers `Trainer`
            leave the split to Accelerate (`HTSATTrainer` passes `num_replicas=1`): it shards the identical
            per-rank queues by batch.

    Call `set_epoch(e)` before each epoch (the Trainer does); without it the epoch counter advances by one per
    iteration, so consecutive epochs still differ.
    """

    def __init__(
        self,
        example_labels: Sequence[Sequence[int]],
        num_classes: int,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas}).")
        self.per_class = class_indices(example_labels, num_classes)
        self.classes = [c for c, members in enumerate(self.per_class) if members]
        if not self.classes:
            raise ValueError("ClassBalancedSampler: no example carries any label; cannot balance an unlabelled set.")
        empty = num_classes - len(self.classes)
        if empty:
            logger.warning(f"ClassBalancedSampler: {empty} of {num_classes} classes have no training example; skipped.")
        self.total_size_unsharded = num_samples if num_samples is not None else len(example_labels)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._epoch_set = False
        self.num_samples = math.ceil(self.total_size_unsharded / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_set = True

    def epoch_queue(self, epoch: int) -> list[int]:
        """The whole (unsharded) queue of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        queue: list[int] = []
        classes = np.array(self.classes)
        while len(queue) < self.total_size_unsharded:
            for c in rng.permutation(classes):
                members = self.per_class[c]
                queue.append(members[rng.integers(len(members))])
        return queue[: self.total_size_unsharded]

    def __iter__(self) -> Iterator[int]:
        queue = self.epoch_queue(self.epoch)
        padded = self.num_samples * self.num_replicas
        queue += queue[: padded - len(queue)]
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        return iter(queue[self.rank : padded : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
