"""`htsat-hf init`, `average` and `ensemble`: model folders written from the command line equal what the package
functions give, and bad folders are usage errors that say what was wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_ensemble import member
from test_pretrained_init import small_swin

from htsat_hf import HTSATConfig, HTSATForAudioClassification
from htsat_hf.commands.cli import main as htsat_hf
from htsat_hf.modeling_htsat_ensemble import HTSATEnsembleModel


def test_init_writes_a_model_started_from_swin(tmp_path, capsys):
    swin = small_swin()
    swin.save_pretrained(tmp_path / "swin")
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])
    config.save_pretrained(tmp_path / "start")  # a saved config.json, file keys and all, as --config takes it

    assert htsat_hf(["init", "swin", str(tmp_path / "swin"), str(tmp_path / "out"), "--config",
                     str(tmp_path / "start" / "config.json"), "--num_labels", "3", "--single_label",
                     "--rgb_reduction", "sum"]) == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    model = HTSATForAudioClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 3 and model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(
        model.htsat.patch_embed.proj.weight,
        swin.state_dict()["swin.embeddings.patch_embeddings.projection.weight"].sum(1, keepdim=True),
    )
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


def test_init_refuses_a_missing_checkpoint_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        htsat_hf(["init", "clap", str(tmp_path / "no-such-clap"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "htsat-hf init: error:" in error and "no-such-clap" in error
    assert not (tmp_path / "out").exists()


def test_average_writes_the_mean_of_the_checkpoints(tmp_path, capsys):
    folders = []
    for seed in (0, 1):
        model = member(seed)
        model.save_pretrained(tmp_path / f"checkpoint-{seed}")
        folders.append(tmp_path / f"checkpoint-{seed}")
    assert htsat_hf(["average", str(tmp_path / "averaged"), *map(str, folders)]) == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    first, second = (load_file(str(folder / "model.safetensors")) for folder in folders)
    averaged = load_file(str(tmp_path / "averaged" / "model.safetensors"))
    name = "classifier.conv.weight"
    torch.testing.assert_close(averaged[name], (first[name] + second[name]) / 2)


def test_average_of_a_folder_without_weights_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        htsat_hf(["average", str(tmp_path / "averaged"), str(tmp_path / "empty")])
    assert exit_.value.code == 2
    assert "No model.safetensors" in capsys.readouterr().err


def test_ensemble_writes_one_model_of_its_members(tmp_path, capsys):
    members = [member(0), member(1, embed_dim=16, depths=(1, 1, 1, 1), heads=(2, 2, 4, 8))]
    for index, model in enumerate(members):
        model.save_pretrained(tmp_path / f"model-{index}")
    assert htsat_hf(["ensemble", str(tmp_path / "ensemble"), str(tmp_path / "model-0"), str(tmp_path / "model-1"),
                     "--average", "logits"]) == 0
    assert "wrote an ensemble of 2 models" in capsys.readouterr().out
    ensemble = HTSATEnsembleModel.from_pretrained(tmp_path / "ensemble").eval()
    assert ensemble.config.average == "logits" and len(ensemble.members) == 2
    features = torch.randn(1, 1001, 64)
    with torch.no_grad():
        expected = torch.stack([m(features).logits for m in members]).mean(0)
        torch.testing.assert_close(ensemble(features).logits, expected, rtol=1e-5, atol=1e-5)


def test_ensemble_refuses_a_folder_of_another_model_type(tmp_path, capsys):
    member(0).save_pretrained(tmp_path / "model-0")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(SystemExit) as exit_:
        htsat_hf(["ensemble", str(tmp_path / "ensemble"), str(tmp_path / "model-0"), str(tmp_path / "other")])
    assert exit_.value.code == 2
    assert "ensemble members must be HTS-AT models" in capsys.readouterr().err
