"""`htsat-hf`: one entry point for every job, in the style of `accelerate` and `huggingface-cli`.

    htsat-hf demo                                   # offline: synthesise keywords, train a small HTS-AT, classify
    htsat-hf detect rec.wav --model DIR             # sound events as DCASE TSV rows
    htsat-hf benchmark model --quick                # benchmark model|annotation|live|search
    htsat-hf <command> --help                       # a command's options

Each command is `htsat_hf.commands.<module>` with `main(argv) -> int`; it is imported only when run, and imports
its job's modules only after its arguments parsed. `htsat-hf --help` and a usage error still cost the package's own
import (torch and Transformers, for the Auto-class and pipeline registration `import htsat_hf` does): about 4 s on
2 cores, where the removed scripts answered in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module under htsat_hf.commands, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "offline demo: synthesise spoken keywords, train a small HTS-AT, classify held-out clips"),
    "detect": ("detect", "sound event detection on audio files, written as DCASE task 4 TSV rows"),
    "annotate": ("annotate", "tags, events, embeddings and frame scores for a corpus, as resumable Parquet shards"),
    "listen": ("listen", "live tags and events from a microphone, URL, file or raw PCM, as JSON lines"),
    "search": ("search", "where in an annotated corpus a phrase happens (CLAP joint-space embeddings, no audio re-run)"),
    "train": ("train", "fine-tune or train HTS-AT with the Transformers Trainer (clip or strong labels)"),
    "average": ("average", "the weight average of several checkpoints of one run, as one model folder"),
    "evaluate": ("evaluate", "DCASE task 4 metrics (F-scores, PSDS) of sound event detections"),
    "convert": ("convert", "convert a checkpoint of the original HTS-AT code into a Transformers folder"),
    "convert-clap": ("convert_clap", "convert a Transformers CLAP folder (unfused) into an HTSATClapModel folder"),
    "init": ("init", "a model folder whose weights start from a Swin (ImageNet) or CLAP checkpoint, for train"),
    "ensemble": ("ensemble", "several saved HTS-AT models combined into one ensemble model folder"),
    "publish": ("publish", "turn a model folder into a Hub repository (model card, remote code) and upload it"),
    "export": ("export", "export a model to ONNX and check it with onnxruntime against PyTorch"),
    "benchmark": ("benchmark", "benchmarks: model (against CLAP and AST), annotation (corpus runs), live (latency), search"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="htsat-hf",
        description="HTS-AT audio transformer for Hugging Face Transformers: commands.",
        epilog=f"commands:\n{listing}\n\n`htsat-hf COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="htsat-hf [-h] [--version] COMMAND [ARGS ...]",
    )
    parser.add_argument("--version", action="store_true", help="print the package version and exit")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_module(name: str):
    """The module that runs command `name` (`htsat_hf.commands.<module>`)."""
    return importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:  # the command's own parser reads everything after its name (even -h)
        command, rest = argv[0], argv[1:]
    else:
        args = parser.parse_args(argv)
        if args.version:
            from importlib.metadata import PackageNotFoundError, version

            try:
                print(f"htsat-hf {version('htsat-hf')}")
            except PackageNotFoundError:
                print("htsat-hf (not installed: run from a source tree)")
            return 0
        parser.print_help()
        return 0 if not argv else 2
    status = command_module(command).main(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
