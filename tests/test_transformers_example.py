"""The calls Transformers' run_audio_classification.py makes, unmodified, on a multi-label folder (as the converter
writes AudioSet): integer class ids fine-tune it single-label, and the saved folder's pipeline gives softmax scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification


@pytest.fixture(scope="module")
def multi_label_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=7,
                         problem_type="multi_label_classification")
    path = tmp_path_factory.mktemp("audioset_like")
    HTSATForAudioClassification(config).save_pretrained(path)
    HTSATFeatureExtractor().save_pretrained(path)
    return path


def test_integer_labels_fine_tune_a_multi_label_folder(multi_label_folder, tmp_path):
    labels = ["yes", "no", "stop"]
    label2id = {name: str(i) for i, name in enumerate(labels)}
    id2label = {str(i): name for i, name in enumerate(labels)}
    config = AutoConfig.from_pretrained(multi_label_folder, num_labels=3, label2id=label2id, id2label=id2label,
                                        finetuning_task="audio-classification")
    model = AutoModelForAudioClassification.from_pretrained(multi_label_folder, config=config,
                                                            ignore_mismatched_sizes=True)
    extractor = AutoFeatureExtractor.from_pretrained(multi_label_folder)
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(16000) * 0.1).astype(np.float32) for _ in range(4)]
    features = extractor(clips, sampling_rate=32000, return_tensors="pt")["input_features"]
    dataset = [{"input_features": features[i], "labels": i % 3} for i in range(4)]  # class ids, as the example
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                               report_to=[], use_cpu=True, save_strategy="no", logging_steps=1),
        train_dataset=dataset,
    )
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert model.config.problem_type == "single_label_classification"
    trainer.save_model(str(tmp_path / "saved"))
    extractor.save_pretrained(tmp_path / "saved")
    scores = pipeline("audio-classification", model=str(tmp_path / "saved"))(clips[0], top_k=3)
    assert {s["label"] for s in scores} == set(labels)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)  # softmax, not sigmoid


def test_multi_hot_floats_stay_multi_label():
    torch.manual_seed(0)
    model = HTSATForAudioClassification(HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                    num_labels=3)).eval()
    features = torch.randn(2, 1001, 64)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = model(features, labels=targets).loss
    expected = torch.nn.functional.binary_cross_entropy_with_logits(model(features).logits, targets)
    torch.testing.assert_close(loss, expected)
    assert model.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="class ids"):
        model(features, labels=torch.ones(2, 5))
