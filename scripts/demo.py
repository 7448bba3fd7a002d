#!/usr/bin/env python
"""Offline HTS-AT demo: build a spoken-keyword dataset with espeak-ng, train a small HTS-AT from scratch on the CPU,
report its accuracy on held-out voices, and classify a held-out clip with the audio-classification pipeline.

    python scripts/demo.py                    # defaults: 4 keywords, a small model trained from scratch
    python scripts/demo.py --words yes no up down left right on off stop go --epochs 20 --output_dir my_demo

From scratch on 2 CPU cores a transformer learns slowly: the defaults are a short, easy run (4 distinct words,
10-30 dB SNR) with a standard warm-up + cosine schedule, not the paper's fine-tuning schedule (whose multiplier caps
the rate at 0.1x and is meant for starting from AudioSet weights).

Needs `espeak-ng` (apt-get install espeak-ng). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


FRONT_END = ["--sampling_rate", "16000", "--hop_length", "160", "--n_fft", "512", "--num_mel_bins", "32",
             "--f_max", "8000"]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="htsat-demo", help="where the data and the model go")
    parser.add_argument("--words", nargs="+", default=["yes", "no", "stop", "go"], help="keywords to learn")
    parser.add_argument("--snr_db", type=float, nargs=2, default=[10.0, 30.0], help="speech-to-noise range (dB)")
    parser.add_argument("--train_per_word", type=int, default=300, help="training clips per keyword")
    parser.add_argument("--test_per_word", type=int, default=50, help="held-out clips per keyword")
    parser.add_argument("--clip_seconds", type=float, default=1.0,
                        help="clip length and model window (1 s as Speech Commands; longer needs a larger --spec_size)")
    parser.add_argument("--epochs", type=float, default=14)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="peak of the warm-up + cosine schedule")
    parser.add_argument("--embed_dim", type=int, default=32)
    parser.add_argument("--spec_size", type=int, default=64,
                        help="side of the folded spectrogram image: spec_size / 32 mel bins x spec_size frames of "
                             "10 ms must hold the clip (64: 1.28 s; 256, the paper's, 20 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch CPU threads")
    parser.add_argument("--keep_data", action="store_true", help="reuse an existing dataset in output_dir/data")
    return parser.parse_args()


def main() -> None:
    args = parse()
    start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from transformers import pipeline

    import htsat_hf  # noqa: F401  (registers HTS-AT with the Auto classes and the pipeline)
    from htsat_hf.demo.data import KeywordDataSpec, build_keyword_dataset, espeak_available
    from htsat_hf.training.run import main as train_main

    if not espeak_available():
        raise SystemExit("The demo synthesises its data with espeak-ng: install it first (apt-get install espeak-ng).")
    output = Path(args.output_dir)
    data_dir, model_dir = output / "data", output / "model"
    spec = KeywordDataSpec(words=tuple(args.words), train_per_word=args.train_per_word,
                           test_per_word=args.test_per_word, clip_seconds=args.clip_seconds, snr_db=tuple(args.snr_db), seed=args.seed)
    if not (args.keep_data and (data_dir / "demo_info.json").exists()):
        print(f"[1/3] Synthesising {len(spec.words)} keywords x {spec.train_per_word} training / {spec.test_per_word} "
              f"held-out clips (held-out clips use voices never heard in training) into {data_dir}", flush=True)
        build_keyword_dataset(data_dir, spec)
    print(f"[2/3] Training a small HTS-AT from scratch ({time.time() - start:.0f} s so far)", flush=True)
    train_main([
        "--dataset_name", str(data_dir), "--eval_split_name", "test", "--output_dir", str(model_dir),
        "--embed_dim", str(args.embed_dim), "--depths", "1", "1", "2", "1", "--num_heads", "2", "4", "8", "16",
        "--spec_size", str(args.spec_size), "--clip_seconds", str(spec.clip_seconds),
        # Speech Commands' front end (16 kHz, 10-ms hop), with 32 mel bins up to Nyquist: the image is 4x smaller
        # than with 64 bins, so the same minutes train on 4x the clips.
        *FRONT_END, "--time_mask_width", "16", "--freq_mask_width", "4",
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "64", "--learning_rate", str(args.learning_rate), "--mixup_alpha", "0",
        "--htsat_lr_schedule", "False", "--lr_scheduler_type", "cosine", "--warmup_steps", str(args.warmup_steps),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10", "--seed", str(args.seed),
        "--use_cpu", "--report_to", "none",
    ])
    results = json.loads((model_dir / "all_results.json").read_text())
    accuracy = results["eval_accuracy"]
    chance = 1 / len(spec.words)
    print(f"[3/3] Held-out accuracy: {accuracy:.1%} on {results.get('eval_samples', 'the')} clips of unseen voices "
          f"(chance {chance:.0%}); model saved in {model_dir}", flush=True)
    classifier = pipeline("audio-classification", model=str(model_dir))
    example = sorted((data_dir / "test" / spec.words[0]).glob("*.wav"))[0]
    top = classifier(str(example), top_k=3)
    print(f"pipeline('audio-classification') on {example}:")
    for guess in top:
        print(f"    {guess['label']:>6}  {guess['score']:.3f}")
    print(f"Done in {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
