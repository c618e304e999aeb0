"""Tracing the model's graphs to ONNX (encoder.onnx, decoder_step.onnx, and for attention models the
attention cache's attention_cache.onnx and decoder_step_cached.onnx) and the checks each must pass.

One plain function per graph: a thin wrapper module fixes the input/output names and their order
from `captool.bundle.graph_signature`, and torch.onnx's dynamo exporter traces it at a batch of 2
with the batch axis dynamic. docs/export.md says why this exporter and not the TorchScript one.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from captool.bundle import STATE_FROM_ENCODER, cache_signature, graph_signature

from .fold import fold_input_projection, fold_normalization
from .validate import ExportError

MIN_OPSET = 18  # the dynamo exporter writes 18 natively; its conversion down to 17 breaks Split (docs/export.md)
DEFAULT_OPSET = 18
TRACE_BATCH = 2  # a batch of 1 may be frozen into the graph; validation then runs at 1, 3 and 17
BATCH = "N"  # the symbolic batch axis, in the graphs and in the manifest

# Control flow would break IO binding and CUDA graph capture.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# ONNX ops that onnxruntime's CUDA provider has kernels for (checked against the kernel classes in
# onnxruntime-gpu 1.31's libonnxruntime_providers_cuda.so). An op outside this set would fall back to
# the CPU provider and force copies between devices on every step.
CUDA_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Exp", "Log", "Abs", "Erf", "Reciprocal",
    "MatMul", "Gemm", "Conv", "Clip", "Relu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax",
    "Cast", "Gather", "GatherND", "GatherElements", "Unsqueeze", "Squeeze", "Reshape", "Flatten",
    "Transpose", "Split", "Slice", "Concat", "Expand", "ConstantOfShape", "Constant", "Identity", "Shape",
    "ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool", "BatchNormalization", "Where", "Equal",
    "Max", "Min",
})
# What the int8 graphs add: QDQ pairs (the encoder) and integer matmuls on dynamically quantized
# activations (the decoder step). An int8 bundle is a CPU bundle (docs/export.md): CUDA runs QDQ graphs
# in float and has no DynamicQuantizeLinear kernel, so these are not held to the CUDA op set.
INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"})
# Ops that may yield int64 tensors as indices or shapes; any other op yielding int64 does int64 arithmetic.
INDEX_OPS = frozenset({"Gather", "GatherND", "GatherElements", "Unsqueeze", "Squeeze", "Reshape", "Shape",
                       "Expand", "Slice", "Concat", "Cast", "ConstantOfShape", "Identity", "Split"})

_DTYPES = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32",
           onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT8: "int8"}


# The wrappers register only the submodules their graph uses, so the trace lifts those weights alone
# (the step never touches MobileNetV2; lifting it anyway doubles the step's export time), and the
# model's own `encode` / `step` are called, not copies of them.


class EncoderGraph(nn.Module):
    """encoder.onnx: uint8 image (N, 3, S, S) -> h0 (N, H) [, c0 (N, H), features (N, H, 4, 4)]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.feature_extractor, self.feature_projector = model.feature_extractor, model.feature_projector
        self._encode = model.encode
        self.outputs = graph_signature(model.config.cell_type)["encoder"]["outputs"]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self._encode(image)
        return tuple(out[name] for name in self.outputs)


class DecoderStepGraph(nn.Module):
    """decoder_step.onnx: token (N,), h [, c, features] -> logits (N, V), h_next [, c_next, attn_weights]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.word_embedding, self.cell, self.out_projector = model.word_embedding, model.cell, model.out_projector
        self._step = model.step
        self.outputs = graph_signature(model.config.cell_type)["decoder_step"]["outputs"]

    def forward(self, token: Tensor, h: Tensor, c: Tensor | None = None, features: Tensor | None = None):
        out = self._step(token, h, c, features)
        return tuple(out[name] for name in self.outputs)


class AttentionCacheGraph(nn.Module):
    """attention_cache.onnx: features (N, H, 4, 4) -> attention_keys (N, H, 16), attention_values (N, 16, 4H)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.cell = model.cell
        self._cache = model.attention_cache

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self._cache(features)
        return out["attention_keys"], out["attention_values"]


