"""Corpus annotation: rows equal the two pipelines, windows packed across files, bad files recorded, exactly-once
resume, 2-process accelerate equal to 1 process, refusal of changed options, and the datasets / Ray recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import needs_torchcodec, save_tiny_classifier
from test_training_end_to_end import free_port, training_env
from transformers import pipeline

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification
from htsat_hf.annotation import Annotator
from htsat_hf.annotation.cli import main as annotate_main
from htsat_hf.annotation.corpus import annotate_corpus
from htsat_hf.annotation.sources import file_source
from htsat_hf.annotation.store import committed_shards, read_errors, read_manifest
from htsat_hf.annotation.windows import count_windows
from htsat_hf.audio_decoding import stream_with_ffmpeg

REPO = Path(__file__).resolve().parents[1]
TASKS = ("tags", "events", "embeddings", "frame_scores")
# (seconds, rate, channels, format): several rates, wav/flac/mp3, mono/stereo, 0.5 s to 75 s (the longest spans three
# of the decoder's 30-s read blocks and many windows; it was 3 min, two thirds of every pass over the corpus)
CORPUS = [
    (0.5, 16000, 1, "wav"), (3.0, 44100, 2, "flac"), (7.3, 22050, 1, "mp3"), (10.1, 32000, 1, "wav"),
    (25.0, 48000, 2, "flac"), (41.7, 32000, 2, "mp3"), (75.0, 16000, 1, "flac"), (1.2, 8000, 1, "wav"),
]
BAD = ["corrupt.flac", "empty.wav", "one_sample.wav"]


def write_clip(path: Path, seconds: float, rate: int, channels: int, rng: np.random.Generator) -> None:
    """Noise bursts and tones that switch on and off, so a random model's scores move over time."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    envelope = (np.sin(2 * np.pi * t / rng.uniform(1.5, 4.0)) > 0).astype(np.float32)
    mono = 0.2 * envelope * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(n)
    audio = np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)
    if path.suffix == ".mp3":
        wav = path.with_suffix(".tmp.wav")
        sf.write(wav, audio, rate)
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(wav), str(path)], check=True)
        wav.unlink()
    else:
        sf.write(path, audio, rate)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    files = []
    for index, (seconds, rate, channels, fmt) in enumerate(CORPUS):
        path = root / f"clip{index}_{rate}_{channels}ch.{fmt}"
        write_clip(path, seconds, rate, channels, rng)
        files.append(str(path))
    (root / "corrupt.flac").write_bytes(b"fLaC" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 32000)
    sf.write(root / "one_sample.wav", np.zeros(1, np.float32), 32000)
    files += [str(root / name) for name in BAD]
    return root, files


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("model"), num_labels=6)


@pytest.fixture(scope="module")
def annotator(model_folder):
    return Annotator(str(model_folder), tasks=TASKS, top_k=4, batch_size=4, threshold=0.5, device="cpu")


@pytest.fixture(scope="module")
def rows(annotator, corpus):
    _, files = corpus
    return {row.id if hasattr(row, "stage") else row["id"]: row for row in annotator.annotate([(f, f) for f in files])}


def decoded_as_a_file(path: str, rate: int = 32000) -> np.ndarray:
    return np.concatenate(list(stream_with_ffmpeg(path, rate, rate * 60)))


def test_rows_equal_the_two_pipelines(model_folder, corpus, rows):
    _, files = corpus
    classify = pipeline("audio-classification", model=str(model_folder))
    detect = pipeline("sound-event-detection", model=str(model_folder))
    backbone = HTSATForAudioClassification.from_pretrained(model_folder).eval()
    extractor = HTSATFeatureExtractor.from_pretrained(model_folder)
    for path in files[: len(CORPUS)]:
        row = rows[path]
        expected_tags = classify(path, top_k=4)
        assert [t["label"] for t in row["tags"]] == [t["label"] for t in expected_tags], path
        np.testing.assert_allclose([t["score"] for t in row["tags"]], [t["score"] for t in expected_tags], atol=1e-5)
        expected = detect(path, threshold=0.5, return_frame_scores=True)
        assert row["events"] == expected["events"], path
        np.testing.assert_allclose(row["frame_scores"], expected["frame_scores"], atol=1e-5)
        assert row["frame_step_s"] == pytest.approx(expected["frame_times"][1])
        assert row["duration_s"] == pytest.approx(len(decoded_as_a_file(path)) / 32000)
        features = extractor(decoded_as_a_file(path), sampling_rate=32000, return_tensors="pt")
        with torch.no_grad():
            pooled = backbone.htsat(**features).pooler_output[0].numpy()
        np.testing.assert_allclose(row["embedding"], pooled, atol=1e-5)
        assert row["embedding"].dtype == np.float32
    assert sum(len(rows[p]["events"]) for p in files[: len(CORPUS)]) > 20  # the comparison is not vacuous


