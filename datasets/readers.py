"""Captions datasets on disk, read without torch: the file `--data` names, and one record per image.

`captool train` (captool.training.data turns the records into tensors) and `captool eval`
(captool.evaluation scores against them) both read datasets here, so they find the same files:

- `--data` a `.json` file: COCO captions JSON (`{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`) or Karpathy split JSON (`dataset_coco.json` style: `images` with
  `filepath`, `filename`, `split`, `sentences`), told apart by what the file holds.
- `--data` a `.pt` file: the course's coco.pt, which only torch reads (captool.training.data).
- `--data` a folder, for split S: `annotations/captions_S*.json`, else `captions_S*.json` at its top
  level (COCO's `captions_val2017.json`, `captool synth`'s `captions_val.json`); without one, the
  folder's only `dataset_*.json` or `coco.pt`. Two files where one is expected is an error naming both.
  Training given one COCO file takes its validation split from the file named with `train` replaced
  by `val` (`captions_train2017.json` -> `captions_val2017.json`), where there is one.
- Images of a COCO file `captions_<split>.json` are in the first of `<images>/<split>/`, `<images>/`,
  `<root>/<split>/`, `<root>/images/<split>/`, `<root>/` and the JSON's own folder that holds one of
  the first five images with a caption, where `<root>` is the folder above `annotations/` (or the
  JSON's folder) and `<images>` the `--images` option. That is `captool synth`'s layout
  (`OUT/train/000000.png`) and COCO's (`coco/train2017/000000000009.jpg`).
- Images of a Karpathy file are `<images, or the JSON's folder>/<filepath>/<filename>`.

A caption without a word (by captool.vocab.tokenize) and an annotation of an image the file does not
list are passed to `report` and left out; an image left with no caption is left out silently. A file
that is not JSON (or nested too deeply, or over 1 GiB), lacks a field its format needs or holds one of
the wrong type (an id that is a list) is a DataError naming the file, the field and the fix. Images are only located here, never opened: decoding them is the caller's (captool.preprocess).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from captool import files
from captool.errors import DataError
from captool.vocab import tokenize

FORMATS = ("the course's coco.pt, COCO captions JSON (a dataset folder or captions_*.json: images + "
           "annotations) or Karpathy split JSON (dataset_*.json)")
PROBES = 5  # images tried when looking for a COCO file's image folder
MAX_ANNOTATION_BYTES = 1 << 30  # COCO's captions_train2017.json is 92 MB, Karpathy's dataset_coco.json 144 MB

Report = Callable[[str], None]


def ignore(message: str) -> None:
    """The default `report`: problems in the data are left out without a word."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of an annotation file and its reference captions, each with at least one word."""

    image_id: Any  # COCO's id; Karpathy's cocoid, else imgid, else the entry's index
    path: Path
    captions: list[str]
    scene: Optional[dict] = None  # what `captool synth` drew, for fact accuracy
    split: Optional[str] = None  # Karpathy's train/restval/val/test; None in COCO, where a file is a split


@dataclass
class Annotations:
    """One annotation file, read: its format and its captioned images, in file order."""

    source: Path
    format: str  # "coco-json" | "karpathy-json"
    records: list[ImageRecord]

    def of_split(self, *splits: str) -> list[ImageRecord]:
        """The records of these Karpathy splits; a COCO file holds one split, so all of its records."""
        if self.format == "coco-json":
            return list(self.records)
        return [r for r in self.records if r.split in splits]


# ---- which file ---------------------------------------------------------------------------------


def coco_annotations(folder: Path, split: str) -> Optional[Path]:
    """The folder's `annotations/captions_<split>*.json` (or the same at its top level), if any."""
    for where in (folder / "annotations", folder):
        found = sorted(where.glob(f"captions_{split}*.json"))
        if len(found) > 1:
            raise DataError(f"{where}: several {split} annotation files ({', '.join(p.name for p in found)}); "
                               f"pass the one to use as --data")
        if found:
            return found[0]
    return None


