"""The linear layers of CPU inference (BLAS or oneDNN, GELU fused or after): the same numbers as nn.Linear (+ exact
GELU) whichever plan the calibration picks, and the plain path wherever autograd, autocast, another dtype, a
dispatch mode or a replaced layer is involved."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from htsat_hf.engine import linear as engine_linear
from htsat_hf.engine.linear import LinearPlan, calibrate, inference_path_applies, linear

needs_onednn = pytest.mark.skipif(engine_linear.ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN")


def _layer(inputs: int = 96, outputs: int = 384, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(inputs, outputs, bias=bias)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


PLANS = [LinearPlan("blas", "after"), LinearPlan("onednn", "after"), LinearPlan("onednn", "onednn")]


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: f"{plan.gemm}-gemm-{plan.gelu}-gelu")
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_plan_matches_nn_linear(monkeypatch, plan, activation, bias):
    if plan.gemm == "onednn" and engine_linear.ONEDNN_LINEAR is None:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(engine_linear, "linear_plan", lambda: plan)
    layer = _layer(bias=bias)
    inputs = torch.randn(70, 3, 192)[..., ::2].transpose(0, 1) * 2  # strided 3-D input, a row count no block divides
    with torch.no_grad():
        assert inference_path_applies(inputs, layer)
        fused = linear(inputs, layer, activation)
        expected = layer(inputs) if activation == "none" else F.gelu(layer(inputs))  # exact (erf) GELU
    assert fused.shape == (3, 70, 384)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    if activation == "gelu":  # the exact GELU, not the tanh approximation
        with torch.no_grad():
            assert (fused - F.gelu(layer(inputs), approximate="tanh")).abs().max() > 1e-4


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: f"{plan.gemm}-gemm-{plan.gelu}-gelu")
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_add_accumulates_the_layer(monkeypatch, plan, with_bias):
    """`linear_add_` adds the layer's output (with or without its bias) to the accumulator in place, as does `linear`
    without the bias, whichever plan runs, and on the plain path."""
    if plan.gemm == "onednn" and engine_linear.ONEDNN_LINEAR is None:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(engine_linear, "linear_plan", lambda: plan)
    layer = _layer(384, 96)
    nn.init.normal_(layer.bias)
    inputs, accumulator = torch.randn(3, 70, 384), torch.randn(3, 70, 96)
    bias = layer.bias if with_bias else torch.zeros(96)
    expected = accumulator + inputs @ layer.weight.t() + bias
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert inference_path_applies(inputs, layer) != grad
            result = accumulator.clone()
            engine_linear.linear_add_(result, inputs, layer, with_bias=with_bias)
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(linear(inputs, layer, with_bias=with_bias), expected - accumulator)
    with pytest.raises(ValueError, match="cannot come with an activation"):
        linear(inputs, layer, "gelu", with_bias=False)


@pytest.mark.parametrize("plan", PLANS[:2], ids=lambda plan: f"{plan.gemm}-gemm")
def test_linear_weights_takes_the_planned_gemm_in_inference_only(monkeypatch, plan):
    """Weights that are no nn.Linear's (the head's convolution as a GEMM) take the plan's GEMM in CPU inference, with
    F.linear's result; with gradients wanted, F.linear itself."""
    if plan.gemm == "onednn" and engine_linear.ONEDNN_LINEAR is None:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(engine_linear, "linear_plan", lambda: plan)
    libraries = []
    gemm = engine_linear._gemm
    monkeypatch.setattr(engine_linear, "_gemm", lambda library, *args: libraries.append(library) or gemm(library, *args))
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 10, kernel_size=(2, 3))
    weight = conv.weight.view(10, -1)
    inputs = torch.randn(2, 7, 24 * 2 * 3)
    with torch.no_grad():
        planned = engine_linear.linear_weights(inputs, weight, conv.bias)
        expected = F.linear(inputs, weight, conv.bias)
    assert libraries == [plan.gemm] and planned.shape == (2, 7, 10)
    torch.testing.assert_close(planned, expected, rtol=1e-5, atol=1e-5)
    tracked = engine_linear.linear_weights(inputs, weight, conv.bias)
    assert libraries == [plan.gemm] and tracked.grad_fn is not None


def test_plain_path_where_fusion_does_not_apply():
    layer = _layer()
    inputs = torch.randn(8, 96)
    assert not inference_path_applies(inputs, layer)  # autograd on: the weight needs its gradient
    output = linear(inputs, layer, "gelu")
    output.sum().backward()
    assert layer.weight.grad is not None and output.grad_fn is not None
    with torch.no_grad():
        assert not inference_path_applies(inputs.double(), layer.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not inference_path_applies(inputs, layer.float())
            assert linear(inputs, layer).dtype == torch.bfloat16  # autocast still lowers the precision
        quantised = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]
        assert not inference_path_applies(inputs, quantised)
        torch.testing.assert_close(linear(inputs, quantised, "gelu"), F.gelu(quantised(inputs)))


