"""Writes the conformance images (conformance/images/) and their expected results (vectors.json).

    python conformance/generate.py            # the images only: byte for byte what is committed
    python conformance/generate.py --vectors  # and vectors.json, from captool's runtime and the shipped bundle

Every image is made here, deterministically, from numpy's seeded generator and Pillow's encoders (a
few PNGs are written byte by byte: 16-bit colour, a lying header). `--vectors` records what captool
makes of each one (the preprocessed pixels' sha256, also under the "scaled" JPEG rule where that
differs, the resized size, the shipped bundle's tokens on its own rule's pixels, greedy and beam 3);
docs/bundle-format.md, "Conformance", says how another runtime is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
VECTORS = HERE / "vectors.json"


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): gradients, a few shapes and some noise; small once compressed, hard to resize."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], axis=2)
    for _ in range(3):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(2, max(3, min(width, height) // 2))
        a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    blocks = rng.integers(-24, 25, (height // 8 + 1, width // 8 + 1, 3))  # noise in 8x8 blocks: compresses well
    a = a + blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    return np.clip(a, 0, 255).astype(np.uint8)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, samples: np.ndarray | None, *,
            idat: bytes | None = None) -> bytes:
    """A PNG byte by byte (filter 0 on every row), for what Pillow cannot save: 16-bit colour, a lying header."""
    if idat is None:
        rows = samples.astype(">u2" if bit_depth == 16 else "u1").reshape(height, -1)
        idat = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def saved(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def images() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, what it covers)."""
    out: dict[str, tuple[bytes, str]] = {}
    rgb = lambda w, h, seed: Image.fromarray(scene(w, h, seed))  # noqa: E731

    def add(name: str, data: bytes, what: str) -> None:
        out[name] = (data, what)

    # --- sizes: the size arithmetic, both passes, upscaling, the crop ---------------------------
    for w, h, what in [(112, 112, "exactly S x S: no resize, no crop"),
                       (100, 100, "square, enlarged"),
                       (113, 113, "square, shrunk by one pixel"),
                       (224, 224, "square, halved"),
                       (200, 150, "landscape 4:3 shrunk"),
                       (150, 200, "portrait 3:4 shrunk"),
                       (105, 96, "half-way size: 105*112/96 = 122.5 rounds up to 123"),
                       (96, 105, "half-way size, portrait: H' = 123"),
                       (240, 600, "taller than 2:1, shrunk: Pillow 13 alone would run the vertical pass first"),
                       (120, 250, "taller than 2:1, shrunk, odd crop offset"),
                       (600, 240, "wider than 2:1, shrunk"),
                       (50, 40, "enlarged on both axes"),
                       (112, 300, "shorter side already S: the vertical pass only"),
                       (300, 112, "shorter side already S: the horizontal pass only"),
                       (2000, 20, "100:1, the widest accepted"),
                       (7, 3, "tiny, enlarged 37x")]:
        add(f"size_{w}x{h}.png", saved(rgb(w, h, w * 7919 + h), "PNG"), what)
    add("photo_640x480.jpg", saved(rgb(640, 480, 1), "JPEG", quality=90), "baseline JPEG 4:2:0, shrunk")
    add("progressive_97x131.jpg", saved(rgb(97, 131, 2), "JPEG", quality=85, progressive=True),
        "progressive JPEG, odd size, enlarged")

    # --- modes -----------------------------------------------------------------------------------
    grey = scene(64, 48, 3)[:, :, 0]
    add("mode_L.png", saved(Image.fromarray(grey), "PNG"), "L: grey to R = G = B")
    add("mode_L.jpg", saved(Image.fromarray(grey), "JPEG", quality=90), "L: grey JPEG")
    add("mode_1.png", saved(Image.fromarray(grey > 128), "PNG"), "1: bilevel, 0 or 255")
    add("mode_L_colour_key.png", saved(Image.fromarray(grey & 0xF0), "PNG", transparency=0x80),
        "L with a tRNS colour key: key pixels white")
    add("mode_RGB_colour_key.png", saved(Image.fromarray(scene(64, 48, 4) & 0xC0), "PNG", transparency=(0x40, 0x80, 0xC0)),
        "RGB with a tRNS colour key: key pixels white")
    pal = Image.fromarray(scene(64, 48, 5)).quantize(16, dither=Image.Dither.NONE)
    add("mode_P.png", saved(pal, "PNG"), "P: palette lookup")
    add("mode_P_transparent_index.gif", saved(pal, "GIF", transparency=3), "P (GIF): one transparent index")
    alphas = bytes(range(0, 256, 16))
    add("mode_P_alpha_table.png", saved(pal, "PNG", transparency=alphas), "P (PNG tRNS): an alpha per palette entry")
    a = scene(64, 48, 6)
    rgba = np.dstack([a, np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))])
    add("mode_RGBA.png", saved(Image.fromarray(rgba), "PNG"), "RGBA: every alpha level composited on white")
    add("mode_LA.png", saved(Image.fromarray(rgba[:, :, [0, 3]], "LA"), "PNG"), "LA: composited on white")
    add("mode_RGBA.webp", saved(Image.fromarray(rgba), "WEBP", lossless=True), "RGBA WebP, lossless")
    v16 = (np.arange(64 * 48).reshape(48, 64) * 21 % 65536).astype(np.uint16)
    add("mode_I16.png", raw_png(64, 48, 16, 0, v16), "16-bit grey PNG: (v + 128) // 257")
    add("mode_I16_small.png", raw_png(64, 48, 16, 0, v16 % 256),
        "16-bit grey PNG, every value <= 255: still scaled (Pillow < 11 opens it as I)")
    add("mode_I16.tif", saved(Image.fromarray(v16), "TIFF"), "16-bit grey TIFF (I;16)")
    add("mode_RGB16.png", raw_png(64, 48, 16, 2, (scene(64, 48, 7).astype(np.uint16) * 257 + 99)),
        "48-bit RGB PNG: the high byte of each sample")
    rgba16 = rgba.astype(np.uint16) * 257 + 77
    add("mode_RGBA16.png", raw_png(64, 48, 16, 6, rgba16), "64-bit RGBA PNG: high bytes, then composited")
    add("mode_LA16.png", raw_png(64, 48, 16, 4, rgba16[:, :, [1, 3]]), "32-bit grey+alpha PNG: high bytes, then composited")
    v32 = (np.arange(64 * 48).reshape(48, 64) * 40 - 20000).astype(np.int32)
    add("mode_I32.tif", saved(Image.fromarray(v32), "TIFF"), "32-bit int grey, some values > 255: / 257, clamped")
    add("mode_I32_small.tif", saved(Image.fromarray((v32 % 300).astype(np.int32)), "TIFF"),
        "32-bit int grey, values 0..299: the largest (> 255) decides, / 257")
    add("mode_I32_8bit.tif", saved(Image.fromarray((v32 % 256).astype(np.int32)), "TIFF"),
        "32-bit int grey, every value <= 255: taken as is")
    f = (np.arange(64 * 48).reshape(48, 64) / (64 * 48 - 1)).astype(np.float32)
    add("mode_F_unit.tif", saved(Image.fromarray(f), "TIFF"), "float grey in 0..1: x 255, half to even")
    fbig = (f * 400 - 50).astype(np.float32)
    fbig[0, :8] = np.nan
    add("mode_F_wide_nan.tif", saved(Image.fromarray(fbig), "TIFF"), "float grey beyond 1, NaN: rounded, clamped, NaN black")
    cmyk = np.dstack([scene(64, 48, 8), scene(64, 48, 9)[:, :, 0]])
    add("mode_CMYK.tif", saved(Image.fromarray(cmyk, "CMYK"), "TIFF"), "CMYK TIFF: the plain formula")
    add("mode_CMYK.jpg", saved(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=90), "CMYK JPEG (Adobe, inverted)")

    # --- formats, metadata -----------------------------------------------------------------------
    frames = [Image.fromarray(scene(40, 30, s)) for s in (10, 11)]
    add("animated.gif", saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40),
        "animated GIF: the first frame")
    add("format.bmp", saved(rgb(41, 37, 12), "BMP"), "BMP")
    add("format.ppm", saved(rgb(41, 37, 13), "PPM"), "PPM")
    add("format.pgm", saved(Image.fromarray(grey), "PPM"), "PGM")
    base = rgb(40, 30, 14)
    for o in range(2, 9):
        add(f"exif_orientation_{o}.png", saved(base, "PNG", exif=exif_with(o)), f"EXIF orientation {o} applied")
    icc = bytes(128) + b"acsp" + bytes(124)  # an ICC profile's bytes: carried, never applied
    add("icc_profile.png", saved(rgb(60, 40, 15), "PNG", icc_profile=icc), "an ICC profile: ignored")
    jpeg = saved(rgb(60, 40, 16), "JPEG", quality=90)
    broken = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 10) + b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xf0\x00\x01"
    add("exif_broken.jpg", jpeg[:2] + broken + jpeg[2:], "an EXIF block that cannot be parsed: kept as stored")

    # --- refused ---------------------------------------------------------------------------------
    add("refused_aspect_101x1.png", saved(rgb(101, 1, 17), "PNG"), "error: a side more than 100 times the other")
    add("refused_bomb.png", raw_png(10000, 9000, 8, 0, None, idat=zlib.compress(b"\x00" * 64)),
        "error: 90,000,000 pixels, more than 89,478,485")
    add("refused_truncated.png", saved(rgb(64, 64, 18), "PNG")[:300], "error: truncated data")
    return out