def test_bad_files_become_error_rows(rows):
    stages = {Path(key).name: row.stage for key, row in rows.items() if hasattr(row, "stage")}
    assert stages == {"corrupt.flac": "decode", "empty.wav": "empty", "one_sample.wav": "too_short"}
    assert "one STFT frame" in rows[next(k for k in rows if k.endswith("one_sample.wav"))].message


def test_windows_of_many_files_share_forward_passes(annotator, corpus, monkeypatch):
    _, files = corpus
    batches = []
    original = type(annotator)._run

    def spy(self, windows, states):
        batches.append([key for key, *_ in windows])
        return original(self, windows, states)

    monkeypatch.setattr(type(annotator), "_run", spy)
    list(annotator.annotate([(f, f) for f in files]))
    assert max(len(set(keys)) for keys in batches) > 1
    assert all(len(keys) == annotator.batch_size for keys in batches[:-1])  # full batches but the last
    sent = sum(len(keys) for keys in batches)
    samples = [len(decoded_as_a_file(f)) for f in files[: len(CORPUS)]]
    assert sent == sum(count_windows(n, annotator.config, annotator.feature_extractor, TASKS) for n in samples)
    assert count_windows(16000, annotator.config, annotator.feature_extractor, ("events",)) == 1  # no clip view


def test_softmax_tags_and_the_pooled_head(tmp_path, corpus):
    _, files = corpus
    torch.manual_seed(1)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=3,
                         use_token_semantic_head=False, problem_type="single_label_classification")
    HTSATForAudioClassification(config).save_pretrained(tmp_path)
    HTSATFeatureExtractor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token-semantic head"):
        Annotator(str(tmp_path), tasks=("tags", "events"))
    annotator = Annotator(str(tmp_path), tasks=("tags",), top_k=3, batch_size=3, device="cpu")
    classify = pipeline("audio-classification", model=str(tmp_path))
    for row in annotator.annotate([(f, f) for f in files[:2]]):
        expected = classify(row["id"], top_k=3)
        assert [t["label"] for t in row["tags"]] == [t["label"] for t in expected]
        np.testing.assert_allclose([t["score"] for t in row["tags"]], [t["score"] for t in expected], atol=1e-5)
        assert sum(t["score"] for t in row["tags"]) == pytest.approx(1.0, abs=1e-5)  # softmax over 3 labels


def test_post_processing_options_and_label_mapping_match_the_sed_pipeline(model_folder, corpus):
    _, files = corpus
    mapping = {"low": ["LABEL_0", "LABEL_1"], "high": ["LABEL_2", 3]}
    for options in (
        dict(threshold={"low": 0.45, "high": 0.6}, median_filter_seconds=0.7, min_duration_seconds=0.3,
             min_gap_seconds=0.4, upsample="linear"),
        dict(hysteresis=(0.55, 0.45), median_filter_seconds={"low": 0.3, "high": 0.9}),
    ):
        annotator = Annotator(str(model_folder), tasks=("events",), batch_size=5, label_mapping=mapping,
                              device="cpu", **options)
        detect = pipeline("sound-event-detection", model=str(model_folder))
        found = 0
        for row in annotator.annotate([(f, f) for f in files[3:7]]):
            expected = detect(row["id"], label_mapping=mapping, **options)["events"]
            assert row["events"] == expected
            assert {e["label"] for e in row["events"]} <= {"low", "high"}
            found += len(expected)
        assert found > 0
    with pytest.raises(ValueError, match="threshold"):
        Annotator(str(model_folder), threshold=1.5)
    with pytest.raises(ValueError, match="Unknown or no tasks"):
        Annotator(str(model_folder), tasks=("captions",))


