"""The offline demo's job: build a spoken-keyword dataset with espeak-ng, train a small HTS-AT from scratch on the
CPU, report its accuracy on held-out voices, and classify a held-out clip with the audio-classification pipeline
(`htsat-hf demo`).

From scratch on 2 CPU cores a transformer learns slowly: the defaults are a short, easy run (4 distinct words,
10-30 dB SNR) with a standard warm-up + cosine schedule, not the paper's fine-tuning schedule (whose multiplier caps
the rate at 0.1x and is meant for starting from AudioSet weights). Needs `espeak-ng`; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# Speech Commands' front end (16 kHz, 10-ms hop), with 32 mel bins up to Nyquist: the image is 4x smaller than with
# 64 bins, so the same minutes train on 4x the clips.
FRONT_END = ["--sampling_rate", "16000", "--hop_length", "160", "--n_fft", "512", "--num_mel_bins", "32",
             "--f_max", "8000"]


@dataclass
class DemoSettings:
    output_dir: str = "htsat-demo"
    words: tuple[str, ...] = ("yes", "no", "stop", "go")
    snr_db: tuple[float, float] = (10.0, 30.0)
    train_per_word: int = 300
    test_per_word: int = 50
    clip_seconds: float = 1.0
    epochs: float = 14
    warmup_steps: int = 50
    batch_size: int = 32
    learning_rate: float = 2e-3
    embed_dim: int = 32
    spec_size: int = 64
    seed: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    keep_data: bool = False


def training_arguments(settings: DemoSettings, data_dir: Path, model_dir: Path) -> list[str]:
    """The `htsat-hf train` arguments of the demo's run."""
    return [
        "--dataset_name", str(data_dir), "--eval_split_name", "test", "--output_dir", str(model_dir),
        "--embed_dim", str(settings.embed_dim), "--depths", "1", "1", "2", "1", "--num_heads", "2", "4", "8", "16",
        "--spec_size", str(settings.spec_size), "--clip_seconds", str(settings.clip_seconds),
        *FRONT_END, "--time_mask_width", "16", "--freq_mask_width", "4",
        "--num_train_epochs", str(settings.epochs), "--per_device_train_batch_size", str(settings.batch_size),
        "--per_device_eval_batch_size", "64", "--learning_rate", str(settings.learning_rate), "--mixup_alpha", "0",
        "--htsat_lr_schedule", "False", "--lr_scheduler_type", "cosine", "--warmup_steps", str(settings.warmup_steps),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10", "--seed", str(settings.seed),
        "--use_cpu", "--report_to", "none",
    ]


def run_demo(settings: DemoSettings) -> dict:
    """Runs the demo, printing its three steps; returns the held-out results (`all_results.json`) and the model
    folder. A SystemExit when espeak-ng is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    start = time.time()
    import torch

    torch.set_num_threads(settings.threads)
    from transformers import pipeline

    import htsat_hf  # noqa: F401  (registers HTS-AT with the Auto classes and the pipeline)

    from ..training.run import main as train_main
    from .data import KeywordDataSpec, build_keyword_dataset, espeak_available

    if not espeak_available():
        raise SystemExit("The demo synthesises its data with espeak-ng: install it first (apt-get install espeak-ng).")
    output = Path(settings.output_dir)
    data_dir, model_dir = output / "data", output / "model"
    spec = KeywordDataSpec(words=tuple(settings.words), train_per_word=settings.train_per_word,
                           test_per_word=settings.test_per_word, clip_seconds=settings.clip_seconds,
                           snr_db=tuple(settings.snr_db), seed=settings.seed)
    if not (settings.keep_data and (data_dir / "demo_info.json").exists()):
        print(f"[1/3] Synthesising {len(spec.words)} keywords x {spec.train_per_word} training / {spec.test_per_word} "
              f"held-out clips (held-out clips use voices never heard in training) into {data_dir}", flush=True)
        build_keyword_dataset(data_dir, spec)
    print(f"[2/3] Training a small HTS-AT from scratch ({time.time() - start:.0f} s so far)", flush=True)
    train_main(training_arguments(settings, data_dir, model_dir))
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
    return {"results": results, "model_dir": str(model_dir)}
