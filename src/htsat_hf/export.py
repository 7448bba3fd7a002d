"""
Deployment paths for HTS-AT: ONNX export (fixed-length 10-s features, dynamic batch), `torch.compile`, and int8
dynamic quantisation of the Linear layers for CPU inference.

ONNX graphs take `input_features` (batch, clip_frames, num_mel_bins) — one `clip_seconds` window, e.g. (batch, 1001,
64) for the paper config — and return `logits` (batch, num_labels) and, for `HTSATForSoundEventDetection`,
`frame_logits` (batch, token_steps, num_labels). Longer audio is windowed outside the graph (as the SED pipeline does).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

from .modeling_htsat import HTSATForAudioClassification, HTSATForSoundEventDetection, HTSATPreTrainedModel

OPSET = 18


class OnnxWrapper(nn.Module):
    """Plain-tensor forward for export: features -> (logits,) or (logits, frame_logits)."""

    def __init__(self, model: HTSATPreTrainedModel):
        super().__init__()
        self.model = model
        self.with_frames = isinstance(model, HTSATForSoundEventDetection)

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(input_features=input_features, return_dict=True)
        if self.with_frames:
            return output.logits, output.frame_logits
        return (output.logits,)


def output_names(model: HTSATPreTrainedModel) -> list[str]:
    return ["logits", "frame_logits"] if isinstance(model, HTSATForSoundEventDetection) else ["logits"]


def export_onnx(
    model: HTSATForAudioClassification | HTSATForSoundEventDetection,
    path: str | os.PathLike,
    example_batch: int = 2,
    opset: int = OPSET,
) -> str:
    """
    Exports `model` (in eval mode, SDPA attention) to `path` with the torch.export-based exporter. The batch axis is
    dynamic; the time axis is fixed at one window (`config.clip_frames`). Returns the path.
    """
    config = model.config
    model = model.eval()
    example = torch.randn(example_batch, config.clip_frames, config.num_mel_bins)
    batch = torch.export.Dim("batch", min=1, max=4096)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            OnnxWrapper(model).eval(),
            (example,),
            dynamo=True,
            input_names=["input_features"],
            output_names=output_names(model),
            dynamic_shapes={"input_features": {0: batch}},
            opset_version=opset,
            optimize=True,
            verify=False,
            report=False,
        )
    program.save(str(path))
    return str(path)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for an exported graph."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, input_features: torch.Tensor) -> list[torch.Tensor]:
    outputs = session.run(None, {"input_features": input_features.detach().cpu().numpy()})
    return [torch.from_numpy(output) for output in outputs]


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """
    A copy of `model` with every `nn.Linear` replaced by an int8 dynamically quantised Linear (weights int8 per tensor,
    activations quantised on the fly); CPU inference only. The convolutions, norms and attention stay fp32.
    """
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated in favour of torchao (not a dependency)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8)


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """`torch.compile` with settings that suit HTS-AT: a static graph per input shape (no dynamic-shape retrace)."""
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)


__all__ = ["export_onnx", "onnx_session", "run_onnx", "quantize_dynamic_int8", "compile_model", "OnnxWrapper"]
