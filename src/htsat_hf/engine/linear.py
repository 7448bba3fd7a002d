"""Linear layers for CPU inference: the faster of PyTorch's two fp32 GEMM libraries on this machine, and the faster
of two ways to apply the MLP's exact GELU.

PyTorch has two CPU GEMMs for a linear layer: its BLAS (`torch.addmm`, MKL in the pip wheels) and oneDNN
(`torch.ops.mkldnn._linear_pointwise`, what PyTorch's own compiler lowers linear layers to, which can also apply GELU
in its epilogue). Which is faster depends on the CPU. On 2 cores, for the Swin blocks' shapes: oneDNN measured 0-15 %
faster than MKL on an AVX-512 machine; on an AMD EPYC Zen 3 (AVX2) MKL was 10-20 % faster, and oneDNN's GELU epilogue
added 0.8-4 ms to a block chunk's fc1, against about 0.4 ms for a vectorised GELU pass after the GEMM (now
`engine.native.bias_gelu_`, which adds fc1's bias in the same pass, so the GEMM runs without it). So
the first inference linear layer of a process times the candidates on one block-sized shape (interleaved rounds, the
best of each, about 0.2 s in all) and keeps the fastest, unless oneDNN (the earlier fixed choice) is within 5 % of it:
a `LinearPlan`, logged at info level. The plan is measured once per machine (CPU flags and PyTorch build) and kept
beside the native kernels (`~/.cache/htsat_hf/kernels/linear-plan-*.json`, under a file lock), so every process on the
machine computes the same numbers: the candidates agree only within fp32 rounding (logits within about 5e-7), and the
ranks of one corpus run must not differ. Delete the file to measure again; `HTSAT_HF_CPU_GEMM=blas` or `=onednn` fixes
the GEMM library instead.

oneDNN takes each weight packed once into its own blocked layout (`packed_weight`, as PyTorch's compiler does to frozen
weights) instead of packing the plain weight again on every call: bit-identical outputs, 3-8 % faster per GEMM in
isolation and 1.10x for the whole model at batch 16 on an AMD EPYC Zen 5 (the repacking also evicted the caches the
kernels around it use), for one more copy of the weights in memory (115 MiB more resident for the paper-size model;
`HTSAT_HF_PACK_WEIGHTS=0` keeps the plain weights only).

Used only where it applies (fp32 CPU tensors, a plain `nn.Linear`, no autograd, autocast, compiler tracing, ONNX export
or dispatch mode such as `FlopCounterMode`); everything else takes the layer itself and `F.gelu`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula
from transformers.utils import logging

try:  # Unix: processes share the measured plan; elsewhere each process measures its own
    import fcntl
except ImportError:
    fcntl = None

from .native import cpu_flags, bias_gelu_, in_onnx_export, kernel_cache_dir

logger = logging.get_logger(__name__)

ACTIVATIONS = ("none", "gelu")
GEMM_LIBRARIES = ("blas", "onednn")
GEMM_ENVIRONMENT_VARIABLE = "HTSAT_HF_CPU_GEMM"
PACK_ENVIRONMENT_VARIABLE = "HTSAT_HF_PACK_WEIGHTS"  # "0": oneDNN takes the plain weights (no packed copies)
CALIBRATION_SHAPE = (1024, 192, 576)  # rows, in_features, out_features: a stage-2 qkv projection on one chunk
CALIBRATION_ROUNDS = 15
MARGIN = 0.05  # the challenger must be this much faster than oneDNN (the previous fixed choice) to be chosen


def _onednn_op(name: str):
    """The oneDNN op `torch.ops.mkldnn.<name>` of this PyTorch build on x86-64 (where it was measured), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return getattr(torch.ops.mkldnn, name).default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_op("_linear_pointwise")
# the reorder of a weight into oneDNN's own blocked layout, as PyTorch's compiler does to frozen weights
ONEDNN_REORDER = _onednn_op("_reorder_linear_weight") if ONEDNN_LINEAR is not None else None
# (id of the weight or of the weight it views, shape) -> ((data pointer, version, strides), oneDNN's packed copy)
_PACKED_WEIGHTS: dict[tuple, tuple[tuple, torch.Tensor]] = {}


def _linear_flops(input_shape, weight_shape, *args, **kwargs) -> int:
    """FLOPs of the fused linear op as `torch.utils.flop_counter` counts addmm: 2 per multiply-add."""
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]


if ONEDNN_LINEAR is not None:  # PyTorch's FLOP counter knows no formula for this op; without one it counts nothing
    try:
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_flops)
    except (RuntimeError, ValueError):  # already registered (the module is imported again as remote code)
        pass


