"""The bundle on disk: manifest schema, loading, and the integrity checks made before any image is read.

docs/bundle-format.md is the human-readable form of this file; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .vocab import Vocab

SCHEMA_VERSION = 1
FORMAT = "captool-bundle"
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER_STEP = "decoder_step.onnx"
# Optional, attention bundles only: the attention cache (docs/bundle-format.md, "Attention cache").
ATTENTION_CACHE = "attention_cache.onnx"
DECODER_STEP_CACHED = "decoder_step_cached.onnx"
CELL_TYPES = ("rnn", "lstm", "attention")


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


GRAPH_FILES = {"encoder": ENCODER, "decoder_step": DECODER_STEP,
               "attention_cache": ATTENTION_CACHE, "decoder_step_cached": DECODER_STEP_CACHED}


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
    def encoder_path(self) -> Path:
        return self.root / ENCODER

    @property
    def decoder_step_path(self) -> Path:
        return self.root / DECODER_STEP

    @property
    def has_attention_cache(self) -> bool:
        """The bundle carries attention_cache.onnx and decoder_step_cached.onnx (attention bundles since captool 0.1)."""
        files = self.raw.get("files", {})
        return ATTENTION_CACHE in files and DECODER_STEP_CACHED in files


def _require(d: dict, key: str, where: str, path: Path):
    if key not in d:
        raise BundleError(f"{path}: manifest has no '{where}{key}' (re-export the bundle with `captool export`)")
    return d[key]


def load_manifest(bundle_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read and check manifest.json: schema version, required fields, and every file's sha256."""
    root = Path(bundle_dir)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise BundleError(f"bundle {root} {what}: pass a directory written by `captool export`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a captool bundle (write one with `captool export`)")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); the bundle is damaged, re-export it") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a captool manifest (no \"format\": \"{FORMAT}\")")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{mpath}: bundle schema version {version!r}, this captool reads version {SCHEMA_VERSION}; "
            f"re-export the bundle with this captool, or install the captool that wrote it"
        )
    cell = _require(raw, "cell_type", "", mpath)
    graph_signature(cell)  # validates the name
    dims = _require(raw, "dims", "", mpath)
    image = _require(raw, "image", "", mpath)
    files = _require(raw, "files", "", mpath)
    try:
        vocab = Vocab(list(_require(raw, "vocab", "", mpath)))
    except ValueError as e:
        raise BundleError(f"{mpath}: bad vocabulary: {e}") from None
    for name in (ENCODER, DECODER_STEP):
        if name not in files:
            raise BundleError(f"{mpath}: 'files' does not list {name}; the manifest is damaged, re-export")
    cached = [name for name in (ATTENTION_CACHE, DECODER_STEP_CACHED) if name in files]
    if len(cached) == 1:
        raise BundleError(f"{mpath}: 'files' lists {cached[0]} without its pair of the attention cache "
                          f"({ATTENTION_CACHE}, {DECODER_STEP_CACHED}); the manifest is damaged, re-export")
    if cached and cell != "attention":
        raise BundleError(f"{mpath}: a {cell} bundle lists an attention cache; the manifest is damaged, re-export")
    if check_files:
        verify_files(root, files)
    return Manifest(
        root=root,
        cell_type=cell,
        hidden_dim=int(_require(dims, "hidden_dim", "dims.", mpath)),
        vocab=vocab,
        image_size=int(_require(image, "size", "image.", mpath)),
        resize_policy=str(_require(image, "resize", "image.", mpath)),
        max_length=int(_require(raw, "max_length", "", mpath)),
        precision=str(raw.get("precision", "fp32")),
        raw=raw,
    )


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """Each listed file exists and hashes to what the manifest says."""
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{root}: {name} is missing; the bundle is incomplete, re-export it")
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not want:
            raise BundleError(f"{root / MANIFEST}: no sha256 for {name}; re-export the bundle")
        got = sha256_file(path)
        if got != want:
            raise BundleError(
                f"{path}: sha256 {got[:12]}… does not match the manifest's {want[:12]}…: "
                f"the file was changed after export; re-export or restore it"
            )
