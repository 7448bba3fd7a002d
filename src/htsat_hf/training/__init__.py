"""Fine-tuning HTS-AT with the Transformers `Trainer`: the paper's recipe (mixup, class-balanced sampling, warm-up
schedule, weight averaging), data loading through `datasets`, and metrics that work offline.

Modules: `mixup`, `sampling`, `schedule`, `averaging`, `metrics`, `data`, `trainer`, `run` (the `htsat-hf train`
driver). Import them directly, e.g. `from htsat_hf.training.mixup import HTSATDataCollator`.
"""

from .averaging import average_checkpoints, average_state_dicts
from .mixup import HTSATDataCollator, mix_targets, sample_mixup_lambda
from .sampling import ClassBalancedSampler
from .schedule import HTSATLRLambda, get_htsat_schedule, original_lr_multiplier

__all__ = [
    "ClassBalancedSampler",
    "HTSATDataCollator",
    "HTSATLRLambda",
    "average_checkpoints",
    "average_state_dicts",
    "get_htsat_schedule",
    "mix_targets",
    "original_lr_multiplier",
    "sample_mixup_lambda",
]