def test_truncated_file_is_annotated_with_a_warning(annotator, corpus, tmp_path):
    _, files = corpus
    source = Path(files[6]).read_bytes()  # the 75-s FLAC
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(source[: len(source) // 2])
    (row,) = annotator.annotate([("t", str(truncated))])
    assert not hasattr(row, "stage") and row["warning"] and "may be incomplete" in row["warning"]
    assert 25 < row["duration_s"] < 50  # about half of it


# ------------------------------------------------------------------------------------------------ corpus runs
def run_cli(model_folder, files, out, *extra):
    return annotate_main([
        "--model_name_or_path", str(model_folder), "--files", *files, "--output_dir", str(out), "--tasks", *TASKS,
        "--top_k", "4", "--batch_size", "4", "--rows_per_shard", "3", "--num_workers", "2", "--no_progress",
        "--device", "cpu", *extra,
    ])


@pytest.fixture(scope="module")
def one_process_run(model_folder, corpus, tmp_path_factory):
    _, files = corpus
    out = tmp_path_factory.mktemp("one")
    summary = run_cli(model_folder, files, out)
    return out, summary


def read_rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values("id").reset_index(drop=True)


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a["id"].tolist() == b["id"].tolist()
    assert a["duration_s"].tolist() == b["duration_s"].tolist()
    for x, y in zip(a["events"], b["events"]):
        assert [dict(e) for e in x] == [dict(e) for e in y]
    for x, y in zip(a["tags"], b["tags"]):
        assert [t["label"] for t in x] == [t["label"] for t in y]
        np.testing.assert_allclose([t["score"] for t in x], [t["score"] for t in y], atol=1e-5)
    for x, y in zip(a["embedding"], b["embedding"]):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_corpus_run_writes_shards_errors_and_manifest(one_process_run, corpus, rows):
    out, summary = one_process_run
    _, files = corpus
    assert summary["inputs"] == len(files) and summary["done"] == len(CORPUS) and summary["failed"] == len(BAD)
    assert summary["failed_by_stage"] == {"decode": 1, "empty": 1, "too_short": 1}
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-0-00000.parquet", "part-0-00001.parquet",
                                                                 "part-0-00002.parquet"]  # 11 inputs, 3 per shard
    assert len(committed_shards(out)) == 4  # the last shard had only failures: committed without a Parquet file
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["done"] == len(CORPUS)
    assert manifest["counts"]["audio_hours"] == pytest.approx(sum(c[0] for c in CORPUS) / 3600, rel=1e-3)
    assert manifest["runs"][-1]["audio_hours_per_hour"] > 0
    assert {Path(e["id"]).name: e["stage"] for e in read_errors(out)} == {
        "corrupt.flac": "decode", "empty.wav": "empty", "one_sample.wav": "too_short"}
    table = read_rows(out)
    for _, row in table.iterrows():  # the stored rows are the annotator's rows
        expected = rows[row["id"]]
        assert [dict(e) for e in row["events"]] == expected["events"]
        np.testing.assert_allclose(np.stack(row["frame_scores"]), expected["frame_scores"], atol=1e-6)


def test_features_on_the_device_give_the_same_rows(one_process_run, model_folder, corpus, tmp_path):
    """`--features_on device`: the decoding workers send each window's samples (`SampleSpan`) and the model's process
    computes the log-mel of a forward pass's windows in batches: the same rows, errors and counts."""
    out, summary = one_process_run
    _, files = corpus
    on_device = run_cli(model_folder, files, tmp_path / "device", "--features_on", "device")
    assert {key: on_device[key] for key in ("inputs", "done", "failed", "failed_by_stage")} == {
        key: summary[key] for key in ("inputs", "done", "failed", "failed_by_stage")}
    assert read_manifest(tmp_path / "device")["fingerprint"]["settings"]["features_on"] == "device"
    assert read_manifest(out)["fingerprint"]["settings"]["features_on"] == "workers"  # auto, on the CPU
    assert_same_rows(read_rows(tmp_path / "device"), read_rows(out))
    for x, y in zip(read_rows(tmp_path / "device")["frame_scores"], read_rows(out)["frame_scores"]):
        np.testing.assert_allclose(np.stack(x), np.stack(y), atol=1e-6)


def test_sample_spans_are_the_stream_features_with_bounded_memory():
    """A window sent as samples gives exactly the features the stream computes (short, windowed and end-aligned
    windows alike), and a long input holds about a window, a hop and a read block of samples, not the recording."""
    from htsat_hf.pipeline_htsat import READ_BLOCK_SECONDS, AudioSource, WindowStream, span_features

    config, extractor = HTSATConfig(), HTSATFeatureExtractor()
    rng = np.random.default_rng(0)
    for seconds in (4.0, 10.3, 47.3, 600.0):
        audio = (rng.standard_normal(int(seconds * 32000)) * 0.1).astype(np.float32)
        frames = list(WindowStream(config, extractor, AudioSource(32000, array=audio)).window_batches(4))
        stream = WindowStream(config, extractor, AudioSource(32000, array=audio), spans=True)
        held, spans = 0, []
        for batch, starts in stream.window_batches(4):
            held = max(held, len(stream.frames.samples))
            spans.append((batch, starts))
        assert [starts for _, starts in spans] == [starts for _, starts in frames]
        computed = span_features([span for batch, _ in spans for span in batch], extractor, "cpu")
        assert torch.equal(torch.stack(computed), torch.cat([batch for batch, _ in frames]))
        if seconds > 60:
            # the last window's samples from its start, one window hop on, and the read block after them
            bound = (config.clip_seconds + config.long_input_hop_seconds + READ_BLOCK_SECONDS) * 32000 + 1280
            assert held <= bound < len(audio) / 10


def test_output_loads_with_datasets_and_pandas(one_process_run):
    import datasets

    out, _ = one_process_run
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert loaded.num_rows == len(CORPUS)
    assert set(loaded.column_names) == {"id", "duration_s", "tags", "events", "embedding", "frame_scores",
                                        "frame_step_s", "warning"}
    assert set(loaded[0]["tags"][0]) == {"label", "score"}
    assert len(pd.read_parquet(out)) == len(CORPUS)


def test_same_command_again_does_nothing_and_changed_options_refuse(one_process_run, model_folder, corpus):
    out, _ = one_process_run
    _, files = corpus
    again = run_cli(model_folder, files, out)
    assert again["run_audio_hours"] == 0 and again["done"] == len(CORPUS)
    with pytest.raises(SystemExit, match=r"settings.top_k: 4 in the manifest, now 2"):
        run_cli(model_folder, files, out, "--top_k", "2")
    with pytest.raises(SystemExit, match=r"settings.threshold"):
        run_cli(model_folder, files, out, "--threshold", "0.3")
    with pytest.raises(SystemExit, match=r"inputs.files: 11 in the manifest, now 10"):
        run_cli(model_folder, files[:-1], out)


def test_a_run_from_before_features_on_resumes_with_workers_only(one_process_run, model_folder, corpus, tmp_path):
    """Manifests written before `features_on` existed lack it; their features were computed in the workers."""
    out = tmp_path / "older"
    shutil.copytree(one_process_run[0], out)
    manifest_path = out / "__annotation__" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["fingerprint"]["settings"]["features_on"]
    manifest_path.write_text(json.dumps(manifest))
    _, files = corpus
    with pytest.raises(SystemExit, match=r'settings.features_on: "workers" in the manifest, now "device"'):
        run_cli(model_folder, files, out, "--features_on", "device")
    again = run_cli(model_folder, files, out)
    assert again["run_audio_hours"] == 0 and again["done"] == len(CORPUS)
    assert read_manifest(out)["fingerprint"]["settings"]["features_on"] == "workers"  # written out on resuming


def test_changed_model_refuses_and_overwrite_starts_over(model_folder, corpus, tmp_path):
    _, files = corpus
    out = tmp_path / "out"
    run_cli(model_folder, files[:2], out)
    other = tmp_path / "other_model"
    model = HTSATForAudioClassification.from_pretrained(model_folder)
    with torch.no_grad():
        model.classifier.conv.bias.add_(0.1)
    model.save_pretrained(other)
    HTSATFeatureExtractor().save_pretrained(other)
    with pytest.raises(SystemExit, match=r"model.sha256"):
        run_cli(other, files[:2], out)
    summary = run_cli(other, files[:2], out, "--overwrite")
    assert summary["done"] == 2 and read_manifest(out)["fingerprint"]["model"]["name_or_path"] == str(other)


def test_killed_run_resumes_exactly_once(annotator, corpus, one_process_run, tmp_path):
    _, files = corpus
    out = tmp_path / "resumed"
    source = file_source(files)

    class Killed(Exception):
        pass

    def die_after_first_shard(shard):
        # what a kill in the middle of the next shard leaves: its temporary files, half written
        (out / ".part-0-00001.parquet.tmp").write_bytes(b"PAR1 half")
        (out / "__annotation__" / "errors-0-00001.jsonl").write_text('{"id": "x", "stage": "decode"}\n')
        (out / "part-0-00001.parquet").write_bytes(b"not committed")
        raise Killed

    with pytest.raises(Killed):
        annotate_corpus(annotator, source, out, model_name="m", rows_per_shard=3, num_workers=1,
                        on_commit=die_after_first_shard, progress=False)
    assert sorted(committed_shards(out)) == [0] and read_manifest(out)["status"] == "running"
    redone = []
    summary = annotate_corpus(annotator, source, out, model_name="m", rows_per_shard=3, num_workers=1,
                              progress=False, on_progress=lambda done, total, seconds: redone.append((done, total)))
    assert redone[-1] == (len(files) - 3, len(files) - 3)  # only the unfinished inputs ran again
    assert summary["inputs"] == len(files) and summary["failed"] == len(BAD)
    resumed = read_rows(out)
    assert resumed["id"].is_unique and len(resumed) == len(CORPUS)
    errors = [e["id"] for e in read_errors(out)]
    assert sorted(errors) == sorted(f for f in files if Path(f).name in BAD)
    assert set(resumed["id"]) | set(errors) == set(files) and not set(resumed["id"]) & set(errors)
    uninterrupted, _ = one_process_run
    assert_same_rows(resumed, read_rows(uninterrupted))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow  # two processes under `accelerate launch`, end to end
def test_two_accelerate_processes_give_the_rows_of_one(one_process_run, model_folder, corpus, tmp_path):
    _, files = corpus
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed next to the interpreter")
    out = tmp_path / "two"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
        "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(REPO / "scripts" / "annotate.py"),
        "--model_name_or_path", str(model_folder), "--files", *files, "--output_dir", str(out), "--tasks", *TASKS,
        "--top_k", "4", "--batch_size", "4", "--rows_per_shard", "3", "--num_workers", "1", "--no_progress",
    ]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = {p.name.split("-")[1] for p in out.glob("part-*.parquet")}
    assert ranks == {"0", "1"}  # both processes did part of the work
    one, _ = one_process_run
    assert_same_rows(read_rows(out), read_rows(one))
    assert sorted(e["id"] for e in read_errors(out)) == sorted(e["id"] for e in read_errors(one))
    assert read_manifest(out)["processes"] == 2 and "11 inputs: 8 annotated, 3 failed" in result.stdout