class _Returns(nn.Module):
    """A replaced layer that hands back a tensor it keeps (its input with `None`)."""

    def __init__(self, kept: torch.Tensor | None = None):
        super().__init__()
        self.kept = kept

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.kept is None else self.kept


def test_a_replaced_layer_takes_its_gelu_in_place_only_on_a_fresh_untracked_output(monkeypatch):
    in_place = []
    real = engine_linear.bias_gelu_
    monkeypatch.setattr(engine_linear, "bias_gelu_", lambda hidden, *args: in_place.append(hidden) or real(hidden, *args))
    inputs = torch.randn(8, 96)
    quantised = torch.ao.quantization.quantize_dynamic(nn.Sequential(_layer()), {nn.Linear}, dtype=torch.qint8)[0]
    expected = F.gelu(quantised(inputs))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(linear(inputs, quantised, "gelu"), expected, rtol=0, atol=1e-6)
    assert len(in_place) == 2  # the quantised layer's own output, in both modes
    original = inputs.clone()
    with torch.no_grad():
        torch.testing.assert_close(linear(inputs, _Returns(), "gelu"), F.gelu(original))
    torch.testing.assert_close(inputs, original, rtol=0, atol=0)  # a layer handing back its input: not overwritten
    with torch.inference_mode():
        kept = torch.randn(8, 96)
    with torch.no_grad():  # an inference tensor outside inference mode cannot be changed in place
        torch.testing.assert_close(linear(inputs, _Returns(kept), "gelu"), F.gelu(kept))
    wrapped = _Returns(torch.randn(8, 96, requires_grad=True))
    output = linear(inputs, wrapped, "gelu")  # autograd on: the graph is kept
    output.sum().backward()
    assert wrapped.kept.grad is not None
    assert len(in_place) == 2


