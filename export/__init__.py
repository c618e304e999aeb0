"""captool.export: the model's two graphs in an ONNX bundle, proven equal to PyTorch (needs the `export` extra)."""

from .bundle import PRECISIONS, export_bundle
from .graphs import DEFAULT_OPSET, MIN_OPSET, check_graph, export_decoder_step, export_encoder
from .validate import ExportError, ParityReport, verify_bundle

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "MIN_OPSET",
    "PRECISIONS",
    "ParityReport",
    "check_graph",
    "export_bundle",
    "export_decoder_step",
    "export_encoder",
    "verify_bundle",
]
