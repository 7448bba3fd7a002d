#!/usr/bin/env python
"""Export an HTS-AT checkpoint to ONNX (log-mel features of any length in, dynamic batch: short inputs stretched to one
window, long ones windowed and stitched, as in PyTorch) and check it with onnxruntime against PyTorch on 4, 10, 25
and 60 s.

Examples:
    python scripts/export_onnx.py path/to/htsat-audioset htsat.onnx                 # audio classification
    python scripts/export_onnx.py path/to/htsat-audioset htsat_sed.onnx --sed       # + frame_logits
    python scripts/export_onnx.py --random htsat_random.onnx                        # paper config, random weights
"""

from __future__ import annotations

import argparse

import torch

from htsat_hf import HTSATConfig, HTSATForAudioClassification, HTSATForSoundEventDetection
from htsat_hf.deployment.export import export_onnx, onnx_session, run_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a saved HTS-AT folder (omit with --random)")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--sed", action="store_true", help="export HTSATForSoundEventDetection (logits + frame_logits)")
    parser.add_argument("--random", action="store_true", help="paper config with random weights (no checkpoint)")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed |onnxruntime - PyTorch| (default 1e-4)")
    args = parser.parse_args()
    if args.random == bool(args.model):
        parser.error("give a model folder or --random (not both)")

    cls = HTSATForSoundEventDetection if args.sed else HTSATForAudioClassification
    model = cls(HTSATConfig()) if args.random else cls.from_pretrained(args.model)
    path = export_onnx(model.eval(), args.output)
    session = onnx_session(path)
    worst = 0.0
    frames_per_second = model.config.sampling_rate / model.config.hop_length
    for batch, seconds in ((1, 4.0), (4, 10.0), (2, 25.0), (1, 60.0)):
        frames = int(round(seconds * frames_per_second)) + 1
        x = torch.randn(batch, frames, model.config.num_mel_bins) * 10 - 40
        with torch.no_grad():
            expected = model(x)
        references = (expected.logits, expected.frame_logits) if args.sed else (expected.logits,)
        for got, reference in zip(run_onnx(session, x), references):
            worst = max(worst, (got - reference).abs().max().item())
    print(f"wrote {path}; max |onnxruntime - PyTorch| over 4, 10, 25 and 60 s: {worst:.2e}")
    if worst > args.atol:
        raise SystemExit(f"difference {worst:.2e} exceeds --atol {args.atol:g}")


if __name__ == "__main__":
    main()
