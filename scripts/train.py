#!/usr/bin/env python
"""Fine-tune (or train from scratch) HTS-AT for audio classification with the Transformers Trainer.

Single process:   python scripts/train.py --dataset_name ./my_audiofolder --output_dir out [--num_train_epochs 10 ...]
Several GPUs:     accelerate launch --multi_gpu --num_processes 4 scripts/train.py ...
CPU, 2 processes: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
                      --mixed_precision no --dynamo_backend no scripts/train.py ... --use_cpu

All options: python scripts/train.py --help. The logic lives in htsat_hf.training.run.
"""

from htsat_hf.training.run import cli

if __name__ == "__main__":
    cli()
