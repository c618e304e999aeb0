"""Hostile bundles: every tampered copy of the shipped bundle is refused at load with its own one-line BundleError.

Each case copies models/shapes-attention to tmp_path, damages the copy (the manifest's fields, the
files it lists, the graphs themselves), and asserts the exact outcome: the BundleError's message
fragment, before any image is read, and for `captool run --json` exit status 2 with one line on
stderr and no traceback. The manifest cases are also checked against docs/manifest.schema.json:
what the runtime refuses by type or range, the schema refuses too. The repository's files are only read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captool import Captioner
from captool.bundle import load_manifest
from captool.cli import app
from captool.errors import BundleError
from captool.graph_file import NESTED, external_tensors
from captool.sessions import create_session, place

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "shapes-attention"
ENCODER_FILE = json.loads((SHIPPED / "manifest.json").read_text())["files"]["encoder.onnx"]  # its size and sha256
SCHEMA = ROOT / "docs" / "manifest.schema.json"
runner = CliRunner()


# --- building tampered bundles -------------------------------------------------------------------

@pytest.fixture
def bundle(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(SHIPPED, dst)
    return dst


def edit(change):
    """A tampering that edits manifest.json as a dict (the change may return a replacement document)."""
    def tamper(b: Path):
        path = b / "manifest.json"
        m = json.loads(path.read_text())
        result = change(m)
        m = result if isinstance(result, dict) else m
        path.write_text(json.dumps(m))
    return tamper


def rehash(b: Path, name: str) -> None:
    """Make the manifest's sha256 and bytes those of the file as it is now (a tamperer who rewrites both)."""
    path = b / name
    data = path.read_bytes()
    m = json.loads((b / "manifest.json").read_text())
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (b / "manifest.json").write_text(json.dumps(m))


def replace_file(name: str, data_of):
    """Write new bytes into a graph file and rehash it: only the content's own checks can catch it."""
    def tamper(b: Path):
        (b / name).write_bytes(data_of(b) if callable(data_of) else data_of)
        rehash(b, name)
    return tamper


def keys(path) -> list:
    """'dims.hidden_dim' -> ['dims', 'hidden_dim'] (list indices as ints); a tuple is taken as it is."""
    return list(path) if isinstance(path, tuple) else [int(k) if k.isdigit() else k for k in path.split(".")]


def setp(path, value):
    """manifest[a][b]... = value, the path dotted ('dims.hidden_dim') or a tuple of keys."""
    def change(m):
        *parents, last = keys(path)
        target = m
        for key in parents:
            target = target[key]
        target[last] = value
    return change


def delp(path):
    def change(m):
        *parents, last = keys(path)
        target = m
        for key in parents:
            target = target[key]
        del target[last]
    return change


# --- ONNX graphs made in the test (onnx.helper; no torch) ----------------------------------------

