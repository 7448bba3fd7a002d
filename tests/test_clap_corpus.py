"""#31 stage 2: phrases across a corpus (Annotator, the annotate command), search over joint-space embeddings, and
phrases live (LiveDetector). Reuses tests/test_clap.py's small random CLAP and locally trained tokenizer."""

from __future__ import annotations

import json

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


# -------------------------------------------------------------------------------------------------------- search
def planted_corpus(tmp_path, planted_vector, rows=3000, dim=64, planted=(17, 1234, 2999)):
    from htsat_hf.benchmarks.search import random_embeddings, write_embedding_corpus

    embeddings = random_embeddings(rows, dim, seed=5)
    noise_rng = np.random.default_rng(6)
    for strength, row in zip((0.0, 0.05, 0.1), planted):  # the planted rows, each a little further from the vector
        vector = planted_vector + strength * noise_rng.standard_normal(dim).astype(np.float32)
        embeddings[row] = vector / np.linalg.norm(vector)
    durations = noise_rng.uniform(1.0, 30.0, rows)
    return write_embedding_corpus(tmp_path / "planted", embeddings, durations, rows_per_shard=700), durations


def test_search_returns_the_planted_rows_first(tmp_path):
    from htsat_hf.annotation.search import EmbeddingIndex

    vector = np.random.default_rng(7).standard_normal(64).astype(np.float32)
    vector /= np.linalg.norm(vector)
    out, durations = planted_corpus(tmp_path, vector)
    index = EmbeddingIndex.open(out)
    assert len(index) == 3000 and len(index.batches) == 5  # one record batch per shard: merged across batches
    other = np.random.default_rng(8).standard_normal(64).astype(np.float32)
    hits = index.search_embeddings(["planted", "other"], np.stack([vector, other / np.linalg.norm(other)]), top_k=5)
    assert [hit.id for hit in hits["planted"][:3]] == ["input-17", "input-1234", "input-2999"]
    assert hits["planted"][0].score == pytest.approx(1.0, abs=1e-5)
    assert hits["planted"][2].score > hits["planted"][3].score + 0.3
    assert (hits["planted"][1].onset, hits["planted"][1].offset) == (0.0, pytest.approx(durations[1234]))
    # the top k equal a full sort of every row's score
    stored = np.concatenate([view for view in index._views])
    expected = np.argsort(-(stored @ other / np.linalg.norm(other)))[:5]
    assert [hit.id for hit in hits["other"]] == [f"input-{i}" for i in expected]
    assert EmbeddingIndex.open(out).path == index.path  # built once, then memory-mapped


def test_search_embeds_phrases_with_the_text_tower_only(clap_setup, tmp_path):
    from htsat_hf.annotation.search import search, text_embeddings

    model, tokenizer = clap_setup["model"], clap_setup["tokenizer"]
    siren = text_embeddings(model, ["a siren"], tokenizer)[0]
    out, _ = planted_corpus(tmp_path, siren)
    hits = search(out, ["a siren", "a dog barking"], model=model, tokenizer=tokenizer, top_k=3)
    assert [hit.id for hit in hits["a siren"]] == ["input-17", "input-1234", "input-2999"]
    assert [hit.rank for hit in hits["a siren"]] == [1, 2, 3]


