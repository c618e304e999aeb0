"""Captioning data from disk: the course's coco.pt, COCO captions JSON, Karpathy split JSON.

`load_data(path)` detects the format from what `--data` names:

- a `.pt` file (or a directory holding `coco.pt`): the course's file, read with
  `torch.load(weights_only=True)` (tensors, dicts, lists and strings only; nothing is unpickled).
  Keys `train_images` uint8 [N,3,112,112], `train_captions` int64 [K,17], `val_images`,
  `val_captions`, `vocab` {idx_to_token, token_to_idx}; optional `train_image_idx`/`val_image_idx`
  map caption rows to image rows (without them captions and images pair up row by row).
- COCO captions JSON (`{"images": [...], "annotations": [...]}`): either a directory holding
  `annotations/captions_train*.json` and `annotations/captions_val*.json` (or the same names at its
  top level), or one such file, which becomes the training split; its `val` sibling (the name with
  `train` replaced by `val`) is the validation split when it exists. Images of `captions_<split>.json`
  are looked up, in order, in `<images>/<split>/`, `<images>/`, `<root>/<split>/`,
  `<root>/images/<split>/`, `<root>/` and the JSON's own folder, where `<root>` is the folder above
  `annotations/` (or the JSON's folder) and `<images>` is the `--images` option; the first folder
  holding one of the first images listed wins. This covers both `captool synth`'s layout
  (`OUT/train/000000.png`) and COCO's (`coco/train2017/000000000009.jpg`).
- Karpathy split JSON (`dataset_coco.json` style: `images` with `filepath`, `filename`, `split`,
  `sentences`): that file, or a directory holding exactly one `dataset_*.json`. Images are
  `<images or the JSON's folder>/<filepath>/<filename>`; splits `train` and `restval` train, `val`
  validates, `test` is left out.

File images go through `captool.preprocess.preprocess`, the runtime's own function, so training sees
the pixels deployment sees. Each image is decoded once into an in-memory uint8 tensor per split:
3×112×112 bytes = 37.6 kB per image, so 10k images take 376 MB and all of COCO train2017 (118k) 4.4 GB.
A missing or corrupt image, or an empty caption, is reported (with the file and the annotation) and
skipped, and the count is reported at the end; an annotation file that cannot be read is an error.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from captool.errors import ImageError
from captool.preprocess import IMAGE_SIZE, preprocess
from captool.vocab import MAX_WORDS, Vocab, tokenize

from .errors import TrainingError

CAPTION_LENGTH = MAX_WORDS + 2  # <START> + 15 words + <END>, as the rows of coco.pt
COCO_PT_KEYS = ("train_images", "train_captions", "val_images", "val_captions", "vocab")
FORMATS = "the course's coco.pt, COCO captions JSON (images + annotations) or Karpathy split JSON (dataset_coco.json)"

Report = Callable[[str], None]


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


@dataclass
class _ImageCaptions:  # one image file and its captions, before decoding
    path: Path
    captions: list[str]


def load_data(path, *, images=None, min_count: int = 1, image_size: int = IMAGE_SIZE,
              report: Report = warn) -> CaptionData:
    """Read a dataset in any of the three formats; `images` overrides where image files are looked up."""
    path = Path(path)
    problems: list[str] = []

    def note(message: str) -> None:
        problems.append(message)
        report(message)

    images = Path(images) if images is not None else None
    if not path.exists():
        raise TrainingError(f"{path}: no such file or directory (--data takes {FORMATS})")
    if path.is_dir() and (path / "coco.pt").is_file() and not _coco_json_files(path, "train"):
        path = path / "coco.pt"
    if path.is_file() and path.suffix == ".pt":
        data = _load_coco_pt(path, image_size, note)
    else:
        train_json, val_json = _annotation_files(path)
        doc = _read_json(train_json)
        kind = _json_kind(doc)
        if kind == "coco":
            splits = {"train": _parse_coco(train_json, doc, images, note),
                      "val": _parse_coco(val_json, _read_json(val_json), images, note) if val_json else None}
        elif kind == "karpathy":
            splits = _parse_karpathy(train_json, doc, images, note)
        else:
            raise TrainingError(f"{train_json}: unknown annotation format; expected {FORMATS}")
        data = _build(splits, min_count, image_size, note, "coco-json" if kind == "coco" else "karpathy-json", path)
    data.problems = problems
    return data


# ---- coco.pt ----------------------------------------------------------------------------------


def _load_coco_pt(path: Path, image_size: int, note: Report) -> CaptionData:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainingError(f"{path}: holds objects other than tensors, dicts, lists and strings; "
                            f"captool does not unpickle them ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TrainingError(f"{path}: cannot be read as a torch file ({e})") from None
    if not isinstance(blob, dict):
        raise TrainingError(f"{path}: expected a dict with keys {', '.join(COCO_PT_KEYS)}, got {type(blob).__name__}")
    missing = [k for k in COCO_PT_KEYS if k not in blob]
    if missing:
        raise TrainingError(f"{path}: missing keys {', '.join(missing)} (a coco.pt has {', '.join(COCO_PT_KEYS)})")
    vocab_blob = blob["vocab"]
    if not isinstance(vocab_blob, dict) or not isinstance(vocab_blob.get("idx_to_token"), list):
        raise TrainingError(f"{path}: 'vocab' must be a dict with an 'idx_to_token' list")
    try:
        vocab = Vocab([str(t) for t in vocab_blob["idx_to_token"]])
    except ValueError as e:
        raise TrainingError(f"{path}: vocab: {e}") from None
    train = _coco_pt_split(path, blob, "train", vocab, image_size, note)
    val = _coco_pt_split(path, blob, "val", vocab, image_size, note)
    return CaptionData(vocab, train, val, "coco.pt", path)


def _coco_pt_split(path: Path, blob: dict, split: str, vocab: Vocab, image_size: int,
                   note: Report) -> CaptionSplit:
    images, captions = blob[f"{split}_images"], blob[f"{split}_captions"]
    want = (3, image_size, image_size)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and tuple(images.shape[1:]) == want):
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TrainingError(f"{path}: {split}_images must be uint8 [N,{','.join(map(str, want))}], got {got}")
    if not (isinstance(captions, torch.Tensor) and captions.dim() == 2 and not captions.is_floating_point()):
        raise TrainingError(f"{path}: {split}_captions must be an integer tensor [K,{CAPTION_LENGTH}]")
    captions = captions.long()
    if captions.numel() and (captions.min() < 0 or captions.max() >= len(vocab)):
        raise TrainingError(f"{path}: {split}_captions has ids outside the vocabulary (0..{len(vocab) - 1})")
    image_idx = blob.get(f"{split}_image_idx")
    if image_idx is None:
        if captions.shape[0] != images.shape[0]:
            raise TrainingError(f"{path}: {captions.shape[0]} {split}_captions for {images.shape[0]} "
                                f"{split}_images and no {split}_image_idx to pair them")
        image_idx = torch.arange(images.shape[0])
    image_idx = torch.as_tensor(image_idx).long()
    if image_idx.shape != (captions.shape[0],) or (image_idx.numel() and (
            image_idx.min() < 0 or image_idx.max() >= images.shape[0])):
        raise TrainingError(f"{path}: {split}_image_idx must hold one image row (0..{images.shape[0] - 1}) per caption")
    # A row with no word between <START> and <END> teaches nothing but "stop".
    empty = (captions[:, 1] == vocab.end_id) | (captions[:, 1] == vocab.null_id)
    for row in empty.nonzero().flatten().tolist():
        note(f"{path}: {split}_captions row {row}: empty caption, skipped")
    keep = ~empty
    return CaptionSplit(images, captions[keep], image_idx[keep])


# ---- JSON formats -----------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise TrainingError(f"{path}: cannot be read ({e})") from None


def _json_kind(doc) -> Optional[str]:
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)):
        return None
    if isinstance(doc.get("annotations"), list):
        return "coco"
    first = doc["images"][0] if doc["images"] else None
    if isinstance(first, dict) and isinstance(first.get("sentences"), list):
        return "karpathy"
    return None


def _coco_json_files(folder: Path, split: str) -> list[Path]:
    for where in (folder / "annotations", folder):
        found = sorted(where.glob(f"captions_{split}*.json"))
        if found:
            return found
    return []


def _annotation_files(path: Path) -> tuple[Path, Optional[Path]]:
    """The training annotation file and, where there is one, the validation file."""
    if path.is_file():
        if path.suffix != ".json":
            raise TrainingError(f"{path}: not a dataset file; --data takes {FORMATS}")
        sibling = path.with_name(path.name.replace("train", "val"))
        return path, (sibling if "train" in path.name and sibling.is_file() else None)
    train, val = _coco_json_files(path, "train"), _coco_json_files(path, "val")
    if train:
        for found in (train, val):
            if len(found) > 1:
                raise TrainingError(f"{path}: several annotation files ({', '.join(p.name for p in found)}); "
                                    f"pass the one to train on as --data")
        return train[0], (val[0] if val else None)
    karpathy = sorted(path.glob("dataset_*.json"))
    if len(karpathy) == 1:
        return karpathy[0], None
    raise TrainingError(f"{path}: no dataset found (looked for coco.pt, annotations/captions_train*.json and "
                        f"dataset_*.json); --data takes {FORMATS}")


def _field(path: Path, entry, key: str, what: str, index: int):
    if not isinstance(entry, dict) or key not in entry:
        raise TrainingError(f"{path}: {what} #{index} has no '{key}' field; the file is not in the format it claims")
    return entry[key]


def _image_folder(ann_path: Path, file_names: list[str], images: Optional[Path]) -> Path:
    split = ann_path.stem.removeprefix("captions_")  # "train2017", "val", ...
    root = ann_path.parent.parent if ann_path.parent.name == "annotations" else ann_path.parent
    tried = ([images / split, images] if images else []) + [root / split, root / "images" / split, root,
                                                            ann_path.parent]
    probes = file_names[:5]
    for folder in dict.fromkeys(tried):  # ordered, without repeats
        if any((folder / name).is_file() for name in probes):
            return folder
    raise TrainingError(f"{ann_path}: cannot find its images (looked for {probes[0]} in "
                        f"{', '.join(map(str, dict.fromkeys(tried)))}); pass the image folder with --images")


def _parse_coco(ann_path: Path, doc, images: Optional[Path], note: Report) -> list[_ImageCaptions]:
    if _json_kind(doc) != "coco":
        raise TrainingError(f"{ann_path}: not COCO captions JSON ('images' and 'annotations' lists)")
    file_of, order = {}, []
    for i, entry in enumerate(doc["images"]):
        image_id = _field(ann_path, entry, "id", "image", i)
        file_of[image_id] = str(_field(ann_path, entry, "file_name", "image", i))
        order.append(image_id)
    captions: dict = {image_id: [] for image_id in order}
    for i, ann in enumerate(doc["annotations"]):
        image_id = _field(ann_path, ann, "image_id", "annotation", i)
        text = _field(ann_path, ann, "caption", "annotation", i)
        where = f"{ann_path}: annotation {ann.get('id', '#' + str(i))}"
        if image_id not in captions:
            note(f"{where}: image_id {image_id} is not among the images, skipped")
        elif not isinstance(text, str) or not tokenize(text):
            note(f"{where}: empty caption for image {file_of[image_id]}, skipped")
        else:
            captions[image_id].append(text)
    if not order:
        return []
    folder = _image_folder(ann_path, [file_of[i] for i in order], images)
    return [_ImageCaptions(folder / file_of[i], captions[i]) for i in order if captions[i]]


def _parse_karpathy(path: Path, doc, images: Optional[Path], note: Report) -> dict[str, list[_ImageCaptions]]:
    root = images or path.parent
    splits: dict[str, list[_ImageCaptions]] = {"train": [], "val": []}
    for i, entry in enumerate(doc["images"]):
        name = str(_field(path, entry, "filename", "image", i))
        split = _field(path, entry, "split", "image", i)
        texts = []
        for j, sentence in enumerate(_field(path, entry, "sentences", "image", i)):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(map(str, sentence["tokens"]))
            if not isinstance(raw, str) or not tokenize(raw):
                sid = sentence.get("sentid", j) if isinstance(sentence, dict) else j
                note(f"{path}: image {name} sentence {sid}: empty caption, skipped")
            else:
                texts.append(raw)
        target = {"train": "train", "restval": "train", "val": "val"}.get(split)
        if target and texts:
            splits[target].append(_ImageCaptions(root / str(entry.get("filepath", "")) / name, texts))
    return splits


def _decode(items: list[_ImageCaptions], size: int, split: str, note: Report) -> tuple[np.ndarray, list[int]]:
    """Every image through the runtime's preprocess, in threads (Pillow releases the GIL while decoding)."""

    def one(item: _ImageCaptions):
        try:
            return preprocess(item.path, size)
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


def _build(splits: dict, min_count: int, size: int, note: Report, fmt: str, source: Path) -> CaptionData:
    decoded = {}
    for name, items in splits.items():
        if not items:
            continue
        pixels, kept = _decode(items, size, name, note)
        decoded[name] = (pixels, [items[i] for i in kept])
    if "train" not in decoded or not decoded["train"][1]:
        raise TrainingError(f"{source}: no training image with a caption could be read")
    vocab = Vocab.build((c for item in decoded["train"][1] for c in item.captions), min_count)
    result = {}
    for name, (pixels, items) in decoded.items():
        rows = [vocab.encode(c, CAPTION_LENGTH) for item in items for c in item.captions]
        image_idx = [i for i, item in enumerate(items) for _ in item.captions]
        captions = torch.tensor(rows, dtype=torch.long).reshape(-1, CAPTION_LENGTH)  # (K, 17)
        result[name] = CaptionSplit(torch.from_numpy(pixels), captions, torch.tensor(image_idx, dtype=torch.long))
    return CaptionData(vocab, result["train"], result.get("val"), fmt, source)
