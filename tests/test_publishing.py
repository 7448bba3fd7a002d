"""Publishing: the prepared repository parses as a model card, loads with and without the package, holds no pickle;
the upload goes through a stand-in API client (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from conftest import definition_only
from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification, HTSATForSoundEventDetection
from htsat_hf.modeling_htsat_ensemble import HTSATEnsembleModel
from htsat_hf.weights.publishing import (
    CardSettings,
    check_publishable,
    prepare_repository,
    publish,
    read_results,
    upload_repository,
)

LABELS = {0: "dog", 1: "cat", 2: "siren", 3: "rain"}


def small_model(seed: int = 0, **settings) -> HTSATForAudioClassification:
    torch.manual_seed(seed)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], id2label=LABELS, **settings)
    return HTSATForAudioClassification(config).eval()


@pytest.fixture
def trained_folder(tmp_path):
    """What a training run leaves: weights, config, preprocessor, metrics, and a pickled training_args.bin."""
    folder = tmp_path / "run"
    model = small_model()
    model.save_pretrained(folder)
    HTSATFeatureExtractor().save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"eval_mAP": 0.47123, "eval_mAUC": 0.9712,
                                                         "eval_dprime": 2.71, "eval_loss": 0.02, "epoch": 3.0}))
    torch.save({"learning_rate": 1e-3}, folder / "training_args.bin")
    return folder, model


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and what the folder held when uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_prepared_repository_card_and_files(trained_folder, tmp_path):
    source, model = trained_folder
    settings = CardSettings(repo_id="someone/htsat-test", dataset_id="agkphysics/AudioSet", dataset_name="AudioSet",
                            base_model="microsoft/swin-tiny-patch4-window7-224", tags=["audioset"])
    prepared = prepare_repository(source, tmp_path / "hub", settings)
    required = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_htsat.py",
                "modeling_htsat.py", "time_axis.py", "audio_decoding.py", "feature_extraction_htsat.py"}
    assert required <= set(prepared.files)
    assert set(prepared.files) - required <= {"pipeline_htsat.py", "sed_postprocessing.py",
                                              "scores.py", "inference_checks.py"}  # SED
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in prepared.files)
    assert "all_results.json" not in prepared.files and "training_args.bin" not in prepared.files

    card = ModelCard.load(tmp_path / "hub" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "audio-classification"
    assert data["license"] == "mit" and data["datasets"] == ["agkphysics/AudioSet"]
    assert data["base_model"] == "microsoft/swin-tiny-patch4-window7-224"
    assert {"audio", "htsat", "custom_code", "sound-event-detection", "audioset"} <= set(data["tags"])
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"mAP": 0.4712, "mAUC": 0.9712, "d'": 2.71}
    assert {result.dataset_type for result in card.data.eval_results} == {"agkphysics/AudioSet"}
    text = card.text
    usage = 'pipeline("audio-classification", model="someone/htsat-test", trust_remote_code=True)'
    for piece in ("## How to use", usage, "## Intended use", "## Limitations", "@inproceedings{chen2022hts",
                  "| AudioSet | test | mAP | 0.4712 |"):
        assert piece in text, piece

    reloaded = HTSATForAudioClassification.from_pretrained(tmp_path / "hub").eval()
    features = torch.randn(1, 1001, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(features).logits, model(features).logits)


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["htsat_hf"] = None  # the package is not available here
    import numpy as np, torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline
    folder = sys.argv[1]
    model = AutoModelForAudioClassification.from_pretrained(folder, trust_remote_code=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    waveform = np.random.default_rng(0).standard_normal(32000 * 2).astype(np.float32) * 0.1
    with torch.no_grad():
        logits = model(**extractor(waveform, sampling_rate=32000, return_tensors="pt")).logits
    classify = pipeline("audio-classification", model=folder, trust_remote_code=True)
    events = None
    if "custom_pipelines" in json.load(open(folder + "/config.json")):
        detect = pipeline("sound-event-detection", model=folder, trust_remote_code=True)
        events = detect(waveform, return_frame_scores=True)["frame_scores"].shape[0]
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "top": classify(waveform, top_k=2),
                      "frames": events}))
    """
)


