"""`HTSATTrainer`: the Transformers `Trainer` with the parts of the HTS-AT recipe it lacks.

- class-balanced sampling of the training set (`ClassBalancedSampler`, the original's per-epoch queue);
- the original warm-up / step learning-rate schedule, stepped per optimizer step (`schedule.py`);
- optionally weight decay on every parameter, as the original AdamW (the `Trainer` exempts biases and norms);
- mixup only in training batches, drawn per (seed, step, micro-batch, process) so that resuming is exact;
- under several processes, the mel BatchNorm statistics of rank 0 (those saved) on every rank before each evaluation:
  each rank updates its running statistics from its own batches, and DDP only re-aligns them at the next training
  forward, so ranks would otherwise score their share of the evaluation set with different models.

Everything else (optimizer = AdamW with `TrainingArguments`' betas / eps / weight decay, gradient clipping at
`max_grad_norm`, DDP, checkpoints and resuming) is the stock `Trainer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import has_length

from .sampling import ClassBalancedSampler
from .schedule import LR_RATE, LR_SCHEDULER_EPOCH, get_htsat_schedule


class HTSATTrainer(Trainer):
    """
    Args (on top of `Trainer`'s):
        train_example_labels: class indices of every training example; needed for `balanced_sampling`.
        balanced_sampling: draw each epoch's training queue class-balanced (multi-label AudioSet recipe).
        htsat_lr_schedule: replace `lr_scheduler_type` by the original schedule (multiplier of `learning_rate`).
        lr_rate, lr_scheduler_epoch: that schedule's warm-up rates and boundaries.
        schedule_steps_per_epoch: optimizer steps per schedule epoch; default: the real epoch length (needed for
            streamed data, whose length is unknown).
        decay_all_parameters: apply `weight_decay` to every parameter (original) instead of the `Trainer`'s
            default that exempts biases and LayerNorm weights.
    """

    def __init__(
        self,
        *args: Any,
        train_example_labels: Sequence[Sequence[int]] | None = None,
        balanced_sampling: bool = False,
        htsat_lr_schedule: bool = False,
        lr_rate: Sequence[float] = LR_RATE,
        lr_scheduler_epoch: Sequence[int] = LR_SCHEDULER_EPOCH,
        schedule_steps_per_epoch: int | None = None,
        decay_all_parameters: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if balanced_sampling and train_example_labels is None:
            raise ValueError("balanced_sampling needs train_example_labels (the class indices of each example).")
        self.train_example_labels = train_example_labels
        self.balanced_sampling = balanced_sampling
        self.htsat_lr_schedule = htsat_lr_schedule
        self.lr_rate = tuple(lr_rate)
        self.lr_scheduler_epoch = tuple(lr_scheduler_epoch)
        self.schedule_steps_per_epoch = schedule_steps_per_epoch
        self.decay_all_parameters = decay_all_parameters
        self._update_steps_per_epoch: int | None = None
        collator = self.data_collator
        self.mixup = collator if getattr(collator, "mixup_alpha", 0) > 0 and hasattr(collator, "mix") else None
        if self.mixup is not None:  # the loaders collate unmixed batches; `training_step` mixes them
            self.data_collator = collator.for_eval()
        self._mixup_position = (-1, 0)  # (optimizer step, micro-batch within it) of the last mixed batch

    # ------------------------------------------------------------------------------------------------- mixup
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.mixup is not None:
            inputs = self.mixup.mix(dict(inputs), self._mixup_generator())
        return super().training_step(model, inputs, num_items_in_batch)

    def _mixup_generator(self) -> np.random.Generator:
        """The generator of this training batch's mixup draws, keyed by (seed, optimizer step, micro-batch within
        the step, process): a run resumed from a checkpoint (always saved at a step boundary) draws what the
        uninterrupted run drew, wherever in an epoch it stopped. (Collating with NumPy's global generator made the
        draws depend on how many batches the DataLoader had prefetched when the checkpoint was written.)"""
        step = self.state.global_step
        last_step, micro = self._mixup_position
        micro = micro + 1 if step == last_step else 0
        self._mixup_position = (step, micro)
        return np.random.default_rng([self.args.seed, step, micro, self.args.process_index])

    # ---------------------------------------------------------------------------------------------- sampling
    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        if not self.balanced_sampling:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        num_classes = self.model.config.num_labels
        # Every rank builds the same queue (same seed and epoch); Accelerate then gives each rank its own batches.
        return ClassBalancedSampler(
            self.train_example_labels,
            num_classes,
            num_samples=len(dataset),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            num_replicas=1,
            rank=0,
        )

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluation_loop(self, *args: Any, **kwargs: Any):
        broadcast_persistent_buffers(self.model)
        return super().evaluation_loop(*args, **kwargs)

    # -------------------------------------------------------------------------------------------- collators
    def _with_eval_collator(self, make_loader, *args: Any) -> DataLoader:
        collator = self.data_collator
        if hasattr(collator, "for_eval"):
            self.data_collator = collator.for_eval()
        try:
            return make_loader(*args)
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    # ------------------------------------------------------------------------------------ optimizer/schedule
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._update_steps_per_epoch = values[1]
        return values

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not self.htsat_lr_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        steps = self.schedule_steps_per_epoch
        if steps is None:
            if self.train_dataset is not None and not has_length(self.train_dataset):
                raise ValueError(
                    "The HTS-AT schedule counts epochs, but a streamed training set has no known epoch length: pass "
                    "--schedule_steps_per_epoch."
                )
            steps = self._update_steps_per_epoch or num_training_steps
        self.lr_scheduler = get_htsat_schedule(
            optimizer if optimizer is not None else self.optimizer, steps, self.lr_rate, self.lr_scheduler_epoch
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler


def broadcast_persistent_buffers(model: torch.nn.Module, source_rank: int = 0) -> None:
    """Copies the saved buffers (BatchNorm running statistics) of `source_rank` to every process; no-op in a single
    process. Non-persistent buffers (index tables, masks) are rebuilt identically everywhere and are left alone."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                dist.broadcast(buffer.data, src=source_rank)


def sync_batchnorm_for_distributed(model: torch.nn.Module, world_size: int, device_type: str) -> torch.nn.Module:
    """The original trains with SyncBatchNorm across GPUs: batch statistics over the global batch. Converts the
    model's BatchNorm layers when several processes train on an accelerator; PyTorch's SyncBatchNorm has no CPU
    kernel, so CPU runs keep per-process statistics (aligned before evaluation). Weight names do not change, so the
    saved checkpoint loads into the plain model."""
    if world_size > 1 and device_type in ("cuda", "xpu", "hpu"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
