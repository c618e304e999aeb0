"""The shared dataset reader: which file `--data` names, where the images are, records and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captool.datasets.readers import (Annotations, coco_annotations, find_dataset, image_folder, read_annotations,
                              sibling)
from captool.errors import CaptoolError


def touch(path: Path) -> Path:
    """An image file as the reader sees it: it locates images, it never opens them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def coco_doc(names: list[str], captions: dict[int, list[str]], scene: bool = False) -> dict:
    images = [{"id": 10 + i, "file_name": n, **({"scene": {"objects": [i]}} if scene else {})}
              for i, n in enumerate(names)]
    annotations = [{"id": len(images) * 100 + k, "image_id": image_id, "caption": text}
                   for k, (image_id, text) in enumerate((i, t) for i, ts in captions.items() for t in ts)]
    return {"images": images, "annotations": annotations}


def karpathy_doc() -> dict:
    return {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "val", "cocoid": 7,
         "sentences": [{"raw": "A red circle.", "sentid": 1}, {"raw": "", "tokens": ["red", "disc"], "sentid": 2}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "imgid": 3,
         "sentences": [{"raw": "", "tokens": [], "sentid": 5}, {"raw": "a blue square"}]},
        {"filename": "c.jpg", "split": "train", "sentences": [{"tokens": ["two", "stars"]}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": " ... "}]},
    ]}


# ---- which file ---------------------------------------------------------------------------------


def test_find_dataset_in_a_folder(tmp_path):
    synth = write_json(tmp_path / "synth" / "annotations" / "captions_val.json", {})
    assert find_dataset(tmp_path / "synth", "val") == synth
    flat = write_json(tmp_path / "flat" / "captions_train2017.json", {})
    assert find_dataset(tmp_path / "flat", "train") == flat and coco_annotations(tmp_path / "flat", "val") is None
    karpathy = write_json(tmp_path / "k" / "dataset_flickr8k.json", {})
    assert find_dataset(tmp_path / "k", "test") == karpathy
    touch(tmp_path / "pt" / "coco.pt")
    assert find_dataset(tmp_path / "pt", "train") == tmp_path / "pt" / "coco.pt"
    # A COCO folder's own annotations win over anything else in it.
    touch(tmp_path / "synth" / "coco.pt")
    assert find_dataset(tmp_path / "synth", "val") == synth


def test_a_file_is_taken_as_it_is(tmp_path):
    ann = write_json(tmp_path / "annotations" / "captions_train2017.json", {})
    assert find_dataset(ann, "val") == ann  # eval of a named file scores that file, whatever --split says
    assert sibling(ann, "val") is None
    val = write_json(tmp_path / "annotations" / "captions_val2017.json", {})
    assert sibling(ann, "val") == val and sibling(val, "val") is None


def test_ambiguous_or_missing_dataset_is_one_line_error(tmp_path):
    with pytest.raises(CaptoolError, match=r"nope: no such file or directory \(--data takes .*coco\.pt"):
        find_dataset(tmp_path / "nope", "val")
    notes = touch(tmp_path / "notes.txt")
    with pytest.raises(CaptoolError, match=r"notes\.txt: not a dataset file \(\.json or \.pt\)"):
        find_dataset(notes, "val")
    with pytest.raises(CaptoolError, match=r"no dataset found for split 'test' .*captions_test\*\.json") as e:
        find_dataset(tmp_path, "test")
    assert "\n" not in str(e.value)
    write_json(tmp_path / "annotations" / "captions_val2014.json", {})
    write_json(tmp_path / "annotations" / "captions_val2017.json", {})
    with pytest.raises(CaptoolError, match=r"several val annotation files \(captions_val2014\.json, "
                                           r"captions_val2017\.json\); pass the one to use as --data"):
        find_dataset(tmp_path, "val")
    write_json(tmp_path / "dataset_coco.json", {})
    touch(tmp_path / "coco.pt")
    with pytest.raises(CaptoolError, match=r"several datasets \(dataset_coco\.json, coco\.pt\)"):
        find_dataset(tmp_path, "train")


# ---- where the images are -----------------------------------------------------------------------


def test_image_folder_follows_the_readme_layouts(tmp_path):
    names = ["000000.png", "000001.png"]
    touch(tmp_path / "synth" / "val" / "000001.png")  # one of the first five images is enough
    assert image_folder(tmp_path / "synth" / "annotations" / "captions_val.json", names) == tmp_path / "synth" / "val"
    touch(tmp_path / "coco" / "images" / "train2017" / "000000.png")
    assert image_folder(tmp_path / "coco" / "annotations" / "captions_train2017.json", names) == \
        tmp_path / "coco" / "images" / "train2017"
    touch(tmp_path / "beside" / "000000.png")
    assert image_folder(tmp_path / "beside" / "captions_val.json", names) == tmp_path / "beside"
    # An explicit images dir comes first, with or without the split folder inside it.
    touch(tmp_path / "pics" / "000000.png")
    assert image_folder(tmp_path / "synth" / "annotations" / "captions_val.json", names,
                        tmp_path / "pics") == tmp_path / "pics"
    touch(tmp_path / "pics" / "val" / "000000.png")
    assert image_folder(tmp_path / "synth" / "annotations" / "captions_val.json", names,
                        tmp_path / "pics") == tmp_path / "pics" / "val"


def test_images_not_found_names_the_file_the_folders_and_the_fix(tmp_path):
    ann = tmp_path / "annotations" / "captions_val.json"
    with pytest.raises(CaptoolError) as e:
        image_folder(ann, ["000000.png"], tmp_path / "pics")
    message = str(e.value)
    assert message.startswith(f"{ann}: cannot find its images (looked for 000000.png in {tmp_path / 'pics' / 'val'}, ")
    assert f"{tmp_path / 'val'}, " in message and message.endswith("pass the image folder with --images")


# ---- what the files hold ------------------------------------------------------------------------


def test_coco_records_skip_and_report_empty_and_unknown(tmp_path):
    doc = coco_doc(["a.png", "b.png", "c.png"], {10: ["A red circle.", "  !? "], 11: ["two blue squares"]},
                   scene=True)
    doc["annotations"].append({"id": 99, "image_id": 42, "caption": "a ghost"})
    ann = write_json(tmp_path / "annotations" / "captions_val.json", doc)
    for name in ("a.png", "b.png", "c.png"):
        touch(tmp_path / "val" / name)
    problems: list[str] = []
    got = read_annotations(ann, report=problems.append)
    assert isinstance(got, Annotations) and got.format == "coco-json" and got.source == ann
    assert [r.image_id for r in got.records] == [10, 11]  # c.png has no caption: nothing to learn or score
    assert got.records[0].path == tmp_path / "val" / "a.png"
    assert got.records[0].captions == ["A red circle."] and got.records[1].captions == ["two blue squares"]
    assert got.records[1].scene == {"objects": [1]} and got.records[0].split is None
    assert got.of_split("anything") == got.records  # a COCO file is one split
    assert problems == [f"{ann}: annotation 301: empty caption for image a.png, skipped",
                        f"{ann}: annotation 99: image_id 42 is not among the images, skipped"]


def test_karpathy_records_keep_every_split(tmp_path):
    ann = write_json(tmp_path / "dataset_coco.json", karpathy_doc())
    problems: list[str] = []
    got = read_annotations(ann, report=problems.append)
    assert got.format == "karpathy-json"
    assert [(r.image_id, r.split) for r in got.records] == [(7, "val"), (3, "restval"), (2, "train")]
    assert got.records[0].captions == ["A red circle.", "red disc"]  # an empty raw falls back to its tokens
    assert got.records[0].path == tmp_path / "val2014" / "a.jpg" and got.records[2].path == tmp_path / "c.jpg"
    assert [r.image_id for r in got.of_split("train", "restval")] == [3, 2]
    assert problems == [f"{ann}: image b.jpg sentence 5: empty caption, skipped",
                        f"{ann}: image d.jpg sentence 0: empty caption, skipped"]
    moved = read_annotations(ann, images=tmp_path / "elsewhere")
    assert moved.records[1].path == tmp_path / "elsewhere" / "train2014" / "b.jpg"


@pytest.mark.parametrize("text, message", [
    ('{"images": [', r"bad\.json: not valid JSON \(Expecting value at line 1 column 13\)"),
    ('{"pictures": []}', r"bad\.json: unknown annotation format; expected .*COCO.*Karpathy"),
    ('{"images": [{"file_name": "a.png"}], "annotations": []}', r"bad\.json: image #0 has no 'id' field"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]}',
     r"bad\.json: annotation #0 has no 'caption' field"),
    ('{"images": [{"filename": "a.jpg", "sentences": []}]}', r"bad\.json: image #0 has no 'split' field"),
    ('{"images": [{"sentences": [], "split": "val", "filename": "a.jpg"}, {"sentences": 3, "split": "val", '
     '"filename": "b.jpg"}]}', r"bad\.json: image #1 has 'sentences' that is not a list"),
])
def test_malformed_files_are_one_line_errors(tmp_path, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(CaptoolError, match=message) as e:
        read_annotations(bad)
    assert "\n" not in str(e.value)


def test_reader_needs_no_torch(tmp_path):
    write_json(tmp_path / "dataset_coco.json", karpathy_doc())
    code = ("import sys; sys.modules['torch'] = None\n"
            "from captool.datasets.readers import find_dataset, read_annotations\n"
            f"print(len(read_annotations(find_dataset({str(tmp_path)!r}, 'val')).records))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
