"""The runtime's exception types: every message names the thing, the value and the fix."""


class CaptoolError(Exception):
    """Base of every error captool raises on purpose; the CLI turns it into an exit code."""


class BundleError(CaptoolError):
    """The bundle directory is missing, incomplete, tampered with or of another schema."""


class DataError(CaptoolError):
    """A dataset (annotation JSON, coco.pt) is malformed: the message names the file, the field and the fix."""


class ImageError(CaptoolError):
    """One input image cannot be read; other inputs are still processed."""


class DeviceError(CaptoolError):
    """The device asked for cannot run here (CUDA libraries or driver missing, unknown device)."""


class MissingExtraError(CaptoolError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(
            f"this command needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'captool[{extra}]'"
        )
        self.extra = extra
