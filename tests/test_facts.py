"""Fact accuracy: captions parsed into claimed objects and checked against recorded scenes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from captool.errors import CaptoolError
from captool.datasets.facts import Claim, caption_matches_scene, fact_accuracy, load_scenes, parse_objects
from captool.datasets.synth import captions, make_scene, write_dataset


def _scene(*objects: tuple[str, str]) -> dict:
    return {"objects": [{"colour": c, "shape": s, "size": "small"} for c, s in objects]}


@pytest.fixture(scope="module")
def scenes() -> dict[int, dict]:
    rng = np.random.default_rng(11)
    return {i: make_scene(rng) for i in range(400)}


def test_parse_counts_plurals_and_sizes():
    assert parse_objects("two red circles and a small blue square") == [
        Claim("circle", "red"), Claim("circle", "red"), Claim("square", "blue", "small")]
    assert parse_objects("There are three large green crosses.") == [Claim("cross", "green", "large")] * 3
    assert parse_objects("an orange star, then a purple triangle") == [
        Claim("star", "orange"), Claim("triangle", "purple")]


def test_parse_ignores_words_that_name_no_object():
    assert parse_objects("two shapes: a red circle to the left of a blue square") == [
        Claim("circle", "red"), Claim("square", "blue")]
    assert parse_objects("from left to right: a yellow star at the top left") == [Claim("star", "yellow")]
    assert parse_objects("a picture of nothing in particular") == []
    # a shape without a colour is claimed, with no colour, so it can never match a scene object
    assert parse_objects("a circle and a green square") == [Claim("circle", None), Claim("square", "green")]
    # "red" is separated from its shape by "and": only blue is attached to the circle
    assert parse_objects("a red and blue circle") == [Claim("circle", "blue")]


def test_match_needs_the_exact_multiset():
    scene = _scene(("red", "circle"), ("red", "circle"), ("blue", "square"))
    assert caption_matches_scene("two red circles and a blue square", scene)
    assert caption_matches_scene("a blue square, a red circle and a red circle", scene)  # order is free
    assert not caption_matches_scene("a red circle and a blue square", scene)  # count wrong
    assert not caption_matches_scene("three red circles and a blue square", scene)  # extra
    assert not caption_matches_scene("two red circles and a blue star", scene)  # wrong shape
    assert not caption_matches_scene("two red circles and a green square", scene)  # wrong colour
    assert not caption_matches_scene("two circles and a blue square", scene)  # colour missing
    assert not caption_matches_scene("", scene)


def test_generator_references_all_match(scenes):
    assert all(caption_matches_scene(c, s) for s in scenes.values() for c in captions(s))
    refs = {i: captions(s)[0] for i, s in scenes.items()}
    assert fact_accuracy(refs, scenes) == 1.0


def test_a_caption_that_ignores_the_image_scores_badly(scenes):
    counts = Counter(c for s in scenes.values() for c in captions(s))
    for constant, _ in counts.most_common(3):
        accuracy = fact_accuracy({i: constant for i in scenes}, scenes)
        assert accuracy < 0.3, (constant, accuracy)
    # the best constant of all: whatever scene is most common, guessed for every image
    kinds = Counter(tuple(sorted((o["colour"], o["shape"]) for o in s["objects"])) for s in scenes.values())
    assert kinds.most_common(1)[0][1] / len(scenes) < 0.3


def test_shuffled_captions_score_badly(scenes):
    ids = list(scenes)
    shifted = {i: captions(scenes[ids[(k + 1) % len(ids)]])[0] for k, i in enumerate(ids)}
    assert fact_accuracy(shifted, scenes) < 0.3


def test_fact_accuracy_counts_the_share_of_images():
    scenes = {0: _scene(("red", "circle")), 1: _scene(("blue", "star")), 7: _scene(("green", "cross"))}
    predictions = {0: "a red circle", 1: "a blue square", 7: "a green cross"}
    assert fact_accuracy(predictions, scenes) == pytest.approx(2 / 3)


def test_fact_accuracy_refuses_unknown_ids_and_empty_input():
    with pytest.raises(CaptoolError, match=r"image id\(s\) \[5\]"):
        fact_accuracy({5: "a red circle"}, {0: _scene(("red", "circle"))})
    with pytest.raises(CaptoolError, match="at least one"):
        fact_accuracy({}, {0: _scene(("red", "circle"))})


def test_load_scenes_from_a_synth_file_and_refuse_others(tmp_path):
    write_dataset(tmp_path / "shapes", train=3, val=2, seed=0)
    scenes = load_scenes(tmp_path / "shapes" / "annotations" / "captions_val.json")
    assert sorted(scenes) == [0, 1] and all(scene["objects"] for scene in scenes.values())
    plain = tmp_path / "captions_coco.json"
    plain.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(CaptoolError, match="captions_coco.json has no scene facts"):
        load_scenes(plain)
    with pytest.raises(CaptoolError, match="cannot read"):
        load_scenes(tmp_path / "missing.json")
