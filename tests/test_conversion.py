"""The converter reproduces the original HTS-AT: on the authors' fixture, and on other sizes through the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, shared_path
from original_reference import front_end_tensors, log_mel, original_forward
from safetensors.torch import load_file

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification, HTSATForSoundEventDetection
from htsat_hf.weights.convert_original import convert_original_checkpoint, load_original_state_dict

FIXTURE = ("fixtures", "original_htsat")


@pytest.fixture(scope="module")
def fixture_io():
    return load_file(str(shared_path(*FIXTURE, "htsat_tiny_io.safetensors")))


@pytest.fixture(scope="module")
def converted():
    model, feature_extractor, report = convert_original_checkpoint(shared_path(*FIXTURE, "htsat_tiny.ckpt"))
    sed = HTSATForSoundEventDetection(report.config).eval()
    sed.load_state_dict(model.state_dict())
    return model, sed, feature_extractor, report


def test_features_match_original_front_end(converted, fixture_io):
    _, _, feature_extractor, _ = converted
    features = feature_extractor(list(fixture_io["input_values"].numpy()), sampling_rate=32000, return_tensors="pt")
    assert features["input_features"].shape == (2, 1001, 64)
    assert (features["input_features"] - fixture_io["log_mel"][:, 0]).abs().max() < 1e-3


def test_clip_frame_and_latent_outputs_match_original(converted, fixture_io):
    classifier, sed, feature_extractor, _ = converted
    features = feature_extractor(list(fixture_io["input_values"].numpy()), sampling_rate=32000, return_tensors="pt")
    with torch.no_grad():
        out = sed(**features)
        clip_logits = classifier(**features).logits
    assert out.frame_logits.shape == (2, 32, 10)
    assert (out.logits.sigmoid() - fixture_io["clipwise_output"]).abs().max() < 1e-4
    frames = out.frame_logits.sigmoid().repeat_interleave(32, dim=1)
    assert (frames - fixture_io["framewise_output"]).abs().max() < 1e-4
    assert (out.pooler_output - fixture_io["latent_output"]).abs().max() < 1e-4
    torch.testing.assert_close(clip_logits, out.logits)
    assert sed.frame_step_seconds(features["input_features"].shape[1]) == pytest.approx(10.0 / 32)


def test_short_clip_without_padding_matches_original(converted, fixture_io):
    _, sed, feature_extractor, _ = converted
    features = feature_extractor(
        list(fixture_io["short_input_values"].numpy()), sampling_rate=32000, padding=False, return_tensors="pt"
    )
    assert features["input_features"].shape == (1, 401, 64)
    with torch.no_grad():
        out = sed(**features)
    assert (out.logits.sigmoid() - fixture_io["short_clipwise_output"]).abs().max() < 1e-4
    frames = out.frame_logits.sigmoid().repeat_interleave(32, dim=1)
    assert (frames - fixture_io["short_framewise_output"]).abs().max() < 1e-4
    assert sed.frame_step_seconds(401) == pytest.approx(4.0 / 32)


def test_reference_oracle_matches_fixture(fixture_io):
    """The oracle used below for other sizes is itself faithful to the authors' outputs."""
    state_dict = load_original_state_dict(shared_path(*FIXTURE, "htsat_tiny.ckpt"))
    out = original_forward(state_dict, fixture_io["input_values"], hop=320, spec_size=256, window=8, patch=4)
    assert (log_mel(state_dict, fixture_io["input_values"], 320)[:, 0] - fixture_io["log_mel"][:, 0]).abs().max() < 1e-3
    assert (out["clip_logits"].sigmoid() - fixture_io["clipwise_output"]).abs().max() < 1e-4
    assert (out["framewise_output"] - fixture_io["framewise_output"]).abs().max() < 1e-4


def test_report_lists_ignored_tensors(converted):
    _, _, _, report = converted
    assert "logmel_extractor.melW" in report.ignored_keys
    assert "head.weight" in report.ignored_keys  # unused by the token-semantic head
    assert any(key.endswith("attn_mask") for key in report.ignored_keys)
    assert report.config.depths == [1, 1, 2, 1] and report.config.num_heads == [1, 2, 4, 8]


