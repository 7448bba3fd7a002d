"""The live detector's numbers: latency and CPU load on a real-time stream, and agreement with the offline pipeline.

Latency of a step: wall time from the arrival of the block holding the step's last sample to the emission of the
step's score. The stream is fed in real time in blocks of `READ_SECONDS` (as `scripts/listen.py` reads ffmpeg), so
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

from ..commands.listen import READ_SECONDS
from ..live.detector import LiveDetector


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
    (`demo_data.build_strong_label_scene_dataset`), with `scripts/train.py`'s code. Returns the model folder (its
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
