"""The fused oneDNN linear layers used in CPU inference: same numbers as nn.Linear (+ exact GELU), and the plain
path wherever autograd, autocast, another dtype or a replaced layer is involved."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from htsat_hf import cpu_kernels
from htsat_hf.cpu_kernels import fused_linear_applies, linear

needs_onednn = pytest.mark.skipif(cpu_kernels._ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN")


def _layer(inputs: int = 96, outputs: int = 384, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(inputs, outputs, bias=bias)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_matches_nn_linear(activation, bias):
    layer = _layer(bias=bias)
    inputs = torch.randn(70, 3, 192)[..., ::2].transpose(0, 1) * 2  # strided 3-D input, a row count no block divides
    with torch.no_grad():
        assert fused_linear_applies(inputs, layer)
        fused = linear(inputs, layer, activation)
        expected = layer(inputs) if activation == "none" else F.gelu(layer(inputs))  # exact (erf) GELU
    assert fused.shape == (3, 70, 384)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    if activation == "gelu":  # the exact GELU, not the tanh approximation
        with torch.no_grad():
            assert (fused - F.gelu(layer(inputs), approximate="tanh")).abs().max() > 1e-4


def test_plain_path_where_fusion_does_not_apply():
    layer = _layer()
    inputs = torch.randn(8, 96)
    assert not fused_linear_applies(inputs, layer)  # autograd on: the weight needs its gradient
    output = linear(inputs, layer, "gelu")
    output.sum().backward()
    assert layer.weight.grad is not None and output.grad_fn is not None
    with torch.no_grad():
        assert not fused_linear_applies(inputs.double(), layer.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_linear_applies(inputs, layer.float())
            assert linear(inputs, layer).dtype == torch.bfloat16  # autocast still lowers the precision
        quantised = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]
        assert not fused_linear_applies(inputs, quantised)
        torch.testing.assert_close(linear(inputs, quantised, "gelu"), F.gelu(quantised(inputs)))


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(torch.randn(2, 96), _layer(), "relu")


def test_flop_counter_counts_the_fused_path():
    """FLOP counts (the benchmark's GFLOP per clip) are the same whether the fused or the plain path runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from htsat_hf import HTSATConfig, HTSATForAudioClassification

    torch.manual_seed(0)
    model = HTSATForAudioClassification(HTSATConfig(embed_dim=16, num_heads=[1, 2, 4, 8], num_labels=5)).eval()
    features = torch.randn(1, 1001, 64)
    counts = []
    for context in (torch.inference_mode, torch.enable_grad):
        counter = FlopCounterMode(display=False)
        with context(), sdpa_kernel(SDPBackend.MATH), counter:
            model(input_features=features)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
