"""The exception types of captool.training, kept apart so every training module can import them."""

from captool.errors import CaptoolError
from captool.errors import DataError as DatasetError


class TrainingError(CaptoolError):
    """A model, checkpoint, backbone file or dataset cannot be used; the message says how to fix it."""


class DataError(TrainingError, DatasetError):
    """A dataset cannot be trained on: caught as a TrainingError or as captool.errors.DataError."""
