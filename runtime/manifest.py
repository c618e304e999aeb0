"""manifest.json's fields, checked by hand as docs/manifest.schema.json states them (type and range of each).

The schema file is the source of truth for the format and what other runtimes validate with; this
module is the same rules in plain Python, so that `captool run` starts without a JSON Schema
library. tests/test_hostile_bundles.py holds the two in step: every manifest the exporter writes
validates against the schema, and every malformed manifest this module refuses, the schema refuses.
Checks that JSON Schema cannot state (the vocabulary's length against dims.vocab_size, the graphs
described against the files listed) are here too, and named in the schema's descriptions.
"""

from __future__ import annotations

import math
import ntpath
import re
from pathlib import Path
from typing import Any, Optional

from .errors import BundleError
from .preprocess import JPEG_DECODES, PREPROCESSING, RESIZE_POLICY
from .vocab import SPECIALS

SCHEMA_VERSION = 1
FORMAT = "captool-bundle"
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER_STEP = "decoder_step.onnx"
# Optional, attention bundles only: the attention cache (docs/bundle-format.md, "Attention cache").
ATTENTION_CACHE = "attention_cache.onnx"
DECODER_STEP_CACHED = "decoder_step_cached.onnx"
CELL_TYPES = ("rnn", "lstm", "attention")
GRAPH_FILES = {"encoder": ENCODER, "decoder_step": DECODER_STEP,
               "attention_cache": ATTENTION_CACHE, "decoder_step_cached": DECODER_STEP_CACHED}
PRECISIONS = ("fp32", "fp16", "int8")
RESIZE_POLICIES = (RESIZE_POLICY,)  # the policies captool.preprocess implements
# image.preprocessing: the versions captool.preprocess implements; a manifest without it is read as the first.
PREPROCESSINGS = (PREPROCESSING,)
DEFAULT_PREPROCESSING = "captool-1"
TENSOR_DTYPES = ("uint8", "int64", "float32")  # every graph input and output, whatever the precision
SPECIAL_IDS = {"null": 0, "start": 1, "end": 2, "unk": 3}  # Vocab's ids (coco.pt's); fixed in version 1

# Ranges: far beyond any captioner captool trains, tight enough that no manifest can make the runtime
# allocate without bound (max_length 10**9 once asked for ~8 GB per image).
MAX_LENGTH = 256  # tokens per caption; a greedy loop runs at most this many steps
IMAGE_SIZES = (32, 1024)  # S of the S×S encoder input
MAX_DIM = 16384  # dims.input_dim, wordvec_dim, hidden_dim
MAX_VOCAB = 262144  # tokens
MAX_TOKEN_CHARS = 256
MAX_BACKBONE_WIDTH = 16.0
OPSETS = (18, 1000)
MAX_GRAPH_BYTES = (1 << 31) - 1  # protobuf's limit for one file (a bundle keeps no external data)
MAX_TENSORS = 16  # inputs or outputs of one graph
MAX_RANK = 8
MAX_BATCHES = 1 << 20  # parity.batches

SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN = re.compile(r"[^\s\x00-\x1f\x7f]+")  # no whitespace or control characters: one word, one line
MISSING = object()  # an optional field that is absent
FIX = "re-export the bundle with `captool export` (docs/manifest.schema.json describes every field)"


