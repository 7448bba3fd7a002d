"""Resuming from a mid-epoch checkpoint with the default recipe (mixup on) ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import numpy as np
import torch
from transformers import TrainingArguments

from htsat_hf import HTSATConfig, HTSATForAudioClassification
from htsat_hf.training.mixup import HTSATDataCollator
from htsat_hf.training.trainer import HTSATTrainer


def make_trainer(output_dir, max_steps=6):
    torch.manual_seed(0)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=3, spec_size=64,
                         clip_seconds=0.6, long_input_hop_seconds=0.3, time_mask_width=8,
                         problem_type="single_label_classification")
    model = HTSATForAudioClassification(config)
    rng = np.random.default_rng(0)
    frames = config.clip_frames
    dataset = [{"input_features": rng.standard_normal((frames, 64)).astype(np.float32) * 10 - 40, "labels": i % 3}
               for i in range(8)]  # 4 steps per epoch at batch 2: step 3 is mid-epoch
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, save_strategy="steps",
        save_steps=3, report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, learning_rate=1e-3,
    )
    collator = HTSATDataCollator(num_labels=3, mixup_alpha=0.5)
    return HTSATTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def test_resume_mid_epoch_with_mixup_is_bit_identical(tmp_path):
    whole = make_trainer(tmp_path / "run")
    whole.train()
    expected = {k: v.clone() for k, v in whole.model.state_dict().items()}
    resumed = make_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    differing = [k for k, v in resumed.model.state_dict().items() if not torch.equal(v, expected[k])]
    assert differing == []


def test_mixup_draws_differ_between_steps_and_are_applied(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("mixup_lambda")), with_kwargs=True
    )
    trainer.train()
    lambdas = [lam for lam in seen if lam is not None]
    assert len(lambdas) == 6 and len({tuple(lam.tolist()) for lam in lambdas}) == 6
