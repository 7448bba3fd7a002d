"""Training-script hooks: a pretrained Swin start (--init_from_swin) and --push_to_hub through the publisher."""

from __future__ import annotations

import json

import torch
from test_pretrained_init import small_swin
from test_publishing import RecordingApi

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification
from htsat_hf.training.arguments import DataTrainingArguments, ModelArguments
from htsat_hf.training.labels import LabelSpace
from htsat_hf.training.run import build_model, push_trained_model


def test_init_from_swin_flag_starts_from_the_swin_weights(tmp_path):
    swin = small_swin(classifier=False)
    swin.save_pretrained(tmp_path / "swin")
    model_args = ModelArguments(init_from_swin=str(tmp_path / "swin"))
    labels = LabelSpace(names=["a", "b", "c"], multi_label=False)
    model, _ = build_model(model_args, labels, None)
    patch = swin.state_dict()["embeddings.patch_embeddings.projection.weight"]
    torch.testing.assert_close(model.htsat.patch_embed.proj.weight, patch.mean(dim=1, keepdim=True))
    assert model.config.num_labels == 3


def test_push_to_hub_publishes_a_safetensors_only_repository(tmp_path):
    from transformers import TrainingArguments

    output = tmp_path / "run"
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=2,
                         id2label={0: "x", 1: "y"}, problem_type="single_label_classification")
    HTSATForAudioClassification(config).save_pretrained(output)
    HTSATFeatureExtractor().save_pretrained(output)
    (output / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75}))
    (output / "training_args.bin").write_bytes(b"pickle")
    api = RecordingApi()
    push_trained_model(ModelArguments(), DataTrainingArguments(dataset_name="someone/data", eval_split_name="test"),
                       TrainingArguments(output_dir=str(output), hub_model_id="me/htsat-run", use_cpu=True), api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    uploaded = {p.name for p in (tmp_path / "run-hub").iterdir()}
    assert "model.safetensors" in uploaded and "README.md" in uploaded and "training_args.bin" not in uploaded
    assert "0.75" in (tmp_path / "run-hub" / "README.md").read_text()
