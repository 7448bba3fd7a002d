"""`htsat-hf benchmark model|annotation|live|search`: the project's benchmarks (`htsat_hf.benchmarks`).

  model       htsat_hf against Transformers' ClapAudioModel and AST, in one process, interleaved
  annotation  corpus annotation end to end against the model alone, memory over the run, 2x1 against 1x2
  live        the live detector's latency and CPU load, and agreement with the offline pipeline per lookahead
  search      a text search over 1,000,000 stored joint-space embeddings (CLAP corpus search)

Examples:
    htsat-hf benchmark model --output results/benchmark_cpu.json        # full CPU run (several minutes)
    htsat-hf benchmark model --quick                                   # batch 1 and 4, 5 min of SED audio
    htsat-hf benchmark model --device cuda --bf16 --output results/benchmark_gpu_bf16.json  # batch 1/16/128
    htsat-hf benchmark model --model-size tiny --sections inference --repeats 1  # plumbing only, in seconds
    htsat-hf benchmark annotation --output results/benchmark_annotation.json   # 2 h corpus
    htsat-hf benchmark annotation --hours 0.005 --model_size tiny --model_batches 1  # plumbing, in seconds
    htsat-hf benchmark annotation --device cuda --bf16 --num_workers 8 --batch_size 128  # on a GPU
    htsat-hf benchmark live --output results/benchmark_live.json
    htsat-hf benchmark live --quality_model DIR       # a trained model (10-s window) for the agreement table
    htsat-hf benchmark search                          # 1,000,000 rows of 512 floats: time per query

`htsat-hf benchmark KIND --help` lists a benchmark's options (each keeps the spelling of its results' keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

KINDS = ("model", "annotation", "live", "search")


def model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf benchmark model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="htsat_hf against Transformers' ClapAudioModel and AST, in one process, interleaved "
        "(see htsat_hf.benchmarks.model for what is measured and how).",
    )
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, fewer repeats, 5 minutes of SED audio")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="inference batch sizes (default 1 4 16; on a GPU 1 16 128)")
    parser.add_argument("--train-batch-size", type=int, help="clips per training step (default 8; on a GPU 32)")
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds per measurement")
    parser.add_argument("--sed-seconds", type=float, help="audio length for sound event detection (default 3600)")
    parser.add_argument("--sections", nargs="+", default=["inference", "training", "fe", "sed"],
                        choices=["inference", "training", "fe", "sed", "fidelity"])
    parser.add_argument("--fidelity-model", help="a trained HTS-AT folder: int8 / bf16 / ONNX against fp32 on its "
                        "held-out data (adds the 'fidelity' section)")
    parser.add_argument("--fidelity-data", help="the audiofolder that model was trained on (its 'test' split)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime row")
    parser.add_argument("--no-cpu-bf16", action="store_true", help="skip the CPU bf16 autocast row")
    parser.add_argument("--no-torch-ops", action="store_true",
                        help="skip the 'htsat_hf torch ops' row (PyTorch's SDPA and LayerNorm in place of the native "
                             "CPU kernels)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd htsat_hf (slow to build)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 dynamically quantised htsat_hf row")
    parser.add_argument("--model-size", choices=["paper", "tiny"], default="paper",
                        help="paper: the published models (default); tiny: tiny models of the same layout and a "
                             "256^3 reference matmul, to check the plumbing in seconds (the timings mean nothing)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, all cores)")
    parser.add_argument("--thp", action="store_true",
                        help="set THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for large CPU tensors; on the 2-core "
                             "benchmark machine it slowed every model by 5-10 %%)")
    return parser


def run_model(args: argparse.Namespace) -> int:
    if args.thp:  # must be set before torch allocates anything; applies to every model alike
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from ..benchmarks.model import BenchmarkSettings, format_report, run_benchmark, save_results

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(bf16=args.bf16, include_int8=not args.no_int8, include_compile=args.compile,
                     include_onnx=not args.no_onnx, include_cpu_bf16=not args.no_cpu_bf16,
                     include_torch_ops=not args.no_torch_ops,
                     fidelity_model=args.fidelity_model, fidelity_data=args.fidelity_data, model_size=args.model_size)
    sections = list(args.sections) + (["fidelity"] if args.fidelity_model and "fidelity" not in args.sections else [])
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(args.batch_sizes)
    if args.train_batch_size:
        overrides["train_batch_size"] = args.train_batch_size
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.sed_seconds:
        overrides["sed_seconds"] = args.sed_seconds
    settings = BenchmarkSettings.for_device(args.device, quick=args.quick, **overrides)
    if args.bf16 and not args.device.startswith("cuda"):
        print("note: --bf16 on CPU runs bf16 autocast on the CPU", file=sys.stderr)
    results = run_benchmark(settings, tuple(sections), log=lambda m: print(f"[benchmark] {m}", file=sys.stderr))
    print(format_report(results))
    if args.output:
        save_results(results, args.output)
        print(f"\nwrote {args.output}")
    return 0


def annotation_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf benchmark annotation",
        description="Corpus annotation benchmark: end-to-end hours of audio per hour against the model alone, memory "
        "over the run, 2 processes x 1 thread against 1 process x 2 threads. Prints a table and pass/fail lines; "
        "writes JSON (htsat_hf.benchmarks.annotation).",
    )
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
    return parser


def run_annotation(args: argparse.Namespace) -> int:
    from ..benchmarks.annotation import AnnotationBenchmarkSettings, format_report, run_annotation_benchmark

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
    return 0


def live_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf benchmark live", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Live detection benchmark: latency and CPU load of the paper-size model on a real-time stream, "
        "and the agreement of live events with the offline pipeline's at each lookahead, on a trained model. Without "
        "--quality_model, a small model with a 10-s window is first trained from strong labels on synthetic scenes "
        "of sound events (about three minutes on 2 cores). See htsat_hf/benchmarks/live.py.",
    )
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
    return parser


def run_live(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..benchmarks.live import LiveBenchmarkSettings, run_live_benchmark

    options = {key: value for key, value in vars(args).items() if key != "output"}
    settings = LiveBenchmarkSettings(**{**options, "lookaheads": tuple(args.lookaheads),
                                        "live_hops": tuple(args.live_hops)})
    report = run_live_benchmark(settings)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.output}")
    return 0


def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="htsat-hf benchmark search",
        description="A text search over generated stored rows in the annotator's on-disk format "
        "(see htsat_hf.benchmarks.search): time per query and to build / open the index.",
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding size (CLAP's projection_dim is 512)")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--folder", help="generate the corpus here and keep it (default: a temporary folder)")
    return parser


def run_search(args: argparse.Namespace) -> int:
    from ..benchmarks.search import report, run

    print(report(run(args.rows, args.dim, args.top_k, args.repeats, args.folder)))
    return 0


BENCHMARKS = {"model": (model_parser, run_model), "annotation": (annotation_parser, run_annotation),
              "live": (live_parser, run_live), "search": (search_parser, run_search)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="htsat-hf benchmark [-h] {model,annotation,live,search} [OPTIONS ...]")
    parser.add_argument("kind", choices=KINDS, help="which benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BENCHMARKS:  # the benchmark's own parser reads the rest (even -h)
        kind, rest = argv[0], argv[1:]
    else:
        kind, rest = build_parser().parse_args(argv).kind, []
    make_parser, run = BENCHMARKS[kind]
    # options are read before anything heavy is imported, so that a wrong one is reported at once
    return run(make_parser().parse_args(rest))


if __name__ == "__main__":
    raise SystemExit(main())
