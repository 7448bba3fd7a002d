"""
Deployment paths for HTS-AT: ONNX export (dynamic batch and length), `torch.compile`, and int8 dynamic quantisation
of the Linear layers for CPU inference.

ONNX graphs take `input_features` (batch, frames, num_mel_bins) of any length and return `logits` (batch, num_labels)
and, for `HTSATForSoundEventDetection`, `frame_logits` (batch, steps, num_labels), as the PyTorch model does: up to
one image of frames (`image_frames`, 10.24 s for the paper's model) the input is one window stretched to the image;
longer inputs are cut into overlapping windows and stitched. The two regimes are two traced graphs (the window
layout is a different function of the length in each); `export_onnx` joins them under one ONNX `If` on the length,
so one file takes every length.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from transformers.utils import logging

from ..engine.linear import CALIBRATION_ROUNDS, choose, fastest_times, kept_per_machine, machine_key
from ..modeling_htsat import HTSATForAudioClassification, HTSATForSoundEventDetection, HTSATPreTrainedModel

logger = logging.get_logger(__name__)

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
    max_frames: int = 360_001,
) -> str:
    """
    Exports `model` (eval mode) to `path` with the torch.export-based exporter: batch and time axes dynamic, any
    length from one STFT frame's worth to `max_frames` frames (an hour at the paper's rate by default). Returns the path.
    """
    import onnx

    config = model.config
    model = model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    regimes = length_regimes(config, max_frames)
    short = _export_graph(model, *regimes["short"], example_batch, opset)
    windowed = _export_graph(model, *regimes["windowed"], example_batch, opset)
    onnx.save(join_by_length(short, windowed, config.image_frames, output_names(model)), str(path))
    return str(path)


def length_regimes(config, max_frames: int = 360_001) -> dict[str, tuple[int, int, int]]:
    """The two traced regimes: name -> (example frames, min frames, max frames)."""
    return {"short": (config.clip_frames // 2, 2, config.image_frames),
            "windowed": (config.image_frames + 1 + config.clip_frames, config.image_frames + 1, max_frames)}


def _inputs_and_dims(model, example_frames: int, min_frames: int, max_frames: int, example_batch: int):
    example = torch.randn(example_batch, example_frames, model.config.num_mel_bins)
    dims = {0: torch.export.Dim("batch", min=1, max=4096),
            1: torch.export.Dim("frames", min=min_frames, max=max_frames)}
    return example, dims


def export_programs(model: HTSATPreTrainedModel, example_batch: int = 2, max_frames: int = 360_001) -> dict:
    """`torch.export` programs of `model` with dynamic batch and length, one per regime ("short": up to one image
    of frames, "windowed": longer); each runs any length in its range. (One program for both regimes is beyond
    torch.export's symbolic shapes today: the window layout is a piecewise function of the length.)"""
    programs = {}
    for name, (example_frames, low, high) in length_regimes(model.config, max_frames).items():
        example, dims = _inputs_and_dims(model.eval(), example_frames, low, high, example_batch)
        with torch.no_grad():
            programs[name] = torch.export.export(OnnxWrapper(model).eval(), (example,),
                                                 dynamic_shapes={"input_features": dims},
                                                 prefer_deferred_runtime_asserts_over_guards=True)
    return programs


def _export_graph(model, example_frames: int, min_frames: int, max_frames: int, example_batch: int, opset: int):
    """One traced ONNX graph for lengths in [min_frames, max_frames]."""
    example, dims = _inputs_and_dims(model, example_frames, min_frames, max_frames, example_batch)
    with torch.no_grad():
        program = torch.onnx.export(
            OnnxWrapper(model).eval(), (example,), dynamo=True, input_names=["input_features"],
            output_names=output_names(model), dynamic_shapes={"input_features": dims}, opset_version=opset,
            optimize=True, verify=False, report=False,
        )
    return program.model_proto


def join_by_length(short, windowed, image_frames: int, outputs: list[str]):
    """One ONNX model: `short` for inputs of at most `image_frames` frames, else `windowed` (an `If` node whose
    branches are the two graphs, their names prefixed so that they cannot collide)."""
    from onnx import TensorProto, helper

    # weights both graphs hold (same type, shape and bytes, whatever the exporter named them) are stored once, in the
    # outer graph ("shared/<name in the short graph>")
    def content(tensor) -> tuple:
        body = tensor.raw_data or _copy(tensor, name="").SerializeToString()
        return tensor.data_type, tuple(tensor.dims), hashlib.sha256(body).digest()

    windowed_by_content = {content(tensor): tensor.name for tensor in windowed.graph.initializer}
    shared, alias = [], {"short/": {}, "windowed/": {}}
    for tensor in short.graph.initializer:
        other = windowed_by_content.get(content(tensor))
        if other is not None and tensor.ByteSize() > 1024:
            shared.append(_copy(tensor, name="shared/" + tensor.name))
            alias["short/"][tensor.name] = alias["windowed/"][other] = "shared/" + tensor.name

    def branch(model, prefix: str):
        graph = model.graph
        outer = {value.name for value in graph.input}
        local = alias[prefix]
        rename = lambda name: local.get(name) or (name if (not name or name in outer) else prefix + name)  # noqa: E731
        nodes = [_copy(node, name=prefix + node.name, input=[rename(n) for n in node.input],
                       output=[rename(n) for n in node.output]) for node in graph.node]
        initializers = [_copy(tensor, name=rename(tensor.name)) for tensor in graph.initializer
                        if tensor.name not in local]
        results = [_copy(value, name=rename(value.name)) for value in graph.output]
        return helper.make_graph(nodes, prefix + "graph", [], results, initializer=initializers)

    if short.functions or windowed.functions:
        raise ValueError("The exported graphs contain ONNX functions; joining them is not supported.")
    feature_input = short.graph.input[0]
    frames = [
        helper.make_node("Shape", ["input_features"], ["length_shape"], start=1, end=2),
        helper.make_node("Constant", [], ["image_frames"],
                         value=helper.make_tensor("image_frames", TensorProto.INT64, [1], [image_frames])),
        helper.make_node("LessOrEqual", ["length_shape", "image_frames"], ["is_short_1"]),
        helper.make_node("Squeeze", ["is_short_1"], ["is_short"]),
        helper.make_node("If", ["is_short"], outputs, then_branch=branch(short, "short/"),
                         else_branch=branch(windowed, "windowed/")),
    ]
    graph_outputs = []
    for value in short.graph.output:
        shape = [None] * len(value.type.tensor_type.shape.dim)
        graph_outputs.append(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, shape))
    graph = helper.make_graph(frames, "htsat", [feature_input], graph_outputs, initializer=shared)
    joined = helper.make_model(graph, opset_imports=list(short.opset_import), producer_name="htsat_hf")
    joined.ir_version = short.ir_version
    return joined


