"""fp16 and int8 variants of the traced fp32 graphs, made with onnxruntime's own tools.

- int8 encoder: static QDQ quantization (`quantize_static`, QuantFormat.QDQ) calibrated on real images,
  after `quant_pre_process` (symbolic shape inference, onnxruntime's basic optimizations, ONNX shape
  inference) as onnxruntime's docs recommend. uint8 activations, int8 weights per output channel:
  the U8S8 pair is MLAS's fast path on x86, and per-channel weights cost nothing in speed here.
  The first convolution stays float: with 3 input channels it gains nothing from int8 and it
  quantizes the image itself (measured on the shipped model: 1.59× fp32 at batch 1 with it in
  float, 1.53× with it in int8; max h0 error 0.18 vs 0.40).
- int8 decoder step: dynamic quantization (`quantize_dynamic`): int8 weights for every MatMul, the
  activation's range found per call (DynamicQuantizeLinear + MatMulInteger). The output projection
  is traced as a Gemm, which quantize_dynamic leaves alone, so it is rewritten as MatMul + Add first.
- fp16 (for GPUs): `onnxruntime.transformers.float16.convert_float_to_float16` with keep_io_types,
  so weights and compute are float16 and the graphs' inputs and outputs keep their dtypes.

Every variant keeps the bundle's input/output names, dtypes and shapes: the runtime does not change.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
import heapq
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibration import ImageReader, ImageSet
from .graphs import name_batch_axis, strip_metadata
from .validate import ExportError

# Settings written into manifest["quantization"], so a bundle says how it was made.
INT8_ENCODER = {"method": "static", "format": "QDQ", "activations": "uint8", "weights": "int8",
                "per_channel": True, "calibrate_method": "Percentile", "tool": "onnxruntime.quantization.quantize_static"}
INT8_DECODER_STEP = {"method": "dynamic", "activations": "uint8 (range per call)", "weights": "int8",
                     "per_channel": True, "ops": ["MatMul", "Gemm"], "tool": "onnxruntime.quantization.quantize_dynamic"}
FP16 = {"method": "float16 weights and compute, float32/uint8/int64 inputs and outputs kept",
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16"}


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization tools log and print their progress and warn about preprocessing."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _finish(path: Path) -> None:
    """The bundle's conventions on a graph the tools wrote: batch axis "N", no producer debris, sorted nodes."""
    model = onnx.load(str(path))
    topological_sort(model.graph)
    name_batch_axis(model)
    strip_metadata(model)
    onnx.save_model(model, str(path))


def _pre_process(src: Path, dst: Path) -> None:
    try:
        with _quiet():
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(dst))
    except Exception as e:  # the tool raises whatever its passes raise
        raise ExportError(f"{src.name}: onnxruntime's quantization pre-processing failed: {e}") from None


def quantize_encoder(src: Path, dst: Path, calibration: ImageSet, work: Path) -> dict:
    """encoder.onnx (fp32) -> static QDQ int8 at `dst`, calibrated on `calibration`'s images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = work / "encoder.pre.onnx"
    _pre_process(src, pre)
    float_nodes = first_conv(onnx.load(str(pre)).graph)
    try:
        with _quiet():
            quantize_static(str(pre), str(dst), ImageReader(calibration.images), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=INT8_ENCODER["per_channel"], nodes_to_exclude=float_nodes,
                            calibrate_method=getattr(CalibrationMethod, INT8_ENCODER["calibrate_method"]))
    except Exception as e:
        raise ExportError(f"{src.name}: static quantization failed: {e}") from None
    _finish(dst)
    return {**INT8_ENCODER, "float_nodes": float_nodes, "calibration": calibration.describe()}


def first_conv(graph: onnx.GraphProto) -> list[str]:
    """The name of the graph's first Conv (the one that reads the image), as a list; [] if none."""
    return next(([n.name] for n in graph.node if n.op_type == "Conv"), [])


def gemm_to_matmul(graph: onnx.GraphProto) -> int:
    """Rewrite each Gemm with a constant B (and alpha = beta = 1, no transA) as MatMul + Add, in place.

    quantize_dynamic gives MatMul int8 weights but leaves Gemm in float; the output projection
    (H x V, the step's largest matrix for a real vocabulary) is a Gemm. Returns the count rewritten.
    """
    weights = {init.name: init for init in graph.initializer}
    rewritten = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if b not in weights or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[b])  # (V, H) with transB, else (H, V)
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)  # (H, V): MatMul takes x (N, H) @ w
        w_name = f"{b}.matmul"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


def quantize_decoder_step(src: Path, dst: Path, work: Path) -> dict:
    """A decoder step (or the attention cache), fp32 -> dynamically quantized int8 weights at `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = work / f"{src.stem}.pre.onnx"
    _pre_process(src, pre)
    model = onnx.load(str(pre))
    gemms = gemm_to_matmul(model.graph)  # after pre-processing: its optimizer fuses MatMul + Add into Gemm
    matmul = work / f"{src.stem}.matmul.onnx"
    onnx.save_model(model, str(matmul))
    try:
        with _quiet():
            quantize_dynamic(str(matmul), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=INT8_DECODER_STEP["per_channel"], extra_options={"MatMulConstBOnly": True})
    except Exception as e:
        raise ExportError(f"{src.name}: dynamic quantization failed: {e}") from None
    _finish(dst)
    return {**INT8_DECODER_STEP, "gemm_rewritten": gemms}


def convert_fp16(src: Path, dst: Path) -> dict:
    """A graph (fp32) -> float16 weights and compute at `dst`, its inputs and outputs as they were."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        with _quiet():
            half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise ExportError(f"{src.name}: float16 conversion failed: {e}") from None
    onnx.save_model(half, str(dst))
    _finish(dst)  # the converter appends its input casts at the end of the node list: sorted here
    return dict(FP16)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order the nodes so each comes after the producers of its inputs, keeping the given order otherwise."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    waiting_on = [sum(1 for x in n.input if x not in available) for n in nodes]  # counts repeats
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for x in n.input:
            if x not in available:
                consumers.setdefault(x, []).append(k)
    # Always the lowest-index node that is ready: a graph already in order keeps its order exactly.
    ready = [k for k, w in enumerate(waiting_on) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for y in nodes[k].output:
            for c in consumers.pop(y, []):
                waiting_on[c] -= 1
                if waiting_on[c] == 0:
                    heapq.heappush(ready, c)
    if len(order) != len(nodes):
        raise ExportError(f"graph {graph.name!r}: {len(nodes) - len(order)} nodes wait on inputs nothing "
                          f"produces (a cycle or a dangling name); the conversion broke the graph")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
