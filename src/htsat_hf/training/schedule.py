"""The original HTS-AT learning-rate schedule (warm-up, then steps), as a step-aware `LambdaLR`.

The authors' code (`sed_model.py`, `configure_optimizers`) steps a `LambdaLR` once per epoch with this multiplier of
the base learning rate (1e-3):

- epochs 0, 1, 2: `lr_rate[epoch]` = 0.02, 0.05, 0.1 (warm-up);
- later: `i = bisect_left(lr_scheduler_epoch, epoch)` with `lr_scheduler_epoch = [10, 20, 30]`, and the rate is
  `lr_rate[-1 - i]`, i.e. counted from the end: 0.1 for epochs 3-10, 0.05 for 11-20, 0.02 for 21-30;
- past the last boundary (epoch > 30): `max(lr_rate[0] * 0.98 ** epoch, 0.03)`, which is always 0.03 because
  `0.02 * 0.98 ** epoch < 0.03`. So the rate goes back *up* from 0.02 to 0.03 after epoch 30. This is what the code
  does (and what the released models were trained with); we reproduce it rather than "fix" it.

The multiplier never exceeds 0.1, so the peak learning rate is 1e-4 with the paper's base rate of 1e-3.
Here the schedule is stepped per optimizer step: the epoch is `step // steps_per_epoch`, so the learning rate is
exactly the original's during each epoch and it works with the `Trainer`, which steps schedulers every update.
The original warm-up and boundary lengths are hard-coded as 3 (= `len(lr_rate)`); other lengths generalise that.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LR_RATE = (0.02, 0.05, 0.1)
LR_SCHEDULER_EPOCH = (10, 20, 30)


def original_lr_multiplier(
    epoch: int,
    lr_rate: Sequence[float] = LR_RATE,
    lr_scheduler_epoch: Sequence[int] = LR_SCHEDULER_EPOCH,
    decay: float = 0.98,
    floor: float = 0.03,
) -> float:
    """The multiplier of the base learning rate in (0-based) `epoch`, as the original `lr_foo`."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}.")
    if epoch < len(lr_rate):
        return float(lr_rate[epoch])
    position = bisect.bisect_left(list(lr_scheduler_epoch), epoch)
    if position >= len(lr_rate):
        return float(max(lr_rate[0] * decay**epoch, floor))
    return float(lr_rate[-1 - position])


class HTSATLRLambda:
    """Picklable `lr_lambda(step)` for `LambdaLR`: `original_lr_multiplier(step // steps_per_epoch)`."""

    def __init__(
        self,
        steps_per_epoch: int,
        lr_rate: Sequence[float] = LR_RATE,
        lr_scheduler_epoch: Sequence[int] = LR_SCHEDULER_EPOCH,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.steps_per_epoch = int(steps_per_epoch)
        self.lr_rate = tuple(float(r) for r in lr_rate)
        self.lr_scheduler_epoch = tuple(int(e) for e in lr_scheduler_epoch)

    def __call__(self, step: int) -> float:
        return original_lr_multiplier(step // self.steps_per_epoch, self.lr_rate, self.lr_scheduler_epoch)


def get_htsat_schedule(
    optimizer: Optimizer,
    steps_per_epoch: int,
    lr_rate: Sequence[float] = LR_RATE,
    lr_scheduler_epoch: Sequence[int] = LR_SCHEDULER_EPOCH,
    last_epoch: int = -1,
) -> LambdaLR:
    """A `LambdaLR` to step once per optimizer step (`last_epoch` counts steps, as in Transformers' schedulers)."""
    return LambdaLR(optimizer, HTSATLRLambda(steps_per_epoch, lr_rate, lr_scheduler_epoch), last_epoch=last_epoch)