def _show(value: Any) -> str:
    """A value for a one-line message: short, and without walking into nested containers."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "...'"
    if isinstance(value, dict):
        return f"an object ({len(value)} keys)"
    if isinstance(value, list):
        return f"a list ({len(value)} items)"
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Field checks of one manifest; each failure is a BundleError naming the file, the field and the value."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, value: Any, want: str, fix: str = FIX):
        raise BundleError(f"{self.path}: '{field}' is {_show(value)}, {want}; {fix}")

    def get(self, obj: dict, key: str, field: str, required: bool = True):
        """obj[key]; a missing required key is an error, a missing optional one is MISSING."""
        if key not in obj:
            if required:
                raise BundleError(f"{self.path}: manifest has no '{field}'; {FIX}")
            return MISSING
        return obj[key]

    def obj(self, obj: dict, key: str, field: str, required: bool = True, nullable: bool = False) -> Optional[dict]:
        """An object, or None where it is optional and absent (or null, where null is allowed)."""
        value = self.get(obj, key, field, required)
        if value is MISSING or (value is None and nullable):
            return None
        if not isinstance(value, dict):
            self.fail(field, value, "must be an object" + (" or null" if nullable else ""))
        return value

    def integer(self, obj: dict, key: str, field: str, lo: int, hi: Optional[int] = None,
                required: bool = True) -> Optional[int]:
        value = self.get(obj, key, field, required)
        if value is MISSING:
            return None
        obj[key] = self.int_value(value, field, lo, hi)  # 16.0 is stored as 16, for every reader of `raw`
        return obj[key]

    def int_value(self, value: Any, field: str, lo: int, hi: Optional[int] = None) -> int:
        # JSON Schema's "integer" is any number with no fraction: 16.0 is 16.
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < lo or (hi is not None and value > hi):
            self.fail(field, value, f"must be an integer from {lo} to {hi}" if hi is not None
                      else f"must be an integer >= {lo}")
        return int(value)

    def number(self, value: Any, field: str, above: Optional[float] = None, most: Optional[float] = None) -> float:
        """A finite number, > `above` and <= `most` where given (NaN and Infinity are not JSON)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (above is not None and value <= above) or (most is not None and value > most):
            bounds = (f" above {above}" if above is not None else "") + (f", at most {most}" if most is not None else "")
            self.fail(field, value, f"must be a finite number{bounds}")
        return float(value)

    def string(self, obj: dict, key: str, field: str, choices: tuple = (), required: bool = True,
               fix: str = FIX) -> Optional[str]:
        value = self.get(obj, key, field, required)
        if value is MISSING:
            return None
        if not isinstance(value, str):
            self.fail(field, value, "must be a string")
        if choices and value not in choices:
            self.fail(field, value, f"this captool knows {', '.join(repr(c) for c in choices)}", fix)
        return value

    def array(self, obj: dict, key: str, field: str, lo: int, hi: int) -> list:
        value = self.get(obj, key, field)
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            self.fail(field, value, f"must be a list of {lo} to {hi} items" if lo != hi else f"must be a list of {lo} items")
        return value


def check_manifest(raw: Any, path: Path) -> None:
    """Every field's type and range, and the fields' agreement with each other; BundleError on the first problem.

    Whole numbers written with a fraction (16.0, an integer to JSON Schema) are stored back into `raw` as ints.
    """
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path}: not a captool manifest (no \"format\": \"{FORMAT}\")")
    version = raw.get("schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {_show(version)}, this captool reads version {SCHEMA_VERSION}; "
            f"re-export the bundle with this captool, or install the captool that wrote it"
        )
    f = _Fields(path)
    cell = f.string(raw, "cell_type", "cell_type", CELL_TYPES)
    vocab_size = _check_dims(f, f.obj(raw, "dims", "dims"))
    _check_vocab(f, f.array(raw, "vocab", "vocab", len(SPECIALS), MAX_VOCAB), vocab_size)
    special = f.obj(raw, "special_tokens", "special_tokens")
    for key, want in SPECIAL_IDS.items():
        got = f.integer(special, key, f"special_tokens.{key}", 0, vocab_size - 1)
        if got != want:
            f.fail(f"special_tokens.{key}", got, f"but {SPECIALS[want]} is id {want} in the vocabulary and "
                                                 f"in this runtime (fixed in schema version {SCHEMA_VERSION})")
    _check_image(f, f.obj(raw, "image", "image"))
    f.integer(raw, "max_length", "max_length", 1, MAX_LENGTH)
    f.integer(raw, "opset", "opset", *OPSETS)
    f.string(raw, "precision", "precision", PRECISIONS, required=False)
    listed = _check_files(f, f.obj(raw, "files", "files"), cell)
    _check_graphs(f, f.obj(raw, "graphs", "graphs"), listed)
    _check_information(f, raw)


def _check_dims(f: _Fields, dims: dict) -> int:
    for key in ("input_dim", "wordvec_dim", "hidden_dim"):
        f.integer(dims, key, f"dims.{key}", 1, MAX_DIM)
    f.number(f.get(dims, "backbone_width", "dims.backbone_width"), "dims.backbone_width", 0, MAX_BACKBONE_WIDTH)
    return f.integer(dims, "vocab_size", "dims.vocab_size", len(SPECIALS), MAX_VOCAB)


