"""The checks a loaded bundle's sessions must pass before any image is read: names, dtypes, shapes.

onnxruntime checks that a graph is valid ONNX; it does not check that the graph is the one the
manifest describes. Every input and output of every session is compared with the bundle format's
tables (docs/bundle-format.md, `bundle.graph_tensors`) for the manifest's cell type and dims, and
with what the manifest's "graphs" section promises. A graph whose hash is right but whose insides
are not (h0 narrowed to 128, h_next float64, logits float16) is refused here, with a message naming
the graph file, the tensor and the fix, instead of failing on the first batch.
"""

from __future__ import annotations

from .bundle import GRAPH_FILES, Manifest
from .errors import BundleError

# onnxruntime's type strings for the dtypes a bundle uses; others are shown as onnxruntime names them.
ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int32)": "int32"}
FIX = "re-export the bundle with `captool export`"


def check_sessions(manifest: Manifest, sessions: dict) -> None:
    """Each session {graph name: InferenceSession} has exactly the inputs and outputs its graph must have,
    and the manifest's "graphs" section describes every graph (loaded or not) as the format does.

    Inputs of every graph are checked before outputs, so a wrong dim is reported where it is fed.
    """
    m = manifest
    want = m.tensors
    for side in ("inputs", "outputs"):
        for graph, session in sessions.items():
            kind = "decoder_step" if graph == "decoder_step_wide" else graph
            args = session.get_inputs() if side == "inputs" else session.get_outputs()
            _check_graph_side(m, kind, side, args, want[kind][side])
    for graph in m.raw["graphs"]:  # every graph the manifest describes, loaded now or not
        _check_promise(m, graph, want[graph])


def _check_graph_side(m: Manifest, graph: str, side: str, args, want: dict) -> None:
    path = m.root / GRAPH_FILES[graph]
    names = [a.name for a in args]
    if sorted(names) != sorted(want):
        raise BundleError(f"{path}: {graph} has {side} {names}, but a {m.cell_type} bundle needs {list(want)}; "
                          f"the graph does not fit the manifest's cell type, {FIX}")
    what = side[:-1]  # "input" / "output"
    for arg in args:
        dtype, shape = want[arg.name]
        got = ORT_DTYPES.get(arg.type, arg.type)
        if got != dtype:
            raise BundleError(f"{path}: {graph} {what} '{arg.name}' is {got}, the bundle format needs {dtype} "
                              f"(for every precision); {FIX}")
        if not _fits(arg.shape, shape):
            raise BundleError(f"{path}: {graph} {what} '{arg.name}' has shape {_dims(arg.shape)}, the manifest's "
                              f"dims make it {_dims(shape)} (N the batch, any size); the bundle is inconsistent, {FIX}")


def _fits(got: list, want: list) -> bool:
    """Same rank; the batch ("N") symbolic in the graph; every other dim fixed and equal."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if w == "N":
            if isinstance(g, int):  # a fixed batch would fail at any other batch size
                return False
        elif not isinstance(g, int) or g != w:
            return False
    return True


def _dims(shape: list) -> str:
    return "[" + ", ".join("N" if d == "N" else (str(d) if isinstance(d, int) else f"{d or '?'}") for d in shape) + "]"


def _check_promise(m: Manifest, graph: str, want: dict) -> None:
    """The manifest's "graphs" section says what the format (and so the session, checked above) says."""
    promised = m.raw["graphs"][graph]
    for side in ("inputs", "outputs"):
        entries = {e["name"]: (e["dtype"], list(e["shape"])) for e in promised[side]}
        if entries != want[side]:
            wrong = sorted(set(entries) ^ set(want[side])) or \
                sorted(name for name in entries if entries[name] != want[side][name])
            raise BundleError(
                f"{m.root}: the manifest promises {graph} {side} {_describe(entries)} but {GRAPH_FILES[graph]} has "
                f"{_describe(want[side])} (differing: {', '.join(wrong)}); the bundle is inconsistent, {FIX}")


def _describe(tensors: dict) -> str:
    return ", ".join(f"{name} {dtype} {_dims(shape)}" for name, (dtype, shape) in tensors.items())
