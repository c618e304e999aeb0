"""Malformed training data: every case is one line on stderr, exit 2, naming the file and the field; no traceback."""

import json
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captool.cli import app  # noqa: E402
from captool.errors import DataError  # noqa: E402
from captool.training.data import load_data  # noqa: E402
from captool.training.errors import TrainingError  # noqa: E402
from captool.vocab import SPECIALS  # noqa: E402

TOKENS = list(SPECIALS) + ["a", "red", "circle"]


def coco_pt(path: Path, **changes) -> Path:
    """A valid 3-image coco.pt, with `changes` applied (a value of None removes the key)."""
    images = torch.zeros(3, 3, 112, 112, dtype=torch.uint8)
    captions = torch.tensor([[1, 4, 5, 6, 2] + [0] * 12] * 3)  # (3, 17): <START> a red circle <END>
    blob = {"train_images": images, "train_captions": captions, "val_images": images[:1],
            "val_captions": captions[:1], "vocab": {"idx_to_token": TOKENS,
                                                    "token_to_idx": {t: i for i, t in enumerate(TOKENS)}}}
    blob.update(changes)
    torch.save({k: v for k, v in blob.items() if v is not None}, path)
    return path


def caption_rows(width: int, n: int = 3, row=(1, 4, 2)) -> torch.Tensor:
    rows = torch.zeros(n, width, dtype=torch.long)  # (n, width)
    rows[:, :min(width, len(row))] = torch.tensor(row[:width])
    return rows


class Unpicklable:
    pass


PT_CASES = {
    "caption width 0": (dict(train_captions=torch.zeros(3, 0, dtype=torch.long)), "train_captions rows are 0 ids wide"),
    "caption width 1": (dict(train_captions=torch.ones(3, 1, dtype=torch.long)), "train_captions rows are 1 ids wide"),
    "caption width 2": (dict(train_captions=caption_rows(2)), "train_captions rows are 2 ids wide"),
    "caption width 517": (dict(train_captions=caption_rows(517)), "train_captions rows are 517 ids wide"),
    "val caption width 1": (dict(val_captions=torch.ones(1, 1, dtype=torch.long)), "val_captions rows are 1 ids wide"),
    "all captions empty": (dict(train_captions=caption_rows(17, row=(1, 2))), "train_captions leaves no training example"),
    "zero examples": (dict(train_images=torch.zeros(0, 3, 112, 112, dtype=torch.uint8),
                           train_captions=caption_rows(17, n=0)), "train_captions leaves no training example"),
    "float captions": (dict(train_captions=torch.ones(3, 17)), "train_captions must be an integer tensor"),
    "1-d captions": (dict(train_captions=torch.ones(17, dtype=torch.long)), "train_captions must be an integer tensor"),
    "captions a list": (dict(train_captions=[[1, 4, 2]] * 3), "train_captions must be an integer tensor"),
    "negative id": (dict(train_captions=caption_rows(17, row=(1, -4, 2))), "train_captions has ids outside"),
    "id past the vocabulary": (dict(train_captions=caption_rows(17, row=(1, 99, 2))), "train_captions has ids outside"),
    "row without <START>": (dict(train_captions=caption_rows(17, row=(5, 4, 2))), "train_captions row 0 starts with id 5"),
    "image_idx of strings": (dict(train_image_idx=["0", "1", "2"]), "train_image_idx must be an integer tensor"),
    "image_idx float": (dict(train_image_idx=torch.zeros(3)), "train_image_idx must be an integer tensor"),
    "image_idx out of range": (dict(train_image_idx=torch.tensor([0, 1, 7])), "train_image_idx must hold one image row"),
    "images float": (dict(train_images=torch.zeros(3, 3, 112, 112)), "train_images must be uint8"),
    "images 64 px": (dict(train_images=torch.zeros(3, 3, 64, 64, dtype=torch.uint8)), "train_images must be uint8"),
    "vocab a string": (dict(vocab="a red circle"), "vocab must be a dict"),
    "vocab of ints": (dict(vocab={"idx_to_token": [0, 1, 2, 3, 4, 5, 6]}), "vocab.idx_to_token entry 0 is int"),
    "vocab without specials": (dict(vocab={"idx_to_token": ["a", "red"]}), "vocab.idx_to_token: vocabulary must start"),
    "missing keys": (dict(vocab=None, val_images=None), "missing keys val_images, vocab"),
}


@pytest.mark.parametrize("case", list(PT_CASES))
def test_malformed_coco_pt(tmp_path, case):
    changes, field = PT_CASES[case]
    path = coco_pt(tmp_path / "coco.pt", **changes)
    with pytest.raises(DataError) as e:
        load_data(path)
    assert isinstance(e.value, TrainingError)  # training's DataError is both
    assert str(path) in str(e.value) and field in str(e.value) and "\n" not in str(e.value)


RAW_PT = {
    "garbage bytes": (b"not a torch file at all", "not a torch file"),
    "empty file": (b"", "not a torch file"),
    "truncated zip": (None, "not a torch file"),
    "zip of something else": (None, "cannot be read as a torch file"),
}