def onnx_model(inputs, outputs, external: str = ""):
    """A valid graph with these inputs and outputs [(name, dtype, shape)], shapes with "N": each output is
    the mean of the first input, through a MatMul, a Reshape and a Cast to its dtype."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE,
             "int64": TensorProto.INT64, "int32": TensorProto.INT32, "uint8": TensorProto.UINT8}
    first, _, shape = inputs[0]
    nodes = [helper.make_node("Cast", [first], ["x"], to=TensorProto.FLOAT)]
    inits = []
    if len(shape) > 1:
        inits.append(numpy_helper.from_array(np.arange(1, len(shape), dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0))  # (N,)
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["mean"]))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
    nodes.append(helper.make_node("Unsqueeze", ["mean", "one"], ["col"]))  # (N, 1)
    for i, (name, dtype, out_shape) in enumerate(outputs):
        rest = [d for d in out_shape[1:]]
        width = int(np.prod(rest)) if rest else 1
        inits.append(numpy_helper.from_array(np.full((1, width), 0.01, dtype=np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.array([-1, *rest], dtype=np.int64), f"s{i}"))
        nodes += [helper.make_node("MatMul", ["col", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Reshape", [f"m{i}", f"s{i}"], [f"r{i}"]),
                  helper.make_node("Cast", [f"r{i}"], [name], to=types[dtype])]
    if external:  # the first output's weight keeps its data in another file
        w = next(t for t in inits if t.name == "w0")
        w.ClearField("raw_data")
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        entry = w.external_data.add()
        entry.key, entry.value = "location", external
    graph = helper.make_graph(nodes, "crafted",
                              [helper.make_tensor_value_info(n, types[d], s) for n, d, s in inputs],
                              [helper.make_tensor_value_info(n, types[d], s) for n, d, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


# The shipped bundle's graphs as the bundle format fixes them (H 256, V 45, S 112).
H, V = 256, 45
ENCODER_IO = ([("image", "uint8", ["N", 3, 112, 112])],
              [("h0", "float32", ["N", H]), ("c0", "float32", ["N", H]), ("features", "float32", ["N", H, 4, 4])])
STEP_IO = ([("token", "int64", ["N"]), ("h", "float32", ["N", H]), ("c", "float32", ["N", H]),
            ("attention_keys", "float32", ["N", H, 16]), ("attention_values", "float32", ["N", 16, 4 * H])],
           [("logits", "float32", ["N", V]), ("h_next", "float32", ["N", H]), ("c_next", "float32", ["N", H]),
            ("attn_weights", "float32", ["N", 4, 4])])


def changed(io, side: int, name: str, dtype=None, shape=None, rename=None):
    """The (inputs, outputs) `io` with one tensor's dtype, shape or name changed."""
    new = copy.deepcopy(io)
    for i, (n, d, s) in enumerate(new[side]):
        if n == name:
            new[side][i] = (rename or n, dtype or d, shape or s)
    return new


def dropped(io, side: int, name: str):
    new = copy.deepcopy(io)
    new[side][:] = [t for t in new[side] if t[0] != name]
    return new


def crafted(name: str, io, external: str = ""):
    return replace_file(name, lambda b: onnx_model(*io, external=external))


def external_copy(location: str):
    """decoder_step_cached.onnx re-saved with one weight in an external file (written where `location` says)."""
    def tamper(b: Path):
        data = onnx_model(*STEP_IO, external=location)
        (b / "decoder_step_cached.onnx").write_bytes(data)
        if not os.path.isabs(location):  # the weights the graph would read: +inf
            (b / location).write_bytes(np.full(V, np.inf, np.float32).tobytes())
        rehash(b, "decoder_step_cached.onnx")
    return tamper


def constant_external(b: Path):
    """A Constant node whose tensor attribute keeps its data outside: found beyond the initializers."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    model = onnx.load_from_string(onnx_model(*STEP_IO))
    value = helper.make_tensor("k", TensorProto.FLOAT, [1], [1.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "k.bin"
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused_k"], value=value))
    (b / "decoder_step_cached.onnx").write_bytes(model.SerializeToString())
    rehash(b, "decoder_step_cached.onnx")


# --- file-system tamperings ----------------------------------------------------------------------

def symlink(name: str, target_of):
    def tamper(b: Path):
        target = target_of(b)
        (b / name).unlink()
        os.symlink(target, b / name)
    return tamper


def outside_copy(b: Path) -> Path:
    """A copy of encoder.onnx outside the bundle (same hash: only confinement can refuse it)."""
    out = b.parent / "outside"
    out.mkdir(exist_ok=True)
    shutil.copy(b / "encoder.onnx", out / "encoder.onnx")
    return out / "encoder.onnx"


def fifo(name: str):
    def tamper(b: Path):
        (b / name).unlink()
        os.mkfifo(b / name)
    return tamper


def a_socket(b: Path):
    (b / "encoder.onnx").unlink()
    cwd = os.getcwd()
    os.chdir(b)  # AF_UNIX paths are limited to ~108 bytes; bind relative to the bundle
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("encoder.onnx")
        s.close()
    finally:
        os.chdir(cwd)


def a_directory(b: Path):
    (b / "encoder.onnx").unlink()
    (b / "encoder.onnx").mkdir()


def inside_symlink(b: Path):
    """encoder.onnx a symlink to a file inside the bundle: allowed (the hash still decides)."""
    (b / "graphs").mkdir()
    os.replace(b / "encoder.onnx", b / "graphs" / "real.onnx")
    os.symlink("graphs/real.onnx", b / "encoder.onnx")


def flip_byte(b: Path):
    data = bytearray((b / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "encoder.onnx").write_bytes(bytes(data))


def list_outside_file(b: Path):
    """'../outside.onnx' listed with that file's true hash: refused by name, the digest never shown."""
    target = b.parent / "outside.onnx"
    target.write_bytes(b"secret outside bytes")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../outside.onnx"] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(), "bytes": 20}
    (b / "manifest.json").write_text(json.dumps(m))