@pytest.mark.slow  # two processes through torch's launcher, end to end
def test_num_processes_starts_the_processes_itself(one_process_run, model_folder, corpus, tmp_path, capfd, monkeypatch):
    """`--num_processes 2` on the CPU: two single-threaded processes through torch's launcher, the rows of one."""
    _, files = corpus
    for name, value in training_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "launched"
    summary = run_cli(model_folder, files, out, "--num_processes", "2")
    printed = capfd.readouterr().out
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"[annotate] starting 2 processes of {threads} thread(s)" in printed
    assert "11 inputs: 8 annotated, 3 failed" in printed
    assert summary["inputs"] == len(files) and summary["done"] == len(CORPUS) and summary["run_audio_hours"] > 0
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"0", "1"}
    one, _ = one_process_run
    assert_same_rows(read_rows(out), read_rows(one))
    assert read_manifest(out)["processes"] == 2
    with pytest.raises(SystemExit, match="stopped with exit status"):  # a child's refusal reaches the caller
        run_cli(model_folder, files, out, "--num_processes=2", "--top_k", "2")


def test_num_processes_is_checked():
    from htsat_hf.annotation.cli import _resolve_process_count, build_parser

    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--num_processes", bad])
    assert _resolve_process_count(3, on_cpu=True) == 3


