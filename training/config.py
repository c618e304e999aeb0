"""How to train: TrainConfig, the one place training's defaults live, and the checks that need no torch.

`captool train` reads its options' defaults from TrainConfig (runtime/cli.py, through `defaults()`),
and checks --out and --data with `check_paths` before torch is imported: a mistake costs a
fraction of a second, not the seconds torch takes to load. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from captool.manifest import CELL_TYPES
from captool.preprocess import JPEG_DECODES

from .errors import TrainingError

# Measured on this project's 2-core machine, shared with other jobs (README, "Train on your own data"):
# one thread trained as fast as two when the machine was quiet and several times faster when another
# job ran, in every phase (warm-up, feature caching, captioning).
DEFAULT_THREADS = 1
# `--overfit N` reproduces the seed's overfit run: 80 epochs at batch 50 (or N, when smaller).
OVERFIT_EPOCHS, OVERFIT_BATCH = 80, 50
# The files whose presence makes a directory a training run (an epoch or a warm-up epoch committed).
RUN_FILES = ("train_state.json", "model.json")


@dataclass
class TrainConfig:
    """How to train; the architecture itself is the checkpoint's ModelConfig."""

    data: str = ""
    out: str = "runs/captioner"
    images: Optional[str] = None  # where image files are, when not beside the annotations
    cell: str = "rnn"
    epochs: int = 10
    batch_size: int = 50
    lr: float = 1e-3
    lr_decay: float = 1.0  # per epoch: epoch e trains at lr * lr_decay**e
    hidden_dim: int = 512
    wordvec_dim: int = 256
    backbone: str = "imagenet"  # "imagenet" | "none" | a state-dict file
    backbone_width: float = 1.0
    train_backbone: bool = False
    overfit: Optional[int] = None  # train on N examples only: the first caption of the first N images
    min_count: int = 1
    seed: int = 0
    device: str = "auto"
    cache_features: bool = True  # also keep frozen features on disk, in the run dir
    # Each epoch, one caption per image drawn at random: an epoch then costs one backbone pass per
    # image rather than per caption (5x fewer with COCO-style data) when the backbone is trained.
    one_caption_per_image: bool = False
    # Epochs of concept-detector warm-up of the backbone before captioning (training/warmup.py); the
    # backbone is frozen afterwards unless train_backbone.
    warmup_epochs: int = 0
    threads: int = DEFAULT_THREADS  # torch's intra-op threads, set once by `captool train`
    quality_images: int = 100  # validation images captioned for the report after each epoch (0: none)
    # How JPEG files are decoded (captool.preprocess, "full" or "scaled"): the model records it, and its
    # bundle is run with it.
    jpeg_decode: str = "full"

    def __post_init__(self):
        if self.cell not in CELL_TYPES:
            raise TrainingError(f"invalid cell {self.cell!r}; only {', '.join(CELL_TYPES)} are supported")
        for name in ("epochs", "batch_size", "hidden_dim", "wordvec_dim", "min_count", "threads"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "quality_images"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.warmup_epochs and not (self.train_backbone or self.backbone.lower() == "none"):
            raise TrainingError("--warmup-epochs trains the backbone: add --train-backbone (or --backbone none)")
        if self.overfit is not None and self.overfit < 1:
            raise TrainingError(f"--overfit must be at least 1, got {self.overfit}")
        if not (self.lr > 0 and self.lr_decay > 0 and self.backbone_width > 0):
            raise TrainingError(f"--lr, --lr-decay and --backbone-width must be positive, got "
                                f"{self.lr}, {self.lr_decay}, {self.backbone_width}")
        if self.jpeg_decode not in JPEG_DECODES:
            raise TrainingError(f"--jpeg-decode must be one of {', '.join(JPEG_DECODES)}, got {self.jpeg_decode!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise TrainingError(f"invalid device {self.device!r}; use auto, cpu or cuda")


# Settings that may change when a run is resumed; the others define the run.
RESUMABLE = ("data", "images", "out", "epochs", "device", "cache_features", "threads", "quality_images")


def defaults() -> dict:
    """Every TrainConfig field's default, by name: what `captool train` shows and passes for an option not given."""
    return {f.name: f.default for f in fields(TrainConfig)}


def check_paths(out: str | Path, data: Optional[str | Path], images: Optional[str | Path], resume: bool) -> None:
    """What can be refused before torch loads: a finished --out without --resume, a missing one with it, bad paths."""
    out = Path(out)
    held = [name for name in RUN_FILES if (out / name).exists()]
    held += [p.name for p in out.glob(".epoch-[0-9][0-9][0-9][0-9]")] if out.is_dir() else []  # committed, not installed
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a run directory; choose another --out")
    if not resume and held:
        raise TrainingError(f"{out} already holds a training run ({held[0]}): pass --resume to continue it, "
                            f"or choose another --out")
    if resume and not held:
        raise TrainingError(f"{out} holds no training run: there is no run to resume: start it without --resume")
    for option, path in (("--data", data), ("--images", images)):
        if path is not None and not Path(path).exists():
            raise TrainingError(f"{option} {path} does not exist; pass a dataset path that exists "
                                f"(`captool synth DIR` writes one)")
    if images is not None and not Path(images).is_dir():
        raise TrainingError(f"--images {images} is not a folder; pass the folder that holds the image files")