@pytest.mark.parametrize("case", list(RAW_PT) + ["pickled class", "a list, not a dict"])
def test_unreadable_pt_is_one_line_without_torch_warnings(tmp_path, case, recwarn):
    path = tmp_path / "coco.pt"
    if case == "pickled class":
        torch.save({"train_images": Unpicklable()}, path)
        field = "holds objects other than tensors"
    elif case == "a list, not a dict":
        torch.save([1, 2, 3], path)
        field = "expected a dict with keys train_images"
    elif case == "truncated zip":
        coco_pt(path)
        path.write_bytes(path.read_bytes()[:2000])
        field = RAW_PT[case][1]
    elif case == "zip of something else":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
        field = RAW_PT[case][1]
    else:
        data, field = RAW_PT[case]
        path.write_bytes(data)
    with pytest.raises(DataError, match=field) as e:
        load_data(path)
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)
    assert not [w for w in recwarn if "pickle" in str(w.message)]


def coco_dir(root: Path, doc) -> Path:
    """A COCO folder: annotations/captions_train.json holding `doc` (text, bytes or JSON) and one image."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "a.png")
    path = root / "annotations" / "captions_train.json"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def coco(images=None, annotations=None):
    return {"images": images if images is not None else [{"id": 1, "file_name": "a.png"}],
            "annotations": annotations if annotations is not None else [{"image_id": 1, "caption": "a red circle"}]}


def karpathy(**entry):
    """Two images, the second with `entry` applied (the first tells the format apart)."""
    image = {"filename": "a.png", "filepath": "train", "split": "train", "sentences": [{"raw": "a red circle"}]}
    return {"images": [image, {**image, **entry}]}


DEEP = "[" * 100_000 + "]" * 100_000

JSON_CASES = {
    "COCO id a list": (coco(images=[{"id": [1], "file_name": "a.png"}]), "image #0 has 'id' that is not an integer"),
    "COCO id an object": (coco(images=[{"id": {"n": 1}, "file_name": "a.png"}]), "'id' that is not an integer"),
    "COCO id a boolean": (coco(images=[{"id": True, "file_name": "a.png"}]), "'id' that is not an integer"),
    "COCO image_id a list": (coco(annotations=[{"image_id": [1], "caption": "a"}]),
                             "annotation #0 has 'image_id' that is not"),
    "COCO file_name a number": (coco(images=[{"id": 1, "file_name": 7}]), "image #0 has 'file_name' that is not"),
    "COCO without file_name": (coco(images=[{"id": 1}]), "image #0 has no 'file_name' field"),
    "COCO without caption": (coco(annotations=[{"image_id": 1}]), "annotation #0 has no 'caption' field"),
    "COCO all captions empty": (coco(annotations=[{"image_id": 1, "caption": "..."}]),
                                "no training image with a caption"),
    "COCO no annotations": (coco(annotations=[]), "no training image with a caption"),
    "COCO image entry a string": (coco(images=["a.png"]), "image #0 has no 'id' field"),
    "deeply nested JSON": (DEEP, "nested too deeply"),
    "deeply nested caption": ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
                              '[{"image_id": 1, "caption": ' + DEEP + "}]}", "nested too deeply"),
    "not UTF-8": (b'{"images": "\xff\xfe"}', "not UTF-8"),
    "invalid JSON": ('{"images": [', "not valid JSON"),
    "images not a list": ({"images": {"id": 1}, "annotations": []}, "unknown annotation format"),
    "Karpathy sentences a number": (karpathy(sentences=3), "image #1 has 'sentences' that is not a list"),
    "Karpathy filename a list": (karpathy(filename=["a.png"]), "image #1 has 'filename' that is not"),
    "Karpathy split a number": (karpathy(split=1), "image #1 has 'split' that is not"),
    "Karpathy filepath an object": (karpathy(filepath={"x": 1}), "image #1 has 'filepath' that is not"),
    "Karpathy cocoid a list": (karpathy(cocoid=[1]), "image #1 has 'cocoid' that is not"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_malformed_json_dataset_is_one_line_on_the_cli(tmp_path, case):
    doc, field = JSON_CASES[case]
    path = coco_dir(tmp_path / "data", doc)
    if case.startswith("Karpathy"):
        path = path.rename(tmp_path / "data" / "dataset_shapes.json")
        Path(path.parent / "annotations").rename(tmp_path / "data" / "elsewhere")
    result = CliRunner().invoke(app, ["train", "--data", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("captool: error: "), result.stderr
    assert str(path) in errors[0] and field in errors[0], errors[0]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("case", ["caption width 1", "caption width 517", "all captions empty"])
def test_malformed_coco_pt_on_the_cli(tmp_path, case):
    changes, field = PT_CASES[case]
    path = coco_pt(tmp_path / "coco.pt", **changes)
    result = CliRunner().invoke(app, ["train", "--data", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"])
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output  # skipped rows are warned about above
    assert str(path) in errors[0] and field in errors[0] and "Traceback" not in result.output


def test_eval_reads_the_same_errors(tmp_path):
    """`captool eval`'s loader goes through the same readers: a list as an id is the same one line."""
    from captool.evaluation.evaluate import load_eval_set

    path = coco_dir(tmp_path / "data", coco(images=[{"id": [1], "file_name": "a.png"}]))
    path.rename(path.with_name("captions_val.json"))
    with pytest.raises(DataError, match=r"captions_val\.json: image #0 has 'id' that is not an integer"):
        load_eval_set(tmp_path / "data", "val")
