"""The live detector (`htsat_hf.live`) and `htsat-hf listen`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, loudness_step_logits, save_tiny_detector
from transformers import pipeline

import htsat_hf  # noqa: F401
from htsat_hf import HTSATFeatureExtractor, HTSATForSoundEventDetection
from htsat_hf.live import LiveDetector
from htsat_hf.pipeline_htsat import AudioInputError

RATE = 32000
MAPPING = {"any": ["tone", "noise"], "other": ["other"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("live_model"))


def noisy(seconds: float, seed: int = 0) -> np.ndarray:
    audio = np.random.default_rng(seed).standard_normal(int(seconds * RATE)).astype(np.float32) * 0.05
    audio[int(0.4 * len(audio)) : int(0.6 * len(audio))] *= 10  # something for the model to react to
    return audio


def run_in_blocks(detector: LiveDetector, audio: np.ndarray, seed: int | None = 0, flush: bool = True) -> list:
    """Pushes `audio` in blocks of random sizes (one block when seed is None)."""
    updates, position = [], 0
    rng = np.random.default_rng(seed)
    while position < len(audio):
        size = len(audio) if seed is None else int(rng.integers(1, 3 * RATE))
        updates += detector.push(audio[position : position + size])
        position += size
    return updates + (detector.flush() if flush else [])


def scores_of(updates) -> np.ndarray:
    return np.concatenate([update.step_scores for update in updates])


def events_of(updates) -> list[dict]:
    """Events in emission order, then sorted as the offline pipeline sorts them."""
    events = [event for update in updates for event in update.events]
    return sorted(events, key=lambda event: (event["onset"], event["label"]))


def sorted_events(events):
    return sorted(events, key=lambda event: (event["onset"], event["label"]))


@pytest.mark.parametrize("seconds", [10.3, 23.7, 40.0])
@pytest.mark.parametrize("settings", [
    {},
    {"median_filter_seconds": 0.7, "min_gap_seconds": 0.5, "min_duration_seconds": 0.4},
    {"hysteresis": (0.505, 0.495), "upsample": "linear", "label_mapping": MAPPING},
])
def test_equals_the_offline_pipeline_where_the_windows_coincide(folder, seconds, settings):
    """hop = long_input_hop_seconds, no padded start, lookahead >= the window: the offline windows and stitching."""
    audio = noisy(seconds)
    offline = pipeline("sound-event-detection", model=str(folder))
    reference = offline(audio, return_frame_scores=True, label_mapping=settings.get("label_mapping"))
    threshold = float(np.median(reference["frame_scores"]))  # random weights: a threshold that gives events
    expected = offline(audio, threshold=threshold, **settings)["events"]
    assert len(expected) >= 3
    detector = LiveDetector(str(folder), hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False,
                            threshold=threshold, **settings)
    updates = run_in_blocks(detector, audio)
    np.testing.assert_allclose(scores_of(updates), reference["frame_scores"], atol=1e-5)
    assert events_of(updates) == sorted_events(expected)


def test_padded_start_changes_only_the_first_window(folder):
    audio = noisy(31.0, seed=1)
    reference = pipeline("sound-event-detection", model=str(folder))(audio, return_frame_scores=True)
    detector = LiveDetector(str(folder), hop_seconds=1.0, lookahead_seconds=10.0)
    scores = scores_of(run_in_blocks(detector, audio))
    assert scores.shape == reference["frame_scores"].shape
    # steps starting at or after clip_seconds - hop_seconds see no padded window; the offline windows hop 5 s, the
    # live ones 1 s, so compare against the offline stitching of the same 1-s windows
    hop_1s = HTSATForSoundEventDetection.from_pretrained(folder)
    hop_1s.config.long_input_hop_seconds = 1.0
    features = HTSATFeatureExtractor()(audio, sampling_rate=RATE, padding=False, return_tensors="pt")
    with torch.no_grad():
        expected = hop_1s.eval()(**features).frame_logits.double().sigmoid()[0].numpy()
    first = int(np.ceil(9.0 / detector.step_seconds))
    np.testing.assert_allclose(scores[first:], expected[first:], atol=1e-5)
    assert not np.allclose(scores[:first], expected[:first], atol=1e-3)


@pytest.mark.parametrize("lookahead", [0.0, 2.0])
def test_blocks_of_any_size_give_the_same_output(folder, lookahead):
    audio = noisy(27.3, seed=2)
    settings = dict(lookahead_seconds=lookahead, threshold=0.5, median_filter_seconds=0.7, min_gap_seconds=0.5)
    one = run_in_blocks(LiveDetector(str(folder), **settings), audio, seed=None)
    many = run_in_blocks(LiveDetector(str(folder), **settings), audio, seed=3)
    assert [u.time for u in one] == [u.time for u in many] == [float(t) for t in range(1, 28)] + [27.3]
    np.testing.assert_allclose(scores_of(one), scores_of(many), atol=1e-6)
    for a, b in zip(one, many):
        assert [t["label"] for t in a.tags] == [t["label"] for t in b.tags]
        assert [t["score"] for t in a.tags] == pytest.approx([t["score"] for t in b.tags], abs=1e-6)
    assert [u.events for u in one] == [u.events for u in many]


def test_steps_are_emitted_lookahead_behind_the_latest_window(folder):
    for lookahead in (0.0, 1.0, 5.0):
        detector = LiveDetector(str(folder), lookahead_seconds=lookahead)
        emitted = 0
        for update in run_in_blocks(detector, noisy(20.0, seed=4), flush=False):
            emitted += len(update.step_scores)
            assert update.first_step * detector.step_seconds == pytest.approx(
                (emitted - len(update.step_scores)) * detector.step_seconds)
            # every emitted step ends at least `lookahead` before the window end; the next one does not
            assert emitted * detector.step_seconds <= max(update.time - lookahead, 0.0) + 1e-6
            assert (emitted + 1) * detector.step_seconds > update.time - lookahead
        tags = update.tags
        assert len(tags) == 3 and tags[0]["score"] >= tags[1]["score"] >= tags[2]["score"]


class LoudnessDetector(LiveDetector):
    """The real detector with a transparent model: label "tone" is active where the features are loud."""

    def step_logits(self, features: torch.Tensor) -> torch.Tensor:
        return loudness_step_logits(features, self.config.token_steps)[:, None]  # (windows, one member, steps, labels)


def tone(seconds: float, start: float, end: float) -> np.ndarray:
    audio = np.full(int(seconds * RATE), 1e-6, dtype=np.float32)
    t = np.arange(int((end - start) * RATE)) / RATE
    audio[int(start * RATE) : int(end * RATE)] = 0.5 * np.sin(2 * np.pi * 1000 * t)
    return audio


def test_events_come_out_once_final_and_flush_closes_open_ones(folder):
    detector = LoudnessDetector(str(folder), lookahead_seconds=1.0, min_gap_seconds=0.5)
    audio = tone(30.0, 8.0, 13.0)
    updates = run_in_blocks(detector, audio, flush=False)
    (event,) = [e for u in updates for e in u.events]
    assert event["label"] == "tone"
    assert event["onset"] == pytest.approx(8.0, abs=0.32) and event["offset"] == pytest.approx(13.0, abs=0.32)
    emitted_at = next(u.time for u in updates if u.events)
    assert event["offset"] + 1.0 + 0.5 <= emitted_at <= event["offset"] + 1.0 + 0.5 + 1.0 + 0.32  # lookahead + gap
    assert not [e for u in detector.flush() for e in u.events]

    still_on = LoudnessDetector(str(folder), lookahead_seconds=1.0)
    updates = run_in_blocks(still_on, tone(20.0, 15.0, 20.0), flush=False)
    assert not [e for u in updates for e in u.events]
    (closed,) = [e for u in still_on.flush() for e in u.events]
    assert closed["onset"] == pytest.approx(15.0, abs=0.32) and closed["offset"] == pytest.approx(20.0)


def test_silence_emits_no_events(folder):
    detector = LoudnessDetector(str(folder))
    updates = run_in_blocks(detector, np.zeros(25 * RATE, dtype=np.float32))
    assert len(updates) == 25 and not [e for u in updates for e in u.events]
    assert all(u.tags[0]["score"] < 1e-3 for u in updates)


def test_memory_stays_flat(folder):
    detector = LoudnessDetector(str(folder), median_filter_seconds=0.5)
    block = tone(10.0, 2.0, 3.0)
    sizes = []
    for _ in range(40):  # 400 s
        detector.push(block)
        sizes.append((len(detector.frames.samples), len(detector.frames._frames), detector.stitcher.sums.shape[0],
                      len(detector.events.frames), len(detector.events.steps)))
    sizes = np.array(sizes)
    assert (sizes[20:].max(axis=0) <= sizes[:20].max(axis=0)).all()  # nothing grows with the stream
    assert sizes[:, 1].max() <= detector.window_frames + detector.hop_frames


def test_bad_blocks(folder):
    detector = LiveDetector(str(folder))
    detector.push(np.zeros(RATE, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot change within a stream"):
        detector.push(np.zeros(100, dtype=np.float32), sampling_rate=16000)
    with pytest.raises(AudioInputError, match="NaN or Inf"):
        detector.push(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match=r"takes \(samples,\) blocks"):
        detector.push(np.zeros((100, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="resample it upstream"):
        LiveDetector(str(folder), sampling_rate=16000)
    with pytest.raises(ValueError, match="resample it upstream"):  # int() took 32000.5 Hz for the model's rate
        LiveDetector(str(folder), sampling_rate=RATE + 0.5)
    with pytest.raises(ValueError, match="cannot change within a stream"):
        detector.push(np.zeros(100, dtype=np.float32), sampling_rate=RATE + 0.5)
    with pytest.raises(ValueError, match="whole number of feature hops"):
        LiveDetector(str(folder), hop_seconds=0.123)
    with pytest.raises(AudioInputError, match="fewer than the 513"):
        short = LiveDetector(str(folder))
        short.push(np.zeros(10, dtype=np.float32))
        short.flush()


def test_stereo_and_integer_blocks(folder):
    audio = noisy(12.0, seed=5)
    mono = run_in_blocks(LiveDetector(str(folder)), audio)
    stereo = run_in_blocks(LiveDetector(str(folder), channels=2), np.stack([audio, audio], axis=1))
    np.testing.assert_allclose(scores_of(mono), scores_of(stereo), atol=1e-6)
    pcm = np.round(audio * 32768).clip(-32768, 32767).astype(np.int16)
    from_pcm = run_in_blocks(LiveDetector(str(folder)), pcm)  # scaled to [-1, 1) as soundfile does
    from_float = run_in_blocks(LiveDetector(str(folder)), pcm.astype(np.float32) / 32768)
    np.testing.assert_allclose(scores_of(from_pcm), scores_of(from_float), atol=1e-6)


def test_listen_script_on_a_file_and_on_stdin(folder, tmp_path):
    audio = noisy(14.0, seed=6)
    sf.write(tmp_path / "clip.wav", audio, RATE, subtype="FLOAT")
    expected = run_in_blocks(LiveDetector(str(folder), threshold=0.5, lookahead_seconds=1.0), audio)
    common = ["--model", str(folder), "--threshold", "0.5", "--lookahead", "1", "--top-k", "3"]
    for source, stdin in ((["--input", str(tmp_path / "clip.wav"), "--as-fast-as-possible"], None),
                          (["--stdin", "--stdin-format", "f32le", "--stdin-rate", str(RATE)], audio.tobytes())):
        result = subprocess.run([sys.executable, "-m", "htsat_hf", "listen", *common, *source], input=stdin,
                                capture_output=True, timeout=120,
                                env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                     "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        assert result.returncode == 0, result.stderr.decode()
        lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
        hops = [line for line in lines if line["type"] == "tags"]
        assert [h["time"] for h in hops] == pytest.approx([u.time for u in expected])
        assert [[t["label"] for t in h["tags"]] for h in hops] == [[t["label"] for t in u.tags] for u in expected]
        events = [{k: v for k, v in line.items() if k != "type"} for line in lines if line["type"] == "event"]
        assert len(events) == sum(len(u.events) for u in expected) > 0
        assert [e["label"] for e in events] == [e["label"] for u in expected for e in u.events]


def test_listen_script_averages_a_stereo_file_as_the_pipelines_do(folder, tmp_path):
    """`htsat-hf listen` used ffmpeg's -ac 1 (+3 dB for stereo); now the channels are averaged, as every other input's
    are."""
    from htsat_hf.audio_decoding import downmix

    stereo = np.stack([noisy(12.0, seed=9), 0.3 * noisy(12.0, seed=10)], axis=1).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, RATE, subtype="FLOAT")
    expected = run_in_blocks(LiveDetector(str(folder), threshold=0.5), downmix(stereo.T))
    result = subprocess.run(
        [sys.executable, "-m", "htsat_hf", "listen", "--model", str(folder), "--threshold", "0.5",
         "--top-k", "5", "--input", str(tmp_path / "stereo.wav"), "--as-fast-as-possible"],
        capture_output=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert result.returncode == 0, result.stderr.decode()
    hops = [line for line in map(json.loads, result.stdout.decode().splitlines()) if line["type"] == "tags"]
    assert len(hops) == len(expected) > 0
    for hop, update in zip(hops, expected):
        assert {t["label"]: t["score"] for t in hop["tags"]} == pytest.approx(
            {t["label"]: t["score"] for t in update.tags}, abs=1e-5)


class VirtualClock:
    """`time` for the latency probe whose clock moves only when it sleeps: the real-time schedule without the
    machine's speed in it (each push takes no time), so the latencies are the schedule's own on any machine."""

    def __init__(self):
        self.now = 0.0
        self.process_time = time.process_time

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_latency_probe_and_agreement_measure_what_they_say(folder, monkeypatch):
    """The benchmark's own bookkeeping: a real-time feed of 3 s at hop 1 s emits every step, with latencies in
    [0, hop + block] when processing takes no time; identical event lists agree with F1 1, disjoint ones 0."""
    from htsat_hf.benchmarks import live as benchmark
    from htsat_hf.benchmarks.live import agreement, real_time_latency

    monkeypatch.setattr(benchmark, "time", VirtualClock())
    detector = LiveDetector(str(folder), hop_seconds=1.0)
    result = real_time_latency(detector, noisy(3.0, seed=8))
    # the window ending at 3 s needs the STFT's right context past the end, so it runs only at flush (not timed)
    assert result.steps == int(2.0 // detector.step_seconds)
    assert 0.0 <= result.latency_p50 <= result.latency_p95 <= result.latency_max <= 1.0 + 0.1
    assert result.latency_max > 0.1 and result.cpu_cores > 0.0  # a step waits for its window's hop
    events = [{"label": "tone", "onset": 1.0, "offset": 2.0}, {"label": "noise", "onset": 3.0, "offset": 3.5}]
    assert agreement(events, events, 5.0, ["tone", "noise"]) == 1.0
    moved = [{"label": "tone", "onset": 4.0, "offset": 4.5}, {"label": "noise", "onset": 0.2, "offset": 0.4}]
    assert agreement(events, moved, 5.0, ["tone", "noise"]) == 0.0


def test_lookahead_agreement_reports_every_hop_and_lookahead(folder):
    """The agreement table's rows: one per live hop and lookahead, F1s in [0, 1]; the offline events at the default
    hop agree with themselves (F1 1), and a live run that sees every window at the offline hop agrees closely."""
    from htsat_hf.benchmarks.live import lookahead_agreement

    audio = noisy(24.0, seed=3)
    result = lookahead_agreement(str(folder), audio, [0.0, 10.0], {"threshold": 0.5}, hops=(1.0, 5.0))
    assert [(row["hop_seconds"], row["lookahead_seconds"]) for row in result["rows"]] == [
        (1.0, 0.0), (1.0, 10.0), (5.0, 0.0), (5.0, 10.0)]
    assert all(0.0 <= row[key] <= 1.0 for row in result["rows"] for key in ("f1_vs_offline", "f1_vs_offline_same_hop"))
    assert result["default_hop_seconds"] == 5.0 and result["offline_hops_agreement"][5.0] == 1.0
    assert 0.0 <= result["offline_hops_agreement"][1.0] <= 1.0 and result["offline_events"] > 0


@pytest.fixture(scope="module")
def ensemble_folder(folder, tmp_path_factory):
    """Two tiny detectors (different weights, the same labels) as one `HTSATEnsembleModel` folder."""
    from htsat_hf.modeling_htsat_ensemble import HTSATEnsembleModel

    second = save_tiny_detector(tmp_path_factory.mktemp("live_member"), seed=1)
    members = [HTSATForSoundEventDetection.from_pretrained(path) for path in (folder, second)]
    path = tmp_path_factory.mktemp("live_ensemble")
    HTSATEnsembleModel.from_members(members).save_pretrained(path)
    HTSATFeatureExtractor().save_pretrained(path)
    return path, second


def test_an_ensemble_equals_the_offline_pipeline_and_averages_its_members(folder, ensemble_folder):
    """Where the windows coincide, an ensemble's steps and events are the offline ensemble's; each hop's tags are the
    mean of the members' tag probabilities (the ensemble's default `average="probabilities"`)."""
    path, second = ensemble_folder
    audio = noisy(23.7)
    offline = pipeline("sound-event-detection", model=str(path))
    reference = offline(audio, return_frame_scores=True)
    threshold = float(np.median(reference["frame_scores"]))
    expected = offline(audio, threshold=threshold, median_filter_seconds=0.7)["events"]
    assert len(expected) >= 3
    settings = dict(hop_seconds=5.0, lookahead_seconds=10.0, pad_start=False, threshold=threshold,
                    median_filter_seconds=0.7, top_k=3)
    updates = run_in_blocks(LiveDetector(str(path), **settings), audio)
    np.testing.assert_allclose(scores_of(updates), reference["frame_scores"], atol=1e-5)
    assert events_of(updates) == sorted_events(expected)
    member_updates = [run_in_blocks(LiveDetector(str(member), **settings), audio) for member in (folder, second)]
    single = pipeline("sound-event-detection", model=str(folder))(audio, return_frame_scores=True)["frame_scores"]
    assert np.abs(single - reference["frame_scores"]).max() > 1e-3  # the second member changes the scores
    for update, *of_members in zip(updates, *member_updates):
        tag_scores = [{tag["label"]: tag["score"] for tag in u.tags} for u in of_members]
        for tag in update.tags:
            assert tag["score"] == pytest.approx(np.mean([scores[tag["label"]] for scores in tag_scores]), abs=1e-5)


def test_an_ensemble_without_the_token_semantic_head_is_refused():
    from htsat_hf import HTSATConfig, HTSATForAudioClassification
    from htsat_hf.modeling_htsat_ensemble import HTSATEnsembleModel

    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=3,
                         use_token_semantic_head=False)
    members = [HTSATForAudioClassification(config).eval() for _ in range(2)]
    with pytest.raises(ValueError, match="members do not all have it on one time grid"):
        LiveDetector(HTSATEnsembleModel.from_members(members), HTSATFeatureExtractor())