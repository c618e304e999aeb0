"""captool: caption images with a verified ONNX bundle, on onnxruntime alone (no PyTorch)."""

from .errors import BundleError, CaptoolError, DeviceError, ImageError

__version__ = "0.1.0"

__all__ = ["Captioner", "Caption", "CaptoolError", "BundleError", "DeviceError", "ImageError", "__version__"]


def __getattr__(name):
    # Captioner pulls in onnxruntime; keep `import captool` cheap for the CLI's --help and training.
    if name in ("Captioner", "Caption"):
        from . import captioner

        return getattr(captioner, name)
    raise AttributeError(f"module 'captool' has no attribute {name!r}")