@needs_onednn
def test_an_onednn_plan_takes_blas_once_onednn_is_switched_off(monkeypatch):
    calls = []
    real = engine_linear.ONEDNN_LINEAR
    monkeypatch.setattr(engine_linear, "ONEDNN_LINEAR", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(engine_linear, "linear_plan", lambda: LinearPlan("onednn", "onednn"))
    layer, inputs = _layer(), torch.randn(5, 96)
    with torch.no_grad():
        linear(inputs, layer, "gelu")
        assert len(calls) == 1
        with torch.backends.mkldnn.flags(enabled=False):
            output = linear(inputs, layer, "gelu")
        assert len(calls) == 1
        torch.testing.assert_close(output, F.gelu(layer(inputs)))


def test_calibration_picks_among_what_is_there(monkeypatch):
    monkeypatch.delenv(engine_linear.GEMM_ENVIRONMENT_VARIABLE, raising=False)
    plan = calibrate(rounds=2)
    assert plan.gemm in ("blas", "onednn") and plan.gelu in ("after", "onednn")
    timed = dict(plan.timings_ms)
    assert "gemm blas" in timed and all(ms > 0 for ms in timed.values())
    assert ("gemm onednn" in timed) == (engine_linear.ONEDNN_LINEAR is not None)
    assert plan.gelu == "after" or plan.gemm == "onednn"  # the GELU epilogue comes with oneDNN's GEMM
    assert ("gelu onednn" in timed) == (plan.gemm == "onednn")
    monkeypatch.setattr(engine_linear, "ONEDNN_LINEAR", None)  # a build without oneDNN: nothing to choose
    plan = calibrate(rounds=2)
    assert (plan.gemm, plan.gelu, [name for name, _ in plan.timings_ms]) == ("blas", "after", ["gemm blas"])


def test_near_ties_keep_onednn():
    assert engine_linear.choose({"blas": 0.97, "onednn": 1.0}, default="onednn") == "onednn"  # within the margin
    assert engine_linear.choose({"blas": 0.90, "onednn": 1.0}, default="onednn") == "blas"
    assert engine_linear.choose({"blas": 1.0}, default="onednn") == "blas"


def test_the_plan_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path):
    """Every process on a machine (the ranks of one run, later runs) takes the plan the first one measured."""
    monkeypatch.setenv("HTSAT_HF_CACHE", str(tmp_path))
    monkeypatch.delenv(engine_linear.GEMM_ENVIRONMENT_VARIABLE, raising=False)
    measured = []
    plans = iter([LinearPlan("onednn", "after", (("gemm onednn", 1.5),)), LinearPlan("blas", "after")])
    monkeypatch.setattr(engine_linear, "calibrate", lambda: measured.append(1) or next(plans))
    try:
        engine_linear.linear_plan.cache_clear()
        first = engine_linear.linear_plan()
        engine_linear.linear_plan.cache_clear()  # as a new process would start
        assert engine_linear.linear_plan() == first == LinearPlan("onednn", "after", (("gemm onednn", 1.5),))
        assert len(measured) == 1 and len(list(tmp_path.glob("linear-plan-*.json"))) == 1
        (tmp_path / "unwritable").write_text("")
        monkeypatch.setenv("HTSAT_HF_CACHE", str(tmp_path / "unwritable"))  # a file, not a folder
        engine_linear.linear_plan.cache_clear()
        assert engine_linear.linear_plan() == LinearPlan("blas", "after") and len(measured) == 2  # measured in-process
        monkeypatch.setenv("HTSAT_HF_CACHE", str(tmp_path / "full_disk"))
        monkeypatch.setattr(engine_linear.os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
        plans = iter([LinearPlan("onednn", "onednn")])
        engine_linear.linear_plan.cache_clear()
        assert engine_linear.linear_plan() == LinearPlan("onednn", "onednn") and len(measured) == 3  # not measured twice
        assert not list((tmp_path / "full_disk").glob("*.tmp"))  # no scratch file left behind
    finally:
        engine_linear.linear_plan.cache_clear()


def test_the_environment_fixes_the_gemm_library(monkeypatch, caplog):
    monkeypatch.setenv(engine_linear.GEMM_ENVIRONMENT_VARIABLE, "BLAS")
    plan = calibrate(rounds=2)
    assert plan == LinearPlan("blas", "after")  # nothing timed
    monkeypatch.setenv(engine_linear.GEMM_ENVIRONMENT_VARIABLE, "mkl")
    with pytest.raises(ValueError, match="HTSAT_HF_CPU_GEMM='mkl' is not one of auto, blas, onednn"):
        calibrate(rounds=2)
    monkeypatch.setenv(engine_linear.GEMM_ENVIRONMENT_VARIABLE, "onednn")
    monkeypatch.setattr(engine_linear, "ONEDNN_LINEAR", None)
    with caplog.at_level("WARNING"):
        assert calibrate(rounds=2).gemm == "blas"
    assert "no oneDNN" in caplog.text


def test_the_plain_path_under_a_dispatch_mode():
    from torch.utils.flop_counter import FlopCounterMode

    layer, inputs = _layer(), torch.randn(4, 96)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert not inference_path_applies(inputs, layer)
        linear(inputs, layer, "gelu")
    assert counter.get_total_flops() == 2 * 4 * 96 * 384


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



needs_reorder = pytest.mark.skipif(engine_linear.ONEDNN_REORDER is None, reason="this PyTorch build cannot pack")


@needs_reorder
@pytest.mark.parametrize("rows, inputs, outputs", [(2048, 96, 288), (512, 384, 1536), (37, 768, 527)])
def test_packed_weights_give_the_plain_weights_product(rows, inputs, outputs):
    """oneDNN with the weight packed once computes what it computes from the plain weight, for the rows it was
    packed for and for others (a last, smaller chunk)."""
    layer = _layer(inputs, outputs)
    with torch.no_grad():
        packed = engine_linear.packed_weight(layer.weight, rows)
        assert packed is not layer.weight and packed.is_mkldnn
        for count in (rows, rows // 2 + 1):
            x = torch.randn(count, inputs)
            plain = engine_linear.ONEDNN_LINEAR(x, layer.weight, layer.bias, "none", [], "")
            torch.testing.assert_close(engine_linear._gemm("onednn", x, layer.weight, layer.bias), plain, rtol=1e-6, atol=1e-6)
            gelu = engine_linear.ONEDNN_LINEAR(x, layer.weight, layer.bias, "gelu", [], "none")
            torch.testing.assert_close(engine_linear._fused_onednn_gelu(x, layer.weight, layer.bias), gelu, rtol=1e-6, atol=1e-6)


@needs_reorder
def test_packed_weights_follow_the_weight_and_go_with_it():
    """Packed once per weight; packed anew when the weight is loaded or edited in place; a view (the head's
    convolution as a matrix) kept with the weight it views; forgotten when the weight is."""
    import gc

    layer = _layer(96, 192)
    x = torch.randn(64, 96)
    with torch.no_grad():
        first = engine_linear.packed_weight(layer.weight, 64)
        assert engine_linear.packed_weight(layer.weight, 64) is first
        layer.load_state_dict(_layer(96, 192).state_dict() | {"weight": torch.randn(192, 96)})  # in-place copy
        assert engine_linear.packed_weight(layer.weight, 64) is not first
        torch.testing.assert_close(engine_linear._gemm("onednn", x, layer.weight, None), x @ layer.weight.t())
        layer.weight.mul_(2.0)
        torch.testing.assert_close(engine_linear._gemm("onednn", x, layer.weight, None), x @ layer.weight.t())
        conv = nn.Conv2d(96, 10, (2, 3))
        as_matrix = engine_linear.packed_weight(conv.weight.view(10, -1), 64)
        assert engine_linear.packed_weight(conv.weight.view(10, -1), 64) is as_matrix  # a new view, the same weight
        with pytest.MonkeyPatch.context() as patch:  # memory before speed: the plain weight
            patch.setenv("HTSAT_HF_PACK_WEIGHTS", "0")
            assert engine_linear.packed_weight(layer.weight, 64) is layer.weight
    gc.collect()  # weights of earlier tests that wait in reference cycles go first, so only ours are counted
    entries = len(engine_linear._PACKED_WEIGHTS)
    del layer, conv, first, as_matrix
    gc.collect()
    assert len(engine_linear._PACKED_WEIGHTS) == entries - 2
