"""Dataset loaders: each format from files written here, and every kind of bad data."""

import json
from pathlib import Path

import numpy as np
import pytest
torch = pytest.importorskip("torch")
from PIL import Image

from captool.preprocess import preprocess
from captool.training.data import load_data
from captool.training.errors import TrainingError
from captool.vocab import Vocab

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def draw(path: Path, colour: str, size=(40, 30)) -> Path:
    """A small non-square picture, so preprocess has to resize and crop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (250, 250, 250))
    img.paste(COLOURS[colour], (5, 5, size[0] // 2, size[1] - 5))
    img.save(path)
    return path


def write_coco(root: Path, split: str, pictures: dict[str, list[str]], folder: str = None) -> Path:
    """COCO captions JSON for `pictures` (file name -> captions) plus the images, named by colour."""
    folder = root / (folder or split)
    images, annotations = [], []
    for i, (name, captions) in enumerate(pictures.items()):
        draw(folder / name, name.split("_")[0])
        images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 30})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "caption": caption})
    ann = root / "annotations" / f"captions_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return ann


TRAIN = {"red_0.png": ["A red square.", "a RED box"], "blue_1.png": ["a blue square"],
         "green_2.png": ["a green square", "green box!"]}
VAL = {"yellow_0.png": ["a yellow square"]}


def test_coco_json_directory(tmp_path):
    write_coco(tmp_path, "train", TRAIN)
    write_coco(tmp_path, "val", VAL)
    data = load_data(tmp_path, min_count=2)
    assert data.format == "coco-json" and data.problems == []
    assert data.train.images.shape == (3, 3, 112, 112) and data.train.images.dtype == torch.uint8
    assert data.train.captions.shape == (5, 17)
    assert data.train.image_idx.tolist() == [0, 0, 1, 2, 2]
    # The runtime's preprocessing, byte for byte.
    assert np.array_equal(data.train.images[1].numpy(), preprocess(tmp_path / "train" / "blue_1.png"))
    assert np.array_equal(data.val.images[0].numpy(), preprocess(tmp_path / "val" / "yellow_0.png"))
    # min_count=2 keeps a/square/red/green/box; blue and yellow appear once and become <UNK>.
    assert set(data.vocab.idx_to_token[4:]) == {"a", "square", "red", "green", "box"}
    assert data.vocab.decode(data.train.captions[0].tolist()) == "a red square"
    assert data.vocab.decode(data.train.captions[2].tolist()) == "a <UNK> square"
    assert data.vocab.decode(data.val.captions[0].tolist()) == "a <UNK> square"
    assert data.train.captions[0].tolist()[:5] == [1, data.vocab.token_to_idx["a"], data.vocab.token_to_idx["red"],
                                                   data.vocab.token_to_idx["square"], 2]


def test_coco_json_file_with_coco_layout(tmp_path):
    """COCO's own layout: annotations/captions_train2017.json and images in train2017/."""
    ann = write_coco(tmp_path, "train2017", TRAIN)
    write_coco(tmp_path, "val2017", VAL)
    data = load_data(ann)
    assert len(data.train) == 5 and len(data.val) == 1
    assert np.array_equal(data.val.images[0].numpy(), preprocess(tmp_path / "val2017" / "yellow_0.png"))


def test_coco_json_images_option(tmp_path):
    ann = write_coco(tmp_path / "ann", "train", TRAIN, folder="../pictures/train")
    with pytest.raises(TrainingError, match=r"cannot find its images.*red_0\.png.*--images"):
        load_data(ann)
    data = load_data(ann, images=tmp_path / "pictures")
    assert len(data.train) == 5 and data.val is None


def test_missing_and_corrupt_images_are_reported_and_skipped(tmp_path, capsys):
    write_coco(tmp_path, "train", TRAIN)
    (tmp_path / "train" / "blue_1.png").unlink()
    (tmp_path / "train" / "green_2.png").write_bytes(b"not a png at all")
    data = load_data(tmp_path)
    assert data.train.images.shape[0] == 1 and data.train.image_idx.tolist() == [0, 0]
    assert np.array_equal(data.train.images[0].numpy(), preprocess(tmp_path / "train" / "red_0.png"))
    err = capsys.readouterr().err
    assert "blue_1.png: no such file" in err and "green_2.png" in err
    assert "2 of 3 train images skipped" in err
    assert len(data.problems) == 3


def test_empty_caption_is_reported_and_skipped(tmp_path, capsys):
    ann = write_coco(tmp_path, "train", {"red_0.png": ["a red square", "  ...  "], "blue_1.png": ["a blue one"]})
    data = load_data(tmp_path)
    assert len(data.train) == 2
    err = capsys.readouterr().err
    assert f"{ann}: annotation 2: empty caption for image red_0.png" in err