def _copy(proto, **fields):
    """A copy of an ONNX protobuf message with some fields replaced (repeated fields by lists)."""
    result = type(proto)()
    result.CopyFrom(proto)
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(result, name)[:] = value
        else:
            setattr(result, name, value)
    return result


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


# ------------------------------------------------------------------------------------------------------ int8
INT8_ENGINES = ("x86", "onednn")  # PyTorch's x86 quantised engines; x86 (fbgemm's kernels) is its default
INT8_ENGINE_VARIABLE = "HTSAT_HF_INT8_ENGINE"
INT8_CALIBRATION_SHAPES = ((2048, 96, 384), (512, 384, 1536), (256, 3072, 768))  # rows, in, out: stages 1, 3, 4 MLPs


def int8_engines() -> list[str]:
    """The quantised engines of INT8_ENGINES that this PyTorch build has."""
    return [engine for engine in INT8_ENGINES if engine in torch.backends.quantized.supported_engines]


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """`torch.backends.quantized.engine = engine` within the block (weights quantised there are packed for it; the
    packed layers then run with their engine's kernels whatever the global setting)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def calibrate_int8_engine(rounds: int = CALIBRATION_ROUNDS) -> dict:
    """Times each engine's dynamic int8 linear layers on INT8_CALIBRATION_SHAPES (interleaved rounds, the best of
    each); the faster is chosen unless x86, PyTorch's default, is within MARGIN of it. On 2 cores of an AMD EPYC Zen 3
    (AVX2, no VNNI) oneDNN's made the whole int8 model 5-6 % faster (30 and 14 interleaved rounds at batch 4)."""
    engines = int8_engines()
    if len(engines) < 2:  # nothing to choose (e.g. qnnpack on an Arm CPU): PyTorch's own choice
        return {"engine": engines[0] if engines else torch.backends.quantized.engine, "timings_ms": []}
    generator = torch.Generator().manual_seed(0)
    shapes = [(nn.Linear(inputs, outputs), torch.randn(rows, inputs, generator=generator))
              for rows, inputs, outputs in INT8_CALIBRATION_SHAPES]
    calls = {}
    for engine in engines:
        layers = [(quantize_dynamic_int8(nn.Sequential(layer), engine)[0], x) for layer, x in shapes]
        calls[engine] = lambda layers=layers: [layer(x) for layer, x in layers]
    with torch.inference_mode():
        measured = fastest_times(calls, rounds)
    engine = choose(measured, default="x86")
    timings = [[name, round(seconds * 1e3, 3)] for name, seconds in measured.items()]
    logger.info(f"int8 engine: {engine} (ms per call: {dict(map(tuple, timings))})")
    return {"engine": engine, "timings_ms": timings}


