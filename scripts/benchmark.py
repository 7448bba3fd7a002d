#!/usr/bin/env python
"""Side-by-side benchmark: htsat_hf against Transformers' ClapAudioModel and AST, in one process, interleaved.

Examples:
    python scripts/benchmark.py --output results/benchmark_cpu.json           # full CPU run (several minutes)
    python scripts/benchmark.py --quick                                      # batch 1 and 4, 5 min of SED audio
    python scripts/benchmark.py --device cuda --bf16 --output results/benchmark_gpu_bf16.json  # batch 1/16/128
    python scripts/benchmark.py --model-size tiny --sections inference --repeats 1  # plumbing only, in seconds
See `htsat_hf.benchmarks.model` for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args()

    if args.thp:  # must be set before torch allocates anything; applies to every model alike
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from htsat_hf.benchmarks.model import BenchmarkSettings, format_report, run_benchmark, save_results

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


if __name__ == "__main__":
    main()