def test_prepared_repository_loads_as_remote_code(trained_folder, tmp_path):
    source, model = trained_folder
    prepare_repository(source, tmp_path / "hub", CardSettings(repo_id="someone/htsat-test"))
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "hub")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules")
    waveform = np.random.default_rng(0).standard_normal(32000 * 2).astype(np.float32) * 0.1
    with torch.no_grad(), definition_only(model):
        expected = model(**HTSATFeatureExtractor()(waveform, sampling_rate=32000, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=0, atol=1e-6)
    assert len(report["top"]) == 2
    if (tmp_path / "hub" / "pipeline_htsat.py").exists():  # the SED pipeline ships with the repository
        assert report["frames"] > 0


def test_upload_through_a_stand_in_api_and_dry_run(trained_folder, tmp_path):
    source, _ = trained_folder
    api = RecordingApi()
    settings = CardSettings(repo_id="someone/htsat-test")
    prepared, dry = publish(source, tmp_path / "hub", settings, dry_run=True, api=api)
    assert api.calls == [] and dry.dry_run and {name for name, _ in dry.files} == set(prepared.files)
    assert "would send" in dry.describe()

    result = upload_repository(prepared.folder, "someone/htsat-test", api=api, private=True)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}
    upload = api.calls[1][2]
    assert upload["folder_path"] == str(prepared.folder) and upload["repo_type"] == "model"
    assert sorted(upload["allow_patterns"]) == sorted(prepared.files)
    assert result.commit_url.endswith("/commit/abc")


def test_pickles_are_refused(tmp_path):
    model = small_model()
    source = tmp_path / "pickled"
    source.mkdir()
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    HTSATFeatureExtractor().save_pretrained(source)
    with pytest.raises(ValueError, match="pickle"):
        prepare_repository(source, tmp_path / "hub", CardSettings(repo_id="someone/x"))

    prepared = prepare_repository(source, tmp_path / "converted", CardSettings(repo_id="someone/x"),
                                  convert_trusted_pickle=True)
    assert "model.safetensors" in prepared.files and "pytorch_model.bin" not in prepared.files
    reloaded = HTSATForAudioClassification.from_pretrained(prepared.folder).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)

    torch.save({}, prepared.folder / "extra.pt")  # something pickled slipped into the folder
    with pytest.raises(ValueError, match="pickled"):
        upload_repository(prepared.folder, "someone/x", api=RecordingApi())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a prepared repository"):
        check_publishable(empty)


def test_single_label_cross_validation_results_and_ensembles(tmp_path):
    model = small_model(problem_type="single_label_classification")
    source = tmp_path / "esc50"
    model.save_pretrained(source)
    (source / "cv_results.json").write_text(json.dumps({"folds": {}, "eval_accuracy_mean": 0.9731,
                                                        "eval_accuracy_std": 0.01}))
    assert read_results(source / "cv_results.json") == {"accuracy": 0.9731}
    settings = CardSettings(repo_id="someone/htsat-esc50", dataset_id="ashraq/esc50", dataset_name="ESC-50")
    prepared = prepare_repository(source, tmp_path / "hub", settings)
    assert any("preprocessor_config.json" in note for note in prepared.notes)  # written from the config
    card = ModelCard.load(prepared.folder / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("accuracy", 0.9731)]
    assert "logits.softmax(-1)" in card.text

    torch.manual_seed(1)
    members = [HTSATForSoundEventDetection(small_model(seed).config).eval() for seed in (1, 2)]
    ensemble_dir = tmp_path / "ensemble"
    HTSATEnsembleModel.from_members(members).save_pretrained(ensemble_dir)
    HTSATFeatureExtractor().save_pretrained(ensemble_dir)
    prepared = prepare_repository(ensemble_dir, tmp_path / "hub-ensemble", CardSettings(repo_id="someone/ens"))
    assert "modeling_htsat_ensemble.py" in prepared.files
    card = ModelCard.load(prepared.folder / "README.md")
    assert "ensemble" in card.data.tags and "an ensemble of 2 models" in card.text


def test_publish_script_dry_run(trained_folder, tmp_path, monkeypatch, capsys, repo_root):
    source, _ = trained_folder
    from htsat_hf.commands.cli import main

    assert main(["publish", str(source), "--repo_id", "someone/htsat-test", "--output_dir", str(tmp_path / "hub"),
                 "--dataset_id", "agkphysics/AudioSet", "--dry_run"]) == 0
    output = capsys.readouterr().out
    assert "would send" in output and "model.safetensors" in output and "training_args.bin" not in output


def test_every_data_file_the_package_reads_ships_in_wheels(repo_root):
    """Model-card templates, metric modules and label mappings live in the package and are declared as package data,
    so an installed wheel (not only a checkout) can publish, load local metrics and map labels."""
    import configparser
    import fnmatch

    from htsat_hf.weights.publishing import find_template

    package = repo_root / "src" / "htsat_hf"
    assert find_template().resolve().is_relative_to(package.resolve())
    setup = configparser.ConfigParser()
    setup.read(repo_root / "setup.cfg")
    patterns = setup["options.package_data"]["htsat_hf"].split()
    data_files = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
        and not (path.suffix == ".py" and (path.parent / "__init__.py").exists())  # modules of packages ship anyway
    ]
    assert any(name.startswith("weights/model_cards/") for name in data_files)
    missing = [name for name in data_files if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert not missing, f"not declared in setup.cfg [options.package_data]: {missing}"