def _onednn_available() -> bool:
    return ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled


def inference_path_applies(inputs: torch.Tensor, layer: nn.Module) -> bool:
    """Whether `linear` takes the planned CPU inference path for this input and layer."""
    return type(layer) is nn.Linear and _weights_path_applies(inputs, layer.weight)  # not a quantised or replaced layer


def _weights_path_applies(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        inputs.is_cpu
        and inputs.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")  # autocast's lower precision applies to F.linear only
        and _eager()
    )


def _eager() -> bool:
    """No compiler tracing, TorchScript tracing, ONNX export or dispatch mode (a FLOP counter or fake tensors must see
    the plain ops)."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not in_onnx_export()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _gelu_in_place_applies(output: torch.Tensor, inputs: torch.Tensor) -> bool:
    """Whether a replaced layer's output can take its GELU in place: an fp32 CPU tensor of its own (not sharing the
    input's memory) that autograd does not track, outside compiler tracing, ONNX export and dispatch modes
    (`bias_gelu_` runs the native kernel where it applies).
    For the int8 model's MLPs that is 3-5 % of its time (2 cores, AMD Zen 3): `F.gelu` wrote a second 3-MiB tensor
    per chunk, at twice the cost of the pass itself."""
    return (
        _eager()  # first: traced or fake tensors have no storage to compare
        and output.device.type == "cpu"
        and output.dtype == torch.float32
        and not (torch.is_grad_enabled() and output.requires_grad)
        and not (output.is_inference() and not torch.is_inference_mode_enabled())  # in place is refused there
        and output.untyped_storage().data_ptr() != inputs.untyped_storage().data_ptr()
    )


def tensor_state(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, version): what stays equal while a tensor's contents are unchanged, for caches of what is derived
    from it. None for an inference tensor (made inside `torch.inference_mode`, as a model built there has): its
    in-place changes bump no version, so nothing derived from it may be kept."""
    if tensor.is_inference():
        return None
    return tensor.data_ptr(), tensor._version


def packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (out, in) in oneDNN's blocked layout, for GEMMs of about `rows` rows: oneDNN otherwise packs a plain
    weight into that layout on every call (5-10 MiB read and written per call for the largest layers, and the caches
    that evicts). Made once per weight and kept while it lives and is unchanged (data pointer, version, strides), so a
    weight loaded or edited in place is packed anew; a view of a weight (the head's convolution seen as a matrix) is
    kept with the weight it views. One more copy of the weights in memory. The plain weight where this PyTorch build
    cannot reorder, with `HTSAT_HF_PACK_WEIGHTS=0` (memory before speed), or for an inference tensor
    (`tensor_state`)."""
    contents = tensor_state(weight)
    if ONEDNN_REORDER is None or os.environ.get(PACK_ENVIRONMENT_VARIABLE) == "0" or contents is None:
        return weight
    owner = weight if weight._base is None else weight._base
    key = (id(owner), tuple(weight.shape))
    state = (*contents, weight.stride())
    entry = _PACKED_WEIGHTS.get(key)
    if entry is not None and entry[0] == state:
        return entry[1]
    packed = ONEDNN_REORDER(weight.detach(), rows)
    if entry is None:  # forgotten with the weight
        weakref.finalize(owner, _PACKED_WEIGHTS.pop, key, None)
    _PACKED_WEIGHTS[key] = (state, packed)
    return packed


def _gemm(library: str, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight.T + bias by "blas" or "onednn" (with the weight packed, `packed_weight`)."""
    if library == "onednn":
        return ONEDNN_LINEAR(rows, packed_weight(weight, rows.shape[0]), bias, "none", [], "")
    return F.linear(rows, weight, bias)


def _fused_onednn_gelu(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # "none": the exact erf form
    return ONEDNN_LINEAR(rows, packed_weight(weight, rows.shape[0]), bias, "gelu", [], "none")


@dataclass(frozen=True)
class LinearPlan:
    """How CPU inference runs linear layers here: `gemm` is "blas" or "onednn"; `gelu` is "onednn" (oneDNN's GELU
    epilogue, with the oneDNN GEMM) or "after" (the GEMM without its bias, then one pass adding the bias and applying
    GELU in place: `engine.native.bias_gelu_`, PyTorch's ops where the kernels do not apply)."""

    gemm: str
    gelu: str
    timings_ms: tuple[tuple[str, float], ...] = ()


def fastest_times(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds per call of each candidate: the best of interleaved rounds of two calls each, after three warm-up
    calls (the first calls in a process pay for thread pools and page faults; other load only ever adds time)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for call in candidates.values():
        for _ in range(3):
            call()
    for _ in range(rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            call()
            call()
            times[name].append((time.perf_counter() - start) / 2)
    return {name: min(values) for name, values in times.items()}


def choose(seconds: dict[str, float], default: str) -> str:
    """The fastest candidate, unless `default` is within MARGIN of it (near ties stay put, whatever the noise)."""
    fastest = min(seconds, key=seconds.get)
    if default in seconds and seconds[fastest] > (1 - MARGIN) * seconds[default]:
        return default
    return fastest


def _requested_gemm() -> str | None:
    requested = os.environ.get(GEMM_ENVIRONMENT_VARIABLE, "auto").strip().lower()
    if requested in ("", "auto"):
        return None
    if requested not in GEMM_LIBRARIES:
        raise ValueError(
            f"{GEMM_ENVIRONMENT_VARIABLE}={requested!r} is not one of auto, {', '.join(GEMM_LIBRARIES)}; unset it to "
            "let the fastest be measured"
        )
    if requested == "onednn" and not _onednn_available():
        logger.warning(f"{GEMM_ENVIRONMENT_VARIABLE}=onednn, but this PyTorch has no oneDNN enabled: BLAS is used")
        return "blas"
    return requested


def calibrate(rounds: int = CALIBRATION_ROUNDS) -> LinearPlan:
    """Times the GEMM libraries, then the ways to apply GELU with the chosen one, on CALIBRATION_SHAPE."""
    rows, inputs, outputs = CALIBRATION_SHAPE
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):  # plain tensors, as a model's weights are, even when the caller is in that mode
        x = torch.randn(rows, inputs, generator=generator)
        weight = torch.randn(outputs, inputs, generator=generator) * inputs**-0.5
        wide = torch.randn(4 * inputs, inputs, generator=generator) * inputs**-0.5
        bias, wide_bias = torch.zeros(outputs), torch.zeros(4 * inputs)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        gemm = _requested_gemm()
        if gemm is None:
            libraries = [name for name in GEMM_LIBRARIES if name == "blas" or _onednn_available()]
            candidates = {name: functools.partial(_gemm, name, x, weight, bias) for name in libraries}
            measured = fastest_times(candidates, rounds)
            timings.update({f"gemm {name}": seconds for name, seconds in measured.items()})
            gemm = choose(measured, default="onednn")
        gelu = "after"
        if gemm == "onednn":  # oneDNN's GELU epilogue against its GEMM followed by the bias-and-GELU pass
            ways = {
                "after": lambda: bias_gelu_(_gemm(gemm, x, wide, None), wide_bias),
                "onednn": lambda: _fused_onednn_gelu(x, wide, wide_bias),
            }
            measured = fastest_times(ways, rounds)
            timings.update({f"gelu {name}": seconds for name, seconds in measured.items()})
            gelu = choose(measured, default="onednn")
    plan = LinearPlan(gemm, gelu, tuple((name, round(seconds * 1e3, 3)) for name, seconds in timings.items()))
    logger.info(f"CPU linear layers: {plan.gemm} GEMM, {plan.gelu} GELU (ms per call: {dict(plan.timings_ms)})")
    return plan


def machine_key(*parts: object) -> str:
    """What a measured choice depends on: PyTorch's build and the CPU's flags, with `parts`."""
    key = "\n".join([torch.__version__, *map(str, parts), cpu_flags()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def kept_per_machine(name: str, key: str, measure: Callable[[], dict], valid: Callable[[dict], bool]) -> dict:
    """`measure()`'s result (a JSON-able dict), measured once per machine and kept beside the native kernels
    (`{name}-{key}.json`, under a file lock), so that every process on the machine (the ranks of one run, later runs)
    takes the same choice; measured in-process, once, where that folder cannot be written or holds something `valid`
    refuses."""
    if fcntl is None:
        return measure()
    path, result = kernel_cache_dir() / f"{name}-{key}.json", None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together: one measures, the others read
            if path.exists():
                saved = json.loads(path.read_text())
                if not valid(saved):
                    raise ValueError(f"{path} holds an unknown {name} {saved}")
                return saved
            result = measure()
            logger.info(f"CPU {name} kept in {path} (delete it to measure again)")
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            try:
                scratch.write_text(json.dumps(result))
                os.replace(scratch, path)
            finally:
                scratch.unlink(missing_ok=True)  # nothing left behind where it could not be written
            return result
    except (OSError, ValueError, KeyError) as error:
        logger.info(f"CPU {name} not kept on disk ({error}); measured for this process")
        return result if result is not None else measure()  # measured once, even when it could not be written


def _plan_fields(plan: LinearPlan) -> dict:
    return {"gemm": plan.gemm, "gelu": plan.gelu, "timings_ms": [list(pair) for pair in plan.timings_ms]}


def _valid_plan(saved: dict) -> bool:
    return saved["gemm"] in GEMM_LIBRARIES and saved["gelu"] in ("after", "onednn")


@functools.cache
def linear_plan() -> LinearPlan:
    """This machine's plan: measured once per CPU and PyTorch build and kept beside the native kernels, so that every
    process on the machine computes the same numbers (`kept_per_machine`). `HTSAT_HF_CPU_GEMM` set: its library,
    with the GELU measured for it."""
    if _requested_gemm() is not None:
        return calibrate()
    key = machine_key("3", ONEDNN_LINEAR is not None, CALIBRATION_SHAPE)  # 3: oneDNN with packed weights
    saved = kept_per_machine("linear-plan", key, lambda: _plan_fields(calibrate()), _valid_plan)
    return LinearPlan(saved["gemm"], saved["gelu"], tuple(map(tuple, saved["timings_ms"])))


def bias_separable(layer: nn.Module) -> bool:
    """Whether `linear(..., with_bias=False)` can leave this layer's bias to the caller: a plain nn.Linear (a quantised
    or otherwise replaced layer applies its own)."""
    return type(layer) is nn.Linear


def linear(inputs: torch.Tensor, layer: nn.Module, activation: str = "none", with_bias: bool = True) -> torch.Tensor:
    """`activation(layer(inputs))` for any (..., in_features) input; activation is "none" or "gelu" (exact erf). With
    `with_bias=False` (no activation; `bias_separable(layer)`) the layer's bias is left out: the caller adds it in a
    pass it makes anyway."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}.")
    if not with_bias and activation != "none":
        raise ValueError("with_bias=False leaves the bias to the caller, so it cannot come with an activation")
    if not with_bias and not bias_separable(layer):
        raise ValueError(f"with_bias=False needs a plain nn.Linear, not {type(layer).__name__}, which adds its own bias")
    if not inference_path_applies(inputs, layer):
        output = layer(inputs) if with_bias else F.linear(inputs, layer.weight)
        if activation == "none":
            return output
        if _gelu_in_place_applies(output, inputs):  # e.g. a quantised layer's fresh fp32 output: no second tensor
            return bias_gelu_(output)
        return F.gelu(output)
    plan = linear_plan()
    onednn = _onednn_available()  # oneDNN may have been switched off since (torch.backends.mkldnn.flags)
    rows = inputs.reshape(-1, inputs.shape[-1])
    if activation == "gelu" and plan.gelu == "onednn" and onednn:
        output = _fused_onednn_gelu(rows, layer.weight, layer.bias)
    elif activation == "gelu":
        output = bias_gelu_(_gemm(plan.gemm if onednn else "blas", rows, layer.weight, None), layer.bias)
    else:
        output = _gemm(plan.gemm if onednn else "blas", rows, layer.weight, layer.bias if with_bias else None)
    return output.view(*inputs.shape[:-1], output.shape[-1])


def linear_weights(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(inputs, weight, bias)` through this machine's planned GEMM in CPU inference, for weights that are not
    an nn.Linear's (the token-semantic head's convolution, run as one GEMM); `F.linear` elsewhere."""
    if not _weights_path_applies(inputs, weight):
        return F.linear(inputs, weight, bias)
    rows = inputs.reshape(-1, inputs.shape[-1])
    output = _gemm(linear_plan().gemm if _onednn_available() else "blas", rows, weight.contiguous(), bias)
    return output.view(*inputs.shape[:-1], output.shape[-1])


def linear_add_(accumulator: torch.Tensor, inputs: torch.Tensor, layer: nn.Module, with_bias: bool = True) -> None:
    """`accumulator += layer(inputs)` (without the bias where `with_bias=False`); with the BLAS GEMM in CPU inference
    the product is accumulated in the GEMM itself (beta = 1), with no output tensor and no separate add."""
    if (
        inference_path_applies(inputs, layer)
        and (linear_plan().gemm == "blas" or not _onednn_available())
        and accumulator.is_contiguous()
        and accumulator.shape == (*inputs.shape[:-1], layer.out_features)
    ):
        rows = accumulator.view(-1, layer.out_features)
        rows.addmm_(inputs.reshape(-1, inputs.shape[-1]), layer.weight.t())
        if with_bias and layer.bias is not None:
            rows += layer.bias
        return
    accumulator += linear(inputs, layer, with_bias=with_bias)


__all__ = [
    "LinearPlan", "bias_separable", "calibrate", "inference_path_applies", "linear", "linear_add_", "linear_plan",
    "linear_weights", "packed_weight", "tensor_state",
]