def text(content: str | bytes):
    def tamper(b: Path):
        path = b / "manifest.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tamper


def huge_manifest(b: Path):
    with open(b / "manifest.json", "wb") as f:
        f.write(b"{" + b" " * (17 << 20) + b"}")


def big_integer(b: Path):
    raw = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(raw.replace('"max_length": 15', '"max_length": 1' + "0" * 5000))


def no_cache_files(m):
    for name in ("attention_cache.onnx", "decoder_step_cached.onnx"):
        del m["files"][name]


def swap_specials(m):
    m["vocab"][1], m["vocab"][2] = m["vocab"][2], m["vocab"][1]


M = "manifest"  # a manifest-only case: the schema must refuse it too
F = "files"     # files, graphs, or agreement between fields: the runtime's own checks
CASES = {
    # JSON itself
    "nested": (text("[" * 100000 + "]" * 100000), "nested too deeply", F),
    "not utf-8": (text(b'{"format": "captool-bundle", "x": "\xff\xfe"}'), "not UTF-8", F),
    "not json": (text("{not json"), "not valid JSON", F),
    "oversize": (huge_manifest, "more than the 16777216", F),
    "digits": (big_integer, "not valid JSON (Exceeds the limit", F),
    "a list": (text("[1, 2]"), "not a captool manifest", F),
    "nan": (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"max_length": 15', '"max_length": NaN')),
        "'max_length' is nan, must be an integer", F),
    "manifest fifo": (fifo("manifest.json"), "is not a regular file", F),
    "manifest dir": (lambda b: ((b / "manifest.json").unlink(), (b / "manifest.json").mkdir()),
                     "is not a regular file", F),
    "manifest outside": (symlink("manifest.json", lambda b: SHIPPED / "manifest.json"), "outside the bundle", F),
    # the types and ranges
    "hidden abc": (edit(setp("dims.hidden_dim", "abc")), "'dims.hidden_dim' is 'abc', must be an integer from 1", M),
    "hidden 0": (edit(setp("dims.hidden_dim", 0)), "'dims.hidden_dim' is 0", M),
    "hidden bool": (edit(setp("dims.hidden_dim", True)), "'dims.hidden_dim' is true", M),
    "hidden huge": (edit(setp("dims.hidden_dim", 10 ** 9)), "from 1 to 16384", M),
    "vocab_size str": (edit(setp("dims.vocab_size", "45")), "'dims.vocab_size' is '45'", M),
    "backbone -1": (edit(setp("dims.backbone_width", -1)), "'dims.backbone_width' is -1", M),
    "no dims.input_dim": (edit(delp("dims.input_dim")), "manifest has no 'dims.input_dim'", M),
    "dims list": (edit(setp("dims", [256])), "'dims' is a list (1 items), must be an object", M),
    "files list": (edit(setp("files", ["encoder.onnx"])), "'files' is a list", M),
    "sha int": (edit(setp(("files", "encoder.onnx"), {"sha256": 12345, "bytes": 4062322})),
                "'files.encoder.onnx.sha256' is 12345, must be a string", M),
    "sha short": (edit(setp(("files", "encoder.onnx"), {"sha256": "abc", "bytes": 4062322})), "64 lowercase hex", M),
    "sha upper": (edit(lambda m: m["files"]["encoder.onnx"].update(sha256=m["files"]["encoder.onnx"]["sha256"].upper())),
                  "64 lowercase hex", M),
    "bytes str": (edit(lambda m: m["files"]["encoder.onnx"].update(bytes="4062322")),
                  "'files.encoder.onnx.bytes' is '4062322'", M),
    "bytes 0": (edit(lambda m: m["files"]["encoder.onnx"].update(bytes=0)), "'files.encoder.onnx.bytes' is 0", M),
    "entry str": (edit(setp(("files", "encoder.onnx"), "1a1f")), "'files.encoder.onnx' is '1a1f', must be an object", M),
    "no encoder": (edit(delp(("files", "encoder.onnx"))), "'files' does not list encoder.onnx", M),
    "vocab ints": (edit(lambda m: m.update(vocab=list(range(45)))), "'vocab[0]' is 0", M),
    "vocab dicts": (edit(lambda m: m.update(vocab=[{"t": t} for t in m["vocab"]])), "'vocab[0]' is an object", M),
    "vocab dict": (edit(lambda m: m.update(vocab={"0": "<NULL>"})), "'vocab' is an object", M),
    "vocab dup": (edit(setp("vocab.5", "a")), "the same token as vocab[4]", M),
    "vocab newline": (edit(setp("vocab.5", "a\nb")), "without whitespace or control characters", M),
    "vocab empty token": (edit(setp("vocab.5", "")), "'vocab[5]' is ''", M),
    "vocab specials": (edit(swap_specials), "must start with <NULL>, <START>, <END>, <UNK>", M),
    "vocab longer": (edit(lambda m: m["vocab"].append("extra")), "the vocabulary has 46 tokens but dims.vocab_size is 45", F),
    "max_length -5": (edit(setp("max_length", -5)), "'max_length' is -5, must be an integer from 1 to 256", M),
    "max_length 0": (edit(setp("max_length", 0)), "'max_length' is 0", M),
    "max_length 1e9": (edit(setp("max_length", 10 ** 9)), "'max_length' is 1000000000", M),
    "max_length str": (edit(setp("max_length", "15")), "'max_length' is '15'", M),
    "max_length frac": (edit(setp("max_length", 15.5)), "'max_length' is 15.5", M),
    "image.size 0": (edit(setp("image.size", 0)), "'image.size' is 0, must be an integer from 32 to 1024", M),
    "image.size huge": (edit(setp("image.size", 100000)), "'image.size' is 100000", M),
    "image.size str": (edit(setp("image.size", "112")), "'image.size' is '112'", M),
    "resize unknown": (edit(setp("image.resize", "nearest")),
                       "'image.resize' is 'nearest', this captool knows 'shorter-side-bilinear-center-crop'", M),
    "resize int": (edit(setp("image.resize", 3)), "'image.resize' is 3, must be a string", M),
    "channels BGR": (edit(setp("image.channels", "BGR")), "'image.channels' is 'BGR'", M),
    "not in graph": (edit(setp("image.normalization.in_graph", False)), "must be true: the encoder graph normalizes", M),
    "std 0": (edit(setp("image.normalization.std.1", 0)), "'image.normalization.std[1]' is 0", M),
    "no image": (edit(delp("image")), "manifest has no 'image'", M),
    "cell gru": (edit(setp("cell_type", "gru")), "'cell_type' is 'gru', this captool knows 'rnn', 'lstm', 'attention'", M),
    "cell int": (edit(setp("cell_type", 5)), "'cell_type' is 5, must be a string", M),
    "end 7": (edit(setp("special_tokens.end", 7)), "'special_tokens.end' is 7, but <END> is id 2", M),
    "end out of range": (edit(setp("special_tokens.end", 100000)), "'special_tokens.end' is 100000, must be an integer from 0 to 44", M),
    "start str": (edit(setp("special_tokens.start", "1")), "'special_tokens.start' is '1'", M),
    "start bool": (edit(setp("special_tokens.start", True)), "'special_tokens.start' is true", M),
    "no unk": (edit(delp("special_tokens.unk")), "manifest has no 'special_tokens.unk'", M),
    "schema str": (edit(setp("schema_version", "1")), "bundle schema version '1', this captool reads version 1", M),
    "schema bool": (edit(setp("schema_version", True)), "bundle schema version true", M),
    "opset 7": (edit(setp("opset", 7)), "'opset' is 7, must be an integer from 18", M),
    "precision fp64": (edit(setp("precision", "fp64")), "'precision' is 'fp64', this captool knows 'fp32', 'fp16', 'int8'", M),
    "graphs str": (edit(setp("graphs", "all")), "'graphs' is 'all', must be an object", M),
    "shape M": (edit(setp("graphs.decoder_step.outputs.0.shape.0", "M")), "'graphs.decoder_step.outputs[0].shape[0]' is 'M'", M),
    "shape -1": (edit(setp("graphs.encoder.outputs.0.shape.1", -1)), "'graphs.encoder.outputs[0].shape[1]' is -1", M),
    "dtype float64": (edit(setp("graphs.encoder.inputs.0.dtype", "float64")),
                      "'graphs.encoder.inputs[0].dtype' is 'float64'", M),
    "graphs extra": (edit(setp("graphs.tokenizer", {"inputs": [], "outputs": []})),
                     "'graphs' describes 'tokenizer', not a graph of a captool bundle", M),
    "tensor twice": (edit(lambda m: m["graphs"]["encoder"]["outputs"].append(m["graphs"]["encoder"]["outputs"][0])),
                     "named twice in graphs.encoder.outputs", F),
    "no step graph": (edit(delp("graphs.decoder_step")), "manifest has no 'graphs.decoder_step'", M),
    "tools list": (edit(setp("tools", ["torch"])), "'tools' is a list", M),
    "tool version int": (edit(setp("tools.torch", 2)), "'tools.torch' is 2, must be a string", M),
    "batches int": (edit(setp("parity.batches", 5)), "'parity.batches' is 5, must be a list", M),
    "batch_size str": (edit(setp("parity.batches.0.batch_size", "1")), "'parity.batches[0].batch_size' is '1'", M),
    "parity ok str": (edit(setp("parity.ok", "yes")), "'parity.ok' is 'yes', must be true or false", M),
    "parity list": (edit(setp("parity", [])), "'parity' is a list (0 items), must be an object or null", M),
    "validation str": (edit(setp("quantization", {"validation": "x"})), "'quantization.validation' is 'x'", M),
    "seconds str": (edit(setp("exporter.seconds.encoder", "fast")), "'exporter.seconds.encoder' is 'fast'", M),
    "created int": (edit(setp("created", 123)), "'created' is 123, must be a string", M),
    # the cache pair and the cell type
    "half cache": (edit(delp(("files", "attention_cache.onnx"))), "decoder_step_cached.onnx without its pair", M),
    "lstm with cache": (edit(setp("cell_type", "lstm")), "a lstm bundle lists an attention cache", M),
    "graphs without files": (edit(no_cache_files), "'graphs' describes attention_cache but 'files' does not list", F),
    # names in "files": confined to the bundle
    "dotdot": (edit(setp(("files", "../x.onnx"), {"sha256": "0" * 64, "bytes": 1})), "leaves the bundle ('..')", M),
    "absolute": (edit(setp(("files", "/etc/passwd"), {"sha256": "0" * 64, "bytes": 1})), "is an absolute path", M),
    "windows absolute": (edit(setp(("files", "C:\\x.onnx"), {"sha256": "0" * 64, "bytes": 1})), "is an absolute path", M),
    "subdir": (edit(setp(("files", "sub/encoder.onnx"), {"sha256": "0" * 64, "bytes": 1})), "is in a subdirectory", M),
    "unknown file": (edit(setp(("files", "weights.bin"), {"sha256": "0" * 64, "bytes": 1})),
                     "'weights.bin', which is not a file of a captool bundle", M),
    "outside hashed": (list_outside_file, "leaves the bundle", F),
    # the files themselves
    "missing": (lambda b: (b / "decoder_step.onnx").unlink(), "decoder_step.onnx is missing", F),
    "truncated": (lambda b: (b / "encoder.onnx").write_bytes((b / "encoder.onnx").read_bytes()[:-10]),
                  f"is {ENCODER_FILE['bytes'] - 10} bytes, the manifest says {ENCODER_FILE['bytes']}", F),
    "flipped byte": (flip_byte, f"its sha256 does not match the manifest's ({ENCODER_FILE['sha256'][:12]}...)", F),
    "symlink out": (symlink("encoder.onnx", outside_copy), "outside the bundle", F),
    "symlink proc": (symlink("encoder.onnx", lambda b: "/proc/self/mem"), "outside the bundle", F),
    "symlink dev": (symlink("encoder.onnx", lambda b: "/dev/zero"), "outside the bundle", F),
    "symlink sibling": (symlink("encoder.onnx", lambda b: (outside_copy(b), Path("..") / "outside" / "encoder.onnx")[1]),
                        "outside the bundle", F),
    "symlink loop": (symlink("encoder.onnx", lambda b: b / "encoder.onnx"), "cannot be resolved", F),
    "symlink dangling": (symlink("encoder.onnx", lambda b: b / "nowhere.onnx"), "encoder.onnx is missing", F),
    "symlink dir": (symlink("encoder.onnx", lambda b: b), "outside the bundle", F),
    "fifo": (fifo("encoder.onnx"), "is not a regular file (a FIFO)", F),
    "fifo cache": (fifo("attention_cache.onnx"), "is not a regular file (a FIFO)", F),
    "socket": (a_socket, "is not a regular file (a socket)", F),
    "directory": (a_directory, "is not a regular file (a directory)", F),
    # graph contents with a right hash
    "garbage": (replace_file("decoder_step.onnx", b"\xff" * 64), "not an ONNX model", F),
    "empty": (replace_file("decoder_step.onnx", b""), "'files.decoder_step.onnx.bytes' is 0", F),
    "no graph": (replace_file("encoder.onnx", b"\x08\x07"), "onnxruntime cannot load this graph (No graph was found", F),
    "empty graph": (replace_file("decoder_step_cached.onnx", lambda b: onnx_model_empty()),
                    "onnxruntime cannot load this graph", F),
    "external": (external_copy("weights.bin"), "tensor 'w0' keeps its data in an external file ('weights.bin')", F),
    "external escaping": (external_copy("../weights.bin"), "keeps its data in an external file ('../weights.bin')", F),
    "external absolute": (external_copy("/proc/self/mem"), "keeps its data in an external file ('/proc/self/mem')", F),
    "external constant": (constant_external, "tensor 'k' keeps its data in an external file ('k.bin')", F),
    "h0 narrowed": (crafted("encoder.onnx", changed(ENCODER_IO, 1, "h0", shape=["N", 128])),
                    "encoder output 'h0' has shape [N, 128], the manifest's dims make it [N, 256]", F),
    "h_next float64": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "h_next", dtype="float64")),
                       "decoder_step_cached output 'h_next' is float64, the bundle format needs float32", F),
    "logits float16": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "logits", dtype="float16")),
                       "decoder_step_cached output 'logits' is float16", F),
    "logits width": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "logits", shape=["N", 44])),
                     "output 'logits' has shape [N, 44], the manifest's dims make it [N, 45]", F),
    "fixed batch": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "logits", shape=[1, V])),
                    "output 'logits' has shape [1, 45]", F),
    "rank": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "c_next", shape=["N", H, 1])),
             "output 'c_next' has shape [N, 256, 1]", F),
    "token int32": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 0, "token", dtype="int32")),
                    "input 'token' is int32, the bundle format needs int64", F),
    "image float": (crafted("encoder.onnx", changed(ENCODER_IO, 0, "image", dtype="float32")),
                    "encoder input 'image' is float32, the bundle format needs uint8", F),
    "output renamed": (crafted("decoder_step_cached.onnx", changed(STEP_IO, 1, "logits", rename="scores")),
                       "decoder_step_cached has outputs ['scores', 'h_next', 'c_next', 'attn_weights'], but a "
                       "attention bundle needs", F),
    "output missing": (crafted("decoder_step_cached.onnx", dropped(STEP_IO, 1, "attn_weights")),
                       "decoder_step_cached has outputs ['logits', 'h_next', 'c_next']", F),
    "features wrong": (crafted("encoder.onnx", changed(ENCODER_IO, 1, "features", shape=["N", H, 2, 8])),
                       "encoder output 'features' has shape [N, 256, 2, 8]", F),
    "promise logits": (edit(setp("graphs.decoder_step_cached.outputs.0.shape", ["N", 44])),
                       "the manifest promises decoder_step_cached outputs", F),
    "promise dtype": (edit(setp("graphs.encoder.outputs.0.dtype", "uint8")),
                      "the manifest promises encoder outputs", F),
}


