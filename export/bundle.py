"""Writing a bundle: both graphs and manifest.json into a temporary directory beside the target,
validated there, and renamed into place only when the bundle is proven equal to PyTorch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import captool
from captool.bundle import DECODER_STEP, ENCODER, FORMAT, MANIFEST, SCHEMA_VERSION, sha256_file
from captool.preprocess import RESIZE_POLICY

from .graphs import DEFAULT_OPSET, check_graph, export_decoder_step, export_encoder, io_specs
from .validate import BATCH_SIZES, ExportError, ParityReport, image_files, load_model, verify_bundle

PRECISIONS = ("fp32",)  # fp16 and int8 come with the quantization work (issue 6)
EXPORTER = "torch.onnx.export(dynamo=True)"


def export_bundle(checkpoint, out: str | Path, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  images: str | Path | None = None, overwrite: bool = False,
                  batch_sizes: Sequence[int] = BATCH_SIZES) -> ParityReport:
    """Export `checkpoint` (run dir, model file or a CaptioningRNN) to the bundle directory `out`.

    The bundle appears at `out` only if validation passes; otherwise ExportError(report) is raised
    and nothing is left behind. An existing bundle at `out` is replaced only with `overwrite`.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not available; this captool exports {', '.join(PRECISIONS)}")
    out = Path(out)
    check_target(out, overwrite)
    if images is not None:
        image_files(images)  # a bad --images fails now, not after the export
    model = load_model(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        specs = io_specs(model.config)
        seconds: dict[str, float] = {}
        graphs: dict[str, dict] = {}
        for graph, name, export in (("encoder", ENCODER, export_encoder), ("decoder_step", DECODER_STEP, export_decoder_step)):
            start = time.perf_counter()
            export(model, tmp / name, opset=opset)
            seconds[graph] = round(time.perf_counter() - start, 3)
            info = check_graph(tmp / name, graph, specs[graph])
            graphs[graph] = {**specs[graph], "nodes": info.nodes, "op_types": info.op_types}
        manifest = build_manifest(model, tmp, graphs, opset=opset, precision=precision, seconds=seconds)
        write_manifest(tmp, manifest)

        start = time.perf_counter()
        report = verify_bundle(tmp, model, images=images, batch_sizes=batch_sizes)
        seconds["validation"] = round(time.perf_counter() - start, 3)
        if not report.ok:
            raise ExportError(f"the exported graphs differ from the PyTorch model; no bundle was written to {out}",
                              report=report)
        manifest["exporter"]["seconds"]["validation"] = seconds["validation"]
        manifest["parity"] = report.to_json()
        write_manifest(tmp, manifest)
        replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an existing bundle (and that only with `overwrite`)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if not overwrite:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if any(out.iterdir()) and not _is_bundle(out):
        raise ExportError(f"{out} is a non-empty directory that is not a captool bundle; "
                          f"refusing to replace it, even with --force: choose another --out")


def _is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    check_target(out, overwrite)
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    path = root / MANIFEST
    part = path.with_suffix(".json.tmp")
    part.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(part, path)


def build_manifest(model, root: Path, graphs: dict, *, opset: int, precision: str,
                   seconds: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """manifest.json (schema 1, docs/bundle-format.md) for the graphs in `root`; parity is filled in later."""
    cfg = model.config
    fe = model.feature_extractor
    files = {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
             for name in (ENCODER, DECODER_STEP)}
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "cell_type": cfg.cell_type,
        "dims": {"input_dim": cfg.input_dim, "wordvec_dim": cfg.wordvec_dim, "hidden_dim": cfg.hidden_dim,
                 "vocab_size": cfg.vocab_size, "backbone_width": cfg.backbone_width},
        "vocab": list(model.idx_to_token),
        "special_tokens": {"null": 0, "start": 1, "end": 2, "unk": 3},
        "image": {
            "size": cfg.image_size, "channels": "RGB", "dtype": "uint8", "layout": "NCHW", "resize": RESIZE_POLICY,
            # What the encoder graph does first, written from the module's own constants.
            "normalization": {"scale": 1 / 255, "mean": _floats(fe.mean), "std": _floats(fe.std), "in_graph": True},
        },
        "max_length": cfg.max_length,
        "opset": opset,
        "precision": precision,
        "graphs": graphs,
        "files": files,
        "tools": _tool_versions(),
        "exporter": {"name": EXPORTER, "seconds": dict(seconds or {})},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parity": None,
    }


def _floats(t) -> list[float]:
    return [round(float(x), 6) for x in t.flatten()]  # float32 buffers, written as the decimals they hold


def _tool_versions() -> dict[str, str]:
    versions = {"captool": captool.__version__}
    for dist in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime"):
        versions[dist] = _version(dist)
    return versions


def _version(dist: str) -> str:
    names = (dist, "onnxruntime-gpu") if dist == "onnxruntime" else (dist,)
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"