@functools.cache
def int8_engine() -> str:
    """This machine's quantised engine for `quantize_dynamic_int8`: `HTSAT_HF_INT8_ENGINE` (x86 or onednn) where set,
    else the faster one, measured once per machine and kept beside the native kernels."""
    requested = os.environ.get(INT8_ENGINE_VARIABLE, "auto").strip().lower()
    if requested not in ("", "auto"):
        if requested not in int8_engines():
            raise ValueError(
                f"{INT8_ENGINE_VARIABLE}={requested!r} is not one of auto, {', '.join(int8_engines())} (the engines "
                "this PyTorch has); unset it to let the faster be measured"
            )
        return requested
    key = machine_key("1", INT8_CALIBRATION_SHAPES, *int8_engines())
    saved = kept_per_machine("int8-engine", key, calibrate_int8_engine,
                              lambda saved: saved["engine"] in torch.backends.quantized.supported_engines)
    return saved["engine"]


def quantize_dynamic_int8(model: nn.Module, engine: str | None = None) -> nn.Module:
    """
    A copy of `model` with every `nn.Linear` replaced by an int8 dynamically quantised Linear (weights int8 per tensor,
    activations quantised on the fly); CPU inference only. The convolutions, norms and attention stay fp32.

    `engine`: PyTorch's quantised engine the weights are packed for, "x86" (its default, fbgemm's kernels) or "onednn";
    None takes this machine's faster one (`int8_engine`, measured once and kept, or `HTSAT_HF_INT8_ENGINE`). The global
    `torch.backends.quantized.engine` is left as it was.
    """
    from torch.ao.quantization import quantize_dynamic

    engine = int8_engine() if engine is None else engine
    supported = [name for name in torch.backends.quantized.supported_engines if name != "none"]
    if engine not in supported:
        raise ValueError(f"engine must be one of {supported} (the quantised engines this PyTorch has), got {engine!r}")
    quantized = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings(), quantized_engine(engine):
        # torch.ao's quantized tensors are deprecated in favour of torchao (not a dependency)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8)


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """`torch.compile` with settings that suit HTS-AT: a static graph per input shape (no dynamic-shape retrace)."""
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)


__all__ = [
    "INT8_ENGINES", "OnnxWrapper", "calibrate_int8_engine", "compile_model", "export_onnx", "export_programs",
    "int8_engine", "int8_engines", "join_by_length", "onnx_session", "quantize_dynamic_int8", "quantized_engine",
    "run_onnx",
]