def onnx_model_empty() -> bytes:
    pytest.importorskip("onnx")
    from onnx import helper

    return helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=10).SerializeToString()


@pytest.fixture
def no_hang():
    """A FIFO opened for reading blocks until a writer comes: fail the test instead of hanging the suite."""
    def timeout(signum, frame):
        raise TimeoutError("the load blocked (on a FIFO?)")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_is_refused_at_load(bundle, case, no_hang):
    tamper, message, _ = CASES[case]
    tamper(bundle)
    with pytest.raises(BundleError) as e:
        Captioner(bundle, device="cpu")
    assert message in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 1000


def test_a_wrong_hash_never_shows_the_digest_read(bundle):
    flip_byte(bundle)
    digest = hashlib.sha256((bundle / "encoder.onnx").read_bytes()).hexdigest()
    with pytest.raises(BundleError) as e:
        load_manifest(bundle)
    assert digest[:8] not in str(e.value)
    list_outside_file(bundle)
    with pytest.raises(BundleError) as e:
        load_manifest(bundle)
    assert hashlib.sha256(b"secret outside bytes").hexdigest()[:8] not in str(e.value)


@pytest.mark.parametrize("case", ["inside symlink", "float whole numbers", "unknown keys", "crafted step",
                                  "no parity", "no cache"])
