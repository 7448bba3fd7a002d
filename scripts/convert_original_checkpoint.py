#!/usr/bin/env python
"""Convert a checkpoint of the original HTS-AT code into a Transformers folder (config, safetensors, preprocessor).

Example (the authors' AudioSet model):
    python scripts/convert_original_checkpoint.py HTSAT_AudioSet_Saved_1.ckpt htsat-audioset \
        --labels class_labels_indices.csv
Speech Commands models were trained at 16 kHz: add --sample-rate 16000 --hop-length 160 --single-label.
"""

from __future__ import annotations

import argparse

from htsat_hf.weights.convert_original import convert_original_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="original checkpoint (.ckpt Lightning dict or a bare state dict)")
    parser.add_argument("output_dir", help="folder to write config.json, model.safetensors, preprocessor_config.json")
    parser.add_argument("--sample-rate", type=int, default=32000, help="audio sample rate in Hz (default 32000)")
    parser.add_argument("--hop-length", type=int, default=320, help="STFT hop in samples (default 320)")
    parser.add_argument("--f-min", type=float, default=50.0, help="lowest mel frequency in Hz (default 50)")
    parser.add_argument("--f-max", type=float, default=14000.0, help="highest mel frequency in Hz (default 14000)")
    parser.add_argument("--single-label", action="store_true", help="softmax classes (ESC-50, Speech Commands)")
    parser.add_argument("--labels", help="AudioSet-style index,mid,display_name CSV for id2label")
    args = parser.parse_args()

    model, feature_extractor, report = convert_original_checkpoint(
        args.checkpoint,
        sampling_rate=args.sample_rate,
        hop_length=args.hop_length,
        f_min=args.f_min,
        f_max=args.f_max,
        single_label=args.single_label,
        labels_csv=args.labels,
    )
    model.save_pretrained(args.output_dir)
    feature_extractor.save_pretrained(args.output_dir)
    config = report.config
    print(
        f"HTS-AT: embed_dim {config.embed_dim}, depths {config.depths}, heads {config.num_heads}, window "
        f"{config.window_size}, spec_size {config.spec_size}, {config.num_labels} labels ({config.problem_type}), "
        f"{'token-semantic' if config.use_token_semantic_head else 'pooled'} head"
    )
    for note in report.notes:
        print(f"note: {note}")  # report.warnings were logged as warnings while converting
    print(f"ignored {len(report.ignored_keys)} tensors: {', '.join(report.ignored_keys)}")
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
