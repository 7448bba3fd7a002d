"""`htsat-hf demo`: the offline demo (`htsat_hf.demo.run`): synthesise spoken keywords with espeak-ng, train a small
HTS-AT from scratch on the CPU, report its held-out accuracy and classify a held-out clip with the pipeline.

    htsat-hf demo                    # defaults: 4 keywords, a small model trained from scratch
    htsat-hf demo --words yes no up down left right on off stop go --epochs 20 --output_dir my_demo

Needs `espeak-ng` (apt-get install espeak-ng). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..demo.run import DemoSettings

DEFAULTS = DemoSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=DEFAULTS.output_dir, help="where the data and the model go")
    parser.add_argument("--words", nargs="+", default=list(DEFAULTS.words), help="keywords to learn")
    parser.add_argument("--snr_db", type=float, nargs=2, default=list(DEFAULTS.snr_db),
                        help="speech-to-noise range (dB)")
    parser.add_argument("--train_per_word", type=int, default=DEFAULTS.train_per_word,
                        help="training clips per keyword")
    parser.add_argument("--test_per_word", type=int, default=DEFAULTS.test_per_word, help="held-out clips per keyword")
    parser.add_argument("--clip_seconds", type=float, default=DEFAULTS.clip_seconds,
                        help="clip length and model window (1 s as Speech Commands; longer needs a larger --spec_size)")
    parser.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    parser.add_argument("--warmup_steps", type=int, default=DEFAULTS.warmup_steps)
    parser.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--learning_rate", type=float, default=DEFAULTS.learning_rate,
                        help="peak of the warm-up + cosine schedule")
    parser.add_argument("--embed_dim", type=int, default=DEFAULTS.embed_dim)
    parser.add_argument("--spec_size", type=int, default=DEFAULTS.spec_size,
                        help="side of the folded spectrogram image: spec_size / 32 mel bins x spec_size frames of "
                             "10 ms must hold the clip (64: 1.28 s; 256, the paper's, 20 s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads, help="torch CPU threads")
    parser.add_argument("--keep_data", action="store_true", help="reuse an existing dataset in output_dir/data")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..demo.run import run_demo

    args = build_parser().parse_args(argv)
    run_demo(DemoSettings(**{**vars(args), "words": tuple(args.words), "snr_db": tuple(args.snr_db)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