def test_what_the_format_allows_still_loads(bundle, case):
    """The checks refuse only what is wrong: each of these is a bundle that must load."""
    if case == "inside symlink":
        inside_symlink(bundle)
    elif case == "float whole numbers":  # 256.0 is the JSON number 256
        edit(lambda m: (setp("dims.hidden_dim", 256.0)(m), setp("max_length", 15.0)(m),
                        setp("graphs.encoder.outputs.0.shape.1", 256.0)(m)))(bundle)
    elif case == "unknown keys":
        edit(lambda m: m.update(comment="added within version 1", tools={**m["tools"], "numpy": "2.3"}))(bundle)
    elif case == "crafted step":  # the test's own graph builder makes graphs the checks accept
        crafted("decoder_step_cached.onnx", STEP_IO)(bundle)
    elif case == "no parity":
        edit(lambda m: (delp("parity")(m), delp("precision")(m), setp("quantization", None)(m)))(bundle)
    else:
        for name in ("attention_cache.onnx", "decoder_step_cached.onnx"):
            (bundle / name).unlink()
        edit(lambda m: (no_cache_files(m), delp("graphs.attention_cache")(m), delp("graphs.decoder_step_cached")(m)))(bundle)
    c = Captioner(bundle, device="cpu")
    assert c.manifest.hidden_dim == 256 and isinstance(c.manifest.max_length, int)


