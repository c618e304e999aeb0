"""Preprocessing: every Pillow mode a user's files have, EXIF, the resize policy, and hostile inputs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captool.errors import ImageError
from captool.preprocess import IMAGE_SIZE, RESIZE_POLICY, load_image, preprocess, resize_crop


def rgb_at(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> Path:
    """A PNG written byte by byte, for what Pillow cannot save (48-bit RGB, a lying header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(raw_rows)) + png_chunk(b"IEND", b""))
    return path


# --- modes ------------------------------------------------------------------------------------

def test_rgb_passes_through_unchanged(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    x = preprocess(tmp_path / "a.png")
    assert x.dtype == np.uint8 and x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(x, a.transpose(2, 0, 1))


def test_grey_l_and_1bit(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    assert rgb_at(load_image(tmp_path / "l.png"), 3, 3) == (77, 77, 77)
    assert rgb_at(load_image(tmp_path / "b.png"), 3, 3) == (255, 255, 255)


@pytest.mark.parametrize("mode, transparent, opaque, want_opaque", [
    ("RGBA", (255, 0, 0, 0), (0, 0, 200, 255), (0, 0, 200)),
    ("LA", (10, 0), (60, 255), (60, 60, 60)),
])
def test_alpha_is_composited_on_white(tmp_path, mode, transparent, opaque, want_opaque):
    img = Image.new(mode, (4, 1), transparent)
    img.putpixel((1, 0), opaque)
    img.putpixel((2, 0), (0, 0, 0, 128) if mode == "RGBA" else (0, 128))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert rgb_at(out, 0, 0) == (255, 255, 255)  # fully transparent: the white background
    assert rgb_at(out, 1, 0) == want_opaque
    assert all(abs(v - 127) <= 1 for v in rgb_at(out, 2, 0))  # half-transparent black over white


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparent_index(tmp_path, suffix):
    img = Image.new("P", (4, 1), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / f"p{suffix}", transparency=0)
    opened = Image.open(tmp_path / f"p{suffix}")
    assert opened.mode == "P" and "transparency" in opened.info
    out = load_image(tmp_path / f"p{suffix}")
    assert rgb_at(out, 0, 0) == (255, 255, 255)
    assert rgb_at(out, 1, 0) == (0, 255, 0)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 1), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    img.save(tmp_path / "p.png")
    assert rgb_at(load_image(tmp_path / "p.png"), 0, 0) == (10, 20, 30)


def test_grey_with_colour_key_transparency(tmp_path):
    img = Image.new("L", (2, 1), 0)
    img.putpixel((1, 0), 90)
    img.save(tmp_path / "l.png", transparency=0)
    out = load_image(tmp_path / "l.png")
    assert rgb_at(out, 0, 0) == (255, 255, 255) and rgb_at(out, 1, 0) == (90, 90, 90)


def test_rgb_with_colour_key_transparency(tmp_path):
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (40, 50, 60))
    img.save(tmp_path / "k.png", transparency=(1, 2, 3))
    assert Image.open(tmp_path / "k.png").info.get("transparency") == (1, 2, 3)
    out = load_image(tmp_path / "k.png")
    assert rgb_at(out, 0, 0) == (255, 255, 255) and rgb_at(out, 1, 0) == (40, 50, 60)


def test_cmyk(tmp_path):
    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    assert rgb_at(load_image(tmp_path / "c.tif"), 0, 0) == (0, 255, 255)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # Pillow >= 11 / Pillow 10
    out = load_image(tmp_path / "g16.png")
    assert [rgb_at(out, x, 0)[0] for x in range(4)] == [0, 128, 255, 4]