def test_auto_process_count_is_one_per_core_as_memory_allows(monkeypatch, capsys):
    from htsat_hf.annotation import cli

    assert cli._available_memory() > 0  # read from /proc/meminfo (and the cgroup limit) here
    monkeypatch.setattr(cli, "_usable_cores", lambda: 64)
    monkeypatch.setattr(cli, "_available_memory", lambda: 200 * 2**30)
    assert cli._resolve_process_count("auto", on_cpu=True) == 64 and not capsys.readouterr().out
    monkeypatch.setattr(cli, "_available_memory", lambda: 10 * 2**30)  # room for 6 processes of 1.5 GiB
    assert cli._resolve_process_count("auto", on_cpu=True) == 6
    assert "6 process(es) rather than one per core (64): 10.0 GiB of memory is available" in capsys.readouterr().out
    monkeypatch.setattr(cli, "_available_memory", lambda: 2**29)
    assert cli._resolve_process_count("auto", on_cpu=True) == 1  # at least one
    monkeypatch.setattr(cli, "_available_memory", lambda: None)  # unknown: one per core
    assert cli._resolve_process_count("auto", on_cpu=True) == 64
    assert cli._resolve_process_count(3, on_cpu=True) == 3  # a number is taken as given


# ------------------------------------------------------------------------------------------------ other engines
def test_datasets_map_with_rank(annotator, corpus, rows):
    import datasets

    _, files = corpus
    table = datasets.Dataset.from_dict({"name": files, "audio": files}).cast_column(
        "audio", datasets.Audio(decode=False)
    )
    mapper = Annotator(annotator.model, annotator.feature_extractor, tasks=("tags", "events"), top_k=4,
                       batch_size=3, id_column="name")
    result = table.map(mapper, batched=True, batch_size=4, with_rank=True)
    assert result.num_rows == len(files)
    for name, tags, events, error in zip(result["name"], result["tags"], result["events"], result["error"]):
        expected = rows[name]
        if hasattr(expected, "stage"):
            assert error.startswith(expected.stage + ":") and tags is None
            continue
        assert error is None and events == expected["events"]
        np.testing.assert_allclose([t["score"] for t in tags], [t["score"] for t in expected["tags"]], atol=1e-5)


