"""`captool synth`: shape scenes with paraphrased reference captions and recorded facts, in COCO format.

A scene holds one to three coloured shapes, each in its own column of a 3×3 grid, so "left to right"
is always well defined. Every reference caption names every object with its colour and shape, which
is what `captool.datasets.facts` checks model captions against. Everything is drawn from per-image numpy
Generators derived from the seed, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from captool.errors import CaptoolError
from captool.files import hold, make_temp_dir, read_json, remove_stale, restore_aside, swap_into_place, write_json
from captool.preprocess import IMAGE_SIZE
from captool.vocab import MAX_WORDS, Vocab, tokenize

GENERATOR = "captool synth"
VERSION = 1  # bump when the same seed would draw different scenes or captions

# The words of the scene world; captool.datasets.facts parses captions with these same tables.
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235),
           "yellow": (240, 215, 40), "purple": (150, 60, 200), "orange": (250, 140, 30)}
SIZES = {"small": (8, 10), "large": (13, 15)}  # circumradius in pixels, inclusive range
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
COUNT_WORD = {1: "one", 2: "two", 3: "three"}
COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")
POSITION_PHRASE = {
    ("top", "left"): "at the top left", ("top", "centre"): "at the top",
    ("top", "right"): "at the top right", ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}

_SPLITS = {"train": 0, "val": 1}  # spawn keys: the two splits never share a scene draw
_MARGIN = 2  # pixels kept free at the image border
_SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: cheap antialiasing
PHOTO_QUALITY = 90  # --photo files: JPEG quality, a camera's usual setting
MAX_PHOTO_SIDE = 8192
_DUPLICATE_P = 0.15  # chance that an object copies another's colour and shape, so counts occur

Progress = Callable[[str, int, int], None]


def make_scene(rng: np.random.Generator) -> dict:
    """One to three objects in distinct columns, ordered left to right."""
    n = int(rng.integers(1, 4))
    columns = sorted(rng.choice(3, size=n, replace=False).tolist())
    cell = (IMAGE_SIZE - 2 * _MARGIN) / 3
    objects = []
    for k, col in enumerate(columns):
        if k > 0 and rng.random() < _DUPLICATE_P:
            twin = objects[int(rng.integers(k))]
            shape, colour = twin["shape"], twin["colour"]
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = "small" if rng.random() < 0.5 else "large"
        radius = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        row = int(rng.integers(3))
        slack = max(0.0, cell / 2 - 1.1 * radius)  # stays inside its cell: objects never overlap
        x = _MARGIN + cell * (col + 0.5) + rng.uniform(-slack, slack)
        y = _MARGIN + cell * (row + 0.5) + rng.uniform(-slack, slack)
        objects.append({"shape": shape, "colour": colour, "size": size, "x": round(float(x), 1),
                        "y": round(float(y), 1), "radius": radius, "column": COLUMNS[col],
                        "row": ROWS[row]})
    return {"objects": objects, "background": int(rng.integers(60, 191))}


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (x, y) with circumradius about r (y grows down)."""
    if shape == "square":
        h = 0.85 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        angles = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        radii = np.full(3, 1.1 * r)
        y += 0.275 * r  # centre the bounding box on (x, y), not the centroid
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * r)
    elif shape == "cross":
        a, w = 0.95 * r, 0.33 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w),
               (-a, w), (-a, -w), (-w, -w)]
        return [(x + dx, y + dy) for dx, dy in pts]
    else:
        raise AssertionError(f"no outline for {shape}")
    return [(x + float(rr * np.cos(t)), y - float(rr * np.sin(t))) for rr, t in zip(radii, angles)]


