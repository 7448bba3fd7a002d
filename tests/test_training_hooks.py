"""Training-script hooks: a pretrained Swin start (--init_from_swin) and --push_to_hub through the publisher."""

from __future__ import annotations

import json

import numpy as np
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


def test_sync_batchnorm_only_for_several_processes_on_an_accelerator_and_the_checkpoint_still_loads(tmp_path):
    from htsat_hf.training.trainer import broadcast_persistent_buffers, sync_batchnorm_for_distributed

    def tiny():
        return HTSATForAudioClassification(HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))

    assert type(sync_batchnorm_for_distributed(tiny(), 2, "cpu").htsat.mel_batch_norm) is torch.nn.BatchNorm2d
    assert type(sync_batchnorm_for_distributed(tiny(), 1, "cuda").htsat.mel_batch_norm) is torch.nn.BatchNorm2d
    model = tiny()
    plain_keys = set(model.state_dict())
    model.htsat.mel_batch_norm.running_mean.normal_()
    converted = sync_batchnorm_for_distributed(model, 2, "cuda")
    assert type(converted.htsat.mel_batch_norm) is torch.nn.SyncBatchNorm
    assert set(converted.state_dict()) == plain_keys
    broadcast_persistent_buffers(converted)  # one process: nothing to align, nothing changes
    converted.save_pretrained(tmp_path)
    loaded = HTSATForAudioClassification.from_pretrained(tmp_path)
    assert type(loaded.htsat.mel_batch_norm) is torch.nn.BatchNorm2d
    torch.testing.assert_close(loaded.htsat.mel_batch_norm.running_mean, model.htsat.mel_batch_norm.running_mean)
    features = torch.randn(2, 1001, 64)
    with torch.no_grad():  # eval mode: SyncBatchNorm uses its running statistics, also on CPU
        torch.testing.assert_close(converted.eval()(features).logits, loaded.eval()(features).logits)


def test_front_end_flags_reach_the_model_and_its_feature_extractor():
    """--sampling_rate/--hop_length/--n_fft/--num_mel_bins/--f_min/--f_max build one matching front end."""
    model_args = ModelArguments(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], spec_size=64, clip_seconds=1.0,
                                sampling_rate=16000, hop_length=160, n_fft=512, num_mel_bins=32, f_min=20.0, f_max=8000.0)
    model, extractor = build_model(model_args, LabelSpace(names=["a", "b"], multi_label=False), None)
    config = model.config
    assert (config.sampling_rate, config.hop_length, config.n_fft, config.num_mel_bins) == (16000, 160, 512, 32)
    assert (config.f_min, config.f_max, config.freq_ratio) == (20.0, 8000.0, 2)
    assert (extractor.sampling_rate, extractor.hop_length, extractor.n_fft, extractor.feature_size) == (16000, 160, 512, 32)
    assert (extractor.f_min, extractor.f_max) == (20.0, 8000.0)
    features = extractor([np.zeros(16000, np.float32)], sampling_rate=16000, return_tensors="pt")["input_features"]
    assert features.shape == (1, 101, 32)
    assert model(input_features=features).logits.shape == (1, 2)
