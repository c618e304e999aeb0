"""Real images for the quantized bundles: the calibration set of the int8 encoder and the validation set
of every fp16/int8 bundle, taken from a folder of images or a dataset's split.

Random noise is no use for either: static quantization fixes each activation's range from what the
calibration images produce, and caption agreement is only meaningful on images the model can caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from captool.errors import CaptoolError
from captool.evaluation import load_eval_set
from captool.inputs import find_images
from captool.preprocess import IMAGE_EXTENSIONS, preprocess

from .validate import ExportError

CALIBRATION_IMAGES = 128  # enough for stable MinMax ranges on MobileNetV2 (docs/export.md has the numbers)
VALIDATION_IMAGES = 256  # agreement measured to about +-1.5 % (one standard error at 95 %)
CALIBRATION_BATCH = 16  # images per calibration run: bounds the memory the calibrator holds at once
TRAIN_STATE = "train_state.json"  # written by `captool train` beside the checkpoint; names its dataset


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images from one place, and what to call that place in reports and the manifest."""

    path: str  # the folder or dataset
    split: Optional[str]  # the dataset's split taken; None for a plain folder of images
    images: np.ndarray  # uint8 (M, 3, S, S)

    @property
    def source(self) -> str:
        return self.path if self.split is None else f"{self.path} [{self.split}]"

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"path": self.path, "split": self.split, "images": len(self.images)}


def _is_dataset(root: Path) -> bool:
    return ((root / "annotations").is_dir() or any(root.glob("captions_*.json"))
            or any(root.glob("dataset_*.json")) or (root / "coco.pt").is_file())


def _spread(n_total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(n_total), in order (all of them if there are fewer)."""
    if n_total <= count:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, count).round().astype(np.int64)


def _folder_files(root: Path) -> list[Path]:
    """The folder's images by captool's one rule (find_images: recursive, sorted, each real file once)."""
    try:
        files = find_images(root)
    except OSError as e:
        raise ExportError(f"{root}: cannot list it ({e.strerror or e}); pass a folder of images you can read") from None
    if not files:
        raise ExportError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it; pass a folder of "
                          f"images or a dataset directory")
    return files


def load_images(source: str | Path, *, split: str, count: int, size: int, option: str = "--calibration",
                jpeg_decode: str = "full") -> ImageSet:
    """`count` images spread over `source`, preprocessed as `captool run` does (JPEGs by `jpeg_decode`).

    `source` is a dataset (a `captool synth`/COCO captions directory, a captions JSON, a Karpathy JSON
    or coco.pt), whose `split` is taken, or any folder of image files (searched recursively).
    """
    root = Path(source)
    if count < 1:
        raise ExportError(f"{option}: the number of images must be >= 1, got {count}")
    if not root.exists():
        raise ExportError(f"{option} {root}: no such file or directory; pass a folder of images or a dataset")
    if root.is_dir() and not _is_dataset(root):
        files = _folder_files(root)
        chosen = [files[i] for i in _spread(len(files), count)]
        return ImageSet(str(root), None, np.stack([_pixels(p, size, option, jpeg_decode) for p in chosen]))  # (M, 3, S, S)
    try:
        evalset = load_eval_set(root, split)
    except CaptoolError as e:
        raise ExportError(f"{option} {root}: {e}") from None
    chosen = _spread(len(evalset.images), count)
    if isinstance(evalset.images, np.ndarray):  # coco.pt: already uint8 (M, 3, S, S)
        images = evalset.images[chosen]
        if images.shape[-1] != size:
            raise ExportError(f"{option} {root}: its images are {images.shape[-1]} px, the model takes {size}")
    else:
        images = np.stack([_pixels(evalset.images[i], size, option, jpeg_decode) for i in chosen])
    return ImageSet(str(root), split, images)


def _pixels(path: Path, size: int, option: str, jpeg_decode: str = "full") -> np.ndarray:
    try:
        return preprocess(path, size, jpeg_decode)  # (3, S, S)
    except CaptoolError as e:
        raise ExportError(f"{option}: {e}") from None


def has_split(source: str | Path, split: str) -> bool:
    """Whether `source` is a dataset with annotations for `split` (a plain image folder has none)."""
    root = Path(source)
    if root.is_dir() and not _is_dataset(root):
        return False
    try:
        load_eval_set(root, split)
    except CaptoolError:
        return False
    return True


def recorded_training_data(checkpoint) -> Optional[Path]:
    """The dataset `captool train` recorded for the run (train_state.json beside the checkpoint), if any."""
    if not isinstance(checkpoint, (str, Path)):
        return None
    run_dir = Path(checkpoint)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    try:
        state = json.loads((run_dir / TRAIN_STATE).read_text(encoding="utf-8"))
        data = state["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, str) or not Path(data).exists():
        return None
    return Path(data)


def calibration_source(calibration: str | Path | None, checkpoint) -> Path:
    """--calibration if given, else the run's recorded training data; an ExportError naming the fix otherwise."""
    if calibration is not None:
        return Path(calibration)
    recorded = recorded_training_data(checkpoint)
    if recorded is None:
        raise ExportError("int8 export needs calibration images and the checkpoint records no training data "
                          "that exists here; pass --calibration DIR (a folder of images or a dataset)")
    return recorded


class ImageReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over uint8 images: {"image": (B, 3, S, S)} per call, then None."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        super().__init__()
        self.images, self.batch = images, batch
        self._batches: Iterator[dict] = self._iterate()

    def _iterate(self) -> Iterator[dict]:
        for start in range(0, len(self.images), self.batch):
            yield {"image": self.images[start:start + self.batch]}  # (B, 3, S, S) uint8

    def get_next(self) -> Optional[dict]:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()
