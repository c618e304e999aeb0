"""Captioning data from disk: the course's coco.pt, COCO captions JSON, Karpathy split JSON.

`load_data(path)` detects the format from what `--data` names:

- a `.pt` file (or a directory holding `coco.pt`): the course's file, read with
  `torch.load(weights_only=True)` (tensors, dicts, lists and strings only; nothing is unpickled).
  Keys `train_images` uint8 [N,3,112,112], `train_captions` int64 [K,17], `val_images`,
  `val_captions`, `vocab` {idx_to_token, token_to_idx}; optional `train_image_idx`/`val_image_idx`
  map caption rows to image rows (without them captions and images pair up row by row). Caption
  rows are 3 to 64 ids wide (`<START>`, words, `<END>`, `<NULL>` padding; the course's are 17):
  a wider file would train the RNN over hundreds of steps per caption for words it never samples.
- COCO captions JSON (a dataset folder, or one `captions_train*.json`, whose `val` sibling is the
  validation split) and Karpathy split JSON (a `dataset_*.json`; splits `train` and `restval` train,
  `val` validates, `test` is left out): read by `captool.datasets` (torch-free, shared with
  `captool eval`), whose docstring gives the rules for which file and which image folder.

File images go through `captool.preprocess.preprocess`, the runtime's own function, so training sees
the pixels deployment sees. Each image is decoded once into an in-memory uint8 tensor per split:
3×112×112 bytes = 37.6 kB per image, so 10k images take 376 MB and all of COCO train2017 (118k) 4.4 GB.
A missing or corrupt image, or an empty caption, is reported (with the file and the annotation) and
skipped, and the count is reported at the end. A dataset that cannot be trained on (a file that cannot
be read, a field missing or of the wrong type or shape, no training example left) is a DataError: one
line naming the file, the field and the fix.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from captool.datasets.readers import (ImageRecord, Report, coco_annotations, find_dataset, read_annotations, read_coco,
                              read_json, sibling)
from captool.errors import CaptoolError, ImageError
from captool.preprocess import IMAGE_SIZE, preprocess
from captool.vocab import MAX_WORDS, Vocab

from .errors import DataError

CAPTION_LENGTH = MAX_WORDS + 2  # <START> + 15 words + <END>, as the rows of coco.pt
MIN_CAPTION_WIDTH, MAX_CAPTION_WIDTH = 3, 64  # coco.pt rows: <START> a word <END> at least
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
COCO_PT_KEYS = ("train_images", "train_captions", "val_images", "val_captions", "vocab")


def warn(message: str) -> None:
    print(f"captool: warning: {message}", file=sys.stderr)


@dataclass
class CaptionSplit:
    """One split in memory: each image stored once, one example per (image, caption) pair."""

    images: torch.Tensor  # uint8 [M, 3, S, S]
    captions: torch.Tensor  # int64 [K, 17]
    image_idx: torch.Tensor  # int64 [K]: the row of `images` each caption describes

    def __len__(self) -> int:
        return self.captions.shape[0]

    def first_pairs(self, n: int) -> "CaptionSplit":
        """The first caption of each of the first n images (`--overfit N`).

        n examples a model can learn by heart, as the seed's 50 coco.pt rows (one caption per image):
        with five paraphrases of one image the loss could not go below log(5) ≈ 1.6.
        """
        first_row: dict[int, int] = {}  # image -> its first caption row, in example order
        for row, image in enumerate(self.image_idx.tolist()):
            first_row.setdefault(image, row)
            if len(first_row) == n:
                break
        rows = torch.tensor(list(first_row.values()), dtype=torch.long)
        return CaptionSplit(self.images[list(first_row)], self.captions[rows], torch.arange(len(rows)))


@dataclass
class CaptionData:
    vocab: Vocab
    train: CaptionSplit
    val: Optional[CaptionSplit]
    format: str  # "coco.pt" | "coco-json" | "karpathy-json"
    source: Path
    problems: list[str] = field(default_factory=list)  # everything reported and skipped


def load_data(path, *, images=None, min_count: int = 1, image_size: int = IMAGE_SIZE,
              report: Report = warn, jpeg_decode: str = "full") -> CaptionData:
    """Read a dataset in any of the three formats; `images` overrides where image files are looked up.
    Image files are decoded by the runtime's preprocess with `jpeg_decode` (the model's rule)."""
    path = Path(path)
    problems: list[str] = []

    def note(message: str) -> None:
        problems.append(message)
        report(message)

    images = Path(images) if images is not None else None
    try:  # captool.datasets finds the file and reads the JSON formats; its errors become training's type
        source = find_dataset(path, "train")
        json_splits = None if source.suffix == ".pt" else _json_splits(path, source, images, note)
    except CaptoolError as e:
        raise DataError(str(e)) from None
    if json_splits is None:
        data = _load_coco_pt(source, image_size, note)
    else:
        fmt, splits = json_splits
        data = _build(splits, min_count, image_size, note, fmt, path, jpeg_decode)
    data.problems = problems
    return data


# ---- coco.pt ----------------------------------------------------------------------------------


def _read_torch_file(path: Path):
    """torch.load(weights_only=True) of a file checked first, with torch's own warnings kept quiet."""
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; --data takes a coco.pt saved by torch.save")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise DataError(f"{path}: not a torch file (torch.save writes a zip archive); --data takes the course's "
                        f"coco.pt, or a COCO or Karpathy JSON dataset")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol ...": captool's error says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise DataError(f"{path}: holds objects other than tensors, dicts, lists and strings{what}; captool "
                        f"does not unpickle them: save the dataset as tensors and plain containers") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot be read as a torch file ({str(e).splitlines()[0] if str(e) else e!r}); "
                        f"the file is damaged, copy it again") from None