def test_search_over_an_annotated_folder(clap_setup, clap_corpus, tmp_path, capsys):
    from htsat_hf.annotation.search import SearchError, search, text_embeddings
    from htsat_hf.commands.search import main

    folder, out, model = str(clap_setup["folder"]), tmp_path / "out", clap_setup["model"]
    text = text_embeddings(model, [LABELS[1]], clap_setup["tokenizer"])[0]
    # one row per input (embeddings), then one per window (window_embeddings, searched where a folder has them)
    annotator = Annotator(folder, tasks=("tags", "embeddings"), device="cpu", text_labels=LABELS)
    annotate_corpus(annotator, file_source(clap_corpus), out, model_name=folder, num_workers=0, progress=False)
    hits = search(out, LABELS[1], top_k=5)[LABELS[1]]  # the model the manifest names
    table = pd.read_parquet(out).set_index("id")
    expected = sorted(((float(np.dot(np.asarray(e, np.float32), text)), i) for i, e in table["embedding"].items()),
                      reverse=True)
    assert [(hit.id, hit.onset, hit.offset) for hit in hits] == [(i, 0.0, table.loc[i, "duration_s"])
                                                                 for _, i in expected]
    np.testing.assert_allclose([hit.score for hit in hits], [score for score, _ in expected], atol=1e-5)
    out = tmp_path / "windows"
    annotator = Annotator(folder, tasks=("window_embeddings",), device="cpu", text_labels=LABELS)
    annotate_corpus(annotator, file_source(clap_corpus), out, model_name=folder, num_workers=0, progress=False)
    table = pd.read_parquet(out).set_index("id")
    long_file = clap_corpus[-1]  # 23 s: windows at 0, 5, 10 s and the one ending with the input
    windows = table.loc[long_file, "window_embeddings"]
    assert [(w["onset"], w["offset"]) for w in windows] == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0),
                                                            (pytest.approx(13.0, abs=0.02), 23.0)]
    features = clap_setup["extractor"](sf.read(long_file, dtype="float32")[0], sampling_rate=RATE, padding=False,
                                       return_tensors="pt")["input_features"]
    with torch.no_grad():
        tokens, _, _ = model.encode_audio(features)
        joint = model.project_audio(tokens.mean(dim=2))[0].numpy()  # each window's get_audio_features
    np.testing.assert_allclose(np.stack([w["embedding"] for w in windows]), joint, atol=1e-5)
    assert [(w["onset"], w["offset"]) for w in table.loc[clap_corpus[0], "window_embeddings"]] == [(0.0, 3.0)]
    hits = search(out, LABELS[1], top_k=4)[LABELS[1]]
    every = sorted(((float(np.dot(np.asarray(w["embedding"], np.float32), text)), i, w["onset"])
                    for i, row in table["window_embeddings"].items() for w in row), reverse=True)
    assert [(hit.id, hit.onset) for hit in hits] == [(i, onset) for _, i, onset in every[:4]]
    np.testing.assert_allclose([hit.score for hit in hits], [score for score, _, _ in every[:4]], atol=1e-5)
    capsys.readouterr()
    assert main([str(out), LABELS[1], "--json", "--top_k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == [hit.id for hit in hits[:2]]
    labelled = tmp_path / "no_embeddings"
    annotate_corpus(Annotator(folder, tasks=("tags",), device="cpu", text_labels=LABELS), file_source(clap_corpus[:1]),
                    labelled, model_name=folder, num_workers=0, progress=False)
    with pytest.raises(SearchError, match="without embeddings"):
        search(labelled, "a siren")


# ---------------------------------------------------------------------------------------------------------- live
@pytest.mark.parametrize("options", [
    {},
    {"calibration": "sigmoid", "background_label": "silence"},
])
def test_live_scores_for_phrases_equal_the_pipeline(clap_setup, options):
    from htsat_hf.live.detector import LiveDetector

    folder = str(clap_setup["folder"])
    audio = noise(23.7, 120)
    audio[8 * RATE : 14 * RATE] = 0.0
    offline = pipeline("sound-event-detection", model=folder)
    reference = offline(audio, candidate_labels=LABELS, return_frame_scores=True, **options)
    threshold = float(np.quantile(reference["frame_scores"], 0.7))
    expected = offline(audio, candidate_labels=LABELS, threshold=threshold, min_duration_seconds=0.3, **options)
    assert expected["events"]
    detector = LiveDetector(folder, hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False, threshold=threshold,
                            min_duration_seconds=0.3, device="cpu", text_labels=LABELS, **options)
    assert detector.labels == LABELS and detector.config.long_input_hop_seconds == 5.0
    updates = []
    for start in range(0, len(audio), RATE):
        updates += detector.push(audio[start : start + RATE])
    updates += detector.flush()
    scores = np.concatenate([update.step_scores for update in updates])
    np.testing.assert_allclose(scores, reference["frame_scores"], atol=1e-5)
    events = sorted((e for u in updates for e in u.events), key=lambda e: (e["onset"], e["label"]))
    expected = sorted(expected["events"], key=lambda e: (e["onset"], e["label"]))
    assert [(e["label"], e["onset"], e["offset"]) for e in events] == [
        (e["label"], e["onset"], e["offset"]) for e in expected]  # scores as the steps', within float rounding
    np.testing.assert_allclose([e["score"] for e in events], [e["score"] for e in expected], atol=1e-5)
    # a window's tags are its own clip scores (from its pooled embedding, not the mean of its steps)
    first = updates[0]
    features = clap_setup["extractor"](audio[: 10 * RATE], sampling_rate=RATE, padding=False,
                                       return_tensors="pt")["input_features"]
    with torch.no_grad():
        window = detector.model(features[:, : detector.window_frames])
    scores = torch.softmax(window.logits[0], -1) if not options else torch.sigmoid(window.logits[0])
    assert first.tags[0]["score"] == pytest.approx(float(scores.max()), abs=1e-5)


def test_listen_command_takes_phrases(clap_setup, tmp_path):
    from htsat_hf.commands.listen import build_parser

    args = build_parser().parse_args(["--model", "m", "--stdin", "--text-labels", "a siren", "a dog barking",
                                      "--calibration", "sigmoid", "--background-label", "silence"])
    from htsat_hf.annotation.text_queries import text_query_from_arguments

    assert text_query_from_arguments(args) == dict(
        text_labels=["a siren", "a dog barking"], hypothesis_template=None, calibration="sigmoid",
        background_label="silence", calibration_bias=None)


def test_search_benchmark_runs_on_a_small_corpus(capsys):
    from htsat_hf.commands.cli import main

    assert main(["benchmark", "search", "--rows", "3000", "--dim", "32", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert '"rows": 3000' in printed and "ms per query" in printed