class CachedStepGraph(nn.Module):
    """decoder_step_cached.onnx: token, h, c, attention_keys, attention_values -> decoder_step's outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.word_embedding, self.cell, self.out_projector = model.word_embedding, model.cell, model.out_projector
        self._step = model.step_cached
        self.outputs = cache_signature()["decoder_step_cached"]["outputs"]

    def forward(self, token: Tensor, h: Tensor, c: Tensor, attention_keys: Tensor, attention_values: Tensor):
        out = self._step(token, h, c, attention_keys, attention_values)
        return tuple(out[name] for name in self.outputs)


def example_images(model: nn.Module, batch: int = TRACE_BATCH) -> Tensor:
    """A fixed uint8 batch (N, 3, S, S) to trace with; the values do not shape the graph."""
    g = torch.Generator().manual_seed(0)
    s = model.config.image_size
    return torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)


def export_encoder(model: nn.Module, path: Path, *, opset: int = DEFAULT_OPSET, batch: int = TRACE_BATCH,
                   fold: bool = True) -> None:
    """Trace `model.encode` into `path` (model on CPU, float32, eval).

    fold: the input normalization's two Divs into the first convolution's weights
    (captool.export.fold.fold_normalization says why the Sub stays).
    """
    names = graph_signature(model.config.cell_type)["encoder"]
    _export(EncoderGraph(model), (example_images(model, batch),), names["inputs"], names["outputs"], path, opset,
            rewrite=fold_normalization if fold else None)


def export_decoder_step(model: nn.Module, path: Path, *, opset: int = DEFAULT_OPSET, batch: int = TRACE_BATCH,
                        fold: bool = True) -> None:
    """Trace one `model.step` into `path`, with the state that `encode` gives for the example images.

    fold: compute `W_embed @ Wx + b` once into a lookup table (captool.export.fold says why).
    """
    names = graph_signature(model.config.cell_type)["decoder_step"]
    _export(DecoderStepGraph(model), _step_args(model, names["inputs"], batch), names["inputs"], names["outputs"],
            path, opset, rewrite=fold_input_projection if fold else None)


def export_attention_cache(model: nn.Module, path: Path, *, opset: int = DEFAULT_OPSET, batch: int = TRACE_BATCH) -> None:
    """Trace `model.attention_cache` (attention models) into `path`."""
    names = cache_signature()["attention_cache"]
    with torch.no_grad():
        features = model.encode(example_images(model, batch))["features"]
    _export(AttentionCacheGraph(model), (features,), names["inputs"], names["outputs"], path, opset)


def export_cached_step(model: nn.Module, path: Path, *, opset: int = DEFAULT_OPSET, batch: int = TRACE_BATCH) -> None:
    """Trace one `model.step_cached` (attention models) into `path`, the input projection folded as in
    `export_decoder_step`."""
    names = cache_signature()["decoder_step_cached"]
    _export(CachedStepGraph(model), _step_args(model, names["inputs"], batch), names["inputs"], names["outputs"],
            path, opset, rewrite=fold_input_projection)


def _step_args(model: nn.Module, inputs: list[str], batch: int) -> tuple[Tensor, ...]:
    """A step's example inputs, in `inputs` order: tokens, and the state `encode` (and, for the cached
    step, `attention_cache`) gives for the example images."""
    with torch.no_grad():
        state = model.encode(example_images(model, batch))
        if "attention_keys" in inputs:
            state.update(model.attention_cache(state["features"]))
    by_input = {STATE_FROM_ENCODER[k]: v for k, v in state.items()}
    by_input["token"] = torch.arange(batch, dtype=torch.int64) % model.config.vocab_size  # (N,)
    # Clones: attention's h0 and c0 are one tensor, and torch.export merges aliased inputs into one.
    return tuple(by_input[name].clone() for name in inputs)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path, opset: int,
            rewrite=None) -> None:
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} and up "
            f"(its conversion to older opsets produces invalid Split nodes); pass --opset {MIN_OPSET} or higher"
        )
    module.eval()
    batch = torch.export.Dim(BATCH, min=1, max=1 << 16)
    dynamic = {name: {0: batch} for name in inputs}
    # The exporter prints its progress and warns that names shared by one Dim are merged: not ours to show.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, input_names=inputs, output_names=outputs, opset_version=opset,
            dynamo=True, dynamic_shapes=dynamic, optimize=True, verbose=False,
        )
    model = program.model_proto
    name_batch_axis(model)
    strip_metadata(model)
    if rewrite is not None:
        rewrite(model)
    onnx.save_model(model, str(path))


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's debugging annotations: stack traces with this machine's paths, and the
    ExportedProgram's signature (40 kB even for a tiny step). The bundle's bytes then depend on the
    weights and the code only."""
    del model.graph.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def name_batch_axis(model: onnx.ModelProto) -> None:
    """Every graph input's and output's first axis is the symbolic "N" (the exporter may name it otherwise)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH


# ---------------------------------------------------------------------------------------------------
# What the graphs must be, and the checks


def io_specs(config) -> dict[str, dict[str, list[dict]]]:
    """Names, dtypes and shapes of every graph's inputs and outputs for a ModelConfig ("N" = batch):
    encoder and decoder_step, plus the attention cache's two graphs for attention models."""
    H, V, S = config.hidden_dim, config.vocab_size, config.image_size
    shapes = {
        "image": ("uint8", [BATCH, 3, S, S]), "token": ("int64", [BATCH]),
        "h0": ("float32", [BATCH, H]), "c0": ("float32", [BATCH, H]), "features": ("float32", [BATCH, H, 4, 4]),
        "h": ("float32", [BATCH, H]), "c": ("float32", [BATCH, H]),
        "logits": ("float32", [BATCH, V]), "h_next": ("float32", [BATCH, H]), "c_next": ("float32", [BATCH, H]),
        "attn_weights": ("float32", [BATCH, 4, 4]),
        "attention_keys": ("float32", [BATCH, H, 16]), "attention_values": ("float32", [BATCH, 16, 4 * H]),
    }
    signature = graph_signature(config.cell_type)
    if config.cell_type == "attention":
        signature.update(cache_signature())
    spec = {}
    for graph, io_names in signature.items():
        spec[graph] = {
            side: [{"name": n, "dtype": shapes[n][0], "shape": shapes[n][1]} for n in names]
            for side, names in io_names.items()
        }
    return spec