def test_16bit_grey_png_with_small_values_is_16bit_on_every_pillow(tmp_path):
    # Pillow 10 opens 16-bit grey PNG as I, whose rule keeps values <= 255 as they are; captool-1
    # reads the file as 16-bit grey on every Pillow: 200 -> (200 + 128) // 257 = 1.
    Image.fromarray(np.array([[0, 200, 255]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert [rgb_at(load_image(tmp_path / "g16.png"), x, 0)[0] for x in range(3)] == [0, 1, 1]


def test_two_passes_in_captools_order(tmp_path):
    """Horizontal then vertical, each a single-axis Pillow resize: not Pillow 13's vertical-first order."""
    a = np.random.default_rng(3).integers(0, 256, (600, 240, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    nw, nh = 112, 280
    want = img.resize((nw, 600), Image.BILINEAR).resize((nw, nh), Image.BILINEAR).crop((0, 84, 112, 196))
    np.testing.assert_array_equal(np.asarray(resize_crop(img)), np.asarray(want))


def test_16bit_rgb_is_scaled_not_clipped(tmp_path):
    # 48-bit RGB: one pixel (0x8000, 0x4000, 0xFFFF); Pillow cannot save it, so write the bytes.
    row = b"\x00" + struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF)
    path = write_png(tmp_path / "rgb48.png", 1, 1, 16, 2, row)
    r, g, b = rgb_at(load_image(path), 0, 0)
    assert abs(r - 128) <= 1 and abs(g - 64) <= 1 and b == 255


def test_32bit_int_and_float_grey(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"
    assert rgb_at(load_image(tmp_path / "i.tif"), 1, 0) == (255, 255, 255)
    assert rgb_at(load_image(tmp_path / "f.tif"), 1, 0) == (128, 128, 128)


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp"])
def test_animated_takes_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(tmp_path / f"a{suffix}", save_all=True, append_images=frames[1:], duration=50, **kwargs)
    assert getattr(Image.open(tmp_path / f"a{suffix}"), "n_frames", 1) == 3
    r, g, b = rgb_at(load_image(tmp_path / f"a{suffix}"), 4, 4)
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "e.png", exif=exif)
    out = load_image(tmp_path / "e.png")
    assert out.size == (20, 40)
    assert rgb_at(out, 10, 5) == (255, 0, 0)  # the stored left half is on top once upright
    assert rgb_at(out, 10, 35) == (0, 0, 255)


def test_broken_exif_keeps_the_image(tmp_path):
    img = Image.new("RGB", (6, 4), (9, 9, 9))
    img.save(tmp_path / "x.png", exif=b"Exif\x00\x00garbage-not-a-tiff-header")
    assert rgb_at(load_image(tmp_path / "x.png"), 1, 1) == (9, 9, 9)


# --- resize policy and input kinds -------------------------------------------------------------

def test_resize_policy_scales_shorter_side_then_centre_crops():
    assert RESIZE_POLICY == "shorter-side-bilinear-center-crop"
    img = Image.new("RGB", (448, 224), (0, 0, 0))
    img.paste((255, 255, 255), (112, 0, 336, 224))  # the central square is white
    out = resize_crop(img, 112)
    assert out.size == (112, 112)
    a = np.asarray(out)
    assert a[:, 2:-2].min() == 255  # the crop is the centre; the black sides are gone
    assert a.min() > 200  # only the antialiasing filter's edge sees a little of them


@pytest.mark.parametrize("size", [(5, 3), (112, 500), (1000, 113), (1, 1)])
def test_any_size_gives_the_model_size(size):
    x = preprocess(Image.new("RGB", size, (1, 2, 3)))
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert tuple(x[:, 0, 0]) == (1, 2, 3)


def test_path_pil_and_array_inputs_agree(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    by_path = preprocess(str(tmp_path / "a.png"))
    np.testing.assert_array_equal(by_path, preprocess(Image.fromarray(a)))
    np.testing.assert_array_equal(by_path, preprocess(a))
    np.testing.assert_array_equal(by_path, preprocess(a[:, ::-1][:, ::-1]))  # non-contiguous view


def test_a_users_pil_image_is_not_modified():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    preprocess(img)
    assert img.mode == "RGBA" and img.getpixel((0, 0)) == (0, 0, 0, 0)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 4), np.uint8), 42])
def test_wrong_array_or_type_is_an_image_error(bad):
    with pytest.raises(ImageError):
        preprocess(bad)


# --- hostile inputs: each an ImageError with a one-line reason naming the file ---------------

def _hostile(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    ok = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ok)
    data = ok.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (64, 64), (5, 5, 5)).save(tmp_path / "j.jpg", quality=90)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "j.jpg").read_bytes()[:300])
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "a_dir.png").mkdir()
    # The header says 30000×30000 (9e8 pixels, over twice Pillow's limit); the data is tiny.
    write_png(tmp_path / "bomb.png", 30000, 30000, 8, 0, b"\x00" * 10)
    return {
        "truncated png": (tmp_path / "truncated.png", "cannot decode"),
        "truncated jpeg": (tmp_path / "truncated.jpg", "cannot decode"),
        "text file": (tmp_path / "notes.jpg", "not an image"),
        "empty file": (tmp_path / "empty.png", "not an image"),
        "directory": (tmp_path / "a_dir.png", "is a directory"),
        "missing": (tmp_path / "missing.png", "no such file"),
        "bomb": (tmp_path / "bomb.png", "decompression bomb"),
    }


@pytest.mark.parametrize("case", ["truncated png", "truncated jpeg", "text file", "empty file",
                                  "directory", "missing", "bomb"])
def test_hostile_input_is_one_line_image_error(tmp_path, case):
    path, reason = _hostile(tmp_path)[case]
    with pytest.raises(ImageError) as e:
        preprocess(path)
    message = str(e.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_bomb_between_limit_and_twice_limit_is_refused_too(tmp_path, monkeypatch):
    # Pillow only warns in this band; captool refuses it like a bomb (and prints no warning).
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        preprocess(tmp_path / "big.png")


def test_unreadable_file(tmp_path, monkeypatch):
    # chmod cannot lock root (who runs CI containers) out, so the refusal comes from a stand-in open().
    p = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(p)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageError, match="locked.png: permission denied"):
        preprocess(p)


def test_a_bomb_is_refused_even_when_another_thread_dropped_the_warning_filter(tmp_path, monkeypatch):
    """catch_warnings is process-wide: a thread may open an image while another thread's exit has put
    back a filter list without 'error'. The pixel count read from the header refuses the bomb anyway."""
    import warnings

    import captool.preprocess as preprocess_module

    path = tmp_path / "bomb.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # a 300×300 image is a bomb under this limit
    monkeypatch.setattr(preprocess_module.warnings, "simplefilter", lambda *a, **k: None)  # the lost filter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="bomb.png: refused as a decompression bomb .*300×300 pixels"):
            preprocess(path)