def _load_coco_pt(path: Path, image_size: int, note: Report) -> CaptionData:
    blob = _read_torch_file(path)
    if not isinstance(blob, dict):
        raise DataError(f"{path}: expected a dict with keys {', '.join(COCO_PT_KEYS)}, got {type(blob).__name__}")
    missing = [k for k in COCO_PT_KEYS if k not in blob]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)} (a coco.pt has {', '.join(COCO_PT_KEYS)})")
    vocab_blob = blob["vocab"]
    if not isinstance(vocab_blob, dict) or not isinstance(vocab_blob.get("idx_to_token"), list):
        raise DataError(f"{path}: vocab must be a dict with an 'idx_to_token' list of strings")
    tokens = vocab_blob["idx_to_token"]
    bad = next((i for i, t in enumerate(tokens) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{path}: vocab.idx_to_token entry {bad} is {type(tokens[bad]).__name__}, "
                        f"not a string; tokens are strings")
    try:
        vocab = Vocab(list(tokens))
    except ValueError as e:
        raise DataError(f"{path}: vocab.idx_to_token: {e}") from None
    train = _coco_pt_split(path, blob, "train", vocab, image_size, note)
    val = _coco_pt_split(path, blob, "val", vocab, image_size, note)
    if len(train) == 0:
        raise DataError(f"{path}: train_captions leaves no training example (no row with a word, "
                        f"{blob['train_images'].shape[0]} images); a dataset needs at least one captioned image")
    return CaptionData(vocab, train, val, "coco.pt", path)


def _coco_pt_split(path: Path, blob: dict, split: str, vocab: Vocab, image_size: int,
                   note: Report) -> CaptionSplit:
    images, captions = blob[f"{split}_images"], blob[f"{split}_captions"]
    want = (3, image_size, image_size)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and tuple(images.shape[1:]) == want):
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{path}: {split}_images must be uint8 [N,{','.join(map(str, want))}], got {got}")
    rows = f"{split}_captions"
    if not (isinstance(captions, torch.Tensor) and captions.dtype in INTEGER_DTYPES and captions.dim() == 2):
        got = f"{captions.dtype} {list(captions.shape)}" if isinstance(captions, torch.Tensor) else type(captions).__name__
        raise DataError(f"{path}: {rows} must be an integer tensor [K,{CAPTION_LENGTH}], got {got}")
    width = captions.shape[1]
    if not MIN_CAPTION_WIDTH <= width <= MAX_CAPTION_WIDTH:
        raise DataError(f"{path}: {rows} rows are {width} ids wide; captool trains on rows {MIN_CAPTION_WIDTH} to "
                        f"{MAX_CAPTION_WIDTH} wide (<START>, words, <END>, padding; coco.pt's are {CAPTION_LENGTH})")
    captions = captions.long()
    if captions.numel() and (captions.min() < 0 or captions.max() >= len(vocab)):
        raise DataError(f"{path}: {rows} has ids outside the vocabulary (0..{len(vocab) - 1})")
    image_idx = blob.get(f"{split}_image_idx")
    if image_idx is None:
        if captions.shape[0] != images.shape[0]:
            raise DataError(f"{path}: {captions.shape[0]} {split}_captions for {images.shape[0]} "
                            f"{split}_images and no {split}_image_idx to pair them")
        image_idx = torch.arange(images.shape[0])
    if not (isinstance(image_idx, torch.Tensor) and image_idx.dtype in INTEGER_DTYPES):
        raise DataError(f"{path}: {split}_image_idx must be an integer tensor [K] (one image row per caption)")
    image_idx = image_idx.long()
    if image_idx.shape != (captions.shape[0],) or (image_idx.numel() and (
            image_idx.min() < 0 or image_idx.max() >= images.shape[0])):
        raise DataError(f"{path}: {split}_image_idx must hold one image row (0..{images.shape[0] - 1}) "
                        f"per caption")
    # A row with no word between <START> and <END> teaches nothing but "stop".
    empty = (captions[:, 1] == vocab.end_id) | (captions[:, 1] == vocab.null_id)
    unstarted = (~empty & (captions[:, 0] != vocab.start_id)).nonzero().flatten()
    if len(unstarted):
        row = int(unstarted[0])
        raise DataError(f"{path}: {rows} row {row} starts with id {int(captions[row, 0])}, not <START> "
                        f"({vocab.start_id}); rows are <START> words <END> <NULL>...")
    for row in empty.nonzero().flatten().tolist():
        note(f"{path}: {split}_captions row {row}: empty caption, skipped")
    keep = ~empty
    return CaptionSplit(images, captions[keep], image_idx[keep])