@dataclass(frozen=True)
class GraphInfo:
    """What check_graph found: node count, op types, opset."""

    nodes: int
    op_types: dict[str, int]
    opset: int


def _value_spec(value: onnx.ValueInfoProto) -> dict:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": value.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}


def check_graph(path: Path, graph: str, expected: dict[str, list[dict]], *, precision: str = "fp32") -> GraphInfo:
    """The ONNX checker, strict shape inference, names/dtypes/shapes as promised, and a clean graph.

    Clean: no control flow, every op one the CUDA provider runs (int8: or one of INT8_OPS), no int64
    arithmetic, every input used, every output computed by a node, no node whose result nobody reads.
    """
    where = f"{path.name}"
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{where}: the ONNX checker rejects the exported graph: {str(e).splitlines()[0]}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"{where}: written at opset {opset}, below the minimum {MIN_OPSET}")

    for side, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        got = [_value_spec(v) for v in values]
        if got != expected[side]:
            raise ExportError(f"{where}: {graph} {side} are {got}, the bundle format needs {expected[side]}")

    nodes = list(model.graph.node)
    ops = Counter(n.op_type for n in nodes)
    foreign = sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"{where}: uses custom op domains {foreign}; the bundle must be plain ONNX")
    if CONTROL_FLOW_OPS & set(ops):
        raise ExportError(f"{where}: has control flow {sorted(CONTROL_FLOW_OPS & set(ops))}; the step must be a straight graph")
    allowed = CUDA_OPS | INT8_OPS if precision == "int8" else CUDA_OPS
    off_gpu = sorted(set(ops) - allowed)
    if off_gpu:
        raise ExportError(f"{where}: ops {off_gpu} have no CUDA kernel in onnxruntime; change the model code that makes them")

    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    # Shape-like int64 inputs (axes, splits) are fine; an op other than indexing that yields int64 is math.
    int64_math = sorted({n.op_type for n in nodes if n.op_type not in INDEX_OPS
                         and any(types.get(y) == onnx.TensorProto.INT64 for y in n.output)})
    if int64_math:
        raise ExportError(f"{where}: {int64_math} compute on int64 tensors; keep int64 to the token lookup")

    consumed = {x for n in nodes for x in n.input if x}
    produced = {y for n in nodes for y in n.output if y}
    graph_outputs = {o.name for o in model.graph.output}
    dead_inputs = [i.name for i in model.graph.input if i.name not in consumed]
    if dead_inputs:
        raise ExportError(f"{where}: inputs {dead_inputs} are never used by the graph")
    uncomputed = sorted(graph_outputs - produced)
    if uncomputed:
        raise ExportError(f"{where}: outputs {uncomputed} are not computed by any node (constants or pass-through)")
    dead_nodes = [n.name for n in nodes if not any(y in consumed or y in graph_outputs for y in n.output if y)]
    if dead_nodes:
        raise ExportError(f"{where}: nodes {dead_nodes[:5]} compute results nobody reads")
    return GraphInfo(nodes=len(nodes), op_types=dict(sorted(ops.items())), opset=opset)
