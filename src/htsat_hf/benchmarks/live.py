"""The live detector's numbers: latency and CPU load on a real-time stream, and agreement with the offline pipeline.

Latency of a step: wall time from the arrival of the block holding the step's last sample to the emission of the
step's score. The stream is fed in real time in blocks of `READ_SECONDS` (as `htsat-hf listen` reads ffmpeg), so
a detector that falls behind accumulates a backlog and the latency shows it. CPU load: this process's CPU time over
the stream's wall time, in cores.

Agreement: on a generated stream (spoken keywords at known times in noise, several minutes), the live events at each
lookahead against the offline `pipeline("sound-event-detection")` events as the reference, by intersection F1
(`sed_metrics.intersection_f1`, psds_eval's defaults).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..live.detector import READ_SECONDS, LiveDetector


@dataclass
class LatencyResult:
    threads: int
    lookahead_seconds: float
    hop_seconds: float
    stream_seconds: float
    steps: int
    latency_p50: float
    latency_p95: float
    latency_max: float
    cpu_cores: float  # CPU seconds per second of stream
    model_seconds_per_window: float


def real_time_latency(detector: LiveDetector, audio: np.ndarray, block_seconds: float = READ_SECONDS) -> LatencyResult:
    """Feeds `audio` in real time and measures when each step's score comes out."""
    rate = detector.sampling_rate
    block = int(round(block_seconds * rate))
    arrivals: list[float] = []  # wall time at which block j arrived
    latencies: list[float] = []
    model_time = 0.0
    original = detector.step_logits

    def timed_step_logits(features):
        nonlocal model_time
        begin = time.perf_counter()
        result = original(features)
        model_time += time.perf_counter() - begin
        return result

    detector.step_logits = timed_step_logits
    cpu_start, start = time.process_time(), time.perf_counter()
    for first in range(0, len(audio), block):
        due = start + (first + block) / rate  # the block's last sample exists from this moment on
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        arrivals.append(due)  # behind schedule, the block has been waiting in the pipe since `due`
        updates = detector.push(audio[first : first + block])
        emitted_at = time.perf_counter()
        for update in updates:
            for i in range(update.first_step, update.first_step + len(update.step_scores)):
                last_sample = min((i + 1) * detector.step_seconds * rate, len(audio)) - 1
                latencies.append(emitted_at - arrivals[int(last_sample // block)])
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    detector.step_logits = original
    values = np.array(latencies)
    return LatencyResult(
        threads=torch.get_num_threads(), lookahead_seconds=detector.lookahead_seconds, hop_seconds=detector.hop_seconds,
        stream_seconds=len(audio) / rate, steps=len(values), latency_p50=float(np.percentile(values, 50)),
        latency_p95=float(np.percentile(values, 95)), latency_max=float(values.max()), cpu_cores=cpu / wall,
        model_seconds_per_window=model_time / max(1, detector.windows_run),
    )


TRAINING_ARGS = [
    "--embed_dim", "32", "--depths", "1", "1", "2", "1", "--num_heads", "2", "4", "8", "16", "--spec_size", "128",
    "--num_mel_bins", "32", "--clip_seconds", "10", "--sampling_rate", "16000", "--hop_length", "320",
    "--n_fft", "512", "--f_max", "8000", "--time_mask_width", "16", "--freq_mask_width", "4",
    "--num_train_epochs", "20", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
    "--learning_rate", "1e-3", "--mixup_alpha", "0", "--htsat_lr_schedule", "False", "--lr_scheduler_type", "cosine",
    "--warmup_steps", "30", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "20", "--seed", "0",
    "--use_cpu", "--report_to", "none", "--disable_tqdm", "True",
]


def train_sound_event_model(directory: str) -> str:
    """Trains a small HTS-AT with a 10-s window (16 kHz, hop 320, 32 mel bins: 10 s fold into a 128-px image, 16
    steps of 0.625 s) from strong labels on synthetic scenes of the benchmark's four sound classes
    (`demo.data.build_strong_label_scene_dataset`), with `htsat-hf train`'s code. Returns the model folder (its
    held-out frame and clip metrics are in all_results.json)."""
    from pathlib import Path

    from ..demo.data import build_strong_label_scene_dataset
    from ..training.run import main as train_main

    data, model = Path(directory) / "scenes", Path(directory) / "strong_model"
    if not (model / "config.json").exists():
        build_strong_label_scene_dataset(data)
        train_main([
            "--strong_labels_train", str(data / "metadata" / "train.tsv"), "--audio_dir", str(data / "audio" / "train"),
            "--strong_labels_eval", str(data / "metadata" / "eval.tsv"), "--eval_audio_dir", str(data / "audio" / "eval"),
            "--output_dir", str(model), *TRAINING_ARGS,
        ])
    return str(model)


def _table(events: list[dict], filename: str = "stream") -> pd.DataFrame:
    rows = [{"filename": filename, "onset": e["onset"], "offset": e["offset"],
             "event_label": e.get("event_label", e.get("label"))} for e in events]
    return pd.DataFrame(rows, columns=["filename", "onset", "offset", "event_label"])


def agreement(reference: list[dict], events: list[dict], duration: float, labels: list[str]) -> float:
    """Macro intersection F1 of `events` with `reference` as the ground truth (classes present in the reference)."""
    from ..metrics.sed_metrics import intersection_f1

    present = sorted({e.get("event_label", e.get("label")) for e in reference})
    result = intersection_f1(_table(reference), _table(events), {"stream": duration}, labels=present)
    return float(result["macro"])


def lookahead_agreement(model: str, audio: np.ndarray, lookaheads: list[float], settings: dict,
                        hops: tuple[float, ...] = (1.0, 5.0)) -> dict[str, Any]:
    """Per live hop and lookahead, the live events' agreement with the offline events at the default window hop
    (`long_input_hop_seconds`) and with the offline events at the live hop (the same windows, all of them seen),
    live audio fed in blocks of `READ_SECONDS`. How much of the first figure's shortfall is the window hop rather
    than the delay shows in `offline_hops_agreement`: the offline events at each hop against the default ones."""
    from transformers import pipeline

    offline = pipeline("sound-event-detection", model=model)
    rate = offline.feature_extractor.sampling_rate
    config = offline.model.config
    default_hop = config.long_input_hop_seconds
    duration = len(audio) / rate
    labels = [config.id2label[i] for i in range(config.num_labels)]
    reference = offline(audio, **settings)["events"]  # the default offline windows (hop long_input_hop_seconds)
    model, extractor = offline.model, offline.feature_extractor
    block = int(READ_SECONDS * rate)
    rows, offline_hops = [], {}
    for hop in hops:
        config.long_input_hop_seconds = hop
        try:
            same_hop = offline(audio, **settings)["events"]  # offline with the live detector's window hop
        finally:
            config.long_input_hop_seconds = default_hop
        offline_hops[hop] = agreement(reference, same_hop, duration, labels)
        for lookahead in lookaheads:
            detector = LiveDetector(model, extractor, hop_seconds=hop, lookahead_seconds=lookahead, **settings)
            events = []
            for first in range(0, len(audio), block):
                events += [e for u in detector.push(audio[first : first + block]) for e in u.events]
            events += [e for u in detector.flush() for e in u.events]
            rows.append({"hop_seconds": hop, "lookahead_seconds": lookahead, "events": len(events),
                         "f1_vs_offline": agreement(reference, events, duration, labels),
                         "f1_vs_offline_same_hop": agreement(same_hop, events, duration, labels)})
    return {"offline_events": len(reference), "rows": rows, "reference": reference, "default_hop_seconds": default_hop,
            "offline_hops_agreement": offline_hops}


@dataclass
class LiveBenchmarkSettings:
    """What `run_live_benchmark` measures (`htsat-hf benchmark live`)."""

    stream_seconds: float = 45.0  # real-time stream per latency run
    runs: str = "1:0,1:2,2:0"  # threads:lookahead pairs of the latency runs
    quality_model: str | None = None  # trained HTS-AT folder with a 10-s window (default: train one)
    quality_dir: str = "results/live_sed"  # where the trained model and data go
    quality_seconds: float = 240.0  # length of the synthetic event stream
    lookaheads: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0)
    live_hops: tuple[float, ...] = (1.0, 5.0)
    threshold: float = 0.5
    median_filter: float = 0.5
    skip_latency: bool = False


def run_live_benchmark(settings: LiveBenchmarkSettings, out=None) -> dict[str, Any]:
    """Latency runs of the paper-size model, then the agreement table on a trained model; prints both as tables to
    `out` (default stdout) and returns the report."""
    import os
    import sys
    from dataclasses import asdict

    from transformers import AutoConfig, AutoFeatureExtractor

    from .. import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection
    from ..demo.data import sound_event_scene
    from ..sed_postprocessing import EventSettings
    from .model import cpu_model

    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    report: dict[str, Any] = {"cpu": cpu_model(), "latency": [], "agreement": None}
    if not settings.skip_latency:
        torch.manual_seed(0)
        model = HTSATForSoundEventDetection(HTSATConfig()).eval()  # the paper's size; weights do not change timing
        extractor = HTSATFeatureExtractor()
        samples = int(settings.stream_seconds * 32000)
        audio = (np.random.default_rng(0).standard_normal(samples) * 0.1).astype(np.float32)
        say(f"{'threads':>7} {'lookahead':>9} {'p50 s':>6} {'p95 s':>6} {'max s':>6} {'bound s':>7} "
            f"{'cores':>6} {'model s/window':>14}")
        for pair in settings.runs.split(","):
            threads, lookahead = int(pair.split(":")[0]), float(pair.split(":")[1])
            torch.set_num_threads(threads)
            detector = LiveDetector(model, extractor, hop_seconds=1.0, lookahead_seconds=lookahead,
                                    event_settings=EventSettings(threshold=0.5))
            result = real_time_latency(detector, audio)
            bound = result.hop_seconds + lookahead + 0.5
            say(f"{threads:>7} {lookahead:>9.1f} {result.latency_p50:>6.3f} {result.latency_p95:>6.3f} "
                f"{result.latency_max:>6.3f} {bound:>7.2f} {result.cpu_cores:>6.2f} "
                f"{result.model_seconds_per_window:>14.3f}")
            report["latency"].append({**asdict(result), "bound_seconds": bound})
    torch.set_num_threads(os.cpu_count() or 2)
    model_dir = settings.quality_model or train_sound_event_model(settings.quality_dir)
    config = AutoConfig.from_pretrained(model_dir)
    rate = AutoFeatureExtractor.from_pretrained(model_dir).sampling_rate
    words = [config.id2label[i] for i in range(config.num_labels)]
    audio, truth = sound_event_scene(settings.quality_seconds, rate, np.random.default_rng(7), classes=words)
    post = {"threshold": settings.threshold, "median_filter_seconds": settings.median_filter}
    result = lookahead_agreement(model_dir, audio, list(settings.lookaheads), post, hops=tuple(settings.live_hops))
    offline_vs_truth = agreement(truth, result["reference"], len(audio) / rate, words)
    default_hop = result["default_hop_seconds"]
    say(f"\nAgreement with the offline pipeline ({settings.quality_seconds:.0f} s synthetic stream, {len(truth)} "
        f"events; offline at its default hop {default_hop} s: {result['offline_events']} events, F1 "
        f"{offline_vs_truth:.3f} against the true event times)")
    say(f"{'live hop s':>10} {'lookahead s':>11} {'events':>6} {'F1 vs offline (hop ' + str(default_hop) + ' s)':>26} "
        f"{'F1 vs offline at the live hop':>30}")
    for row in result["rows"]:
        say(f"{row['hop_seconds']:>10.1f} {row['lookahead_seconds']:>11.1f} {row['events']:>6} "
            f"{row['f1_vs_offline']:>26.3f} {row['f1_vs_offline_same_hop']:>30.3f}")
    for hop, value in result["offline_hops_agreement"].items():
        say(f"offline at hop {hop} s against offline at hop {default_hop} s: F1 {value:.3f}")
    report["agreement"] = {"model": model_dir, "stream_seconds": settings.quality_seconds, "true_events": len(truth),
                           "settings": post, "offline_events": result["offline_events"],
                           "offline_f1_vs_truth": offline_vs_truth, "rows": result["rows"],
                           "offline_hops_agreement": result["offline_hops_agreement"]}
    return report
