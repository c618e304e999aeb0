"""The checks a loaded bundle's sessions must pass before any image is read: names, dtypes, shapes.

onnxruntime checks that a graph is valid ONNX; it does not check that the graph is the one the
manifest describes. A graph whose hash is right but whose inputs or outputs are not what the bundle
format promises is refused here, with a message naming the graph, the tensor and the fix.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .bundle import Manifest, cache_signature, graph_signature
from .errors import BundleError

# onnxruntime's type strings for the dtypes a bundle uses.
ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32",
              "tensor(float16)": "float16"}


def check_sessions(manifest: Manifest, sessions: dict) -> None:
    """Each session {graph name: InferenceSession} has the inputs and outputs its graph must have."""
    m = manifest
    want = {**graph_signature(m.cell_type), **cache_signature()}
    promised = m.raw.get("graphs", {})
    for graph, sess in sessions.items():
        kind = "decoder_step" if graph == "decoder_step_wide" else graph
        got = {"inputs": [i.name for i in sess.get_inputs()], "outputs": [o.name for o in sess.get_outputs()]}
        for side in ("inputs", "outputs"):
            if sorted(got[side]) != sorted(want[kind][side]):
                raise BundleError(
                    f"{m.root}: {kind}.onnx has {side} {got[side]}, but a {m.cell_type} bundle needs "
                    f"{want[kind][side]}; the graph does not fit the manifest's cell type, re-export the bundle"
                )
            names = [_name(e) for e in promised.get(kind, {}).get(side, [])]
            if names and sorted(names) != sorted(got[side]):
                raise BundleError(
                    f"{m.root}: the manifest promises {kind} {side} {names} but {kind}.onnx has "
                    f"{got[side]}; the bundle is inconsistent, re-export it"
                )
    encoder = sessions["encoder"]
    _check_io(m, encoder.get_inputs()[0], "encoder", "uint8", ["N", 3, m.image_size, m.image_size])
    for graph, sess in sessions.items():
        if not graph.startswith("decoder_step"):
            continue
        for arg in sess.get_inputs():
            if arg.name == "token":
                _check_io(m, arg, graph, "int64", ["N"])
            elif arg.name in ("h", "c"):
                _check_io(m, arg, graph, None, ["N", m.hidden_dim])
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        width = logits.shape[-1] if isinstance(logits.shape[-1], int) else _probe_logits_width(sess)
        if width != len(m.vocab):
            raise BundleError(
                f"{m.root}: {graph} gives {width} logits but the manifest's vocabulary has "
                f"{len(m.vocab)} tokens; the bundle is inconsistent, re-export it"
            )


def _check_io(m: Manifest, arg, graph: str, dtype: Optional[str], shape: list) -> None:
    got_dtype = ORT_DTYPES.get(arg.type, arg.type)
    if dtype is not None and got_dtype != dtype:
        raise BundleError(f"{m.root}: {graph} input '{arg.name}' is {got_dtype}, the bundle "
                          f"format needs {dtype}; re-export the bundle")
    fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
    if len(arg.shape) != len(shape) or any(isinstance(arg.shape[i], int) and arg.shape[i] != d for i, d in fixed):
        raise BundleError(f"{m.root}: {graph} input '{arg.name}' has shape {arg.shape}, the "
                          f"manifest says {shape}; the bundle is inconsistent, re-export it")


def _probe_logits_width(session) -> int:
    """The logits width when the graph leaves it symbolic: one decoder step on a zero state."""
    feeds = {}
    for arg in session.get_inputs():
        dims = [1 if not isinstance(d, int) else d for d in arg.shape]
        dtype = np.int64 if arg.name == "token" else np.dtype(ORT_DTYPES.get(arg.type, "float32"))
        feeds[arg.name] = np.zeros(dims, dtype=dtype)
    return int(session.run(["logits"], feeds)[0].shape[-1])


def _name(entry) -> str:
    return entry["name"] if isinstance(entry, dict) else str(entry)
