"""`htsat-hf train`: fine-tune (or train from scratch) HTS-AT for audio classification or sound event detection with
the Transformers Trainer (`htsat_hf.training.run`).

Single process:   htsat-hf train --dataset_name ./my_audiofolder --output_dir out [--num_train_epochs 10 ...]
Several GPUs:     accelerate launch --multi_gpu --num_processes 4 -m htsat_hf.commands.train ...
CPU, 2 processes: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
                      --mixed_precision no --dynamo_backend no -m htsat_hf.commands.train ... --use_cpu

All options: htsat-hf train --help (Transformers' `TrainingArguments` and the recipe's, `training.arguments`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ..training.run import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
    cli(argv)
    return 0


if __name__ == "__main__":  # the processes `accelerate launch -m htsat_hf.commands.train` starts
    raise SystemExit(main())
