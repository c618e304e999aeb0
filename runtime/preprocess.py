"""Image decoding and resizing, defined once: training's file datasets and the runtime both call it.

The encoder graph takes uint8 RGB [N,3,S,S] and normalizes inside, so everything that happens to
pixels outside the graph is in this file, and the manifest names the policy (`RESIZE_POLICY`).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import CaptoolError, ImageError

IMAGE_SIZE = 112
RESIZE_POLICY = "shorter-side-bilinear-center-crop"
# The version of everything this file does to pixels (docs/bundle-format.md, "Preprocessing"): a
# bundle names the version it was trained with (manifest image.preprocessing) and is run only with
# that one. captool-1: integer sizes, the horizontal pass then the vertical one, on any Pillow >= 10.
PREPROCESSING = "captool-1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The Pillow plugins a file may be decoded by, whatever its name: the formats of IMAGE_EXTENSIONS and
# no others (no EPS, which hands the file to Ghostscript, nor any plugin a user did not ask for).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# How JPEG files are decoded (manifest image.jpeg_decode, docs/bundle-format.md): "full" decodes every
# pixel; "scaled" lets libjpeg decode at 1/2, 1/4 or 1/8 in the DCT domain (`jpeg_scale`) where the
# result still covers the resize target, 3-7x less work on photos; a bundle records which it was
# proven with (export measures the captions it changes).
JPEG_DECODES = ("full", "scaled")
JPEG_SCALES = (8, 4, 2, 1)
JPEG_FORMATS = ("JPEG", "MPO")  # Pillow's names for a JPEG file; MPO: a camera's multi-picture JPEG (first picture)
# The longer side may be at most this many times the shorter: the resize's intermediate image is
# (ratio × size²) pixels, so a 1,000,000×1 file would otherwise ask for ~37 GB however small it is.
MAX_ASPECT_RATIO = 100



@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, read by someone else (an engine such as Ray, an upload), and the name
    the file goes by: decoded exactly as the file at `name` would be, with the same errors."""

    data: bytes
    name: str


ImageSource = Union[str, os.PathLike, EncodedImage, Image.Image, np.ndarray]

