#!/usr/bin/env python
"""Live detection benchmark: latency and CPU load of the paper-size model on a real-time stream, and the agreement of
live events with the offline pipeline's at each lookahead, on a trained model.

    python scripts/benchmark_live.py --output results/benchmark_live.json
    python scripts/benchmark_live.py --quality_model DIR        # a trained model for the agreement table

Without `--quality_model`, a small model with a 10-s window is first trained from strong labels on synthetic scenes
of sound events (beeps, chirps, buzzes, hisses; about three minutes on 2 cores). See htsat_hf/benchmarks/live.py.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream_seconds", type=float, default=45.0, help="real-time stream per latency run")
    parser.add_argument("--runs", default="1:0,1:2,2:0", help="threads:lookahead pairs of the latency runs")
    parser.add_argument("--quality_model", help="trained HTS-AT folder with a 10-s window (default: train one)")
    parser.add_argument("--quality_dir", default="results/live_sed", help="where the trained model and data go")
    parser.add_argument("--quality_seconds", type=float, default=240.0, help="length of the synthetic event stream")
    parser.add_argument("--lookaheads", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0, 10.0])
    parser.add_argument("--live_hops", type=float, nargs="+", default=[1.0, 5.0],
                        help="live detector hops of the agreement table (1 s: the default; 5 s: the offline hop)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--median_filter", type=float, default=0.5)
    parser.add_argument("--skip_latency", action="store_true")
    parser.add_argument("--output", default="results/benchmark_live.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection
    from htsat_hf.benchmarks.model import cpu_model
    from htsat_hf.demo.data import sound_event_scene
    from htsat_hf.live import LiveDetector
    from htsat_hf.benchmarks.live import agreement, lookahead_agreement, real_time_latency, train_sound_event_model

    report = {"cpu": cpu_model(), "latency": [], "agreement": None}
    if not args.skip_latency:
        torch.manual_seed(0)
        model = HTSATForSoundEventDetection(HTSATConfig()).eval()  # the paper's size; weights do not change timing
        extractor = HTSATFeatureExtractor()
        audio = (np.random.default_rng(0).standard_normal(int(args.stream_seconds * 32000)) * 0.1).astype(np.float32)
        print(f"{'threads':>7} {'lookahead':>9} {'p50 s':>6} {'p95 s':>6} {'max s':>6} {'bound s':>7} "
              f"{'cores':>6} {'model s/window':>14}", flush=True)
        for pair in args.runs.split(","):
            threads, lookahead = int(pair.split(":")[0]), float(pair.split(":")[1])
            torch.set_num_threads(threads)
            detector = LiveDetector(model, extractor, hop_seconds=1.0, lookahead_seconds=lookahead, threshold=0.5)
            result = real_time_latency(detector, audio)
            bound = result.hop_seconds + lookahead + 0.5
            print(f"{threads:>7} {lookahead:>9.1f} {result.latency_p50:>6.3f} {result.latency_p95:>6.3f} "
                  f"{result.latency_max:>6.3f} {bound:>7.2f} {result.cpu_cores:>6.2f} "
                  f"{result.model_seconds_per_window:>14.3f}", flush=True)
            report["latency"].append({**asdict(result), "bound_seconds": bound})
    torch.set_num_threads(os.cpu_count() or 2)
    model_dir = args.quality_model or train_sound_event_model(args.quality_dir)
    from transformers import AutoConfig, AutoFeatureExtractor

    config = AutoConfig.from_pretrained(model_dir)
    rate = AutoFeatureExtractor.from_pretrained(model_dir).sampling_rate
    words = [config.id2label[i] for i in range(config.num_labels)]
    audio, truth = sound_event_scene(args.quality_seconds, rate, np.random.default_rng(7), classes=words)
    settings = {"threshold": args.threshold, "median_filter_seconds": args.median_filter}
    result = lookahead_agreement(model_dir, audio, args.lookaheads, settings, hops=tuple(args.live_hops))
    offline_vs_truth = agreement(truth, result["reference"], len(audio) / rate, words)
    default_hop = result["default_hop_seconds"]
    print(f"\nAgreement with the offline pipeline ({args.quality_seconds:.0f} s synthetic stream, {len(truth)} events; "
          f"offline at its default hop {default_hop} s: {result['offline_events']} events, F1 {offline_vs_truth:.3f} "
          "against the true event times)")
    print(f"{'live hop s':>10} {'lookahead s':>11} {'events':>6} {'F1 vs offline (hop ' + str(default_hop) + ' s)':>26} "
          f"{'F1 vs offline at the live hop':>30}")
    for row in result["rows"]:
        print(f"{row['hop_seconds']:>10.1f} {row['lookahead_seconds']:>11.1f} {row['events']:>6} "
              f"{row['f1_vs_offline']:>26.3f} {row['f1_vs_offline_same_hop']:>30.3f}")
    for hop, value in result["offline_hops_agreement"].items():
        print(f"offline at hop {hop} s against offline at hop {default_hop} s: F1 {value:.3f}")
    report["agreement"] = {"model": model_dir, "stream_seconds": args.quality_seconds, "true_events": len(truth),
                           "settings": settings, "offline_events": result["offline_events"],
                           "offline_f1_vs_truth": offline_vs_truth, "rows": result["rows"],
                           "offline_hops_agreement": result["offline_hops_agreement"]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
