"""A folder whose weights were not loaded, or whose two config files disagree, is refused by every entry point
(issue #32), with the keys / the two files and their values named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_detector
from safetensors.torch import load_file, save_file
from transformers import AutoModelForAudioFrameClassification, pipeline

from htsat_hf.inference_checks import check_inference_ready


def rewrite_weights(folder: Path, change) -> None:
    """Rewrites `model.safetensors` as `change(state_dict)` returns it."""
    path = folder / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    """Sets (or, for a value of None, deletes) keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def entry_points(folder: Path) -> dict:
    """Builds each entry point on `folder`: the error each raised (None when it was built)."""
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    builders = {
        "sound-event-detection": lambda: pipeline("sound-event-detection", model=str(folder)),
        "audio-classification": lambda: pipeline("audio-classification", model=str(folder)),
        "annotator": lambda: Annotator(str(folder)),
        "live": lambda: LiveDetector(str(folder)),
    }
    errors = {}
    for name, build in builders.items():
        try:
            build()
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    return errors


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_tiny_detector(tmp_path / "model")


def test_keys_with_a_module_prefix_are_refused_everywhere(folder, capsys):
    from htsat_hf.commands import detect

    rewrite_weights(folder, lambda weights: {"module." + key: value for key, value in weights.items()})
    for name, error in entry_points(folder).items():
        assert error is not None, f"{name} ran a randomly initialised model"
        assert "87 missing" in error and "classifier.conv.weight" in error, name
        assert "87 unexpected" in error and "module.classifier.conv.weight" in error, name
        assert "prefix 'module.'" in error, name
    audio = folder.parent / "a.wav"
    import soundfile as sf

    sf.write(audio, np.zeros(32000 * 2, dtype=np.float32), 32000)
    assert detect.main([str(audio), "--model", str(folder)]) == 2
    assert "prefix 'module.'" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused_with_the_keys_named(folder):
    edit_json(folder / "config.json", depths=[1, 1, 1, 1])  # the checkpoint has two blocks in stage 2
    errors = entry_points(folder)
    for name, error in errors.items():
        assert error is not None and "unexpected" in error and "htsat.stages.2.blocks.1." in error, name
        assert "another architecture" in error, name


def test_documented_ignorable_keys_and_a_good_folder_pass(folder):
    rewrite_weights(folder, lambda weights: {**weights, "htsat.stages.0.blocks.0.attn.relative_position_index":
                                             torch.zeros(4, dtype=torch.long)})
    assert set(entry_points(folder).values()) == {None}
    model, info = AutoModelForAudioFrameClassification.from_pretrained(folder, output_loading_info=True)
    assert model.loading_info is info and not info["missing_keys"] and not info["unexpected_keys"]


def test_a_model_built_in_memory_is_not_refused():
    from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection

    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=3)
    check_inference_ready(HTSATForSoundEventDetection(config), HTSATFeatureExtractor.for_model_config(config))


def test_config_files_that_disagree_are_refused_naming_both(folder):
    edit_json(folder / "preprocessor_config.json", sampling_rate=16000)
    for name, error in entry_points(folder).items():
        assert error is not None, name
        assert "preprocessor_config.json says sampling_rate=16000 but config.json says sampling_rate=32000" in error


def test_a_setting_one_file_lacks_is_named_with_its_default(folder):
    edit_json(folder / "config.json", hop_length=640)
    edit_json(folder / "preprocessor_config.json", hop_length=None)
    for name, error in entry_points(folder).items():
        assert error is not None, name
        assert ("preprocessor_config.json does not set hop_length (so the default 320) but config.json says "
                "hop_length=640") in error


def test_a_feature_extractor_passed_in_is_checked_against_the_model(folder):
    from htsat_hf import HTSATFeatureExtractor

    model = AutoModelForAudioFrameClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="feature_size=32 but config.json says num_mel_bins=64"):
        pipeline("sound-event-detection", model=model, feature_extractor=HTSATFeatureExtractor(feature_size=32))


def test_an_ensemble_folder_whose_weights_do_not_fit_is_refused(tmp_path):
    from htsat_hf import HTSATConfig, HTSATEnsembleModel, HTSATFeatureExtractor, HTSATForSoundEventDetection

    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=3)
    ensemble = HTSATEnsembleModel.from_members([HTSATForSoundEventDetection(config) for _ in range(2)])
    ensemble.save_pretrained(tmp_path)
    HTSATFeatureExtractor().save_pretrained(tmp_path)
    assert pipeline("sound-event-detection", model=str(tmp_path)).model.loading_info["missing_keys"] == set()
    rewrite_weights(tmp_path, lambda weights: {k: v for k, v in weights.items() if not k.startswith("members.1.")})
    with pytest.raises(ValueError, match=r"missing .*members\.1\.classifier\.conv"):
        pipeline("sound-event-detection", model=str(tmp_path))


def test_weights_skipped_for_another_shape_are_refused(folder):
    """`ignore_mismatched_sizes=True` (e.g. a head for another label set) leaves those weights random: refused."""
    edit_json(folder / "config.json", id2label={str(i): f"c{i}" for i in range(4)},
              label2id={f"c{i}": i for i in range(4)})
    with pytest.raises(ValueError, match=r"2 with another shape .*classifier\.conv\.bias \(3,\) in the checkpoint, "
                                         r"\(4,\) in the model"):
        pipeline("sound-event-detection", model=str(folder), model_kwargs={"ignore_mismatched_sizes": True})


def test_a_head_fine_tuned_after_ignore_mismatched_sizes_is_usable(folder):
    """Loaded with a new head (`ignore_mismatched_sizes`), the model is refused as it stands; once trained (train()),
    the load report no longer describes its weights and every entry point takes it."""
    from htsat_hf import HTSATForSoundEventDetection

    labels = json.loads((folder / "config.json").read_text())["id2label"]
    model = HTSATForSoundEventDetection.from_pretrained(folder, num_labels=len(labels) + 2, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="another shape"):
        check_inference_ready(model)
    model.train()  # as the Trainer does before it changes the weights
    model.eval()
    check_inference_ready(model)
    from htsat_hf import HTSATFeatureExtractor

    extractor = HTSATFeatureExtractor.from_pretrained(folder)
    assert pipeline("audio-classification", model=model, feature_extractor=extractor) is not None