def write_images() -> dict[str, str]:
    IMAGES.mkdir(exist_ok=True)
    made = images()
    for name, (data, _) in made.items():
        (IMAGES / name).write_bytes(data)
    for stale in IMAGES.iterdir():
        if stale.name not in made:
            stale.unlink()
    return {name: what for name, (_, what) in made.items()}


def pixels_sha256(x: np.ndarray) -> str:
    """The sha256 of the encoder input of one image: uint8 [3, S, S], C order (R plane, G plane, B plane)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.uint8).tobytes()).hexdigest()


def write_vectors(whats: dict[str, str]) -> None:
    from captool import Captioner
    from captool.errors import ImageError
    from captool.models import default_bundle
    from captool.preprocess import IMAGE_SIZE, PREPROCESSING, load_image, preprocess, resized_size

    captioner = Captioner(default_bundle(), device="cpu")
    vectors = []
    for name, what in whats.items():
        path = IMAGES / name
        entry = {"file": f"images/{name}", "what": what}
        try:
            x = preprocess(path)
        except ImageError:
            vectors.append({**entry, "error": True})
            continue
        w, h = load_image(path).size
        entry.update(upright=[w, h], resized=list(resized_size(w, h)) if (w, h) != (IMAGE_SIZE,) * 2 else [w, h],
                     sha256=pixels_sha256(x))
        scaled = preprocess(path, IMAGE_SIZE, "scaled")
        if not np.array_equal(scaled, x):  # a JPEG of at least 2S: the "scaled" rule's pixels as well
            entry["sha256_scaled"] = pixels_sha256(scaled)
        bundle_x = captioner.preprocess(path)  # the tokens: the shipped bundle on its own rule's pixels
        for key, beam in (("greedy", 1), ("beam3", 3)):
            entry[key] = captioner.to_caption(captioner.generate(bundle_x[None], beam_size=beam)[0]).tokens
        vectors.append(entry)
    import PIL

    doc = {"preprocessing": PREPROCESSING, "image_size": IMAGE_SIZE, "pillow": PIL.__version__, "bundle": "models/shapes-attention",
           "bundle_encoder_sha256": captioner.manifest.raw["files"]["encoder.onnx"]["sha256"],
           "jpeg_decode": captioner.manifest.jpeg_decode, "vectors": vectors}
    VECTORS.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", action="store_true", help="also write vectors.json (needs captool and onnxruntime)")
    args = parser.parse_args()
    whats = write_images()
    if args.vectors:
        write_vectors(whats)


if __name__ == "__main__":
    main()
