"""`captool bench`'s pipeline section: `captool run` end to end on photo-like files against the model alone.

The bench writes its own photos (no download): smooth random colour fields with edges and sensor
noise, saved as 640×480 JPEGs, 12-megapixel (4000×3000) JPEGs and 112-pixel PNGs, cached in the
temp directory so later runs reuse them. For each kind, one interleaved run alternates
`captool run`'s machinery (expand the folder, the loader's decode threads, `Captioner.generate` per
batch, one JSON record per input) with the model alone on the same images already preprocessed, at
the same batch size. The preprocessing share is one thread's preprocessing time per image over that
plus the model's time per image: the share of the work that the loader must hide.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from captool.errors import CaptoolError

PHOTOS_VERSION = 1  # bump when the generator changes: the cache is keyed by it


@dataclass(frozen=True)
class PhotoKind:
    name: str
    width: int
    height: int
    suffix: str  # ".jpg" (quality 90) or ".png"


KINDS = {k.name: k for k in (PhotoKind("jpeg_640x480", 640, 480, ".jpg"),
                             PhotoKind("jpeg_12mp", 4000, 3000, ".jpg"),
                             PhotoKind("png_112", 112, 112, ".png"))}
DEFAULT_COUNTS = {"jpeg_640x480": 256, "jpeg_12mp": 8, "png_112": 256}


def photo(seed: int, width: int, height: int) -> "Image.Image":
    """A photo-like RGB image: a smooth random colour field (bicubic from a coarse grid), a few hard
    edges, and mild per-pixel noise, so JPEG and PNG compress it as they would a photo."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # (h, w, 3)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(min(width, height) // 10, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)  # (H, W, 3)
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def photo_set(kind: PhotoKind, count: int, root: Optional[Path] = None) -> Path:
    """A folder of `count` photos of this kind, made once and kept under the temp directory."""
    if count < 1:
        raise CaptoolError(f"pipeline image count must be >= 1, got {count} for {kind.name}")
    root = root or Path(tempfile.gettempdir()) / f"captool-bench-photos-v{PHOTOS_VERSION}"
    folder = root / f"{kind.name}-{count}"
    if folder.is_dir() and len(list(folder.glob(f"*{kind.suffix}"))) == count:
        return folder
    work = Path(tempfile.mkdtemp(prefix=f".{kind.name}-", dir=_made(root)))
    for i in range(count):
        image = photo(i, kind.width, kind.height)
        image.save(work / f"{i:05d}{kind.suffix}", **({"quality": 90} if kind.suffix == ".jpg" else {}))
    try:
        work.rename(folder)
    except OSError:  # another bench made it meanwhile: use theirs
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return folder


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_pipeline(captioner, folder: Path, batch_size: int) -> int:
    """`captool run FOLDER --json` after start-up: the records made and serialized; returns their count."""
    from captool.inputs import expand_inputs
    from captool.run import caption_items

    count = 0
    for record in caption_items(captioner, expand_inputs([str(folder)]), batch_size=batch_size):
        if record.error is not None:
            raise CaptoolError(f"pipeline bench: {record.error}")
        record.to_json()
        count += 1
    return count


def run_model(captioner, pixels: np.ndarray, batch_size: int) -> int:
    """The model alone on preprocessed pixels (N, 3, S, S), in batches of `batch_size`."""
    for start in range(0, len(pixels), batch_size):
        captioner.generate(pixels[start:start + batch_size])
    return len(pixels)


def pipeline(captioner, *, counts: Optional[dict[str, int]] = None, batch_size: int = 64, repeats: int = 3,
             root: Optional[Path] = None) -> dict:
    """Per kind: `captool run` images/s against the model's on the same images, interleaved `repeats`
    times (best of each side: the quietest moment of a shared machine), and the preprocessing share."""
    if repeats < 1:
        raise CaptoolError(f"pipeline repeats must be >= 1, got {repeats}")
    out = {"batch_size": batch_size, "repeats": repeats, "jpeg_decode": captioner.manifest.jpeg_decode, "kinds": {}}
    for name, count in (counts or DEFAULT_COUNTS).items():
        if name not in KINDS:
            raise CaptoolError(f"unknown pipeline image kind {name!r}; the kinds are {', '.join(KINDS)}")
        folder = photo_set(KINDS[name], count, root)
        files = sorted(folder.iterdir())
        started = time.perf_counter()
        pixels = np.stack([captioner.preprocess(f) for f in files])  # (N, 3, S, S), one thread, the bundle's rules
        preprocess_s = (time.perf_counter() - started) / len(files)
        run_model(captioner, pixels[:batch_size], batch_size)  # warm-up: this batch shape's buffers
        times: dict[str, list[float]] = {"pipeline": [], "model": []}
        for r in range(repeats):
            sides = ("pipeline", "model") if r % 2 == 0 else ("model", "pipeline")
            for side in sides:
                started = time.perf_counter()
                if side == "pipeline":
                    run_pipeline(captioner, folder, batch_size)
                else:
                    run_model(captioner, pixels, batch_size)
                times[side].append(time.perf_counter() - started)
        pipe, model = (len(files) / min(times[s]) for s in ("pipeline", "model"))
        model_s = 1 / model
        out["kinds"][name] = {"images": len(files), "width": KINDS[name].width, "height": KINDS[name].height,
                              "pipeline_images_per_s": pipe, "model_images_per_s": model,
                              "pipeline_over_model": pipe / model, "preprocess_ms": preprocess_s * 1e3,
                              "preprocess_share": preprocess_s / (preprocess_s + model_s),
                              "folder": str(folder)}
    return out


def pipeline_lines(section: dict) -> list[str]:
    """The section as text lines for `captool bench`'s table."""
    lines = [f"pipeline (`captool run` end to end vs the model alone, batch {section['batch_size']}, best of "
             f"{section['repeats']} interleaved, JPEG decode {section.get('jpeg_decode', 'full')}):",
             f"{'images':<16}{'n':>5}{'run img/s':>11}{'model img/s':>13}{'run/model':>11}{'preprocess':>14}"
             f"{'share':>7}"]
    for name, k in section["kinds"].items():
        lines.append(f"{name:<16}{k['images']:>5}{k['pipeline_images_per_s']:>11,.0f}{k['model_images_per_s']:>13,.0f}"
                     f"{k['pipeline_over_model']:>10.0%} {k['preprocess_ms']:>10.2f} ms{k['preprocess_share']:>7.0%}")
    return lines


def pipeline_counts(images: int) -> dict[str, int]:
    """`--pipeline-images N`: N of each kind, and a 32nd of N (at least 1) of the 12-megapixel JPEGs."""
    if images < 1:
        raise CaptoolError(f"--pipeline-images must be >= 1, got {images}")
    return {"jpeg_640x480": images, "jpeg_12mp": max(1, images // 32), "png_112": images}
