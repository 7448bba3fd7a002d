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

from .cli import READ_SECONDS
from .detector import LiveDetector


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


def keyword_stream(words: list[str], seconds: float, rate: int, seed: int = 7, gap: tuple[float, float] = (1.0, 6.0),
                   snr_db: tuple[float, float] = (10.0, 30.0)) -> tuple[np.ndarray, list[dict]]:
    """Spoken keywords (held-out voices) at random times in coloured noise: (audio, ground-truth events)."""
    from ..demo_data import KeywordDataSpec, coloured_noise, split_voices, synthesize, trim_silence

    rng = np.random.default_rng(seed)
    _, voices = split_voices(KeywordDataSpec(words=tuple(words)))
    length = int(seconds * rate)
    audio = coloured_noise(length, 1.0, rng) * 0.003
    events, position = [], float(rng.uniform(*gap))
    while True:
        word = words[int(rng.integers(len(words)))]
        speech, speech_rate = synthesize(word, voices[int(rng.integers(len(voices)))], int(rng.integers(110, 220)),
                                         int(rng.integers(15, 90)))
        speech = torch.from_numpy(trim_silence(speech))
        import torchaudio

        speech = torchaudio.functional.resample(speech, speech_rate, rate).numpy()
        begin = int(position * rate)
        if begin + len(speech) >= length:
            break
        gain = 0.003 * 10 ** (rng.uniform(*snr_db) / 20) / (np.sqrt(np.mean(speech**2)) + 1e-9)
        audio[begin : begin + len(speech)] += speech * gain
        events.append({"event_label": word, "onset": position, "offset": position + len(speech) / rate})
        position += len(speech) / rate + float(rng.uniform(*gap))
    audio = audio / (np.abs(audio).max() + 1e-9) * 0.8
    return audio.astype(np.float32), events


def _table(events: list[dict], filename: str = "stream") -> pd.DataFrame:
    rows = [{"filename": filename, "onset": e["onset"], "offset": e["offset"],
             "event_label": e.get("event_label", e.get("label"))} for e in events]
    return pd.DataFrame(rows, columns=["filename", "onset", "offset", "event_label"])


def agreement(reference: list[dict], events: list[dict], duration: float, labels: list[str]) -> float:
    """Macro intersection F1 of `events` with `reference` as the ground truth (classes present in the reference)."""
    from ..sed_metrics import intersection_f1

    present = sorted({e.get("event_label", e.get("label")) for e in reference})
    result = intersection_f1(_table(reference), _table(events), {"stream": duration}, labels=present)
    return float(result["macro"])


def lookahead_agreement(model: Any, audio: np.ndarray, lookaheads: list[float], settings: dict,
                        hop_seconds: float = 1.0) -> dict[str, Any]:
    """Offline events, and per lookahead the live events' agreement with them (block size 0.1 s)."""
    from transformers import pipeline

    from ..annotation.annotator import _load

    model, extractor = _load(model, None, None, False)
    offline = pipeline("sound-event-detection", model=model, feature_extractor=extractor)
    rate = extractor.sampling_rate
    reference = offline(audio, **settings)["events"]
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = []
    for lookahead in lookaheads:
        detector = LiveDetector(model, extractor, hop_seconds=hop_seconds, lookahead_seconds=lookahead, **settings)
        block = int(READ_SECONDS * rate)
        events = []
        for first in range(0, len(audio), block):
            events += [e for u in detector.push(audio[first : first + block]) for e in u.events]
        events += [e for u in detector.flush() for e in u.events]
        rows.append({"lookahead_seconds": lookahead, "events": len(events),
                     "f1_vs_offline": agreement(reference, events, len(audio) / rate, labels)})
    return {"offline_events": len(reference), "rows": rows, "reference": reference}