def test_ray_data_map_batches(model_folder, corpus, rows):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")

    _, files = corpus
    corrupt = [f for f in files if f.endswith("corrupt.flac")]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        items = ray.data.from_items([{"id": f, "audio": Path(f).read_bytes()} for f in files[:5] + corrupt])
        annotated = items.map_batches(
            Annotator, fn_constructor_kwargs={"model": str(model_folder), "id_column": "id", "top_k": 4,
                                              "device": "cpu"},
            batch_size=4, concurrency=1, batch_format="numpy",
        ).take_all()
    finally:
        ray.shutdown()
    by_id = {row["id"]: row for row in annotated}
    assert set(by_id) == set(files[:5] + corrupt)
    assert any(path.endswith(".mp3") for path in files[:5])  # bytes decode as the file does, MP3 included
    for path in files[:5]:
        assert [dict(e) for e in by_id[path]["events"]] == rows[path]["events"]
        np.testing.assert_allclose([t["score"] for t in by_id[path]["tags"]],
                                   [t["score"] for t in rows[path]["tags"]], atol=1e-5)
    assert by_id[corrupt[0]]["error"].startswith("decode:")


def test_manifest_is_json_and_names_the_model(one_process_run, model_folder):
    out, _ = one_process_run
    manifest = json.loads((out / "__annotation__" / "manifest.json").read_text())
    assert manifest["fingerprint"]["model"]["name_or_path"] == str(model_folder)
    assert len(manifest["fingerprint"]["model"]["sha256"]) == 64
    assert manifest["tag_labels"] == [f"LABEL_{i}" for i in range(6)]


