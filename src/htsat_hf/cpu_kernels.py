"""Fused linear layers for CPU inference through oneDNN, the library PyTorch's own compiler lowers linear layers to.

`torch.ops.mkldnn._linear_pointwise` runs a linear layer with an elementwise epilogue (here GELU) in one pass: the
activation is applied while the GEMM's output tile is still in cache, instead of streaming the 4x-wide MLP hidden
layer through memory a second time, and the bias is added there too (addmm first copies it into its whole output).
On the 2-core AVX-512 machine we benchmark on, its fp32 GEMMs measured 0-15 % faster than MKL's for the Swin blocks'
shapes. Used only where it applies (x86-64, fp32 CPU tensors, no autograd, autocast or compiler tracing, oneDNN
enabled); everything else takes the layer itself.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

_ACTIVATIONS = {"none": None, "gelu": F.gelu}


def _onednn_linear_op():
    """The fused oneDNN linear op of this PyTorch build on x86-64 (where it was measured), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _linear_flops(input_shape, weight_shape, *args, **kwargs) -> int:
    """FLOPs of the fused linear op as `torch.utils.flop_counter` counts addmm: 2 per multiply-add."""
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]


if _ONEDNN_LINEAR is not None:  # PyTorch's FLOP counter knows no formula for this op; without one it counts nothing
    try:
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_flops)
    except (RuntimeError, ValueError):  # already registered (the module is imported again as remote code)
        pass


def fused_linear_applies(inputs: torch.Tensor, layer: nn.Module) -> bool:
    """Whether `linear` would take oneDNN for this input and layer."""
    return (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and type(layer) is nn.Linear  # not a quantised or otherwise replaced layer
        and inputs.device.type == "cpu"
        and inputs.dtype == torch.float32
        and layer.weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (inputs.requires_grad or layer.weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")  # autocast's lower precision applies to F.linear only
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def linear(inputs: torch.Tensor, layer: nn.Module, activation: str = "none") -> torch.Tensor:
    """`activation(layer(inputs))` for any (..., in_features) input; activation is "none" or "gelu" (exact erf)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
    if fused_linear_applies(inputs, layer):
        rows = inputs.reshape(-1, inputs.shape[-1])
        output = _ONEDNN_LINEAR(rows, layer.weight, layer.bias, activation, [], "none" if activation == "gelu" else "")
        return output.view(*inputs.shape[:-1], output.shape[-1])
    output = layer(inputs)
    function = _ACTIVATIONS[activation]
    return output if function is None else function(output)
