"""The one exception type of captool.training, kept apart so every training module can import it."""

from captool.errors import CaptoolError


class TrainingError(CaptoolError):
    """A model, checkpoint, backbone file or dataset cannot be used; the message says how to fix it."""
