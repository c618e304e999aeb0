"""The bundle on disk: names, loading, and the integrity checks made before any image is read.

docs/bundle-format.md is the human-readable form of this file and docs/manifest.schema.json the
manifest's schema (checked field by field in manifest.py); keep the three in step.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .files import read_json
from .graph_file import ProtobufError, external_tensors
# The names every stage uses, defined with the manifest's rules and re-exported here.
from .manifest import (ATTENTION_CACHE, CELL_TYPES, DECODER_STEP, DECODER_STEP_CACHED, ENCODER,  # noqa: F401
                       FORMAT, GRAPH_FILES, MANIFEST, SCHEMA_VERSION, check_manifest)
from .vocab import Vocab

MAX_MANIFEST_BYTES = 16 << 20  # a 262144-token vocabulary (the schema's most) fits several times over
FIX_FILE = "re-export the bundle, or restore the file"


def graph_signature(cell_type: str) -> dict[str, dict[str, list[str]]]:
    """The input and output names each graph must have for a cell type (DESIGN.md's contract)."""
    if cell_type not in CELL_TYPES:
        raise BundleError(f"unknown cell type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}")
    enc_out, step_in, step_out = ["h0"], ["token", "h"], ["logits", "h_next"]
    if cell_type in ("lstm", "attention"):
        enc_out.append("c0")
        step_in.append("c")
        step_out.append("c_next")
    if cell_type == "attention":
        enc_out.append("features")
        step_in.append("features")
        step_out.append("attn_weights")
    return {
        "encoder": {"inputs": ["image"], "outputs": enc_out},
        "decoder_step": {"inputs": step_in, "outputs": step_out},
    }


def cache_signature() -> dict[str, dict[str, list[str]]]:
    """The attention cache's two graphs: features -> keys and values once per image, and the step on them."""
    return {
        "attention_cache": {"inputs": ["features"], "outputs": ["attention_keys", "attention_values"]},
        "decoder_step_cached": {"inputs": ["token", "h", "c", "attention_keys", "attention_values"],
                                "outputs": ["logits", "h_next", "c_next", "attn_weights"]},
    }


def graph_tensors(cell_type: str, hidden_dim: int, vocab_size: int, image_size: int) -> dict:
    """Each graph's inputs and outputs as the bundle format fixes them, for these dims:
    {graph: {"inputs" | "outputs": {name: (dtype, shape)}}}, shape entries ints or "N" (the batch).
    The same for every precision: fp16 and int8 graphs convert inside."""
    H, V, S = hidden_dim, vocab_size, image_size
    state = ("float32", ["N", H])
    spec = {"image": ("uint8", ["N", 3, S, S]), "token": ("int64", ["N"]),
            "h0": state, "c0": state, "h": state, "c": state, "h_next": state, "c_next": state,
            "features": ("float32", ["N", H, 4, 4]), "logits": ("float32", ["N", V]),
            "attn_weights": ("float32", ["N", 4, 4]),
            "attention_keys": ("float32", ["N", H, 16]), "attention_values": ("float32", ["N", 16, 4 * H])}
    graphs = {**graph_signature(cell_type), **(cache_signature() if cell_type == "attention" else {})}
    return {graph: {side: {name: spec[name] for name in names} for side, names in sides.items()}
            for graph, sides in graphs.items()}


# How the decoder step's outputs feed its next call, and how the encoder's outputs seed the first.
STATE_FROM_ENCODER = {"h0": "h", "c0": "c", "features": "features",
                      "attention_keys": "attention_keys", "attention_values": "attention_values"}
STATE_FROM_STEP = {"h_next": "h", "c_next": "c"}
# State that is the same at every step of an image: beam search does not reorder it.
IMAGE_STATE = frozenset({"features", "attention_keys", "attention_values"})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed and checked; `raw` keeps every field for tools that want more."""

    root: Path
    cell_type: str
    hidden_dim: int
    vocab: Vocab
    image_size: int
    resize_policy: str
    max_length: int
    precision: str
    raw: dict[str, Any]

    @property
    def jpeg_decode(self) -> str:
        """How JPEG files are decoded for this bundle (image.jpeg_decode; absent: "full")."""
        return self.raw["image"].get("jpeg_decode", "full")

    @property
    def encoder_path(self) -> Path:
        return self.root / ENCODER

    @property
    def decoder_step_path(self) -> Path:
        return self.root / DECODER_STEP

    @property
    def has_attention_cache(self) -> bool:
        """The bundle carries attention_cache.onnx and decoder_step_cached.onnx (attention bundles since captool 0.1)."""
        files = self.raw["files"]
        return ATTENTION_CACHE in files and DECODER_STEP_CACHED in files

    @property
    def tensors(self) -> dict:
        """graph_tensors for this bundle: what each graph's inputs and outputs must be."""
        return graph_tensors(self.cell_type, self.hidden_dim, len(self.vocab), self.image_size)


def load_manifest(bundle_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read and check manifest.json (every field, docs/manifest.schema.json) and every file it lists."""
    root = Path(bundle_dir)
    try:
        is_dir = root.is_dir()
    except OSError as e:  # a name too long for the file system, say
        raise BundleError(f"bundle {_short(root)} cannot be read ({e.strerror or e}); pass a directory "
                          f"written by `captool export`") from None
    if not is_dir:
        what = "does not exist" if not os.path.lexists(root) else "is not a directory"
        raise BundleError(f"bundle {root} {what}: pass a directory written by `captool export`")
    mpath = root / MANIFEST
    if not os.path.lexists(mpath):
        raise BundleError(f"{root} has no {MANIFEST}: not a captool bundle (write one with `captool export`)")
    _inside(root.resolve(), mpath, MANIFEST)
    try:
        raw = read_json(mpath, what="manifest", error=BundleError, max_bytes=MAX_MANIFEST_BYTES,
                        fix="the bundle is damaged, re-export it with `captool export`")
    except ValueError as e:  # an integer of thousands of digits: json raises plain ValueError
        raise BundleError(f"{mpath}: manifest is not valid JSON ({e}); the bundle is damaged, re-export it") from None
    check_manifest(raw, mpath)
    if check_files:
        verify_files(root, raw["files"])
    return Manifest(
        root=root,
        cell_type=raw["cell_type"],
        hidden_dim=int(raw["dims"]["hidden_dim"]),
        vocab=Vocab(list(raw["vocab"])),
        image_size=int(raw["image"]["size"]),
        resize_policy=raw["image"]["resize"],
        max_length=int(raw["max_length"]),
        precision=raw.get("precision", "fp32"),
        raw=raw,
    )


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"{text[:120]}...{text[-60:]} ({len(text)} characters)"


def _inside(root: Path, path: Path, name: str) -> Path:
    """`path` with its symlinks resolved, refused unless it stays inside the (resolved) bundle `root`."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise BundleError(f"{root}: {name} is missing; the bundle is incomplete, re-export it") from None
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise BundleError(f"{path}: cannot be resolved ({getattr(e, 'strerror', None) or e}); {FIX_FILE}") from None
    if real == root or root not in real.parents:
        raise BundleError(f"{path} is a symlink to {_short(real)}, outside the bundle; a bundle's files must lie "
                          f"inside its directory: {FIX_FILE}")
    return real


def read_graph_file(root: Path, name: str, entry: dict) -> bytes:
    """The bytes of a listed graph file, after checking that it is a regular file inside the bundle
    whose size and SHA-256 are those of `entry` ({sha256, bytes}, already validated)."""
    path = root / name
    real = _inside(root.resolve(), path, name)
    fd = None
    try:
        st = os.stat(real)  # classified before opening: opening a socket fails, a FIFO would block
        if stat.S_ISREG(st.st_mode):
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            fd = os.open(real, flags)  # non-blocking and no symlink: nothing swapped in since can hang or lead out
            st = os.fstat(fd)
    except OSError as e:
        raise BundleError(f"{path}: cannot be opened ({e.strerror or e}); {FIX_FILE}") from None
    if not stat.S_ISREG(st.st_mode):
        if fd is not None:  # it was swapped for something else after the first look
            os.close(fd)
        raise BundleError(f"{path} is not a regular file ({_kind(st.st_mode)}); a bundle's graphs are "
                          f"plain files: {FIX_FILE}")
    with os.fdopen(fd, "rb") as f:
        if st.st_size != entry["bytes"]:
            raise BundleError(f"{path} is {st.st_size} bytes, the manifest says {entry['bytes']}: the file was "
                              f"changed after export; {FIX_FILE}")
        try:
            data = f.read(st.st_size + 1)
        except OSError as e:
            raise BundleError(f"{path}: cannot be read ({e.strerror or e}); {FIX_FILE}") from None
    # The digest of what was read is not shown: only whether it matches.
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{path}: its sha256 does not match the manifest's ({entry['sha256'][:12]}...): "
                          f"the file was changed after export; {FIX_FILE}")
    return data


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """Each listed graph is a regular file inside the bundle, hashes to what the manifest says, and keeps
    all its weights inside itself (no ONNX external data: no hash would cover it)."""
    for name, entry in files.items():
        data = read_graph_file(root, name, entry)
        try:
            external = external_tensors(data)
        except ProtobufError as e:
            raise BundleError(f"{root / name}: not an ONNX model ({e}); {FIX_FILE}") from None
        if external:
            t = external[0]
            raise BundleError(f"{root / name}: tensor {t.name!r} keeps its data in an external file "
                              f"({t.location!r}{f' and {len(external) - 1} more' if len(external) > 1 else ''}); "
                              f"a bundle's graphs hold all their weights (docs/bundle-format.md): re-export "
                              f"the bundle with `captool export`")