def draw_scene(scene: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as a size×size RGB image (112 in the datasets): grey background with a faint smooth
    texture. Larger sizes draw the same scene with finer edges (fewer supersamples: ~448 px each way)."""
    s = max(1, round(_SUPERSAMPLE * IMAGE_SIZE / size))  # 4 at 112, 1 from 448
    k = size / IMAGE_SIZE  # scene coordinates are in 112-pixel units
    grey = scene["background"]
    canvas = Image.new("RGB", (size * s, size * s), (grey, grey, grey))
    pen = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        shade = np.array(COLOURS[obj["colour"]]) + rng.integers(-12, 13, size=3)
        fill = tuple(int(v) for v in np.clip(shade, 0, 255))
        x, y, r = obj["x"] * s * k, obj["y"] * s * k, obj["radius"] * s * k
        if obj["shape"] == "circle":
            pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            pen.polygon(_outline(obj["shape"], x, y, r), fill=fill)
    pixels = np.asarray(canvas.reduce(s), dtype=np.int16)  # (size, size, 3)
    coarse = rng.normal(0.0, 6.0, size=(4, 4)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))  # (size, size)
    pixels = pixels + np.rint(texture).astype(np.int16)[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def draw_photo(scene: dict, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """The scene as a width×height photo: drawn as a square of the shorter side, centred on its
    background, so captool's centre crop sees the scene whole and a 112-pixel crop matches the dataset's."""
    side = min(width, height)
    canvas = Image.new("RGB", (width, height), (scene["background"],) * 3)
    canvas.paste(draw_scene(scene, rng, side), ((width - side) // 2, (height - side) // 2))
    return canvas


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(obj: dict, sized: bool = False) -> str:
    words = ([obj["size"]] if sized else []) + [obj["colour"], obj["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _counted(objects: list[dict]) -> list[str]:
    """"two red circles", grouped by colour and shape, in order of first appearance left to right."""
    groups = Counter((o["colour"], o["shape"]) for o in objects)
    out = []
    for (colour, shape), n in groups.items():
        out.append(f"{_article(colour)} {colour} {shape}" if n == 1
                   else f"{COUNT_WORD[n]} {colour} {PLURALS[shape]}")
    return out


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(scene: dict, count: int = 5) -> list[str]:
    """`count` distinct reference captions, each naming every object with its colour and shape."""
    objs = scene["objects"]
    listed = _join([_noun(o) for o in objs])
    sized = _join([_noun(o, sized=True) for o in objs])
    counted = _join(_counted(objs))
    n_shapes = f"{COUNT_WORD[len(objs)]} shape{'s' if len(objs) > 1 else ''}"
    where = [POSITION_PHRASE[o["row"], o["column"]] for o in objs]
    if len(objs) == 1:
        candidates = [listed, sized, f"{listed} {where[0]}", f"there is {sized} {where[0]}",
                      f"{n_shapes}: {listed}"]
    elif len(objs) == 2:
        a, b = (_noun(o) for o in objs)
        candidates = [listed, counted, sized, f"{a} to the left of {b}",
                      f"{a} {where[0]} and {b} {where[1]}", f"{n_shapes}: {listed}"]
    else:
        candidates = [listed, counted, sized, f"{n_shapes}: {listed}", f"from left to right: {listed}",
                      " then ".join(_noun(o) for o in objs)]
    unique = list(dict.fromkeys(candidates))[:count]
    assert all(len(tokenize(c, max_words=99)) <= MAX_WORDS for c in unique), unique
    return unique


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Image `index` of `split` gets its own stream, so images do not depend on how many come before."""
    entropy = np.random.SeedSequence(seed, spawn_key=(_SPLITS[split], index))
    return np.random.Generator(np.random.PCG64(entropy))


def generate(seed: int, split: str, count: int,
             photo: Optional[tuple[int, int]] = None) -> Iterator[tuple[Image.Image, dict, list[str]]]:
    """(image, scene, captions) for images 0..count-1 of a split; image i depends only on (seed, split, i).
    `photo` (width, height): each scene drawn at that size (draw_photo) instead of 112×112."""
    for i in range(count):
        rng = _image_rng(seed, split, i)
        scene = make_scene(rng)
        image = draw_scene(scene, rng) if photo is None else draw_photo(scene, rng, *photo)
        yield image, scene, captions(scene)


def _write_split(root: Path, split: str, count: int, seed: int, progress: Optional[Progress],
                 photo: Optional[tuple[int, int]] = None) -> list[str]:
    (root / split).mkdir()
    images, annotations = [], []
    width, height = photo or (IMAGE_SIZE, IMAGE_SIZE)
    for i, (image, scene, refs) in enumerate(generate(seed, split, count, photo)):
        if photo is None:
            name = f"{i:06d}.png"
            image.save(root / split / name, format="PNG", compress_level=1)  # no tIME chunk: reproducible
        else:
            name = f"{i:06d}.jpg"
            image.save(root / split / name, format="JPEG", quality=PHOTO_QUALITY)
        images.append({"id": i, "file_name": name, "width": width, "height": height, "scene": scene})
        annotations.extend({"id": len(annotations) + k, "image_id": i, "caption": c}
                           for k, c in enumerate(refs))
        if progress is not None:
            progress(split, i + 1, count)
    info = {"description": "procedurally generated shape scenes", "generator": GENERATOR,
            "version": VERSION, "seed": seed, "split": split, "image_size": IMAGE_SIZE,
            **({"photo": f"{width}x{height}"} if photo else {})}
    doc = {"info": info, "images": images, "annotations": annotations}
    write_json(root / "annotations" / f"captions_{split}.json", doc, indent=None, durable=False)
    return [a["caption"] for a in annotations]


def is_synth_output(out: Path) -> bool:
    """True when `out` holds exactly what a previous `captool synth` wrote (so it may be replaced)."""
    if not out.is_dir() or not set(os.listdir(out)) <= {"train", "val", "annotations"}:
        return False
    try:
        info = read_json(out / "annotations" / "captions_train.json")["info"]
        return info.get("generator") == GENERATOR
    except (CaptoolError, KeyError, TypeError, AttributeError):
        return False


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CaptoolError(f"{out} is a file, not a directory: choose a directory path for the dataset")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out):
        raise CaptoolError(f"{out} is not empty and is not a captool synth dataset; refusing to "
                           "overwrite it: choose a new or empty directory, or delete it first")


