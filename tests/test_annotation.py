"""Corpus annotation: rows equal the two pipelines, windows packed across files, bad files recorded, exactly-once
resume, 2-process accelerate equal to 1 process, refusal of changed options, and the datasets / Ray recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
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
from htsat_hf.commands.annotate import run as annotate_main
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
    from htsat_hf.pipeline_htsat import AudioSource
    from htsat_hf.time_axis import READ_BLOCK_SECONDS, WindowStream, span_features

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
        # what a kill in the middle of the next shard leaves: its pending note, its files, half written
        (out / "__annotation__" / "shard-0-00001.pending").write_text("{}")
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
        "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "htsat_hf.commands.annotate",
        "--model_name_or_path", str(model_folder), "--files", *files, "--output_dir", str(out), "--tasks", *TASKS,
        "--top_k", "4", "--batch_size", "4", "--rows_per_shard", "256", "--num_workers", "1",
    ]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = {p.name.split("-")[1] for p in out.glob("part-*.parquet")}
    assert ranks == {"0", "1"}  # both processes did part of the work: 11 inputs in shards of 6, not one of 256
    assert read_manifest(out)["shard_rows"] == 6 and not (out / "__annotation__" / "lock.json").exists()
    bar = result.stderr.replace("\r", "\n").splitlines()
    assert any("annotating (2 processes)" in line and "11/11" in line for line in bar), result.stderr[-2000:]
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
    from htsat_hf.commands.annotate import _resolve_process_count, build_parser

    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--num_processes", bad])
    assert _resolve_process_count(3, on_cpu=True) == 3


def test_auto_process_count_is_one_per_core_as_memory_allows(monkeypatch, capsys):
    from htsat_hf.commands import annotate as cli

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


def test_a_batch_without_the_columns_named_is_refused_with_the_setting(annotator, corpus):
    _, files = corpus
    batch = {"bytes": [Path(files[0]).read_bytes()], "path": [files[0]]}
    with pytest.raises(ValueError, match=r"no column 'audio' \(audio_column\); its columns are \['bytes', 'path'\]: "
                       r"pass Annotator\(\.\.\., audio_column=\.\.\.\)"):
        annotator(batch)
    reader = Annotator(annotator.model, annotator.feature_extractor, audio_column="bytes", id_column="file")
    with pytest.raises(ValueError, match=r"no column 'file' \(id_column\)"):
        reader(batch)


@needs_torchcodec
def test_datasets_map_recipe_with_a_decoded_audio_column_gives_the_command_lines_rows(one_process_run, model_folder,
                                                                                      corpus):
    """The docs' recipe on `datasets`' default, a decoded `Audio` column (torchcodec `AudioDecoder` cells, here with
    the cast's own rate): each cell is annotated from the bytes or file it was decoded from, by the command line's
    FFmpeg path, so the rows are the command line's (not torchaudio's resampling of datasets' samples)."""
    import datasets

    out, _ = one_process_run
    _, files = corpus
    good = [path for path, (seconds, *_) in zip(files, CORPUS) if seconds < 60]  # mp3, flac, wav; several rates
    table = datasets.Dataset.from_dict({"audio": good}).cast_column("audio", datasets.Audio(sampling_rate=22050))
    assert type(table[0]["audio"]).__name__ == "AudioDecoder"
    mapper = Annotator(str(model_folder), tasks=TASKS, top_k=4, batch_size=3, device="cpu")
    mapped = table.add_column("id", good).map(mapper, batched=True, batch_size=4, remove_columns=["audio"])
    recipe = mapped.to_pandas().sort_values("id").reset_index(drop=True)
    cli_rows = read_rows(out)
    cli_rows = cli_rows[cli_rows["id"].isin(good)].reset_index(drop=True)
    assert recipe["error"].isna().all()
    assert_same_rows(recipe, cli_rows)
    for x, y in zip(recipe["frame_scores"], cli_rows["frame_scores"]):
        np.testing.assert_array_equal(np.stack(x), np.stack(y))


@pytest.mark.slow  # starting Ray: 35-40 s on 2 busy cores
def test_ray_data_map_batches(model_folder, corpus, rows):
    """The docs' CPU recipe on a 2-CPU Ray: files read by `read_binary_files`, an autoscaling pool of up to one
    actor per CPU. (A fixed pool of 2, `concurrency=2`, holds both CPUs, one per actor, and the read tasks never get
    one: it hung.)"""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")

    _, files = corpus
    corrupt = [f for f in files if f.endswith("corrupt.flac")]
    inputs = files[:5] + corrupt
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        annotated = ray.data.read_binary_files(inputs, include_paths=True, override_num_blocks=3).map_batches(
            Annotator,
            fn_constructor_kwargs={"model": str(model_folder), "audio_column": "bytes", "id_column": "path",
                                   "top_k": 4, "device": "cpu"},
            batch_size=2, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        )
        outcome: dict = {}
        reader = threading.Thread(target=take_all_into, args=(annotated, outcome), daemon=True)
        reader.start()
        reader.join(timeout=300)  # a guard against the hang, not a speed bound
    finally:
        ray.shutdown()
    assert outcome, "the Ray recipe did not finish in 300 s: its read tasks got no CPU"
    if "error" in outcome:
        raise outcome["error"]
    by_id = {row["path"]: row for row in outcome["rows"]}
    assert set(by_id) == set(inputs)
    assert any(path.endswith(".mp3") for path in files[:5])  # bytes decode as the file does, MP3 included
    for path in files[:5]:
        assert [dict(e) for e in by_id[path]["events"]] == rows[path]["events"]
        np.testing.assert_allclose([t["score"] for t in by_id[path]["tags"]],
                                   [t["score"] for t in rows[path]["tags"]], atol=1e-5)
    assert by_id[corrupt[0]]["error"].startswith("decode:")


def take_all_into(dataset, outcome: dict) -> None:
    """`dataset.take_all()` into outcome["rows"], or the exception into outcome["error"]."""
    try:
        outcome["rows"] = dataset.take_all()
    except Exception as error:  # noqa: BLE001 - re-raised by the test
        outcome["error"] = error


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


def audio_folder(root: Path, corpus_root: Path, names: list[str], ids: list[str]) -> Path:
    """An audiofolder of `names` copied from the corpus, with a `recording` column of `ids`."""
    root.mkdir()
    for name in set(names):
        (root / name).write_bytes((corpus_root / name).read_bytes())
    (root / "metadata.csv").write_text("file_name,recording\n" + "".join(f"{n},{i}\n" for n, i in zip(names, ids)))
    return root


def annotate_args(model_folder: Path, out: Path, *inputs: str) -> list[str]:
    return ["--model_name_or_path", str(model_folder), *inputs, "--output_dir", str(out), "--top_k", "4",
            "--batch_size", "4", "--no_progress", "--device", "cpu", "--num_workers", "0"]


def test_bad_inputs_end_the_command_with_a_message(model_folder, corpus, tmp_path):
    """A missing --file_list, repeated paths, repeated or null dataset ids and missing columns end the command with
    what was wrong and what to do (no traceback), before a model is loaded or a process started."""
    root, files = corpus
    out = str(tmp_path / "out")

    def refused(*inputs: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            annotate_main(annotate_args(model_folder, tmp_path / "out", *inputs) + ["--num_processes", "2"])
        return str(stopped.value.code)

    assert refused("--file_list", str(tmp_path / "missing.txt")) == (
        f"error: --file_list {tmp_path / 'missing.txt'}: no such file; give a text file with one audio path per line.")
    listed = tmp_path / "list.txt"
    listed.write_text(f"# corpus\n{files[0]}\n{files[1]}\n\n{files[0]}\n")
    message = refused("--file_list", str(listed), "--files", files[1])
    assert message.startswith("error: Inputs listed more than once") and f"{files[0]!r} (2 times)" in message
    assert f"{files[1]!r} (2 times)" in message and "list each file once" in message

    names = [Path(f).name for f in files[:3]]
    folder = audio_folder(tmp_path / "dup", root, names, ["a", "b", "a"])
    message = refused("--dataset_name", str(folder), "--id_column_name", "recording")
    assert message.startswith("error: Ids repeated in the column 'recording'") and "'a' (2 times)" in message
    assert "--id_column_name" in message
    message = refused("--dataset_name", str(folder), "--id_column_name", "file_id")
    assert message.startswith("error: Split 'train' has no id column 'file_id'") and "recording" in message
    message = refused("--dataset_name", str(folder), "--audio_column_name", "sound")
    assert "has no audio column 'sound'" in message and "--audio_column_name" in message
    assert not Path(out).exists()


@needs_torchcodec
def test_repeated_ids_of_a_stream_stop_the_run_with_a_message(model_folder, corpus, tmp_path):
    """A stream cannot be counted up front: the first repeated id stops the run (read in a decoding worker here)."""
    root, files = corpus
    names = [Path(f).name for f in files[:2]] + [Path(files[0]).name]
    folder = audio_folder(tmp_path / "dup", root, names, ["a", "b", "a"])
    arguments = annotate_args(model_folder, tmp_path / "out", "--dataset_name", str(folder), "--streaming",
                              "--id_column_name", "recording")
    with pytest.raises(SystemExit) as stopped:
        annotate_main([*arguments[:-2], "--num_workers", "1"])
    assert str(stopped.value.code) == (
        "error: Ids repeated in the column 'recording': rows 0 and 2 are both 'a' (each row's id must be unique); "
        "choose a column whose values are unique with --id_column_name, or leave it out to use row numbers.")


@needs_torchcodec
def test_dataset_name_takes_a_folder_save_to_disk_wrote(model_folder, corpus, rows, tmp_path):
    import datasets

    _, files = corpus
    good = files[:3]
    saved = datasets.Dataset.from_dict({"audio": good, "name": [Path(f).name for f in good]}).cast_column(
        "audio", datasets.Audio())
    saved.save_to_disk(tmp_path / "saved")
    out = tmp_path / "out"
    summary = annotate_main(annotate_args(model_folder, out, "--dataset_name", str(tmp_path / "saved"),
                                          "--id_column_name", "name"))
    assert summary["done"] == 3 and read_manifest(out)["fingerprint"]["inputs"]["split"] == "train"
    for _, row in read_rows(out).iterrows():
        expected = rows[str(Path(files[0]).parent / row["id"])]
        assert [dict(e) for e in row["events"]] == expected["events"]
        np.testing.assert_allclose([t["score"] for t in row["tags"]], [t["score"] for t in expected["tags"]],
                                   atol=1e-5)
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(tmp_path / "both")
    with pytest.raises(SystemExit, match=r"has the splits \['test', 'train'\]: choose one with --split"):
        annotate_main(annotate_args(model_folder, tmp_path / "out2", "--dataset_name", str(tmp_path / "both")))


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

    from htsat_hf.benchmarks.annotation import TreePeakMemory, high_water_mark

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

    from htsat_hf.benchmarks.annotation import AnnotationBenchmarkSettings, format_report, run_annotation_benchmark

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
    from htsat_hf.benchmarks.annotation import _duration, _write

    path = tmp_path / "clip.mp3"
    _write(path, 12.3, 44100, 2, np.random.default_rng(0))
    with_torchcodec = _duration(path, 32000)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `from torchcodec.decoders import ...` fails
    assert _duration(path, 32000) == with_torchcodec == pytest.approx(12.3, abs=1 / 32000)
    sf.write(tmp_path / "clip.flac", np.zeros(16000 * 3, dtype=np.float32), 16000)
    assert _duration(tmp_path / "clip.flac", 32000) == 3.0


# ------------------------------------------------------------------------------------ exactly once, beyond a kill
@pytest.fixture(scope="module")
def short_files(corpus, tmp_path_factory):
    """Ten short inputs (copies of the 0.5 s and 1.2 s clips) and one that fails: quick corpus runs."""
    root, files = corpus
    folder = tmp_path_factory.mktemp("short")
    names = []
    for index in range(10):
        source = Path(files[0] if index % 2 else files[7])
        names.append(str(folder / f"short{index}{source.suffix}"))
        shutil.copy(source, names[-1])
    names.insert(3, files[-3])  # corrupt.flac
    return names


def quick_run(annotator, source, out, **options):
    options = {"model_name": "m", "rows_per_shard": 4, "num_workers": 0, "progress": False, **options}
    return annotate_corpus(annotator, source, out, **options)


def ids_of(out: Path) -> list[str]:
    return sorted([*pd.read_parquet(out)["id"], *(e["id"] for e in read_errors(out))])


@pytest.mark.parametrize("streamed", [False, True])
def test_limit_then_full_run_redoes_the_shard_the_limit_cut(annotator, short_files, tmp_path, streamed):
    """`--limit 6` with 4 inputs per shard commits shard 1 with inputs 4-5 only: its marker says so, the limited run
    is not "complete", and the full run redoes shard 1 (and does shard 2), so every input is there exactly once."""
    from htsat_hf.annotation.sources import InputSource

    if streamed:
        source = InputSource({"stream": "short"}, None, iterate=lambda: ((f, f) for f in short_files))
    else:
        source = file_source(short_files)
    out = tmp_path / "out"
    quick_run(annotator, source, out, limit=6)
    assert read_manifest(out)["status"] == "incomplete" and committed_shards(out)[1]["stop"] == 6
    redone = []
    quick_run(annotator, source, out, limit=6, on_progress=lambda *counts: redone.append(counts))
    assert redone == []  # the same limit again: nothing to do
    summary = quick_run(annotator, source, out, on_progress=lambda *counts: redone.append(counts))
    assert redone[-1][0] == len(short_files) - 4  # shards 1 and 2: inputs 4-10
    assert ids_of(out) == sorted(short_files) and summary["inputs"] == len(short_files)
    assert read_manifest(out)["status"] == "complete"
    again = quick_run(annotator, source, out)
    assert again["run_audio_hours"] == 0 and ids_of(out) == sorted(short_files)
    if streamed:  # a stream that ends on a shard boundary: complete too
        eight = InputSource({"stream": "eight"}, None, iterate=lambda: ((f, f) for f in short_files[:8]))
        quick_run(annotator, eight, tmp_path / "eight")
        assert read_manifest(tmp_path / "eight")["status"] == "complete"


def test_damaged_or_missing_shards_are_redone(annotator, short_files, tmp_path, capsys):
    """A part file deleted, one truncated and one marker garbled: the resume says which and redoes exactly those."""
    source = file_source(short_files)
    out = tmp_path / "out"
    quick_run(annotator, source, out)
    (out / "part-0-00000.parquet").unlink()
    part = out / "part-0-00001.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    (out / "__annotation__" / "shard-0-00002.done").write_text('{"rows": 3, "err')
    capsys.readouterr()
    redone = []
    summary = quick_run(annotator, source, out, on_progress=lambda *counts: redone.append(counts))
    printed = capsys.readouterr().out
    assert "shard 0 is done again: part-0-00000.parquet is missing" in printed
    assert "shard 1 is done again: part-0-00001.parquet has" in printed
    assert "shard 2 is done again: its commit marker is damaged" in printed
    assert redone[-1][0] == len(short_files) and summary["inputs"] == len(short_files)
    assert ids_of(out) == sorted(short_files) and read_manifest(out)["status"] == "complete"
    marker = committed_shards(out)[1]
    assert marker["files"]["part-0-00001.parquet"]["size"] == part.stat().st_size


def test_only_the_runs_own_files_are_touched(annotator, short_files, tmp_path, capsys):
    """Clean-up removes only what this folder's runs left unfinished; a foreign non-empty folder is refused."""
    source = file_source(short_files)
    out = tmp_path / "out"
    quick_run(annotator, source, out, limit=4)
    foreign = [out / "notes.tmp", out / "part-7-00003.parquet", out / "__annotation__" / "mine.tmp"]
    for path in foreign:
        path.write_text("not the run's")
    quick_run(annotator, source, out)
    assert all(path.read_text() == "not the run's" for path in foreign)
    assert "Parquet files no commit of this run names (part-7-00003.parquet)" in capsys.readouterr().out
    for path in foreign[:2]:
        path.unlink()  # pandas would read them as rows
    assert ids_of(out) == sorted(short_files)

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.parquet").write_text("someone's")
    from htsat_hf.annotation.store import OutputFolderError

    with pytest.raises(OutputFolderError, match=r"already holds files that no annotation run wrote \(data.parquet\)"):
        quick_run(annotator, source, other)
    assert (other / "data.parquet").read_text() == "someone's"


def test_a_folder_is_held_by_one_live_run(annotator, model_folder, short_files, tmp_path):
    """A live holder (here this process, or another host's fresh heartbeat) is refused with its name; a dead one (its
    process killed with SIGKILL, or another host's lock older than the timeout) is taken over."""
    import signal

    from htsat_hf.annotation.lock import STALE_AFTER_S, FolderBusyError, FolderLock

    source = file_source(short_files[:2])
    out = tmp_path / "out"
    with FolderLock(out / "__annotation__").acquire():
        with pytest.raises(FolderBusyError, match=rf"in use by another annotation run \(host .*, pid {os.getpid()}"):
            quick_run(annotator, source, out)
        with pytest.raises(SystemExit, match="in use by another annotation run .* pass --wait"):
            run_cli(model_folder, short_files[:2], out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from htsat_hf.annotation.lock import FolderLock; "
         f"FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(out / "__annotation__")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusyError, match=f"pid {holder.pid}"):
        quick_run(annotator, source, out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert quick_run(annotator, source, out)["inputs"] == 2  # the dead holder's folder is taken over
    lock = out / "__annotation__" / "lock.json"
    assert not lock.exists()  # released at the end

    lock.write_text(json.dumps({"host": "node-b", "pid": 1, "started": "2026-12-07T00:00:00+00:00", "token": "b"}))
    with pytest.raises(FolderBusyError, match="host node-b, pid 1"):
        quick_run(annotator, source, out)
    old = lock.stat().st_mtime - STALE_AFTER_S - 5
    os.utime(lock, (old, old))  # node-b stopped refreshing it
    assert quick_run(annotator, source, out)["inputs"] == 2


def test_a_second_run_waits_for_the_holder(annotator, short_files, tmp_path):
    import threading

    from htsat_hf.annotation.lock import FolderLock

    out = tmp_path / "out"
    lock = FolderLock(out / "__annotation__").acquire()
    threading.Timer(0.5, lock.release).start()
    assert quick_run(annotator, file_source(short_files[:2]), out, wait=True)["inputs"] == 2


def test_damaged_manifest_and_full_disk_end_in_clear_errors(model_folder, short_files, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    written = []

    def full_disk(table, path, **kwargs):
        if written:  # the second shard's results
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return original(table, path, **kwargs)

    original = pq.write_table
    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(SystemExit, match=r"part-0-00001.parquet: the disk is full .* run the same command again"):
        run_cli(model_folder, short_files, out, "--rows_per_shard", "4", "--num_workers", "0")
    monkeypatch.setattr(pq, "write_table", original)
    assert not list(out.glob(".*.tmp")) and sorted(committed_shards(out)) == [0]
    assert run_cli(model_folder, short_files, out, "--rows_per_shard", "4", "--num_workers", "0")["inputs"] == 11
    assert ids_of(out) == sorted(short_files)
    (out / "__annotation__" / "manifest.json").write_text('{"format": "htsat-hf-annot')
    with pytest.raises(SystemExit, match=r"manifest.json is damaged .* --overwrite to start over"):
        run_cli(model_folder, short_files, out, "--rows_per_shard", "4", "--num_workers", "0")


def test_commit_unit_gives_every_process_work():
    from htsat_hf.annotation.corpus import shard_rows

    assert shard_rows(256, 11, 2) == 6 and shard_rows(256, 600, 2) == 256 and shard_rows(3, 11, 2) == 3
    assert shard_rows(256, 600, 1) == 256
    assert shard_rows(256, None, 4) == 256 and shard_rows(256, 0, 2) == 256 and shard_rows(256, 3, 8) == 1


def test_sigkill_mid_run_then_the_same_command_gives_every_input_once(model_folder, short_files, tmp_path):
    """A real `kill -9` of the command after its first commit (its lock, pending note and temporary files left as they
    are): the same command again takes the folder over and ends with every input exactly once."""
    import signal
    import time

    out = tmp_path / "out"
    arguments = ["--model_name_or_path", str(model_folder), "--files", *short_files, "--output_dir", str(out),
                 "--tasks", *TASKS, "--top_k", "4", "--batch_size", "4", "--rows_per_shard", "1", "--num_workers",
                 "0", "--no_progress", "--device", "cpu"]
    process = subprocess.Popen([sys.executable, "-m", "htsat_hf", "annotate", *arguments],
                               env=dict(training_env(), PYTHONPATH=str(REPO / "src")))
    first = out / "__annotation__" / "shard-0-00000.done"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists()  # (a machine fast enough to finish within the poll leaves a finished run: also fine)
    summary = annotate_main(arguments)
    assert summary["inputs"] == len(short_files) and ids_of(out) == sorted(short_files)
    assert read_manifest(out)["status"] == "complete"


def test_markers_of_earlier_versions_are_checked_by_their_counts(tmp_path):
    """Markers written before they recorded ranges and digests: a shard a --limit cut (fewer inputs than its range)
    is redone, a whole one is kept while its Parquet file holds the rows its marker counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from htsat_hf.annotation.store import ShardMarker, shard_problem

    (tmp_path / "__annotation__").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), tmp_path / "part-0-00000.parquet")
    pq.write_table(pa.table({"id": ["e", "f"]}), tmp_path / "part-0-00001.parquet")
    whole = ShardMarker(0, 0, {"rows": 3, "errors": 1, "audio_seconds": 1.0, "failed_by_stage": {"decode": 1}})
    cut = ShardMarker(0, 1, {"rows": 2, "errors": 0, "audio_seconds": 1.0, "failed_by_stage": {}})
    assert shard_problem(tmp_path, whole, 4, 11) is None
    assert shard_problem(tmp_path, cut, 4, 11) == "it holds inputs 4-5 only (a run with --limit), this run needs up to 7"
    assert shard_problem(tmp_path, cut, 4, 6) is None  # the same limit again
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "part-0-00000.parquet")
    assert shard_problem(tmp_path, whole, 4, 11) == "part-0-00000.parquet has 1 rows, its marker recorded 3"


def test_several_processes_refuse_a_held_folder_together(model_folder, short_files, tmp_path, capfd, monkeypatch):
    """`--num_processes 2` on a folder another run holds: process 0 refuses with the holder named, the launcher ends
    process 1 (waiting at the first barrier), and nothing is written."""
    from htsat_hf.annotation.lock import FolderLock

    for name, value in training_env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "held"
    with FolderLock(out / "__annotation__").acquire():
        with pytest.raises(SystemExit, match="stopped with exit status"):
            run_cli(model_folder, short_files, out, "--num_processes", "2")
    assert f"in use by another annotation run (host {os.uname().nodename}, pid {os.getpid()}" in capfd.readouterr().err
    assert sorted(path.name for path in out.rglob("*")) == ["__annotation__"]


def test_a_holder_whose_lock_was_taken_over_stops_before_committing(tmp_path):
    """A run suspended past the timeout and taken over finds out at its next commit, and leaves the new lock alone."""
    from htsat_hf.annotation.lock import FolderBusyError, FolderLock

    lock = FolderLock(tmp_path).acquire()
    lock.check()
    taken = json.dumps({"host": "node-b", "pid": 7, "token": "theirs"})
    (tmp_path / "lock.json").write_text(taken)
    with pytest.raises(FolderBusyError, match="Another run took over"):
        lock.check()
    lock.release()
    assert (tmp_path / "lock.json").read_text() == taken


def test_window_embeddings_average_to_the_input_embedding(model_folder, corpus):
    """window_embeddings: each window's pooled latent with its span; their mean is the input's embedding."""
    _, files = corpus
    annotator = Annotator(str(model_folder), tasks=("embeddings", "window_embeddings"), batch_size=4, device="cpu")
    rows = [row for row in annotator.annotate([(f, f) for f in files[: len(CORPUS)]]) if isinstance(row, dict)]
    assert any(len(row["window_embeddings"]) > 1 for row in rows)
    for row in rows:
        windows = row["window_embeddings"]
        np.testing.assert_allclose(np.mean([w["embedding"] for w in windows], axis=0), row["embedding"], atol=1e-5)
        assert windows[0]["onset"] == 0.0 and windows[-1]["offset"] == pytest.approx(row["duration_s"])
        assert len(windows) == 1 or all(w["offset"] - w["onset"] <= annotator.config.clip_seconds + 1e-9 for w in windows)
    from htsat_hf.annotation.annotator import rows_to_arrow

    table = rows_to_arrow(rows, annotator.tasks)
    assert table.column_names[:3] == ["duration_s", "embedding", "window_embeddings"]