# --- the schema file agrees with the runtime --------------------------------------------------

@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_shipped_manifest_validates_against_the_schema(validator):
    errors = [e.message for e in validator.iter_errors(json.loads((SHIPPED / "manifest.json").read_text()))]
    assert errors == []


@pytest.mark.parametrize("case", [c for c, (_, _, kind) in CASES.items() if kind == M])
def test_the_schema_refuses_what_the_runtime_refuses(validator, bundle, case):
    CASES[case][0](bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert list(validator.iter_errors(manifest)), f"the schema accepts the {case!r} manifest"


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "lstm", "attention"])
def test_every_exported_manifest_validates_against_the_schema(validator, tiny_bundle, cell):
    manifest = json.loads((tiny_bundle(cell) / "manifest.json").read_text())
    assert [e.message for e in validator.iter_errors(manifest)] == []
    load_manifest(tiny_bundle(cell))  # and the runtime's own checks


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_lowered_manifests_validate_against_the_schema(validator, tiny_checkpoint, tmp_path, precision):
    """fp16 and int8 exports (bounds opened wide: the tiny model's agreement is not what is tested here)."""
    pytest.importorskip("onnxruntime.quantization")
    from captool.export import export_bundle

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "bundle"
    export_bundle(tiny_checkpoint("rnn"), out, precision=precision, images=images, calibration=images,
                  batch_sizes=(1,), min_agreement=0.0, rel_err=1e9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision
    assert [e.message for e in validator.iter_errors(manifest)] == []
    Captioner(out, device="cpu")  # and the runtime loads it: fp16/int8 graphs keep float32 inputs and outputs


def test_graph_file_reads_onnx_field_numbers_as_onnx_defines_them():
    onnx = pytest.importorskip("onnx")
    for message, fields in NESTED.items():
        descriptor = getattr(onnx, message).DESCRIPTOR
        for number, nested in fields.items():
            field = descriptor.fields_by_number[number]
            assert field.message_type.name == nested, (message, number)
    tensor = onnx.TensorProto.DESCRIPTOR.fields_by_name
    assert (tensor["name"].number, tensor["external_data"].number, tensor["data_location"].number) == (8, 13, 14)
    assert onnx.TensorProto.EXTERNAL == 1
    assert all(external_tensors((SHIPPED / f).read_bytes()) == [] for f in os.listdir(SHIPPED) if f.endswith(".onnx"))


def test_the_special_ids_are_the_runtimes():
    from captool.manifest import SPECIAL_IDS
    from captool.vocab import SPECIALS, Vocab

    vocab = Vocab(list(SPECIALS))
    assert {key: getattr(vocab, f"{key}_id") for key in SPECIAL_IDS} == SPECIAL_IDS
    assert [vocab.idx_to_token[i] for i in SPECIAL_IDS.values()] == list(SPECIALS)


def test_onnxruntime_load_errors_become_bundle_errors(tmp_path):
    """create_session itself: external data escaping the directory (which load_manifest refuses first)."""
    path = tmp_path / "escape.onnx"
    path.write_bytes(onnx_model(*STEP_IO, external="../escape.bin"))
    with pytest.raises(BundleError, match=r"escape.onnx: onnxruntime cannot load this graph \(External data path"):
        create_session(path, "decoder_step_cached", place("cpu"))


# --- captool run: exit 2, one line, no traceback, no record -----------------------------------

CLI_CASES = ["hidden abc", "files list", "sha int", "nested", "max_length 1e9", "vocab ints", "resize unknown",
             "dotdot", "symlink proc", "external", "garbage", "empty graph", "h0 narrowed", "logits float16"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_captool_run_exits_2_with_one_line(bundle, tmp_path, case, no_hang):
    tamper, message, _ = CASES[case]
    tamper(bundle)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    result = runner.invoke(app, ["run", str(image), "--model", str(bundle), "--json", "--device", "cpu"])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["fifo", "symlink proc", "external"])
def test_captool_run_process_on_a_hostile_bundle(bundle, tmp_path, case):
    """A real process: a FIFO among the graphs must not hang it, and nothing but one line is printed."""
    CASES[case][0](bundle)
    script = "import sys; from captool.cli import main; sys.argv[0] = 'captool'; main()"
    proc = subprocess.run([sys.executable, "-c", script, "run", str(tmp_path / "x.png"), "--model", str(bundle),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert CASES[case][1] in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
