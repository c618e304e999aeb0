"""Writing a bundle: both graphs and manifest.json into a temporary directory beside the target,
validated there, and renamed into place only when the bundle is proven equal to PyTorch.

An fp16 or int8 bundle starts as an fp32 one: the traced graphs are proven first, then converted or
quantized (export/quantize.py) and validated again, on real images, with their precision's tolerance.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import captool
from captool.bundle import FORMAT, GRAPH_FILES, MANIFEST, SCHEMA_VERSION, sha256_file
from captool.errors import CaptoolError
from captool.files import hold, make_temp_dir, read_json, remove_stale, restore_aside, swap_into_place, write_json
from captool.preprocess import JPEG_DECODES, PREPROCESSING, RESIZE_POLICY
from captool.progress import Progress, phase

from . import jpeg_decode as jpeg_gate
from .calibration import (CALIBRATION_IMAGES, VALIDATION_IMAGES, ImageSet, calibration_source, has_split,
                          load_images, recorded_training_data)
from .graphs import (DEFAULT_OPSET, check_graph, export_attention_cache, export_cached_step, export_decoder_step,
                     export_encoder, io_specs)
from .quantize import convert_fp16, quantize_decoder_step, quantize_encoder
from .validate import BATCH_SIZES, ExportError, ParityReport, image_files, load_model, tolerance_for, verify_bundle

PRECISIONS = ("fp32", "fp16", "int8")
EXPORTER = "torch.onnx.export(dynamo=True)"


def export_bundle(checkpoint, out: str | Path, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  images: str | Path | None = None, overwrite: bool = False,
                  batch_sizes: Sequence[int] = BATCH_SIZES, calibration: str | Path | None = None,
                  calibration_images: int = CALIBRATION_IMAGES,
                  validation_images: int = VALIDATION_IMAGES,
                  min_agreement: Optional[float] = None, atol: Optional[float] = None,
                  rounding_factor: Optional[float] = None, rel_err: Optional[float] = None,
                  jpeg_decode: Optional[str] = None,
                  max_caption_change: float = jpeg_gate.MAX_CAPTION_CHANGE) -> ParityReport:
    """Export `checkpoint` (run dir, model file or a CaptioningRNN) to the bundle directory `out`.

    The bundle appears at `out` only if validation passes; otherwise ExportError(report) is raised
    and nothing is left behind. An existing bundle at `out` is replaced only with `overwrite`.

    Args:
        precision: "fp32", "fp16" (GPU bundle) or "int8" (CPU bundle); docs/export.md.
        images: fp32: also validate on the image files in this folder. fp16/int8: validate on these
            images (up to `validation_images`; a dataset directory gives its val split).
        calibration: int8: the folder of images or dataset (its train split) to calibrate the encoder
            on; default the training data the run recorded. fp16/int8 without `images`: that
            dataset's val split is the validation set (a plain folder: its own images).
        min_agreement: fp16/int8: the share of validation images whose caption must equal PyTorch's
            (default: the precision's, validate.TOLERANCES).
        atol, rounding_factor: the fp32 graphs' bound, per row of each output: max |bundle - torch| <=
            atol + rounding_factor x float32's error on that row, PyTorch's own or the sampled spread
            where larger (default 0 and 8; x 4 for the step graphs, validate.STEP_DEPTH).
        rel_err: fp16/int8: the bound on each output's ||bundle - torch|| / ||torch||.
        jpeg_decode: how the bundle decodes JPEG files (manifest image.jpeg_decode), default the model's
            own (it was trained on files decoded so). "scaled" needs `images`: held-out photos whose
            captions under it may differ from the full decode's on at most `max_caption_change` of them
            (export/jpeg_decode.py; the measurement goes into parity.jpeg_decode).
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not available; choose one of {', '.join(PRECISIONS)}")
    tolerance_for(precision, atol=atol, rounding_factor=rounding_factor, rel_err=rel_err,
                  min_agreement=min_agreement)  # a bad option fails now, not after the export
    bounds = {"atol": atol, "rounding_factor": rounding_factor}
    out = Path(out)
    clear_leftovers(out)
    check_target(out, overwrite)
    if images is not None and precision == "fp32":
        image_files(images)  # a bad --images fails now, not after the export
    model = load_model(checkpoint)
    decode = model.config.jpeg_decode if jpeg_decode is None else jpeg_decode
    if decode not in JPEG_DECODES:
        raise ExportError(f"--jpeg-decode must be one of {', '.join(JPEG_DECODES)}, got {decode!r}")
    if decode == "scaled":
        if images is None:
            raise ExportError("--jpeg-decode scaled is measured on held-out photos before it is accepted: pass "
                              "--images DIR (e.g. made by `captool synth held --train 0 --val 500 --photo 640x480`)")
        jpeg_gate.check_max_share(max_caption_change)
        photos = jpeg_gate.scaled_photos(images, model.config.image_size)  # too few: fails now, not after the export
    calibration_set = validation_set = None
    if precision != "fp32":  # read before tracing: a missing folder fails in a second, not after the export
        calibration_set, validation_set = real_images(checkpoint, model.config.image_size, precision, images,
                                                      calibration, calibration_images, validation_images, decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)  # .NAME.XXXXXXXX.tmp, held (locked) while this export works in it
    busy = hold(tmp)
    try:
        specs = io_specs(model.config)
        seconds: dict[str, float] = {}
        graphs: dict[str, dict] = {}
        for graph in specs:
            name, export = GRAPH_FILES[graph], _tracer(graph)
            start = time.perf_counter()
            with phase(f"export: tracing {graph}"):
                export(model, tmp / name, opset=opset)
            seconds[graph] = round(time.perf_counter() - start, 3)
            info = check_graph(tmp / name, graph, specs[graph])
            graphs[graph] = {**specs[graph], "nodes": info.nodes, "op_types": info.op_types}
        manifest = build_manifest(model, tmp, graphs, opset=opset, precision="fp32", seconds=seconds,
                                  jpeg_decode=decode)
        write_manifest(tmp, manifest)

        start = time.perf_counter()
        with phase("export: validating the fp32 graphs against PyTorch"):
            report = verify_bundle(tmp, model, images=images if precision == "fp32" else None,
                                   batch_sizes=batch_sizes, **bounds)
        seconds["validation"] = round(time.perf_counter() - start, 3)
        if not report.ok:
            raise ExportError(f"the exported graphs differ from the PyTorch model: {report.failure()}; "
                              f"no bundle was written to {out}", report=report)
        fp32_report = report
        if precision != "fp32":
            start = time.perf_counter()
            with phase(f"export: converting to {precision}"):
                quantization = lower_precision(tmp, precision, specs, graphs, calibration_set)
            seconds[precision] = round(time.perf_counter() - start, 3)
            manifest = build_manifest(model, tmp, graphs, opset=opset, precision=precision, seconds=seconds,
                                      jpeg_decode=decode)
            manifest["quantization"] = {**quantization, "validation": validation_set.describe()}
            write_manifest(tmp, manifest)
            start = time.perf_counter()
            with phase(f"export: validating the {precision} graphs"):
                report = verify_bundle(tmp, model, real=validation_set, batch_sizes=batch_sizes,
                                       min_agreement=min_agreement, rel_err=rel_err)
            seconds["validation"] = round(seconds["validation"] + time.perf_counter() - start, 3)
            if not report.ok:
                raise ExportError(f"the {precision} graphs are further from the PyTorch model than {precision} "
                                  f"allows: {report.failure()}; no bundle was written to {out}", report=report)
        manifest["exporter"]["seconds"]["validation"] = seconds["validation"]
        manifest["parity"] = report.to_json()
        if precision != "fp32":
            manifest["parity"]["fp32_graphs"] = fp32_summary(fp32_report)
        if decode == "scaled":
            bar = Progress("export: held-out photos captioned with full and scaled JPEG decode", unit="images")
            try:
                decoding = jpeg_gate.measure(tmp, images, max_caption_change, progress=bar.update, photos=photos)
            except BaseException:
                bar.close()
                raise
            bar.finish()
            if not decoding.ok:
                raise ExportError(f"{decoding.line()}: more than --max-caption-change allows; export with "
                                  f"--jpeg-decode full; no bundle was written to {out}", report=report)
            manifest["parity"]["jpeg_decode"] = decoding.to_json()
        write_manifest(tmp, manifest)
        replace_dir(tmp, out, overwrite)
    except BaseException:  # Ctrl-C, and SIGTERM in the CLI, too; a kill -9 leaves it to clear_leftovers
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(busy)
    return report


def _tracer(graph: str):
    """What traces each graph (io_specs says which graphs a model's bundle has); looked up when called."""
    return {"encoder": export_encoder, "decoder_step": export_decoder_step,
            "attention_cache": export_attention_cache, "decoder_step_cached": export_cached_step}[graph]


def real_images(checkpoint, size: int, precision: str, images, calibration, n_calibration: int,
                n_validation: int, jpeg_decode: str = "full") -> tuple[ImageSet | None, ImageSet]:
    """The calibration images (int8) and the validation images (fp16, int8) of a quantized export, decoded
    as the bundle will decode them."""
    calibration_set = None
    if precision == "int8":
        source = calibration_source(calibration, checkpoint)
        calibration_set = load_images(source, split="train", count=n_calibration, size=size, jpeg_decode=jpeg_decode)
    if images is not None:
        return calibration_set, load_images(images, split="val", count=n_validation, size=size, option="--images",
                                            jpeg_decode=jpeg_decode)
    source = Path(calibration) if calibration is not None else recorded_training_data(checkpoint)
    if source is None:
        raise ExportError(f"{precision} bundles are validated on real images (caption agreement means nothing on "
                          f"noise) and the checkpoint records no training data that exists here; pass --images DIR")
    if has_split(source, "val"):  # held out from calibration
        return calibration_set, load_images(source, split="val", count=n_validation, size=size, jpeg_decode=jpeg_decode)
    # A plain folder: its images are all there is (calibration-like; --images gives held-out ones).
    return calibration_set, load_images(source, split="train", count=n_validation, size=size, jpeg_decode=jpeg_decode)


def lower_precision(tmp: Path, precision: str, specs: dict, graphs: dict, calibration: ImageSet | None) -> dict:
    """Replace the proven fp32 graphs in `tmp` by their fp16 or int8 versions; checks them, updates `graphs`."""
    work = tmp / ".work"
    work.mkdir()
    made: dict[str, dict] = {}
    for graph in specs:
        name = GRAPH_FILES[graph]
        fp32 = work / f"{graph}.fp32.onnx"
        os.replace(tmp / name, fp32)
        if precision == "fp16":
            made[graph] = convert_fp16(fp32, tmp / name)
        elif graph == "encoder":
            made[graph] = quantize_encoder(fp32, tmp / name, calibration, work)
        else:  # the steps and the attention cache: matmuls with constant weights
            made[graph] = quantize_decoder_step(fp32, tmp / name, work)
        info = check_graph(tmp / name, graph, specs[graph], precision=precision)
        graphs[graph] = {**specs[graph], "nodes": info.nodes, "op_types": info.op_types}
    shutil.rmtree(work)
    return made


def fp32_summary(report: ParityReport) -> dict:
    """The fp32 graphs' proof, in short: the quantized bundle was made from graphs equal to PyTorch."""
    worst = report.worst()
    return {"ok": report.ok, "atol": report.atol, "rounding_factor": report.rounding_factor,
            "bound": report.tolerance.describe(),
            "max_abs": {f"{d.graph}.{d.output}": d.max_abs for d, _ in worst},
            "of_bound": {f"{d.graph}.{d.output}": round(d.bound, 4) for d, _ in worst},
            "batch_sizes": [b.batch_size for b in report.batches],
            "equal": sum(b.equal for b in report.batches), "images": sum(b.batch_size for b in report.batches)}


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
        return read_json(path / MANIFEST).get("format") == FORMAT
    except (CaptoolError, AttributeError):
        return False


def clear_leftovers(out: Path) -> None:
    """What killed exports of `out` left: the old bundle put back if a kill struck between --force's
    two renames, and temporary directories no running export holds removed."""
    started = time.time()
    restore_aside(out)
    remove_stale(out, older_than=started)
    remove_stale(out, "old-", older_than=started)


def replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished bundle in place: at every instant `out` holds the old bundle or the new one."""
    if out.exists():
        check_target(out, overwrite)
    swap_into_place(tmp, out)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest, indent=2)


def build_manifest(model, root: Path, graphs: dict, *, opset: int, precision: str,
                   seconds: Optional[dict[str, float]] = None, jpeg_decode: str = "full") -> dict[str, Any]:
    """manifest.json (schema 1, docs/bundle-format.md) for the graphs in `root`; parity is filled in later."""
    cfg = model.config
    fe = model.feature_extractor
    files = {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
             for name in (GRAPH_FILES[graph] for graph in graphs)}
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
            "preprocessing": PREPROCESSING, "jpeg_decode": jpeg_decode,
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