def test_no_readable_image_is_an_error(tmp_path):
    write_coco(tmp_path, "train", {"red_0.png": ["a red square"]})
    (tmp_path / "train" / "red_0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(TrainingError, match="no training image with a caption could be read"):
        load_data(tmp_path, report=lambda message: None)


def test_unknown_annotation_shape(tmp_path):
    odd = tmp_path / "captions_train.json"
    odd.write_text(json.dumps({"pictures": [{"file": "a.png", "text": "a cat"}]}))
    with pytest.raises(TrainingError, match=r"captions_train\.json: unknown annotation format; expected .*coco\.pt.*COCO.*Karpathy"):
        load_data(odd)


def test_broken_annotation_file(tmp_path):
    ann = write_coco(tmp_path, "train", TRAIN)
    ann.write_text(ann.read_text()[:-10])
    with pytest.raises(TrainingError, match=r"captions_train\.json: not valid JSON"):
        load_data(tmp_path)
    ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(TrainingError, match=r"image #0 has no 'file_name' field"):
        load_data(tmp_path)


def test_nothing_to_load(tmp_path):
    with pytest.raises(TrainingError, match="no dataset found"):
        load_data(tmp_path)
    with pytest.raises(TrainingError, match="no such file"):
        load_data(tmp_path / "missing.pt")


def test_karpathy_json(tmp_path):
    entries = []
    for i, (colour, split) in enumerate([("red", "train"), ("blue", "restval"), ("green", "val"), ("yellow", "test")]):
        draw(tmp_path / "imgs" / f"{colour}.jpg", colour)
        sentences = [{"raw": f"A {colour} square.", "tokens": ["a", colour, "square"], "sentid": 10 * i},
                     {"raw": "", "tokens": [], "sentid": 10 * i + 1}]
        entries.append({"filepath": "imgs", "filename": f"{colour}.jpg", "split": split, "imgid": i,
                        "sentences": sentences})
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    problems = []
    data = load_data(tmp_path, report=problems.append)
    assert data.format == "karpathy-json"
    assert [data.vocab.decode(c.tolist()) for c in data.train.captions] == ["a red square", "a blue square"]
    assert [data.vocab.decode(c.tolist()) for c in data.val.captions] == ["a <UNK> square"]  # green is a val-only word
    assert "yellow" not in data.vocab.token_to_idx  # the test split stays out of the vocabulary
    assert np.array_equal(data.train.images[1].numpy(), preprocess(tmp_path / "imgs" / "blue.jpg"))
    assert any(f"{ann}: image red.jpg sentence 1: empty caption" in p for p in problems)
    # --images points elsewhere: the same files under another root.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "imgs").rename(moved / "imgs")
    assert len(load_data(ann, images=moved, report=problems.append).train) == 2


def write_coco_pt(path: Path, **changes) -> dict:
    vocab = Vocab(["<NULL>", "<START>", "<END>", "<UNK>", "a", "cat", "dog"])
    rows = torch.tensor([[1, 4, 5, 2] + [0] * 13, [1, 4, 6, 2] + [0] * 13, [1, 2] + [0] * 15])
    blob = {"train_images": torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8), "train_captions": rows,
            "val_images": torch.zeros(1, 3, 112, 112, dtype=torch.uint8), "val_captions": rows[:1].clone(),
            "vocab": {"idx_to_token": vocab.idx_to_token, "token_to_idx": vocab.token_to_idx}}
    blob.update(changes)
    torch.save({k: v for k, v in blob.items() if v is not None}, path)
    return blob


def test_coco_pt(tmp_path, capsys):
    blob = write_coco_pt(tmp_path / "coco.pt")
    data = load_data(tmp_path)  # the directory holding coco.pt
    assert data.format == "coco.pt" and data.vocab.idx_to_token[4:] == ["a", "cat", "dog"]
    assert torch.equal(data.train.images, blob["train_images"])
    assert torch.equal(data.train.captions, blob["train_captions"][:2])  # row 2 has no word
    assert data.train.image_idx.tolist() == [0, 1]
    assert "train_captions row 2: empty caption, skipped" in capsys.readouterr().err
    assert len(data.val) == 1


def test_coco_pt_image_idx(tmp_path):
    write_coco_pt(tmp_path / "coco.pt", train_image_idx=torch.tensor([2, 2, 0]))
    data = load_data(tmp_path / "coco.pt", report=lambda m: None)
    assert data.train.image_idx.tolist() == [2, 2]
    overfit = data.train.first_pairs(1)  # --overfit: one caption per image, only the images used
    assert overfit.images.shape[0] == 1 and torch.equal(overfit.images[0], data.train.images[2])
    assert torch.equal(overfit.captions, data.train.captions[:1]) and overfit.image_idx.tolist() == [0]


def test_first_pairs_takes_one_caption_per_image(tmp_path):
    write_coco(tmp_path, "train", TRAIN)
    data = load_data(tmp_path)
    pairs = data.train.first_pairs(2)
    assert [data.vocab.decode(c.tolist()) for c in pairs.captions] == ["a red square", "a blue square"]
    assert torch.equal(pairs.images, data.train.images[:2]) and pairs.image_idx.tolist() == [0, 1]
    assert len(data.train.first_pairs(10)) == 3  # fewer images than asked: all of them


def test_coco_pt_bad(tmp_path):
    write_coco_pt(tmp_path / "coco.pt", vocab=None, val_images=None)
    with pytest.raises(TrainingError, match=r"coco\.pt: missing keys val_images, vocab"):
        load_data(tmp_path / "coco.pt")
    write_coco_pt(tmp_path / "coco.pt", train_captions=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(TrainingError, match="2 train_captions for 3 train_images and no train_image_idx"):
        load_data(tmp_path / "coco.pt")
    write_coco_pt(tmp_path / "coco.pt", train_images=torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TrainingError, match=r"train_images must be uint8 \[N,3,112,112\]"):
        load_data(tmp_path / "coco.pt")


class Payload:
    """Anything that is not a tensor, dict, list or string must never be unpickled from a data file."""


def test_coco_pt_refuses_pickled_objects(tmp_path):
    write_coco_pt(tmp_path / "coco.pt", extra=Payload())
    with pytest.raises(TrainingError, match="does not unpickle"):
        load_data(tmp_path / "coco.pt")
