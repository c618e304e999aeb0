"""Fact accuracy: does a caption name exactly the objects of a `captool synth` scene?

BLEU rewards a caption that shares words with the references; it does not notice "a red circle" for
a blue one. Here a caption is parsed into the objects it claims (count-expanded, with the
generator's own vocabulary) and compared with the scene's recorded objects as a multiset of
(colour, shape): none missing, none extra, counts right. Sizes and positions are parsed but not
judged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from captool.errors import CaptoolError
from .synth import COLOURS, NUMBER_WORDS, PLURALS, SHAPES, SIZES
from captool.vocab import tokenize

_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


class Claim(NamedTuple):
    """One object a caption claims; colour or size is None where the caption does not say."""

    shape: str
    colour: Optional[str]
    size: Optional[str] = None


def parse_objects(caption: str) -> list[Claim]:
    """The objects a caption names, one Claim per object: "two red circles" gives two.

    A noun phrase is [number] [size] [colour] shape; any other word ends the phrase, so "two
    shapes: a red circle" claims one object ("shapes" names no shape). A phrase with no number
    claims one object.
    """
    claims: list[Claim] = []
    count, size, colour = None, None, None
    for word in tokenize(caption, max_words=10_000):
        if word in NUMBER_WORDS:
            count, size, colour = NUMBER_WORDS[word], None, None
        elif word in SIZES:
            size = word
        elif word in COLOURS:
            colour = word
        elif word in _SHAPE_OF:
            claims.extend([Claim(_SHAPE_OF[word], colour, size)] * (count or 1))
            count, size, colour = None, None, None
        else:
            count, size, colour = None, None, None
    return claims


def _objects_of(scene: Mapping) -> Counter:
    try:
        return Counter((o["colour"], o["shape"]) for o in scene["objects"])
    except (KeyError, TypeError):
        raise CaptoolError(f"a scene must be {{'objects': [{{'shape', 'colour', ...}}]}}, "
                           f"got {scene!r:.80}") from None


def caption_matches_scene(caption: str, scene: Mapping) -> bool:
    """True when the caption names exactly the scene's objects, each with its right colour and shape."""
    return Counter((c.colour, c.shape) for c in parse_objects(caption)) == _objects_of(scene)


def fact_accuracy(predictions: Mapping[int, str], scenes: Mapping[int, Mapping]) -> float:
    """Share of predicted captions (image id -> caption) that match their image's scene exactly."""
    if not predictions:
        raise CaptoolError("fact accuracy needs at least one predicted caption, got none")
    missing = [i for i in predictions if i not in scenes]
    if missing:
        raise CaptoolError(f"no scene facts for image id(s) {missing[:5]}: predictions and scenes must "
                           "come from the same captool synth split")
    hits = sum(caption_matches_scene(caption, scenes[i]) for i, caption in predictions.items())
    return hits / len(predictions)


def load_scenes(annotation_file) -> dict[int, dict]:
    """Image id -> scene from a `captool synth` annotation file (OUT/annotations/captions_SPLIT.json)."""
    path = Path(annotation_file)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CaptoolError(f"cannot read scene facts from {path}: {e}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(im, dict) and "scene" in im for im in images):
        raise CaptoolError(f"{path} has no scene facts (images[].scene): fact accuracy needs a dataset "
                           "written by `captool synth`")
    return {im["id"]: im["scene"] for im in images}

