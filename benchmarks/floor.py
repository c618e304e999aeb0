"""The floor of `captool bench`: what a graph costs (MACs, bytes) and what this machine can do (FLOP/s, B/s).

The multiply-accumulates of Conv, Gemm and MatMul (x2 = FLOPs) come from the ONNX graph with shapes
inferred at the batch asked for; the machine's rates from numpy's float32 matmul and copies (from
DRAM and from each cache level), each the best of several samples spread over time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

_MAC_OPS = ("Conv", "Gemm", "MatMul")


def seconds_of(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_rates(matmul_n: int = 1024, copy_mb: int = 256, repeats: int = 10, samples: int = 5,
                  gap_s: float = 0.1) -> dict:
    """This machine's best rates: numpy float32 matmul FLOP/s (n×n products) and copy bandwidth (bytes
    read + written per second) from DRAM (a `copy_mb` array) and from each cache level (L2, L3: a
    copy whose source and destination fill half the level).

    Each rate is the best of `samples` samples taken `gap_s` apart, each sample the best of `repeats`
    calls: on a shared machine one burst of calls can land wholly in a busy moment (one sample read
    32-67 GFLOP/s instead of ~200 here), several spread out rarely do. The samples are kept in the
    result, so a report shows how far apart they were.
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((matmul_n, matmul_n), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up: BLAS threads, page faults
    src = np.ones(copy_mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    levels = {f"L{level}": size for level, size in cache_sizes().items() if level >= 2}
    matmul, copy, cached = [], [], {name: [] for name in levels}
    for i in range(samples):
        if i:
            time.sleep(gap_s)
        matmul.append(2 * matmul_n ** 3 / min(seconds_of(lambda: a @ b) for _ in range(repeats)))
        copy.append(2 * src.nbytes / min(seconds_of(lambda: np.copyto(dst, src)) for _ in range(max(1, repeats // 2))))
        for name, size in levels.items():
            cached[name].append(_copy_rate(size // 4, repeats))  # source + copy: half the level
    rates = {"matmul_flops": max(matmul), "copy_bytes_per_s": max(copy),
             "matmul_samples": matmul, "copy_samples": copy, "caches": {}}
    for name, size in levels.items():
        rates["caches"][name] = {"bytes": size, "copy_bytes_per_s": max(cached[name])}
    return rates


def _copy_rate(nbytes: int, repeats: int) -> float:
    """Bytes read + written per second copying an array of `nbytes` that stays in cache (many copies per timing)."""
    src = np.ones(max(1, nbytes // 4), dtype=np.float32)
    dst = np.empty_like(src)
    laps = max(1, (64 << 20) // max(src.nbytes, 1))  # ~64 MB moved per timing: long enough to time

    def copies():
        for _ in range(laps):
            np.copyto(dst, src)

    copies()
    return 2 * src.nbytes * laps / min(seconds_of(copies) for _ in range(max(1, repeats // 2)))


def cache_sizes() -> dict[int, int]:
    """Data/unified cache bytes per level of CPU 0 ({2: 1048576, 3: 33554432}); {} where the OS does not say."""
    sizes: dict[int, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes[level] = int(text.rstrip("KMG")) * unit
        except ValueError:
            continue
    return sizes


def best_rates(*measured: dict) -> dict:
    """The best of several machine_rates results (taken before and after the timed figures), samples pooled."""
    out = dict(measured[0])
    for key in ("matmul", "copy"):
        out[f"{key}_samples"] = [x for m in measured for x in m.get(f"{key}_samples", [])]
    out["matmul_flops"] = max(m["matmul_flops"] for m in measured)
    out["copy_bytes_per_s"] = max(m["copy_bytes_per_s"] for m in measured)
    out["caches"] = {name: {"bytes": c["bytes"],
                            "copy_bytes_per_s": max(m.get("caches", {}).get(name, c)["copy_bytes_per_s"] for m in measured)}
                     for name, c in measured[0].get("caches", {}).items()}
    return out


def cache_level(nbytes: int, caches: dict) -> Optional[str]:
    """The smallest cache level ("L2", "L3") that holds `nbytes` with room to spare (half its size); None if none does."""
    fits = [(c["bytes"], name) for name, c in caches.items() if nbytes <= c["bytes"] // 2]
    return min(fits)[1] if fits else None


@dataclass
class GraphCost:
    """One graph's work at a batch size, from its ONNX form with shapes inferred."""

    macs: int
    weight_bytes: int  # weights read by one run: a lookup table counts the rows gathered, not all of it
    io_bytes: int  # graph inputs + outputs
    activation_bytes: int  # every node reading its inputs and writing its outputs (no fusion)
    uncounted: list[str]  # MAC ops whose shapes could not be inferred

    @property
    def flops(self) -> int:
        return 2 * self.macs


def graph_cost(onnx_path: str | Path, batch: int) -> GraphCost:
    """MACs of Conv/Gemm/MatMul and the bytes a run moves, with the dynamic batch dim set to `batch`."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    del model.graph.value_info[:]  # symbolic shapes from export; re-infer them at this batch
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = batch
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        shapes[value.name] = (dims, helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for init_name, array in weights.items():
        shapes[init_name] = (array.shape, array.itemsize)

    def nbytes(name: str) -> int:
        dims, size = shapes.get(name, ((-1,), 0))
        return int(np.prod(dims)) * size if all(d >= 0 for d in dims) else 0

    macs, traffic, uncounted = 0, 0, []
    for node in model.graph.node:
        traffic += sum(nbytes(n) for n in node.input if n and n not in weights)
        traffic += sum(nbytes(n) for n in node.output if n)
        if node.op_type in _MAC_OPS:
            node_macs = _node_macs(node, shapes)
            if node_macs is None:
                uncounted.append(f"{node.op_type} {node.name}")
            else:
                macs += node_macs
    io = sum(nbytes(v.name) for v in list(model.graph.input) + list(model.graph.output))
    return GraphCost(macs, _weight_bytes_read(model.graph, weights, nbytes), io, traffic, uncounted)


def _weight_bytes_read(graph, weights: dict, nbytes: Callable[[str], int]) -> int:
    """Bytes of weights one run reads: all of each initializer, except tables only looked up into
    (Gather/GatherND data, as the decoder step's folded embedding), which cost the rows taken."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in weights:
                readers.setdefault(name, []).append((node, i))
    total = 0
    for name, array in weights.items():
        uses = readers.get(name, [])
        if uses and all(node.op_type in ("Gather", "GatherND") and i == 0 for node, i in uses):
            total += min(array.nbytes, sum(nbytes(node.output[0]) for node, _ in uses))
        else:
            total += array.nbytes
    return total


def _node_macs(node, shapes) -> Optional[int]:
    a, b = (shapes.get(n, ((-1,), 0))[0] for n in node.input[:2])
    out = shapes.get(node.output[0], ((-1,), 0))[0]
    if any(d < 0 for d in (*a, *b, *out)) or not out:
        return None
    if node.op_type == "Conv":  # out [N, Cout, *spatial], weight [Cout, Cin/group, *kernel]
        return int(np.prod(out)) * int(np.prod(b[1:]))
    if node.op_type == "Gemm":  # out [M, N]; K from A, transposed or not
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return int(np.prod(out)) * (a[0] if trans_a else a[-1])
    return int(np.prod(out)) * a[-1]  # MatMul: out [..., M, N], K = A's last dim