# ---- JSON formats, through captool.datasets -----------------------------------------------------


def _json_splits(data: Path, source: Path, images: Optional[Path],
                 note: Report) -> tuple[str, dict[str, list[ImageRecord]]]:
    """Training and validation images: Karpathy's train+restval and val, or a COCO file and its val file."""
    annotations = read_annotations(source, images=images, report=note)
    if annotations.format == "karpathy-json":
        return annotations.format, {"train": annotations.of_split("train", "restval"),
                                    "val": annotations.of_split("val")}
    val_file = coco_annotations(data, "val") if data.is_dir() else sibling(source, "val")
    val = read_coco(val_file, read_json(val_file), images=images, report=note).records if val_file else []
    return annotations.format, {"train": annotations.records, "val": val}


def _decode(items: list[ImageRecord], size: int, split: str, note: Report,
            jpeg_decode: str = "full") -> tuple[np.ndarray, list[int]]:
    """Every image through the runtime's preprocess, in threads (Pillow releases the GIL while decoding)."""

    def one(item: ImageRecord):
        try:
            return preprocess(item.path, size, jpeg_decode)
        except ImageError as e:
            return str(e)

    pixels = np.empty((len(items), 3, size, size), dtype=np.uint8)  # [M, 3, S, S]
    kept: list[int] = []
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for i, result in enumerate(pool.map(one, items)):
            if isinstance(result, str):
                note(f"{split} image skipped: {result}")
            else:
                pixels[len(kept)] = result
                kept.append(i)
    if len(kept) < len(items):
        note(f"{len(items) - len(kept)} of {len(items)} {split} images skipped (listed above)")
    return pixels[: len(kept)], kept


def _build(splits: dict, min_count: int, size: int, note: Report, fmt: str, source: Path,
           jpeg_decode: str = "full") -> CaptionData:
    decoded = {}
    for name, items in splits.items():
        if not items:
            continue
        pixels, kept = _decode(items, size, name, note, jpeg_decode)
        decoded[name] = (pixels, [items[i] for i in kept])
    if "train" not in decoded or not decoded["train"][1]:
        raise DataError(f"{source}: no training image with a caption could be read")
    vocab = Vocab.build((c for item in decoded["train"][1] for c in item.captions), min_count)
    result = {}
    for name, (pixels, items) in decoded.items():
        rows = [vocab.encode(c, CAPTION_LENGTH) for item in items for c in item.captions]
        image_idx = [i for i, item in enumerate(items) for _ in item.captions]
        captions = torch.tensor(rows, dtype=torch.long).reshape(-1, CAPTION_LENGTH)  # (K, 17)
        result[name] = CaptionSplit(torch.from_numpy(pixels), captions, torch.tensor(image_idx, dtype=torch.long))
    return CaptionData(vocab, result["train"], result.get("val"), fmt, source)