def find_dataset(data: Path, split: str) -> Path:
    """The annotation file, or coco.pt, holding `split` of the dataset `data` names (a file is itself)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or directory (--data takes {FORMATS})")
    if data.is_file():
        if data.suffix not in (".json", ".pt"):
            raise DataError(f"{data}: not a dataset file (.json or .pt); --data takes {FORMATS}")
        return data
    found = coco_annotations(data, split)
    if found is not None:
        return found
    others = sorted(data.glob("dataset_*.json")) + [p for p in [data / "coco.pt"] if p.is_file()]
    if len(others) > 1:
        raise DataError(f"{data}: several datasets ({', '.join(p.name for p in others)}) and no "
                           f"captions_{split}*.json; pass the one to use as --data")
    if others:
        return others[0]
    raise DataError(f"{data}: no dataset found for split {split!r} (looked for annotations/captions_{split}*.json, "
                       f"captions_{split}*.json, dataset_*.json and coco.pt); --data takes {FORMATS}")


def sibling(ann_path: Path, split: str) -> Optional[Path]:
    """The COCO file of `split` beside a training file (`train` in its name replaced), if there is one."""
    if "train" not in ann_path.name:
        return None
    other = ann_path.with_name(ann_path.name.replace("train", split))
    return other if other.is_file() else None


def image_folder(ann_path: Path, file_names: list[str], images: Optional[Path] = None) -> Path:
    """The folder holding a COCO file's images, by the rule in this module's docstring."""
    split = ann_path.stem.removeprefix("captions_")  # "train2017", "val", ...
    root = ann_path.parent.parent if ann_path.parent.name == "annotations" else ann_path.parent
    tried = ([images / split, images] if images else []) + [root / split, root / "images" / split, root,
                                                            ann_path.parent]
    tried = list(dict.fromkeys(tried))  # in order, without repeats
    probes = file_names[:PROBES]
    for folder in tried:
        if any((folder / name).is_file() for name in probes):
            return folder
    raise DataError(f"{ann_path}: cannot find its images (looked for {probes[0]} in "
                       f"{', '.join(map(str, tried))}); pass the image folder with --images")


# ---- what it holds ------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return files.read_json(path, what="annotation file", error=DataError, max_bytes=MAX_ANNOTATION_BYTES)


def json_format(doc: Any) -> Optional[str]:
    """The format of a parsed annotation file: "coco-json", "karpathy-json", or None (neither)."""
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)):
        return None
    if isinstance(doc.get("annotations"), list):
        return "coco-json"
    first = doc["images"][0] if doc["images"] else None
    if isinstance(first, dict) and isinstance(first.get("sentences"), list):
        return "karpathy-json"
    return None


def read_annotations(path: Path, *, images: Optional[Path] = None, report: Report = ignore) -> Annotations:
    """A COCO captions or Karpathy JSON file; `images` overrides where its image files are looked up."""
    path = Path(path)
    doc = read_json(path)
    kind = json_format(doc)
    if kind == "coco-json":
        return read_coco(path, doc, images=images, report=report)
    if kind == "karpathy-json":
        return read_karpathy(path, doc, images=images, report=report)
    raise DataError(f"{path}: unknown annotation format; expected {FORMATS}")


def _field(path: Path, entry: Any, key: str, what: str, index: int, kinds: tuple = (), need: str = "") -> Any:
    """entry[key], which must be of one of `kinds` (any type when none are given)."""
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{path}: {what} #{index} has no '{key}' field; the file is not in the format it claims")
    value = entry[key]
    if kinds and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise DataError(f"{path}: {what} #{index} has '{key}' that is not {need} (it is {_json_type(value)}); "
                        f"the file is not in the format it claims")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


ID = ((int, str), "an integer or a string")
NAME = ((str,), "a string (a file name)")


def read_coco(path: Path, doc: Any, *, images: Optional[Path] = None, report: Report = ignore) -> Annotations:
    """The images of a COCO captions JSON (already parsed as `doc`) that have a caption."""
    if json_format(doc) != "coco-json":
        raise DataError(f"{path}: not COCO captions JSON ('images' and 'annotations' lists)")
    entries: dict = {}  # image id -> its entry, in file order
    for i, entry in enumerate(doc["images"]):
        image_id = _field(path, entry, "id", "image", i, *ID)
        _field(path, entry, "file_name", "image", i, *NAME)
        entries[image_id] = entry
    captions: dict = {image_id: [] for image_id in entries}
    for i, ann in enumerate(doc["annotations"]):
        image_id = _field(path, ann, "image_id", "annotation", i, *ID)
        text = _field(path, ann, "caption", "annotation", i)
        where = f"{path}: annotation {ann.get('id', '#' + str(i))}"
        if image_id not in captions:
            report(f"{where}: image_id {image_id} is not among the images, skipped")
        elif not isinstance(text, str) or not tokenize(text):
            report(f"{where}: empty caption for image {entries[image_id]['file_name']}, skipped")
        else:
            captions[image_id].append(text)
    ids = [i for i in entries if captions[i]]
    if not ids:
        return Annotations(path, "coco-json", [])
    names = {i: str(entries[i]["file_name"]) for i in ids}
    folder = image_folder(path, list(names.values()), images)
    return Annotations(path, "coco-json", [ImageRecord(i, folder / names[i], captions[i], entries[i].get("scene"))
                                           for i in ids])


def read_karpathy(path: Path, doc: Any, *, images: Optional[Path] = None, report: Report = ignore) -> Annotations:
    """The images of a Karpathy split JSON (already parsed as `doc`) that have a caption, every split."""
    root = Path(images) if images else path.parent
    records = []
    for k, entry in enumerate(doc["images"]):
        name = _field(path, entry, "filename", "image", k, *NAME)
        split = _field(path, entry, "split", "image", k, (str,), "a string (train, restval, val or test)")
        sentences = _field(path, entry, "sentences", "image", k, (list,), "a list")
        folder = entry.get("filepath", "")
        if not isinstance(folder, str):
            _field(path, entry, "filepath", "image", k, (str,), "a string (a folder name)")
        texts = []
        for j, sentence in enumerate(sentences):
            sentence = sentence if isinstance(sentence, dict) else {}
            raw = sentence.get("raw")
            if not raw and isinstance(sentence.get("tokens"), list):
                raw = " ".join(map(str, sentence["tokens"]))
            if isinstance(raw, str) and tokenize(raw):
                texts.append(raw)
            else:
                report(f"{path}: image {name} sentence {sentence.get('sentid', j)}: empty caption, skipped")
        if texts:
            image_id = entry.get("cocoid", entry.get("imgid", k))
            if "cocoid" in entry or "imgid" in entry:
                _field(path, entry, "cocoid" if "cocoid" in entry else "imgid", "image", k, *ID)
            records.append(ImageRecord(image_id, root / folder / name, texts, split=split))
    return Annotations(path, "karpathy-json", records)
