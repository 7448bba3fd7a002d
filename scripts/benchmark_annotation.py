#!/usr/bin/env python
"""Corpus annotation benchmark: end-to-end hours of audio per hour against the model alone, memory over the run,
2 processes x 1 thread against 1 process x 2 threads. Prints a table and pass/fail lines; writes JSON.

    python scripts/benchmark_annotation.py --output results/benchmark_annotation.json       # 2 h corpus
    python scripts/benchmark_annotation.py --hours 0.1                                      # a quick look
    python scripts/benchmark_annotation.py --device cuda --bf16 --num_workers 8 --batch_size 128  # on a GPU
    python scripts/benchmark_annotation.py --hours 0.005 --model_size tiny --model_batches 1  # plumbing, in seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0, help="length of the generated corpus")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--num_workers", type=int, default=2, help="decoding workers per process")
    parser.add_argument("--corpus_dir", help="where to generate (or reuse) the corpus")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--device", default="cpu", help="cpu (the 1 x 2 / 2 x 1 comparison) or cuda, cuda:1 ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (model only and end to end)")
    parser.add_argument("--model_batches", type=int, default=18,
                        help="forward passes per model-only measurement (default 18: about 30 s on 2 cores)")
    parser.add_argument("--single_process", action="store_true",
                        help="only one end-to-end process on --device between model-only rounds (the GPU layout; "
                             "the default on any device but the CPU)")
    parser.add_argument("--model_size", choices=["paper", "tiny"], default="paper",
                        help="paper: the published model (default); tiny: a tiny one of the same layout, to check the "
                             "plumbing in seconds (the timings mean nothing)")
    args = parser.parse_args()
    # imported once the arguments are read, so that a wrong one is reported at once, not after torch has loaded
    from htsat_hf.benchmarks.annotation import AnnotationBenchmarkSettings, format_report, run_annotation_benchmark

    settings = AnnotationBenchmarkSettings(
        hours=args.hours, batch_size=args.batch_size, num_workers=args.num_workers, corpus_dir=args.corpus_dir,
        device=args.device, bf16=args.bf16, model_size=args.model_size, single_process=args.single_process or None,
        model_batches=args.model_batches,
    )
    results = run_annotation_benchmark(settings)
    print(format_report(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