@needs_torchcodec
def test_dataset_source_streaming_through_the_command_line(model_folder, corpus, rows, tmp_path):
    root, files = corpus
    folder = tmp_path / "folder"
    folder.mkdir()
    names = [Path(f).name for f in files[:4]]
    for name in names:
        (folder / name).write_bytes((root / name).read_bytes())
    (folder / "metadata.csv").write_text("file_name,recording\n" + "".join(f"{n},rec-{n}\n" for n in names))
    out = tmp_path / "out"
    summary = annotate_main([
        "--model_name_or_path", str(model_folder), "--dataset_name", str(folder), "--streaming", "--id_column_name",
        "recording", "--output_dir", str(out), "--top_k", "4", "--batch_size", "4", "--rows_per_shard", "3",
        "--num_workers", "2", "--no_progress", "--device", "cpu",
    ])
    assert summary["done"] == 4 and read_manifest(out)["fingerprint"]["inputs"]["streaming"] is True
    table = read_rows(out)
    assert sorted(table["id"]) == sorted(f"rec-{n}" for n in names)
    by_name = {f"rec-{Path(f).name}": rows[f] for f in files[:4]}
    for _, row in table.iterrows():
        assert [dict(e) for e in row["events"]] == by_name[row["id"]]["events"]


def test_bf16_autocast_stays_close_to_fp32(annotator, corpus, rows):
    _, files = corpus
    bf16 = Annotator(annotator.model, annotator.feature_extractor, tasks=("tags",), top_k=4, batch_size=4, bf16=True)
    assert bf16.settings()["bf16"] is True
    for row in bf16.annotate([(f, f) for f in files[1:4]]):
        expected = {t["label"]: t["score"] for t in rows[row["id"]]["tags"]}
        for tag in row["tags"]:
            if tag["label"] in expected:
                assert tag["score"] == pytest.approx(expected[tag["label"]], abs=0.05)


@pytest.mark.parametrize("average", ["probabilities", "logits"])
def test_ensemble_rows_equal_the_two_pipelines(corpus, tmp_path, average):
    """An `HTSATEnsembleModel` folder (members of different widths): tags equal the ensemble's forward on the whole
    decoded file (and `pipeline("audio-classification")`), events and frame scores `pipeline("sound-event-detection")`,
    short clips and long files alike; embeddings are refused (no single pooled latent)."""
    from htsat_hf.modeling_htsat_ensemble import HTSATEnsembleModel

    members = []
    for seed, width in ((1, 8), (2, 16)):
        torch.manual_seed(seed)
        config = HTSATConfig(embed_dim=width, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=6)
        model = HTSATForAudioClassification(config).eval()
        with torch.no_grad():  # spread-out logits, so that the averaging rule matters
            model.classifier.conv.weight.mul_(20)
        members.append(model)
    folder = tmp_path / "ensemble"
    HTSATEnsembleModel.from_members(members, average=average).save_pretrained(folder)
    HTSATFeatureExtractor().save_pretrained(folder)
    _, files = corpus
    files = [files[0], files[2], files[4], files[6]]  # 0.5 s, 7.3 s, 25 s, 75 s
    annotator = Annotator(str(folder), tasks=("tags", "events", "frame_scores"), top_k=3, batch_size=4,
                          threshold=0.5, device="cpu")
    rows = {row["id"]: row for row in annotator.annotate([(f, f) for f in files])}
    classify = pipeline("audio-classification", model=str(folder))
    detect = pipeline("sound-event-detection", model=str(folder))
    ensemble = HTSATEnsembleModel.from_pretrained(folder).eval()
    extractor = HTSATFeatureExtractor.from_pretrained(folder)
    for path in files:
        features = extractor(decoded_as_a_file(path), sampling_rate=32000, return_tensors="pt")
        with torch.no_grad():  # the ensemble's own forward on the whole decoded file
            probabilities = ensemble(**features).logits[0].sigmoid()
        scores, ids = probabilities.topk(3)
        assert [t["label"] for t in rows[path]["tags"]] == [ensemble.config.id2label[i] for i in ids.tolist()], path
        np.testing.assert_allclose([t["score"] for t in rows[path]["tags"]], scores.numpy(), atol=1e-5)
        expected_tags = classify(path, top_k=3)
        assert [t["label"] for t in expected_tags] == [t["label"] for t in rows[path]["tags"]], path
        np.testing.assert_allclose([t["score"] for t in rows[path]["tags"]], [t["score"] for t in expected_tags],
                                   atol=1e-5)
        expected = detect(path, threshold=0.5, return_frame_scores=True)
        assert rows[path]["events"] == expected["events"], path
        np.testing.assert_allclose(rows[path]["frame_scores"], expected["frame_scores"], atol=1e-5)
    assert sum(len(rows[p]["events"]) for p in files) > 5  # the comparison is not vacuous
    single = Annotator(members[0], tasks=("tags",), top_k=3, device="cpu")
    first = {row["id"]: row for row in single.annotate([(f, f) for f in files])}
    assert any(first[p]["tags"] != rows[p]["tags"] for p in files)  # the second member changes the result
    with pytest.raises(ValueError, match="no single pooled embedding"):
        Annotator(str(folder), tasks=("tags", "embeddings"), device="cpu")


