"""The gate on a faster JPEG decoding rule: a bundle may name `image.jpeg_decode: "scaled"` only after
its own captions of held-out photos were measured against the full decode and changed on at most
`max_share` of them (default 1%).

Only the images the rule changes count: JPEGs at least twice the model's size on their shorter side
(`captool.preprocess.jpeg_scale` > 1). Others decode the same way under both rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from captool.errors import CaptoolError
from captool.preprocess import JPEG_FORMATS, jpeg_scale, preprocess

from .validate import ExportError, image_files

MAX_CAPTION_CHANGE = 0.01  # "scaled" is accepted if it changes at most this share of held-out captions
MIN_IMAGES = 100  # fewer photos than this cannot show a 1% share
BATCH = 64
EXAMPLES = 5  # changed images named in the report


@dataclass
class DecodeReport:
    """Captions of held-out JPEGs under "scaled" decoding against "full", by the bundle itself."""

    source: str
    images: int  # JPEGs the rule changes (decoded at 1/2 .. 1/8), all of them compared
    changed: int  # of those, captions that differ from the full decode's
    max_share: float
    skipped: int = 0  # files under the folder the rule leaves alone (not JPEG, too small) or unreadable
    examples: list[dict] = field(default_factory=list)  # {"file", "full", "scaled"}

    @property
    def share(self) -> float:
        return self.changed / self.images

    @property
    def ok(self) -> bool:
        return self.share <= self.max_share

    def line(self) -> str:
        return (f"jpeg_decode scaled: {self.changed} of {self.images} held-out JPEGs ({self.share:.2%}) captioned "
                f"otherwise than with the full decode (at most {self.max_share * 100:g}%); {self.source}")

    def to_json(self) -> dict:
        return {**asdict(self), "share": round(self.share, 6), "ok": self.ok, "summary": self.line()}


def scaled_photos(folder: str | Path, size: int) -> tuple[list[Path], int]:
    """The files under `folder` that "scaled" decodes otherwise than "full" (JPEG, shorter side >= 2·size),
    and how many others there were; an ExportError if there are fewer than MIN_IMAGES."""
    from PIL import Image

    chosen, skipped = [], 0
    for path in image_files(folder):
        try:
            with Image.open(path) as img:
                if img.format in JPEG_FORMATS and jpeg_scale(*img.size, size) > 1:
                    chosen.append(path)
                    continue
        except Exception:  # unreadable: preprocess would refuse it under both rules
            pass
        skipped += 1
    if len(chosen) < MIN_IMAGES:
        raise ExportError(f"--jpeg-decode scaled is measured on held-out photos and --images {folder} has "
                          f"{len(chosen)} JPEGs of at least {2 * size} px on the shorter side (it needs {MIN_IMAGES}); "
                          f"pass a folder of such photos, e.g. `captool synth held --train 0 --val 500 --photo 640x480`")
    return chosen, skipped


def check_max_share(max_share: float) -> None:
    if not 0.0 <= max_share < 1.0:
        raise ExportError(f"--max-caption-change must be a share from 0 to below 1, got {max_share}")


def measure(bundle_dir: str | Path, folder: str | Path, max_share: float = MAX_CAPTION_CHANGE,
            progress=None, photos: tuple[list[Path], int] | None = None) -> DecodeReport:
    """Caption every affected JPEG under `folder` with the bundle twice, full and scaled decode;
    `progress(n)` after each batch of n images. `photos`: scaled_photos(folder, size) if already made."""
    from captool.captioner import Captioner

    check_max_share(max_share)
    captioner = Captioner(bundle_dir, device="cpu")
    size = captioner.manifest.image_size
    files, skipped = photos if photos is not None else scaled_photos(folder, size)
    report = DecodeReport(str(folder), len(files), 0, max_share, skipped)
    vocab = captioner.vocab
    for start in range(0, len(files), BATCH):
        chunk = files[start:start + BATCH]
        try:
            full = captioner.generate(np.stack([preprocess(p, size, "full") for p in chunk]))
            scaled = captioner.generate(np.stack([preprocess(p, size, "scaled") for p in chunk]))
        except CaptoolError as e:
            raise ExportError(f"--images {folder}: {e}") from None
        for path, a, b in zip(chunk, full, scaled):
            if not np.array_equal(a, b):
                report.changed += 1
                if len(report.examples) < EXAMPLES:
                    report.examples.append({"file": str(path), "full": vocab.decode(a), "scaled": vocab.decode(b)})
        if progress is not None:
            progress(len(chunk))  # images done
    return report