def _check_vocab(f: _Fields, vocab: list, vocab_size: int) -> None:
    seen: dict[str, int] = {}
    for i, token in enumerate(vocab):
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS or not TOKEN.fullmatch(token):
            f.fail(f"vocab[{i}]", token, f"a token is a string of 1 to {MAX_TOKEN_CHARS} characters without "
                                         f"whitespace or control characters")
        if i < len(SPECIALS) and token != SPECIALS[i]:
            f.fail(f"vocab[{i}]", token, f"the vocabulary must start with {', '.join(SPECIALS)} (ids 0 to 3)")
        if token in seen:
            f.fail(f"vocab[{i}]", token, f"the same token as vocab[{seen[token]}]; every token must be unique")
        seen[token] = i
    if len(vocab) != vocab_size:
        raise BundleError(f"{f.path}: the vocabulary has {len(vocab)} tokens but dims.vocab_size is {vocab_size}; {FIX}")


def _check_image(f: _Fields, image: dict) -> None:
    f.integer(image, "size", "image.size", *IMAGE_SIZES)
    f.string(image, "channels", "image.channels", ("RGB",))
    f.string(image, "dtype", "image.dtype", ("uint8",))
    f.string(image, "layout", "image.layout", ("NCHW",))
    f.string(image, "resize", "image.resize", RESIZE_POLICIES,
             fix="a bundle that needs another resize policy needs a captool that implements it")
    f.string(image, "preprocessing", "image.preprocessing", PREPROCESSINGS, required=False,
             fix="the bundle was trained on pixels made another way: run it with the captool that implements "
                 "that version (docs/bundle-format.md, Preprocessing)")
    f.string(image, "jpeg_decode", "image.jpeg_decode", JPEG_DECODES, required=False,
             fix="the bundle was proven with JPEG files decoded another way: run it with the captool that "
                 "implements that rule (docs/bundle-format.md, Preprocessing)")
    norm = f.obj(image, "normalization", "image.normalization")
    f.number(f.get(norm, "scale", "image.normalization.scale"), "image.normalization.scale", 0)
    for key, above in (("mean", None), ("std", 0)):
        for i, x in enumerate(f.array(norm, key, f"image.normalization.{key}", 3, 3)):
            f.number(x, f"image.normalization.{key}[{i}]", above)
    if f.get(norm, "in_graph", "image.normalization.in_graph") is not True:
        f.fail("image.normalization.in_graph", norm["in_graph"], "must be true: the encoder graph normalizes, "
                                                                 "the runtime does not")


