"""A saved folder works through `trust_remote_code` in a process where `htsat_hf` cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import soundfile as sf
import torch

from conftest import definition_only
from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["htsat_hf"] = None  # the package is not available here
    try:
        import htsat_hf
        raise SystemExit("htsat_hf should not be importable")
    except ImportError:
        pass
    import torch
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification,
                              AutoModelForAudioFrameClassification, pipeline)
    folder, wav = sys.argv[1], sys.argv[2]
    classifier = AutoModelForAudioClassification.from_pretrained(folder, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    detector = AutoModelForAudioFrameClassification.from_pretrained(folder, trust_remote_code=True)
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    features = extractor(list(torch.load(sys.argv[3]).numpy()), sampling_rate=32000, return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**features).logits
    classify = pipeline("audio-classification", model=folder, trust_remote_code=True)
    print(json.dumps({
        "modules": [type(m).__module__ for m in (classifier, backbone, detector, extractor)],
        "classes": [type(m).__name__ for m in (classifier, backbone, detector, extractor)],
        "logits": logits.tolist(),
        "pipeline": classify(wav, top_k=3),
    }))
    """
)


def test_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=4,
                         id2label={0: "dog", 1: "cat", 2: "siren", 3: "rain"})
    model = HTSATForAudioClassification(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    HTSATFeatureExtractor().save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForAudioClassification"}
    assert {p.name for p in folder.glob("*.py")} == {
        "configuration_htsat.py", "modeling_htsat.py", "time_axis.py", "audio_decoding.py", "feature_extraction_htsat.py"
    }  # the definition only: the CPU engine (htsat_hf.engine) does not travel

    rng = np.random.default_rng(0)
    waveform = torch.tensor(rng.standard_normal((1, 320000)) * 0.1, dtype=torch.float32)
    torch.save(waveform, tmp_path / "wave.pt")
    stereo = rng.standard_normal((44100 * 3, 2)).astype(np.float32) * 0.1  # 44.1 kHz stereo file
    sf.write(tmp_path / "clip.wav", stereo, 44100)
    (tmp_path / "remote.py").write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(folder), str(tmp_path / "clip.wav"), str(tmp_path / "wave.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules") for module in report["modules"])
    assert report["classes"] == [
        "HTSATForAudioClassification", "HTSATModel", "HTSATForSoundEventDetection", "HTSATFeatureExtractor"
    ]
    features = HTSATFeatureExtractor()(waveform.numpy(), sampling_rate=32000, return_tensors="pt")
    with torch.no_grad(), definition_only(model):
        expected = model(**features).logits
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=0, atol=1e-6)
    assert len(report["pipeline"]) == 3
    assert {item["label"] for item in report["pipeline"]} <= {"dog", "cat", "siren", "rain"}
    assert all(0.0 <= item["score"] <= 1.0 for item in report["pipeline"])


SED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["htsat_hf"] = None
    import numpy as np
    from transformers import pipeline
    detector = pipeline("sound-event-detection", model=sys.argv[1], trust_remote_code=True)
    audio = np.random.default_rng(0).standard_normal(32000 * 25).astype(np.float32) * 0.05
    result = detector(audio, threshold=0.0, return_frame_scores=True)
    print(json.dumps({"module": type(detector).__module__, "steps": len(result["frame_times"]),
                      "labels": result["labels"], "events": len(result["events"])}))
    """
)


def test_sound_event_detection_pipeline_as_remote_code(tmp_path):
    from htsat_hf.modeling_htsat import HTSATForSoundEventDetection
    from htsat_hf.pipeline_htsat import add_remote_sed_pipeline

    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=2,
                         id2label={0: "bird", 1: "car"})
    folder = tmp_path / "model"
    HTSATForSoundEventDetection(config).save_pretrained(folder)
    HTSATFeatureExtractor().save_pretrained(folder)
    add_remote_sed_pipeline(folder)
    assert {"pipeline_htsat.py", "audio_decoding.py", "sed_postprocessing.py", "scores.py", "inference_checks.py"} <= {
        p.name for p in folder.glob("*.py")}
    (tmp_path / "sed.py").write_text(SED_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, str(tmp_path / "sed.py"), str(folder)], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules")
    assert report["steps"] == 80 and report["labels"] == ["bird", "car"]  # 25 s at 3.2 steps per second
    assert report["events"] >= 2  # threshold 0: every class active throughout
