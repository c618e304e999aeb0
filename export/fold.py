"""Folding constants into the exported graphs: the word embedding into the decoder step's input
projection, and the input normalization into the encoder's first convolution (fold_normalization).

Every cell starts its step with `W_embed[token] @ Wx + b`: a lookup, then a (W × G) matrix product
and a bias add, where G is H (rnn) or 4H (lstm, attention). Both factors are constants, so the
product can be computed once, at export: `T = W_embed @ Wx + b` (V × G), and the step looks up a row
of T instead. At batch 1 the step is a chain of matrix-vector products whose cost is reading their
weights, and this removes the read of Wx (1 MB of the shipped attention model's 3.1 MB; 0.5 MB of
the earlier rnn's 1.7 MB) and two nodes. docs/export.md has the numbers.

The rewrite runs on the ONNX graph the exporter wrote, so `CaptioningRNN.step` stays the seed's
computation and the parity check compares the folded graph with it like any other.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

TABLE = "input_projection"  # the folded table's initializer name: (V, G) float32

_LOOKUPS = ("Gather", "GatherND")


def fold_input_projection(model: onnx.ModelProto) -> bool:
    """Rewrite `lookup(E, idx) @ Wx [+ y] [+ b]` into `lookup(E @ Wx [+ b], idx) [+ y]`, in place.

    Applies only where E, Wx (and b) are float32 initializers and every intermediate result has a
    single reader; returns False, leaving the graph untouched, when the pattern is not there.
    """
    graph = model.graph
    inits, readers, outputs = _index(graph)
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            continue
        lookup = _producer(graph, matmul.input[0])
        if lookup is None or lookup.op_type not in _LOOKUPS or lookup.input[0] not in inits:
            continue
        if readers.get(lookup.output[0], 0) != 1 or lookup.output[0] in outputs:
            continue
        embed, wx = (numpy_helper.to_array(inits[n]) for n in (lookup.input[0], matmul.input[1]))
        if embed.ndim != 2 or wx.ndim != 2 or embed.dtype != np.float32 or wx.dtype != np.float32:
            continue
        table = embed.astype(np.float64) @ wx.astype(np.float64)  # (V, W) @ (W, G) -> (V, G)
        bias_add = _bias_add(graph, matmul.output[0], inits, readers, outputs, table.shape[1])
        if bias_add is not None:
            add, bias_name = bias_add
            table += numpy_helper.to_array(inits[bias_name]).astype(np.float64)
            _rewire(graph, add.output[0], _other(add, bias_name))
            graph.node.remove(add)
        _rewire(graph, matmul.output[0], lookup.output[0])
        graph.node.remove(matmul)
        lookup.input[0] = TABLE
        graph.initializer.append(numpy_helper.from_array(table.astype(np.float32), TABLE))
        _drop_unused_initializers(graph)
        _forget_shapes(graph, {lookup.output[0], matmul.output[0], *(bias_add[0].output if bias_add else ())})
        return True
    return False


def _index(graph: onnx.GraphProto) -> tuple[dict[str, onnx.TensorProto], dict[str, int], set[str]]:
    """What a fold looks up: initializers by name, how many nodes read each value, the graph's outputs."""
    return {i.name: i for i in graph.initializer}, _readers(graph), {o.name for o in graph.output}


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _producer(graph: onnx.GraphProto, name: str) -> Optional[onnx.NodeProto]:
    return next((n for n in graph.node if name in n.output), None)


def _other(add: onnx.NodeProto, name: str) -> str:
    return add.input[1] if add.input[0] == name else add.input[0]


def _bias_add(graph, value: str, inits, readers, outputs, width: int):
    """The Add of a (width,) float32 bias initializer reached from `value` through at most one other Add.

    Addition reorders freely here: (x@Wx + y) + b == (x@Wx + b) + y up to float rounding.
    """
    current = value
    for _ in range(2):
        if readers.get(current, 0) != 1 or current in outputs:
            return None
        add = next((n for n in graph.node if n.op_type == "Add" and current in n.input), None)
        if add is None:
            return None
        other = _other(add, current)
        if other in inits:
            b = numpy_helper.to_array(inits[other])
            if b.dtype == np.float32 and b.shape == (width,):
                return add, other
            return None
        current = add.output[0]
    return None


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every reader of `old` reads `new` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop the exporter's recorded shapes of values the rewrite changed (the lookup now yields G columns)."""
    for info in list(graph.value_info):
        if info.name in names:
            graph.value_info.remove(info)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