def file_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a file of a bundle, or None for one of the graph files the format names."""
    if name in GRAPH_FILES.values():
        return None
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        return "is an absolute path; a bundle lists its files by name, relative to the bundle"
    if ".." in parts:
        return "leaves the bundle ('..'); a bundle lists its files by name, relative to the bundle"
    if len(parts) > 1:
        return "is in a subdirectory; a bundle's graphs lie beside manifest.json"
    return f"is not a file of a captool bundle ({', '.join(GRAPH_FILES.values())})"


def _check_files(f: _Fields, files: dict, cell: str) -> set[str]:
    """The graph files listed, each {sha256, bytes}; -> the graphs they are."""
    for name in files:
        problem = file_name_problem(name)
        if problem:
            raise BundleError(f"{f.path}: 'files' names {_show(name)}, which {problem}; {FIX}")
        entry = f.obj(files, name, f"files.{name}")
        sha = f.string(entry, "sha256", f"files.{name}.sha256")
        if not SHA256.fullmatch(sha):
            f.fail(f"files.{name}.sha256", sha, "must be 64 lowercase hex digits")
        f.integer(entry, "bytes", f"files.{name}.bytes", 1, MAX_GRAPH_BYTES)
    for name in (ENCODER, DECODER_STEP):
        if name not in files:
            raise BundleError(f"{f.path}: 'files' does not list {name}; the manifest is damaged, re-export")
    cached = [name for name in (ATTENTION_CACHE, DECODER_STEP_CACHED) if name in files]
    if len(cached) == 1:
        raise BundleError(f"{f.path}: 'files' lists {cached[0]} without its pair of the attention cache "
                          f"({ATTENTION_CACHE}, {DECODER_STEP_CACHED}); the manifest is damaged, re-export")
    if cached and cell != "attention":
        raise BundleError(f"{f.path}: a {cell} bundle lists an attention cache; the manifest is damaged, re-export")
    return {graph for graph, name in GRAPH_FILES.items() if name in files}


def _check_graphs(f: _Fields, graphs: dict, listed: set[str]) -> None:
    """Each listed graph described as {inputs, outputs} of {name, dtype, shape}; graphs.py checks the values."""
    for graph in graphs:
        if graph not in GRAPH_FILES:
            raise BundleError(f"{f.path}: 'graphs' describes {_show(graph)}, not a graph of a captool bundle "
                              f"({', '.join(GRAPH_FILES)}); {FIX}")
        if graph not in listed:
            raise BundleError(f"{f.path}: 'graphs' describes {graph} but 'files' does not list "
                              f"{GRAPH_FILES[graph]}; {FIX}")
    for graph in sorted(listed, key=list(GRAPH_FILES).index):
        g = f.obj(graphs, graph, f"graphs.{graph}")
        for side in ("inputs", "outputs"):
            names = set()
            for i, tensor in enumerate(f.array(g, side, f"graphs.{graph}.{side}", 1, MAX_TENSORS)):
                where = f"graphs.{graph}.{side}[{i}]"
                if not isinstance(tensor, dict):
                    f.fail(where, tensor, "must be an object {name, dtype, shape}")
                name = f.string(tensor, "name", f"{where}.name")
                if name in names:
                    f.fail(f"{where}.name", name, f"named twice in graphs.{graph}.{side}")
                names.add(name)
                f.string(tensor, "dtype", f"{where}.dtype", TENSOR_DTYPES)
                shape = f.array(tensor, "shape", f"{where}.shape", 1, MAX_RANK)
                for j, dim in enumerate(shape):
                    if dim != "N":
                        shape[j] = f.int_value(dim, f"{where}.shape[{j}]", 1, MAX_GRAPH_BYTES)
        f.integer(g, "nodes", f"graphs.{graph}.nodes", 0, required=False)
        op_types = f.obj(g, "op_types", f"graphs.{graph}.op_types", required=False) or {}
        for op in op_types:
            f.integer(op_types, op, f"graphs.{graph}.op_types.{op}", 0)


def _real(f: _Fields, value: Any, field: str) -> None:
    """A number, or "nan" / "inf" / "-inf" (how the parity report writes non-finite values), or null."""
    if value is not None and value not in ("nan", "inf", "-inf"):
        f.number(value, field)


def _check_information(f: _Fields, raw: dict) -> None:
    """The fields kept for people and tools (captool info, verify): optional, but of their type where present."""
    for key, value in (f.obj(raw, "tools", "tools", required=False) or {}).items():
        if not isinstance(value, str):
            f.fail(f"tools.{key}", value, "must be a string (a version)")
    exporter = f.obj(raw, "exporter", "exporter", required=False)
    if exporter is not None:
        f.string(exporter, "name", "exporter.name", required=False)
        for key, value in (f.obj(exporter, "seconds", "exporter.seconds", required=False) or {}).items():
            f.number(value, f"exporter.seconds.{key}")
    f.string(raw, "created", "created", required=False)
    parity = f.obj(raw, "parity", "parity", required=False, nullable=True)
    if parity is not None:
        if "ok" in parity and not isinstance(parity["ok"], bool):  # captool info prints passed / FAILED
            f.fail("parity.ok", parity["ok"], "must be true or false")
        f.string(parity, "precision", "parity.precision", required=False)
        for key in ("atol", "rtol", "rel_err", "min_agreement", "agreement"):
            _real(f, parity.get(key), f"parity.{key}")
        batches = f.array(parity, "batches", "parity.batches", 0, MAX_BATCHES) if "batches" in parity else []
        for i, batch in enumerate(batches):
            if not isinstance(batch, dict):
                f.fail(f"parity.batches[{i}]", batch, "must be an object")
            f.string(batch, "source", f"parity.batches[{i}].source", required=False)
            f.integer(batch, "batch_size", f"parity.batches[{i}].batch_size", 0, required=False)
            f.integer(batch, "equal", f"parity.batches[{i}].equal", 0, required=False)
    quantization = f.obj(raw, "quantization", "quantization", required=False, nullable=True)
    if quantization is not None:
        validation = f.obj(quantization, "validation", "quantization.validation", required=False, nullable=True)
        if validation is not None:
            f.string(validation, "path", "quantization.validation.path", required=False)
            if validation.get("split") is not None:
                f.string(validation, "split", "quantization.validation.split")
            f.integer(validation, "images", "quantization.validation.images", 1, required=False)
