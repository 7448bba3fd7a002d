"""#31 stage 2: phrases across a corpus (Annotator, the annotate command), search over joint-space embeddings, and
phrases live (LiveDetector). Reuses tests/test_clap.py's small random CLAP and locally trained tokenizer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from test_clap import LABELS, RATE, clap_setup, noise  # noqa: F401  (clap_setup is a fixture)
from transformers import pipeline

from htsat_hf.annotation.annotator import Annotator
from htsat_hf.annotation.corpus import annotate_corpus
from htsat_hf.annotation.sources import file_source
from htsat_hf.annotation.store import ManifestMismatchError

SECONDS = [3.0, 10.0, 23.0]


@pytest.fixture(scope="module")
def clap_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clap_corpus")
    files = []
    for index, seconds in enumerate(SECONDS):
        audio = noise(seconds, 100 + index)
        audio[int(seconds * RATE * 0.3) : int(seconds * RATE * 0.6)] = 0.0  # the scores change over time
        path = folder / f"clip{index}.wav"
        sf.write(path, audio, RATE, subtype="FLOAT")
        files.append(str(path))
    return files


def annotate(annotator, files):
    return {row["id"]: row for row in annotator.annotate([(f, f) for f in files])}


@pytest.mark.parametrize("options", [
    {},
    {"calibration": "sigmoid", "background_label": "silence", "calibration_bias": 0.5},
])
def test_corpus_rows_for_phrases_equal_the_pipelines(clap_setup, clap_corpus, options):
    folder, model = str(clap_setup["folder"]), clap_setup["model"]
    detect = pipeline("sound-event-detection", model=folder)
    scores = detect(clap_corpus[-1], candidate_labels=LABELS, return_frame_scores=True, **options)["frame_scores"]
    threshold = float(np.quantile(scores, 0.7))  # random weights: a threshold that gives events
    annotator = Annotator(folder, tasks=("tags", "events", "embeddings", "frame_scores"), top_k=2, batch_size=3,
                          threshold=threshold, device="cpu", text_labels=LABELS, **options)
    assert annotator.model_labels == LABELS
    rows = annotate(annotator, clap_corpus)
    zero_shot = pipeline("zero-shot-audio-classification", model=folder)
    extractor = clap_setup["extractor"]
    events = 0
    for path in clap_corpus:
        row, audio = rows[path], sf.read(path, dtype="float32")[0]
        expected = detect(path, candidate_labels=LABELS, threshold=threshold, return_frame_scores=True, **options)
        assert expected["labels"] == LABELS
        np.testing.assert_allclose(row["frame_scores"], expected["frame_scores"], atol=1e-5)
        assert row["events"] == expected["events"], path
        events += len(row["events"])
        assert row["frame_step_s"] == pytest.approx(expected["frame_times"][1])
        features = extractor(audio, sampling_rate=RATE, padding="repeat", return_tensors="pt")["input_features"]
        with torch.no_grad():
            joint = model.get_audio_features(features).pooler_output[0].numpy()
        np.testing.assert_allclose(row["embedding"], joint, atol=1e-5)  # CLAP's joint space, per clip
        if not options:  # softmax across the phrases: CLAP's zero-shot scores
            tags = zero_shot(audio, candidate_labels=LABELS)[:2]
            assert [t["label"] for t in row["tags"]] == [t["label"] for t in tags]
            np.testing.assert_allclose([t["score"] for t in row["tags"]], [t["score"] for t in tags], atol=1e-5)
    assert events > 0


def test_phrases_need_a_clap_model_and_a_clap_model_needs_phrases(clap_setup, tmp_path):
    folder = str(clap_setup["folder"])
    with pytest.raises(ValueError, match="text_labels"):
        Annotator(folder, device="cpu")
    with pytest.raises(ValueError, match="go with text_labels"):
        Annotator(folder, device="cpu", calibration="sigmoid")
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# what to find\na dog barking\n\na siren\n")
    annotator = Annotator(folder, device="cpu", text_labels=str(phrases))
    assert annotator.model_labels == ["a dog barking", "a siren"]


def test_resume_refuses_changed_phrases(clap_setup, clap_corpus, tmp_path):
    folder, out = str(clap_setup["folder"]), tmp_path / "out"
    source = file_source(clap_corpus[:1])
    first = Annotator(folder, tasks=("tags",), device="cpu", text_labels=LABELS)
    annotate_corpus(first, source, out, model_name=folder, num_workers=0, progress=False)
    again = Annotator(folder, tasks=("tags",), device="cpu", text_labels=LABELS)
    annotate_corpus(again, file_source(clap_corpus[:1]), out, model_name=folder, num_workers=0, progress=False)
    assert list(pd.read_parquet(out)["id"]) == clap_corpus[:1]
    for changed in ({"text_labels": LABELS[:2]}, {"text_labels": LABELS, "background_label": "silence"}):
        annotator = Annotator(folder, tasks=("tags",), device="cpu", **changed)
        with pytest.raises(ManifestMismatchError, match="text_query"):
            annotate_corpus(annotator, file_source(clap_corpus[:1]), out, model_name=folder, num_workers=0,
                            progress=False)


def test_annotate_command_takes_phrases(clap_setup, clap_corpus, tmp_path):
    from htsat_hf.commands.annotate import main

    folder, out = str(clap_setup["folder"]), tmp_path / "out"
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(LABELS[:2]) + "\n")
    main(["--model_name_or_path", folder, "--files", *clap_corpus[:2], "--output_dir", str(out), "--tasks", "tags",
          "events", "embeddings", "--text_labels", str(phrases), "--calibration", "sigmoid", "--background_label",
          "silence", "--threshold", "0.5", "--num_workers", "0", "--device", "cpu", "--no_progress"])
    table = pd.read_parquet(out).set_index("id")
    annotator = Annotator(folder, tasks=("tags", "events", "embeddings"), device="cpu", text_labels=LABELS[:2],
                          calibration="sigmoid", background_label="silence", threshold=0.5)
    for path, row in annotate(annotator, clap_corpus[:2]).items():
        assert [t["label"] for t in table.loc[path, "tags"]] == [t["label"] for t in row["tags"]]
        assert len(table.loc[path, "events"]) == len(row["events"])
        np.testing.assert_allclose(np.asarray(table.loc[path, "embedding"]), row["embedding"], atol=1e-6)
    with pytest.raises(SystemExit, match="text_labels"):
        main(["--model_name_or_path", folder, "--files", clap_corpus[0], "--output_dir", str(tmp_path / "o2"),
              "--num_workers", "0", "--device", "cpu", "--no_progress"])