# ------------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")
def test_peak_memory_of_a_process_tree_outlives_its_processes():
    """The benchmark's memory reading: each process's kernel high-water mark, kept after it exits, summed over the
    tree; a child that briefly holds 200 MiB is seen although it is gone before the run ends."""
    import subprocess
    import sys
    import time

    from htsat_hf.annotation.benchmark import TreePeakMemory, high_water_mark

    child = ("import subprocess, sys, time; subprocess.run([sys.executable, '-c', "
             "'import time; b = bytearray(200 * 2**20); time.sleep(1.5)']); time.sleep(1.0)")
    process = subprocess.Popen([sys.executable, "-c", child])
    memory = TreePeakMemory(process.pid, interval=0.05)
    process.wait()
    time.sleep(0.1)
    memory.stop()
    assert len(memory.peaks) == 2  # the parent and its child
    assert memory.largest() >= 200 * 2**20
    assert memory.total() >= memory.largest() + 5 * 2**20  # the parent's own interpreter
    assert high_water_mark(process.pid) is None  # gone: only the polled marks remain


def test_annotation_benchmark_one_process_on_a_device(tmp_path, monkeypatch):
    """The benchmark's GPU layout (model-only around one end-to-end process with the features on the device), run on
    the CPU with a tiny corpus: it measures, reports, and its run used the device features."""
    import tempfile

    from htsat_hf.annotation.benchmark import AnnotationBenchmarkSettings, format_report, run_annotation_benchmark

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the benchmark's work folder
    settings = AnnotationBenchmarkSettings(hours=0.004, batch_size=2, num_workers=1, model_batches=1,
                                           corpus_dir=str(tmp_path / "corpus"), single_process=True, model_size="tiny")
    results = run_annotation_benchmark(settings)
    run = results["one_process_on_device"]
    assert len(results["model_only_audio_hours_per_hour"]) == 3 and min(results["model_only_audio_hours_per_hour"]) > 0
    assert run["audio_hours"] == pytest.approx(results["audio_hours"], rel=1e-3) and run["audio_hours_per_hour"] > 0
    assert results["end_to_end_share_of_model_only"] > 0 and results["gpu_utilization_percent"] is None
    (work,) = tmp_path.glob("htsat-annotation-bench-*")
    assert read_manifest(work / "out1")["fingerprint"]["settings"]["features_on"] == "device"
    report = format_report(results)
    assert "| end to end, 1 process |" in report and "device busy: not read (not a GPU)" in report


def test_corpus_durations_without_torchcodec(tmp_path, monkeypatch):
    """A GPU image may have the ffmpeg command but not torchcodec (or FFmpeg's libraries for it): an MP3's duration is
    its decoded length either way (not the header's, which counts the encoder's padding)."""
    from htsat_hf.annotation.benchmark import _duration, _write

    path = tmp_path / "clip.mp3"
    _write(path, 12.3, 44100, 2, np.random.default_rng(0))
    with_torchcodec = _duration(path, 32000)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `from torchcodec.decoders import ...` fails
    assert _duration(path, 32000) == with_torchcodec == pytest.approx(12.3, abs=1 / 32000)
    sf.write(tmp_path / "clip.flac", np.zeros(16000 * 3, dtype=np.float32), 16000)
    assert _duration(tmp_path / "clip.flac", 32000) == 3.0