_WHITE = (255, 255, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every mode a user's file may have, as 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "RGB"):
        # A palette entry or a colour key marks transparent pixels (PNG tRNS, GIF): alpha first.
        img = img.convert("RGBA")
        mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode == "YCbCr":
        return _ycbcr_to_rgb(img)
    if mode in ("L", "1", "CMYK", "RGBX"):
        return img.convert("RGB")  # Pillow's conversions, each a documented integer formula
    raise ImageError(f"mode {mode} is not one captool converts (docs/bundle-format.md lists them); "
                     f"convert the image to RGB first")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int / float) grey scaled into 0..255 rather than clipped at 255."""
    a = np.asarray(img).astype(np.float64)
    a[np.isnan(a)] = 0.0  # a float image's NaN is black
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = a / 257.0  # 65535 -> 255; never exactly half-way between two integers
    elif img.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255.0
    grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)  # rint: half to even
    return Image.fromarray(grey).convert("RGB")


def _ycbcr_to_rgb(img: Image.Image) -> Image.Image:
    """JFIF's YCbCr -> RGB in float64, rounded half to even (Pillow's own tables round otherwise)."""
    y, cb, cr = (c.astype(np.float64) for c in np.moveaxis(np.asarray(img), 2, 0))
    rgb = np.stack([y + 1.402 * (cr - 128.0),
                    y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0),
                    y + 1.772 * (cb - 128.0)], axis=2)  # (H, W, 3)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


_NOT_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOTDIR:
        return "no such file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long for this system (ENAMETOOLONG); rename or move it"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links (a link loop)"
    return f"cannot open ({e.strerror or type(e).__name__})"


def _check_regular(st: os.stat_result, name: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image (pass the files, or the directory to `captool run`)")
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _NOT_FILES if test(st.st_mode)), "not a regular file")
        raise ImageError(f"{name}: is {kind}, not an image file; captool reads regular files only")


def _check_shape(width: int, height: int, name: str) -> None:
    if min(width, height) < 1:
        raise ImageError(f"{name}: image is {width}×{height} pixels, nothing to caption")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"{name}: image is {width}×{height} pixels, a side more than {MAX_ASPECT_RATIO} times "
                         f"the other; crop it to a less extreme shape first")


def jpeg_scale(width: int, height: int, size: int) -> int:
    """"scaled" decoding's divisor for a width×height JPEG: the largest s of 8, 4, 2, 1 with 2·s·size at
    most the shorter side m (s <= m // (2·size)), so the decoded image is still at least twice the
    resize target and the resize's antialiasing does the rest. Measured against s <= m // size (decode
    down to the target itself): 640×480 mean pixel difference 0.28 vs 0.57 from the full decode,
    captions changed on 1.0% vs 1.3% of 300 held-out scenes (0.5% of 1,000 for this rule; docs/export.md)."""
    room = min(width, height) // (2 * size)
    return next((s for s in JPEG_SCALES if s <= room), 1)


def _open(path: Path, draft: int = 0) -> Image.Image:
    """Decode a regular file's first frame (so the file is closed; a JPEG scaled where `draft` asks), or
    raise ImageError saying why.

    The path is stat'ed before it is opened, so a FIFO, device or socket is refused without opening
    it (which could block or act on a device); O_NONBLOCK and a second check on the open descriptor
    close the race with a file swapped in between.
    """
    name = str(path)
    try:
        st = os.stat(path)
        _check_regular(st, name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ImageError(f"{name}: {_os_reason(e)}") from None
    except ValueError:  # a NUL byte in the name
        raise ImageError(f"{name}: no such file (the name holds a NUL byte)") from None
    with os.fdopen(fd, "rb") as file:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            _check_regular(opened, name)
        return _decode(file, name, draft)


def _decode(file, name: str, draft: int = 0) -> Image.Image:
    """The file's first frame, decoded, upright; `draft` > 0: a JPEG is decoded by "scaled"'s rule for
    that target size (`jpeg_scale`), other formats fully."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is an error either way.
            # catch_warnings swaps one process-wide filter list, so with several threads decoding
            # (Captioner.caption from a thread pool) the filter may be gone while this thread opens:
            # the pixel count is checked here as well, from the header.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as img:
                _check_shape(*img.size, name)  # from the header, before any pixel is decoded
                if Image.MAX_IMAGE_PIXELS and img.size[0] * img.size[1] > Image.MAX_IMAGE_PIXELS:
                    raise ImageError(f"{name}: refused as a decompression bomb ({img.size[0]}×{img.size[1]} "
                                     f"pixels, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS})")
                if draft and img.format in JPEG_FORMATS and jpeg_scale(*img.size, draft) > 1:
                    # libjpeg's DCT scaling. Pillow's draft() takes the largest s of 8, 4, 2, 1 with
                    # s <= min(W // w, H // h) for a request (w, h): (W // s, H // s) gives exactly s.
                    s = jpeg_scale(*img.size, draft)
                    img.draft(img.mode, (img.size[0] // s, img.size[1] // s))
                img.seek(0)  # animated GIF/PNG/WebP: the first frame
                img.load()
                if img.format == "PNG" and img.mode == "I":
                    # 16-bit grey PNG: Pillow < 11 opens it as I, later ones as I;16. The same rule for both.
                    img = img.convert("I;16")
                # EXIF is read from the file here; the transposed copy outlives the closed file.
                return _upright(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({_one_line(e)})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file captool reads (JPEG, PNG, BMP, GIF, WebP, TIFF, "
                         f"PPM/PGM)") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Exception as e:  # truncated data and Pillow's decoders' many other complaints
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None


_TRANSPOSED = range(2, 9)  # EXIF orientations 2..8 move pixels; 1, absent or any other value leaves them


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (as ImageOps.exif_transpose decides it: getexif() also carries an XMP
    orientation). An image with nothing to rotate is returned as it is, not copied (0.9 ms of a 640×480
    photo's 3.8 ms went to that copy); a broken EXIF block keeps the image as stored."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation) not in _TRANSPOSED:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image; keep it as stored
        return img


def _draft(jpeg_decode: str, size: int) -> int:
    if jpeg_decode not in JPEG_DECODES:
        raise CaptoolError(f"jpeg_decode must be one of {', '.join(JPEG_DECODES)}, got {jpeg_decode!r}")
    return size if jpeg_decode == "scaled" else 0


def load_image(source: ImageSource, *, jpeg_decode: str = "full", size: int = IMAGE_SIZE) -> Image.Image:
    """A path, PIL image or H×W×3 uint8 array as an upright 8-bit RGB PIL image.

    jpeg_decode "scaled": a JPEG file (path or EncodedImage) is decoded at 1/jpeg_scale(W, H, size)."""
    draft = _draft(jpeg_decode, size)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ImageError(
                f"array input must be H×W×3 uint8 RGB, got shape {source.shape} dtype {source.dtype}"
            )
        return Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Image.Image):
        img, name = _upright(source), "image"
    elif isinstance(source, (str, os.PathLike)):
        img, name = _open(Path(source), draft), str(source)
    elif isinstance(source, EncodedImage):
        img, name = _decode(io.BytesIO(source.data), source.name, draft), source.name
    else:
        raise ImageError(f"unsupported image input of type {type(source).__name__}: pass a path, a PIL image or an array")
    try:
        return _to_rgb(img)
    except Exception as e:  # an exotic mode Pillow cannot convert
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB ({_one_line(e)})") from None


def resized_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """The size before the crop: the shorter side becomes `size`, the longer one keeps the aspect ratio.

    In integers, rounding half up: round(L·size/m) = (2·L·size + m) // (2·m), m the shorter side.
    (A float product rounds the exact half-way cases either way, by the last bit of size/m.)
    """
    m = min(width, height)
    return (2 * width * size + m) // (2 * m), (2 * height * size + m) // (2 * m)


def resize_crop(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """RESIZE_POLICY: scale the shorter side to `size` (bilinear, antialiased), then centre-crop.

    The two passes are made one at a time, horizontal then vertical: each single-axis resize is one
    pass of Pillow's fixed-point filter, while a two-axis resize leaves the order to Pillow (13 runs
    the vertical pass first for tall images) and the rounding between the passes with it.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    _check_shape(w, h, "image")
    nw, nh = resized_size(w, h, size)
    if nw != w:
        img = img.resize((nw, h), Image.BILINEAR)  # (H, W) -> (H, W')
    if nh != h:
        img = img.resize((nw, nh), Image.BILINEAR)  # (H, W') -> (H', W')
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(source: ImageSource, size: int = IMAGE_SIZE, jpeg_decode: str = "full") -> np.ndarray:
    """What the encoder graph takes for one image: uint8 [3, size, size], RGB. `jpeg_decode` is the
    bundle's (manifest image.jpeg_decode) or the model's (training config): "full" or "scaled"."""
    img = resize_crop(load_image(source, jpeg_decode=jpeg_decode, size=size), size)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (H,W,3) -> (3,H,W)