# ----------------------------------------------------------------------------------------- other architectures
def to_original_layout(model: HTSATForAudioClassification, front_end: dict, seed: int) -> dict:
    """Writes a model's weights (perturbed) under the original code's key names, as its training code would."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    original = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.clone()
        if tensor.is_floating_point():
            tensor += 0.02 * torch.randn(tensor.shape, generator=generator)
        key = key.replace("htsat.mel_batch_norm.", "bn0.").replace("htsat.stages.", "layers.").replace("htsat.", "")
        key = key.replace("classifier.conv.", "tscam_conv.").replace("classifier.dense.", "head.")
        original[key] = tensor
    original["bn0.running_var"] = 0.5 + torch.rand(config.num_mel_bins, generator=generator)
    original["bn0.running_mean"] = 10 * torch.randn(config.num_mel_bins, generator=generator)
    if config.use_token_semantic_head:  # the original keeps an unused linear head beside the token-semantic conv
        original["head.weight"] = torch.randn(config.num_labels, config.num_labels, generator=generator)
        original["head.bias"] = torch.zeros(config.num_labels)
    for stage_index, stage in enumerate(model.htsat.stages):
        for block_index, block in enumerate(stage.blocks):
            prefix = f"layers.{stage_index}.blocks.{block_index}."
            # averaged checkpoints store the index as float32: the converter must not trust it
            original[prefix + "attn.relative_position_index"] = block.attn.relative_position_index.float().view(
                block.window**2, block.window**2
            )
            if block.shift_mask is not None:
                original[prefix + "attn_mask"] = block.shift_mask.clone()
    original.update(front_end)
    return {"state_dict": {f"sed_model.{k}": v for k, v in original.items()}, "epoch": 3, "global_step": 100}


CASES = {
    "16kHz-hop160-fmax8k-4stages": dict(
        front=dict(sampling_rate=16000, hop_length=160, f_min=50.0, f_max=8000.0),
        arch=dict(embed_dim=16, depths=[2, 1, 2, 2], num_heads=[2, 4, 4, 8], num_labels=7),
        seconds=10.0,
        single_label=False,
    ),
    "20Hz-16kHz-3stages-single-label": dict(
        front=dict(sampling_rate=32000, hop_length=320, f_min=20.0, f_max=16000.0),
        arch=dict(embed_dim=12, depths=[1, 3, 2], num_heads=[3, 3, 6], num_labels=5),
        seconds=10.0,
        single_label=True,
    ),
    "spec128-mel32-pooled-head": dict(
        front=dict(sampling_rate=32000, hop_length=320, f_min=50.0, f_max=14000.0),
        arch=dict(
            embed_dim=8, depths=[2, 2, 1], num_heads=[2, 2, 4], num_labels=3, spec_size=128, num_mel_bins=32,
            clip_seconds=5.0,
            use_token_semantic_head=False,
        ),
        seconds=5.0,
        single_label=False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_matches_original_for_other_sizes(case, tmp_path):
    spec = CASES[case]
    front, arch = spec["front"], spec["arch"]
    config = HTSATConfig(**front, **arch)
    source = HTSATForAudioClassification(config)
    tensors = front_end_tensors(front["sampling_rate"], 1024, config.num_mel_bins, front["f_min"], front["f_max"])
    checkpoint = to_original_layout(source, tensors, seed=len(case))
    path = tmp_path / "original.ckpt"
    torch.save(checkpoint, path)

    model, feature_extractor, report = convert_original_checkpoint(path, single_label=spec["single_label"], **front)
    assert report.config.depths == arch["depths"] and report.config.num_heads == arch["num_heads"]
    assert report.config.embed_dim == arch["embed_dim"] and report.config.num_labels == arch["num_labels"]
    assert report.config.spec_size == config.spec_size

    rng = np.random.default_rng(0)
    samples = int(spec["seconds"] * front["sampling_rate"])
    waveform = torch.tensor(rng.standard_normal((2, samples)) * 0.1, dtype=torch.float32)
    expected = original_forward(
        checkpoint_state(checkpoint), waveform, front["hop_length"], config.spec_size, config.window_size, config.patch_size
    )
    features = feature_extractor(
        list(waveform.numpy()), sampling_rate=front["sampling_rate"], padding=False, return_tensors="pt"
    )
    reference_mel = log_mel(checkpoint_state(checkpoint), waveform, front["hop_length"])[:, 0]
    assert (features["input_features"] - reference_mel).abs().max() < 1e-3
    with torch.no_grad():
        logits = model(**features).logits
    if spec["single_label"]:  # the original's "clip_ce": raw logits
        assert model.config.problem_type == "single_label_classification"
        assert (logits - expected["clip_logits"]).abs().max() < 1e-4
    else:
        assert (logits.sigmoid() - expected["clip_logits"].sigmoid()).abs().max() < 1e-4
    if config.use_token_semantic_head:
        sed = HTSATForSoundEventDetection(model.config).eval()
        sed.load_state_dict(model.state_dict())
        with torch.no_grad():
            frames = sed(**features).frame_logits.sigmoid()
        steps = frames.shape[1]
        frames = frames.repeat_interleave(expected["framewise_output"].shape[1] // steps, dim=1)
        assert (frames - expected["framewise_output"]).abs().max() < 1e-4


def checkpoint_state(checkpoint: dict) -> dict:
    return {k[len("sed_model.") :]: v for k, v in checkpoint["state_dict"].items()}


# ----------------------------------------------------------------------------------------------- error cases
def _fixture_checkpoint() -> dict:
    return torch.load(shared_path(*FIXTURE, "htsat_tiny.ckpt"), map_location="cpu", weights_only=True)


def test_missing_tensor_is_an_error(tmp_path):
    checkpoint = _fixture_checkpoint()
    del checkpoint["state_dict"]["sed_model.layers.1.blocks.0.mlp.fc2.weight"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="lacks tensors.*stages.1.blocks.0.mlp.fc2.weight"):
        convert_original_checkpoint(tmp_path / "broken.ckpt")


def test_misshaped_tensor_is_an_error(tmp_path):
    checkpoint = _fixture_checkpoint()
    checkpoint["state_dict"]["sed_model.norm.weight"] = torch.ones(5)
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="'norm.weight' has shape \\(5,\\)"):
        convert_original_checkpoint(tmp_path / "broken.ckpt")


def test_wrong_front_end_flags_are_caught_by_the_mel_filters():
    with pytest.raises(ValueError, match="mel filter bank does not match"):
        convert_original_checkpoint(shared_path(*FIXTURE, "htsat_tiny.ckpt"), sampling_rate=16000, hop_length=160)


def test_bare_state_dict_is_accepted(tmp_path):
    checkpoint = _fixture_checkpoint()
    bare = {k[len("sed_model.") :]: v for k, v in checkpoint["state_dict"].items()}
    torch.save(bare, tmp_path / "bare.pt")
    model, _, _ = convert_original_checkpoint(tmp_path / "bare.pt")
    assert model.config.num_labels == 10


def test_script_writes_a_loadable_folder_with_labels(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},/m/{i},"Class, {i}"\n' for i in range(10)))
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "htsat_hf", "convert",
         str(shared_path(*FIXTURE, "htsat_tiny.ckpt")), str(out), "--labels", str(labels)],
        capture_output=True, text=True, check=True,
    )
    assert "ignored" in result.stdout and "logmel_extractor.melW" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["3"] == "Class, 3" and config["model_type"] == "htsat"
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["sampling_rate"] == 32000 and preprocessor["hop_length"] == 320
    loaded = HTSATForAudioClassification.from_pretrained(out)
    assert loaded.config.id2label[3] == "Class, 3"
    assert isinstance(HTSATFeatureExtractor.from_pretrained(out), HTSATFeatureExtractor)


def test_audioset_label_csv_is_read_in_index_order():
    from htsat_hf.weights.convert_original import read_audioset_labels

    labels = read_audioset_labels(shared_path("data", "audioset_class_labels_indices.csv"))
    assert len(labels) == 527 and labels[0] == "Speech" and labels[526] == "Field recording"


def test_label_csv_with_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="527 labels but the checkpoint has 10"):
        convert_original_checkpoint(
            shared_path(*FIXTURE, "htsat_tiny.ckpt"), labels_csv=shared_path("data", "audioset_class_labels_indices.csv")
        )


def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as raised:
        convert_original_checkpoint(path)
    assert "weights_only" not in str(raised.value)  # no advice to unpickle an untrusted file


def test_a_hop_that_changes_the_clip_length_is_a_warning(caplog):
    with caplog.at_level("WARNING"):
        _, _, report = convert_original_checkpoint(shared_path(*FIXTURE, "htsat_tiny.ckpt"), hop_length=160)
    assert report.config.clip_seconds < 10 and len(report.warnings) == 1
    assert "clip_seconds is set to" in report.warnings[0] and report.warnings[0] in caplog.text
