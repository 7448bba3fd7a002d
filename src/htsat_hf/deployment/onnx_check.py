"""An exported ONNX file against PyTorch on the lengths of both regimes (`htsat-hf export`'s check)."""

from __future__ import annotations

import os

import torch

from ..modeling_htsat import HTSATForSoundEventDetection
from .export import export_onnx, onnx_session, run_onnx

# (batch, seconds): one stretched window, and windowed and stitched inputs of 10, 25 and 60 s
CHECK_INPUTS = ((1, 4.0), (4, 10.0), (2, 25.0), (1, 60.0))


def largest_onnx_difference(model, session, checks=CHECK_INPUTS) -> float:
    """max |onnxruntime - PyTorch| over every output (logits, and frame_logits for a SED model) on random log-mel
    features of the given (batch, seconds)."""
    worst = 0.0
    frames_per_second = model.config.sampling_rate / model.config.hop_length
    with_frames = isinstance(model, HTSATForSoundEventDetection)
    for batch, seconds in checks:
        frames = int(round(seconds * frames_per_second)) + 1
        x = torch.randn(batch, frames, model.config.num_mel_bins) * 10 - 40
        with torch.no_grad():
            expected = model(x)
        references = (expected.logits, expected.frame_logits) if with_frames else (expected.logits,)
        for got, reference in zip(run_onnx(session, x), references):
            worst = max(worst, (got - reference).abs().max().item())
    return worst


def export_and_check(model, output: str | os.PathLike, checks=CHECK_INPUTS) -> tuple[str, float]:
    """Exports `model` (`export_onnx`) and returns the file's path and `largest_onnx_difference` on `checks`."""
    path = export_onnx(model.eval(), output)
    return path, largest_onnx_difference(model, onnx_session(path), checks)


__all__ = ["CHECK_INPUTS", "export_and_check", "largest_onnx_difference"]