# ---- the encoder: the input normalization into the first convolution ---------------------------------


def fold_normalization(model: onnx.ModelProto) -> bool:
    """Rewrite `Conv((x·s - mean) / std, W, B)` into `Conv(x - mean/s, W·s/std, B)`, in place.

    The encoder starts with `Cast(image) / 255`, `- mean`, `/ std` over every pixel: three passes over
    3×S×S floats before the first convolution. Scaling the convolution's input channels is the same
    as scaling its weights' input channels, so the two Divs go into W. The Sub stays, as a Sub of
    mean/s: the convolution pads with zeros in normalized space, which is `x = mean/s`, not `x = 0`,
    so a bias could not stand in for it at the borders. Applies only where the first Div is by a
    scalar, mean and std are (1, C, 1, 1) or (C,)-shaped float32 initializers and the Conv (group 1)
    has a float32 initializer for weight; returns False, leaving the graph untouched, when the pattern is not there.
    """
    graph = model.graph
    inits, readers, outputs = _index(graph)
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        chain = _normalization_chain(graph, conv.input[0], inits, readers, outputs)
        if chain is None:
            continue
        scale_div, sub, std_div, scale, mean, std = chain
        weight = numpy_helper.to_array(inits[conv.input[1]])  # (Cout, Cin / group, kH, kW)
        if weight.dtype != np.float32 or weight.ndim != 4 or _group(conv) != 1 or weight.shape[1] != mean.size:
            continue
        # ((x·s) - mean) / std == (x - mean/s) / (std/s): the shift and the divisor in pixel units.
        per_channel = std.reshape(-1).astype(np.float64) / scale  # (Cin,)
        folded = weight.astype(np.float64) / per_channel[None, :, None, None]  # (Cout, Cin, kH, kW)
        shift = (mean.reshape(-1).astype(np.float64) / scale).reshape(1, -1, 1, 1)  # (1, Cin, 1, 1)
        weight_name, shift_name = f"{conv.input[1]}_normalized", f"{sub.input[1]}_in_pixels"
        graph.initializer.append(numpy_helper.from_array(folded.astype(np.float32), weight_name))
        graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), shift_name))
        sub.input[0], sub.input[1] = scale_div.input[0], shift_name  # x - mean/s, x the Div's input
        conv.input[0], conv.input[1] = sub.output[0], weight_name
        graph.node.remove(scale_div)
        graph.node.remove(std_div)
        _drop_unused_initializers(graph)
        _forget_shapes(graph, {scale_div.output[0], sub.output[0], std_div.output[0]})
        return True
    return False


def _normalization_chain(graph, value: str, inits, readers, outputs):
    """(Div by 1/s, Sub of mean, Div by std, s, mean, std) for the chain ending in `value`, or None;
    s multiplies the pixels (1/255 for a Div by 255)."""
    std_div = _producer(graph, value)
    if std_div is None or std_div.op_type != "Div" or std_div.input[1] not in inits:
        return None
    sub = _producer(graph, std_div.input[0])
    if sub is None or sub.op_type != "Sub" or sub.input[1] not in inits:
        return None
    scale_div = _producer(graph, sub.input[0])
    if scale_div is None or scale_div.op_type != "Div" or scale_div.input[1] not in inits:
        return None
    for node in (scale_div, sub, std_div):  # every intermediate read once, by the next node only
        if readers.get(node.output[0], 0) != 1 or node.output[0] in outputs:
            return None
    divisor, mean, std = (numpy_helper.to_array(inits[n.input[1]]) for n in (scale_div, sub, std_div))
    if any(a.dtype != np.float32 for a in (divisor, mean, std)) or divisor.size != 1:
        return None
    if mean.size != std.size or any(a.shape not in ((a.size,), (1, a.size, 1, 1)) for a in (mean, std)):
        return None
    if np.any(std == 0) or float(divisor.reshape(())) == 0:
        return None
    return scale_div, sub, std_div, 1.0 / float(divisor.reshape(())), mean, std


def _group(conv: onnx.NodeProto) -> int:
    return next((a.i for a in conv.attribute if a.name == "group"), 1)
