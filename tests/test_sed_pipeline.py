"""pipeline("sound-event-detection"): streaming windows equal the model's long-input path; events in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, loudness_step_logits, save_tiny_detector
from transformers import pipeline

import htsat_hf.pipeline_htsat as pipeline_module
from htsat_hf import HTSATFeatureExtractor, HTSATForSoundEventDetection, audio_decoding

RATE = 32000


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("sed_model"))


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.05).astype(np.float32)


def model_frame_scores(folder, audio: np.ndarray) -> torch.Tensor:
    model = HTSATForSoundEventDetection.from_pretrained(folder).eval()
    features = HTSATFeatureExtractor.from_pretrained(folder)(audio, sampling_rate=RATE, padding=False, return_tensors="pt")
    with torch.no_grad():
        return model(**features).frame_logits.sigmoid()[0]


@pytest.mark.parametrize("seconds", [4.0, 10.0, 10.2, 10.3, 23.7, 40.0])
def test_streamed_windows_equal_the_models_long_input_path(folder, seconds, monkeypatch):
    monkeypatch.setattr(pipeline_module, "READ_BLOCK_SECONDS", 3.0)  # many blocks, windows straddle them
    detector = pipeline("sound-event-detection", model=str(folder))
    audio = noise(seconds)
    result = detector(audio, return_frame_scores=True, window_batch_size=3)
    expected = model_frame_scores(folder, audio)
    assert result["frame_scores"].shape == tuple(expected.shape)
    np.testing.assert_allclose(result["frame_scores"], expected.numpy(), atol=1e-5)
    assert result["labels"] == ["tone", "noise", "other"]
    step = result["frame_times"][1] - result["frame_times"][0]
    assert step * len(result["frame_times"]) == pytest.approx(seconds, abs=step)


def test_file_path_is_streamed_through_ffmpeg(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "READ_BLOCK_SECONDS", 7.0)
    audio = noise(31.0, seed=3)
    sf.write(tmp_path / "clip.flac", audio, RATE)
    detector = pipeline("sound-event-detection", model=str(folder))
    from_file = detector(str(tmp_path / "clip.flac"), return_frame_scores=True)
    from_array = detector(audio, return_frame_scores=True)
    np.testing.assert_allclose(from_file["frame_scores"], from_array["frame_scores"], atol=1e-4)
    from_bytes = detector((tmp_path / "clip.flac").read_bytes(), return_frame_scores=True)
    np.testing.assert_allclose(from_bytes["frame_scores"], from_array["frame_scores"], atol=1e-4)


def loudness_model(folder):
    """The real model with its forward replaced by a transparent detector: label 0 is active where the
    features are loud, so we know exactly where events must come out."""
    model = HTSATForSoundEventDetection.from_pretrained(folder).eval()

    def forward(input_features, **kwargs):
        frame_logits = loudness_step_logits(input_features, model.config.token_steps)
        return htsat_hf.modeling_htsat.HTSATSoundEventDetectionOutput(
            logits=frame_logits.mean(1), frame_logits=frame_logits
        )

    model.forward = forward
    return model


import htsat_hf  # noqa: E402


def test_event_crossing_window_boundaries_comes_out_whole(folder):
    model = loudness_model(folder)
    detector = pipeline("sound-event-detection", model=model, feature_extractor=HTSATFeatureExtractor())
    audio = np.zeros(int(30 * RATE), dtype=np.float32) + 1e-6
    t = np.arange(int(5 * RATE)) / RATE
    audio[int(8 * RATE) : int(13 * RATE)] = 0.5 * np.sin(2 * np.pi * 1000 * t)  # 8-13 s, across the 10-s boundary
    events = detector(audio)["events"]
    assert len(events) == 1
    event = events[0]
    assert event["label"] == "tone"
    assert event["onset"] == pytest.approx(8.0, abs=0.3125)
    assert event["offset"] == pytest.approx(13.0, abs=0.3125)


def test_bad_inputs(folder):
    detector = pipeline("sound-event-detection", model=str(folder))
    with pytest.raises(ValueError, match="mono"):
        detector(np.zeros((2, RATE * 3), dtype=np.float32))
    with pytest.raises(ValueError, match="sampling_rate"):
        detector({"array": noise(2.0)})
    with pytest.raises(ValueError, match="could not decode"):
        detector(str(REPO_ROOT / "README.md"))


def test_cli_writes_tsv_and_plot(folder, tmp_path):
    audio = noise(12.0, seed=5)
    sf.write(tmp_path / "a.wav", audio, 44100)
    out = tmp_path / "events.tsv"
    png = tmp_path / "events.png"
    subprocess.run(
        [sys.executable, "-m", "htsat_hf", "detect", str(tmp_path / "a.wav"), "--model",
         str(folder), "--threshold", "0.0", "--output", str(out), "--plot", str(png)],
        check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    rows = out.read_text().strip().splitlines()
    assert rows[0].split("\t") == ["filename", "onset", "offset", "event_label", "score"]
    assert len(rows) > 1 and all(row.split("\t")[0] == "a.wav" for row in rows[1:])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_goes_on_past_a_bad_file_and_never_leaves_half_an_output(folder, tmp_path, monkeypatch, capsys):
    from htsat_hf.commands import detect

    for name, seed in (("a.wav", 1), ("c.wav", 2)):
        sf.write(tmp_path / name, noise(6.0, seed=seed), RATE)
    (tmp_path / "b.flac").write_bytes(b"fLaC" + bytes(300))
    out = tmp_path / "events.tsv"
    out.write_text("previous results\n")
    files = [str(tmp_path / n) for n in ("a.wav", "b.flac", "c.wav")]
    status = detect.main([*files, "--model", str(folder), "--threshold", "0.0", "--output", str(out)])
    assert status == 1
    rows = out.read_text().strip().splitlines()
    assert {row.split("\t")[0] for row in rows[1:]} == {"a.wav", "c.wav"}  # the file after the bad one too
    report = capsys.readouterr().err
    assert "3 files: 2 done" in report and "1 failed" in report and "b.flac" in report
    out.write_text("previous results\n")
    calls = []
    original = detect.csv.writer

    def crash_on_second_file(*args, **kwargs):
        writer = original(*args, **kwargs)

        class Crashing:
            def writerow(self, row):
                calls.append(row)
                if row[0] == "c.wav":
                    raise RuntimeError("disk on fire")
                writer.writerow(row)

        return Crashing()

    monkeypatch.setattr(detect.csv, "writer", crash_on_second_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        detect.main([files[0], files[2], "--model", str(folder), "--threshold", "0.0", "--output", str(out)])
    assert out.read_text() == "previous results\n" and calls  # untouched, and no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.flac", "c.wav", "events.tsv"]


@pytest.mark.parametrize("seconds", [4.0, 63.0])
def test_events_found_while_streaming_equal_those_from_the_whole_grid(folder, seconds, monkeypatch):
    """Without `return_frame_scores` the pipeline keeps no score grid: steps go to an `EventStream` as soon as no
    later window can reach them. The events must be exactly those of post-processing the whole grid."""
    monkeypatch.setattr(pipeline_module, "READ_BLOCK_SECONDS", 7.0)
    detector = pipeline("sound-event-detection", model=str(folder))
    audio = noise(seconds, seed=3)
    whole = detector(audio, return_frame_scores=True, window_batch_size=2)
    scores = whole["frame_scores"]
    middle = [float(np.median(scores[:, k])) for k in range(scores.shape[1])]  # about half the steps active
    settings = [
        dict(threshold=middle),
        dict(threshold=middle, upsample="linear", median_filter_seconds=0.7, min_gap_seconds=0.5),
        dict(hysteresis=(max(middle), min(middle)), min_duration_seconds=0.4),
        dict(threshold=0.5, label_mapping={"any": ["tone", "noise", "other"], "tone": ["tone"]}),
    ]
    for options in settings:
        expected = detector(audio, return_frame_scores=True, window_batch_size=2, **options)["events"]
        streamed = detector(audio, window_batch_size=2, **options)
        assert set(streamed) == {"events"}
        assert streamed["events"] == expected
    assert any(detector(audio, window_batch_size=2, **options)["events"] for options in settings)


FAKE_FFMPEG = """#!{python}
import sys
import threading
import numpy as np
sys.stderr.write("[flac] invalid frame header\\n" * 20000)  # ~560 KB of warnings before any audio
sys.stderr.flush()
sys.stdout.buffer.write(np.ones(32000 * 3, dtype=np.float32).tobytes())
sys.exit({code})
"""


@pytest.mark.parametrize("code", [0, 1])
def test_ffmpeg_warnings_do_not_stall_the_stream(tmp_path, monkeypatch, caplog, code):
    """ffmpeg's stderr is drained while the samples are read: a file with many decoding warnings used to fill the
    pipe and block ffmpeg (and the pipeline with it) forever. Warnings are reported; a failure names the file."""
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text(FAKE_FFMPEG.format(python=sys.executable, code=code))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    sf.write("x.flac", np.zeros(RATE, np.float32), RATE)  # a real file for ffprobe (the streams, the channels)
    outcome = {}

    def read():
        try:
            outcome["samples"] = sum(len(b) for b in audio_decoding.stream_with_ffmpeg("x.flac", RATE, RATE))
        except ValueError as error:
            outcome["error"] = str(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "reading stalled on ffmpeg's stderr"
    if code == 0:
        assert outcome["samples"] == 3 * RATE
        assert "invalid frame header" in caplog.text
    else:
        assert "ffmpeg could not decode x.flac" in outcome["error"] and "invalid frame header" in outcome["error"]


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_step_scores_do_not_depend_on_how_the_steps_are_split(problem_type):
    """Streamed blocks and the whole grid must score each step identically, whatever the block lengths."""
    from htsat_hf.scores import logits_to_scores

    logits = torch.randn(203, 7, generator=torch.Generator().manual_seed(0)) * 4
    whole = logits_to_scores(logits, problem_type).numpy()
    for cut in (1, 2, 5, 13, 64, 101, 202):
        parts = [logits_to_scores(logits[:cut], problem_type), logits_to_scores(logits[cut:], problem_type)]
        assert np.array_equal(np.concatenate(parts), whole)
    assert whole.dtype == np.float32
    expected = torch.sigmoid(logits) if problem_type.startswith("multi") else torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(whole, expected.numpy(), rtol=1e-6)
