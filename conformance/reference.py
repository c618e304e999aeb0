"""docs/bundle-format.md's preprocessing written out from the text alone, in plain numpy: no Pillow resize or convert.

A second implementation of the spec, for two uses: the tests compare it with captool's runtime on
every conformance image (so the document and the code cannot drift apart), and another runtime's
author can read the algorithm as code. Decoding and EXIF stay Pillow's (they are codecs, not
arithmetic); everything after the decode is here. Slow and plain on purpose.
"""

from __future__ import annotations

import math

import numpy as np

PRECISION_BITS = 22  # fixed-point weights: 1.0 is 2**22


def jpeg_scale(width: int, height: int, size: int) -> int:
    """image.jpeg_decode "scaled": libjpeg decodes at 1/s, s the largest of 8, 4, 2, 1 with 2·s·size <= the
    shorter stored side (1 when none is); the decoded image is ceil(W/s) × ceil(H/s)."""
    for s in (8, 4, 2):
        if 2 * s * size <= min(width, height):
            return s
    return 1


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The shorter side becomes `size`; each side is round-half-up(side * size / shorter), in integers."""
    m = min(width, height)
    return (2 * width * size + m) // (2 * m), (2 * height * size + m) // (2 * m)


def weights(in_size: int, out_size: int) -> list[tuple[int, list[int]]]:
    """For each output index: (first input index, fixed-point weights of the inputs from there on)."""
    scale = in_size / out_size  # float64
    support = max(scale, 1.0)  # the triangle's half-width: 1 input pixel, widened when shrinking
    inv = 1.0 / support
    out = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(0, math.floor(center - support + 0.5))
        hi = min(in_size, math.floor(center + support + 0.5))
        w = []
        for x in range(lo, hi):
            t = abs(((x - center) + 0.5) * inv)
            w.append(1.0 - t if t < 1.0 else 0.0)
        total = 0.0
        for v in w:  # in order: the float sum depends on it
            total += v
        if total != 0.0:
            w = [v / total for v in w]
        out.append((lo, [math.floor(v * (1 << PRECISION_BITS) + 0.5) for v in w]))
    return out


def resize_axis(a: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One pass along `axis` of a uint8 array: sum of pixel x weight, plus half, >> 22, clamped to 0..255."""
    a = np.moveaxis(a, axis, 0)
    k = np.zeros((out_size, a.shape[0]), dtype=np.float64)  # exact: every product and sum is an integer < 2**53
    for i, (lo, w) in enumerate(weights(a.shape[0], out_size)):
        k[i, lo:lo + len(w)] = w
    acc = np.tensordot(k, a.astype(np.float64), axes=(1, 0)).astype(np.int64) + (1 << (PRECISION_BITS - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): the horizontal pass, then the vertical one, then the centre crop."""
    h, w = rgb.shape[:2]
    if (w, h) == (size, size):
        return rgb
    nw, nh = resized_size(w, h, size)
    if nw != w:
        rgb = resize_axis(rgb, nw, axis=1)
    if nh != h:
        rgb = resize_axis(rgb, nh, axis=0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return rgb[top:top + size, left:left + size]


# --- to 8-bit RGB: each mode's rule ------------------------------------------------------------------

def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Over opaque white: (c*a + 255*(255 - a) + 127) // 255 per channel (exactly round(., 255))."""
    c, a = rgb.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2).astype(np.uint8)


def to_rgb(img, file_format: str | None) -> np.ndarray:
    """A decoded, upright Pillow image (its raw samples, its mode, its info) as uint8 (H, W, 3).

    `file_format` is the file's (Pillow's `format` before EXIF transposing copies the image): a PNG's
    16-bit grey is "I;16" in Pillow >= 11 and "I" before, and the spec reads both as 16-bit grey.
    """
    mode, a = img.mode, np.asarray(img)
    if mode == "I" and file_format == "PNG":
        mode = "I;16"
    key = img.info.get("transparency")
    if mode == "RGB":
        if key is None:
            return a
        return np.where(np.all(a == np.array(key, np.uint8), axis=2)[..., None], np.uint8(255), a)
    if mode == "L":
        return grey(np.where(a == key, 255, a)) if key is not None else grey(a)
    if mode == "1":
        return grey(np.where(a, 255, 0))
    if mode == "P":
        entries = np.frombuffer(img.palette.tobytes(), np.uint8).reshape(-1, 3)  # RGB entries
        palette = np.zeros((256, 3), np.uint8)
        palette[:len(entries)] = entries[:256]
        rgb = palette[a]
        if key is None:
            return rgb
        alpha = np.full(256, 255, np.int64)
        if isinstance(key, bytes):
            alpha[:len(key)] = list(key)
        else:
            alpha[key] = 0
        return composite_on_white(rgb, alpha[a])
    if mode == "RGBA":
        return composite_on_white(a[..., :3], a[..., 3])
    if mode == "LA":
        return composite_on_white(grey(a[..., 0]), a[..., 1])
    if mode == "CMYK":
        c, k = a[..., :3].astype(np.int64), a[..., 3:].astype(np.int64)
        nk = 255 - k
        return (nk - (c * nk + 127) // 255).astype(np.uint8)
    if mode.startswith("I;16"):
        return grey((a.astype(np.int64) + 128) // 257)
    if mode == "I":
        v = a.astype(np.int64)
        return grey(np.clip((v + 128) // 257 if v.max(initial=0) > 255 else v, 0, 255))
    if mode == "F":
        v = np.where(np.isnan(a), 0.0, a.astype(np.float64))
        return grey(np.clip(np.rint(v * 255.0 if v.max(initial=0) <= 1.0 else v), 0, 255))
    raise ValueError(f"mode {mode}: not in the reference")
