"""`captool synth`: deterministic files, the COCO layout with scene facts, and a careful writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captool.cli import app
from captool.errors import CaptoolError
from captool.datasets.facts import caption_matches_scene
from captool.datasets.synth import COLOURS, GENERATOR, SHAPES, VERSION, captions, make_scene, write_dataset
from captool.vocab import MAX_WORDS, Vocab, tokenize


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    write_dataset(out, train=40, val=10, seed=3)
    return out


def test_same_seed_same_bytes_other_seed_other_files(dataset, tmp_path):
    write_dataset(tmp_path / "again", train=40, val=10, seed=3)
    write_dataset(tmp_path / "other", train=40, val=10, seed=4)
    first, again, other = _digests(dataset), _digests(tmp_path / "again"), _digests(tmp_path / "other")
    assert len(first) == 40 + 10 + 2
    assert first == again
    same = [name for name in first if first[name] == other[name]]
    assert same == []


def test_splits_and_seeds_draw_different_scenes(dataset, tmp_path):
    write_dataset(tmp_path / "heldout", train=40, val=10, seed=4)
    def pngs(root: Path, split: str) -> set[bytes]:
        return {p.read_bytes() for p in (root / split).glob("*.png")}

    train, val = pngs(dataset, "train"), pngs(dataset, "val")
    heldout = pngs(tmp_path / "heldout", "train") | pngs(tmp_path / "heldout", "val")
    assert len(train) == 40 and len(val) == 10
    assert not train & val
    assert not (train | val) & heldout


def test_layout_schema_and_images(dataset):
    for split, n in (("train", 40), ("val", 10)):
        doc = _load(dataset, split)
        assert doc["info"]["generator"] == GENERATOR
        assert doc["info"]["version"] == VERSION and doc["info"]["seed"] == 3
        assert len(doc["images"]) == n
        assert len({im["id"] for im in doc["images"]}) == n
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
        per_image = {im["id"]: 0 for im in doc["images"]}
        for a in doc["annotations"]:
            per_image[a["image_id"]] += 1
        assert min(per_image.values()) >= 3
        for im in doc["images"]:
            with Image.open(dataset / split / im["file_name"]) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (112, 112)
                assert (im["width"], im["height"]) == (112, 112)
            objects = im["scene"]["objects"]
            assert 1 <= len(objects) <= 3
            for o in objects:
                assert o["shape"] in SHAPES and o["colour"] in COLOURS
                assert o["size"] in ("small", "large")
                assert 0 < o["x"] < 112 and 0 < o["y"] < 112
            assert [o["x"] for o in objects] == sorted(o["x"] for o in objects)


def test_every_reference_names_its_scene_and_fits_the_tokenizer(dataset):
    doc = _load(dataset, "train")
    scenes = {im["id"]: im["scene"] for im in doc["images"]}
    for a in doc["annotations"]:
        assert caption_matches_scene(a["caption"], scenes[a["image_id"]]), a
        assert len(tokenize(a["caption"], max_words=99)) <= MAX_WORDS


def test_objects_are_drawn_in_their_colour_where_the_scene_says(dataset):
    doc = _load(dataset, "val")
    for im in doc["images"]:
        pixels = np.asarray(Image.open(dataset / "val" / im["file_name"]), dtype=np.int32)
        for o in im["scene"]["objects"]:
            centre = pixels[round(o["y"]), round(o["x"])]  # inside every shape, star and cross too
            nearest = min(COLOURS, key=lambda c: np.abs(centre - np.array(COLOURS[c])).sum())
            assert nearest == o["colour"], (im["file_name"], o, centre)


def test_captions_are_paraphrases_with_counts_and_sizes():
    scene = {"objects": [
        {"shape": "circle", "colour": "red", "size": "small", "x": 20.0, "y": 20.0, "radius": 9,
         "column": "left", "row": "top"},
        {"shape": "circle", "colour": "red", "size": "large", "x": 56.0, "y": 56.0, "radius": 14,
         "column": "centre", "row": "middle"},
        {"shape": "square", "colour": "orange", "size": "small", "x": 90.0, "y": 90.0, "radius": 9,
         "column": "right", "row": "bottom"}], "background": 100}
    refs = captions(scene)
    assert len(refs) == 5 and len(set(refs)) == 5
    assert refs[0] == "a red circle, a red circle and an orange square"
    assert "two red circles and an orange square" in refs
    assert "a small red circle, a large red circle and a small orange square" in refs


def test_vocabulary_is_small():
    rng = np.random.default_rng(1)
    refs = [c for _ in range(300) for c in captions(make_scene(rng))]
    words = len(Vocab.build(refs)) - 4
    assert 30 <= words <= 60


def test_refuses_a_foreign_directory_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(CaptoolError, match="photos.*not a captool synth dataset.*delete it first"):
        write_dataset(foreign, train=2, val=1, seed=0)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]

    ours = tmp_path / "shapes"
    write_dataset(ours, train=5, val=2, seed=0)
    write_dataset(ours, train=3, val=1, seed=1)  # a smaller rerun leaves no stale images behind
    assert sorted(p.name for p in (ours / "train").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert _load(ours, "train")["info"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "shapes"]  # no temp dirs left


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(CaptoolError, match="--train"):
        write_dataset(tmp_path / "x", train=0, val=0, seed=0)
    with pytest.raises(CaptoolError, match="--train"):
        write_dataset(tmp_path / "x", train=-1, val=3, seed=0)
    with pytest.raises(CaptoolError, match="--seed"):
        write_dataset(tmp_path / "x", train=1, val=1, seed=-1)
    assert not (tmp_path / "x").exists()


def test_an_evaluation_only_set_has_no_training_images(tmp_path):
    write_dataset(tmp_path / "heldout", train=0, val=3, seed=1)
    assert not list((tmp_path / "heldout" / "train").glob("*.png"))
    assert len(_load(tmp_path / "heldout", "val")["images"]) == 3


def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["synth", str(out), "--train", "6", "--val", "2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "6 train + 2 val" in result.output
    assert len(list((out / "train").glob("*.png"))) == 6 and len(list((out / "val").glob("*.png"))) == 2
    assert _load(out, "val")["info"]["seed"] == 5


def test_cli_refusal_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--train", "2"])
    assert result.exit_code == 2
    assert "not a captool synth dataset" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_interrupted_run_leaves_the_previous_dataset_intact(tmp_path):
    out = tmp_path / "shapes"
    write_dataset(out, train=4, val=2, seed=0)
    before = _digests(out)

    def interrupt(split, done, total):
        if split == "val":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, train=6, val=2, seed=9, progress=interrupt)
    assert _digests(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