def write_dataset(out, *, train: int, val: int, seed: int, progress: Optional[Progress] = None,
                  photo: Optional[tuple[int, int]] = None) -> str:
    """Write OUT/{train,val}/*.png and OUT/annotations/captions_{train,val}.json; return a summary line.

    `photo` (width, height): the scenes drawn at that size and saved as JPEG (quality PHOTO_QUALITY), the
    size and format of camera files, for measuring decoding (export --jpeg-decode, bench) on known scenes.

    The dataset is built in a hidden directory beside `out` and renamed into place when complete, so
    an interrupted run leaves `out` as it was. A previous synth output at `out` is replaced; any other
    non-empty directory is refused.
    """
    out = Path(out)
    if train < 0 or val < 0 or train + val < 1:
        raise CaptoolError(f"--train and --val must be >= 0 with at least one image in all, got train={train}, "
                           f"val={val}")
    if seed < 0:
        raise CaptoolError(f"--seed must be a non-negative integer, got {seed}")
    if photo is not None and not (IMAGE_SIZE <= min(photo) and max(photo) <= MAX_PHOTO_SIDE):
        raise CaptoolError(f"--photo must be WIDTHxHEIGHT with sides from {IMAGE_SIZE} to {MAX_PHOTO_SIDE}, "
                           f"got {photo[0]}x{photo[1]}")
    started = time.time()  # what killed runs left: the old dataset put back, temporary directories removed
    restore_aside(out)
    remove_stale(out, "synth-", older_than=started)
    remove_stale(out, "old-", older_than=started)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    building = make_temp_dir(out, "synth-")
    busy = hold(building)  # remove_stale leaves a directory alone while a run holds it
    try:
        (building / "annotations").mkdir()
        refs = _write_split(building, "train", train, seed, progress, photo)
        refs += _write_split(building, "val", val, seed, progress, photo)
        swap_into_place(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        os.close(busy)
    seconds = time.perf_counter() - start
    words = len(Vocab.build(refs)) - 4
    return (f"wrote {train} train + {val} val images ({len(refs)} captions, {words} words) to {out} "
            f"in {seconds:.1f} s ({(train + val) / seconds:.0f} images/s), seed {seed}")
