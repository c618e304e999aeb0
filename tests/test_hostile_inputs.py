"""Hostile inputs and outputs for `captool run`: each case asserts its exact record, the exit status,
what is on disk afterwards and that no traceback was printed.

The inputs are real files made here (Pillow images, FIFOs, sockets, link loops, names too long or not
UTF-8); the crash cases run real `captool run` processes on the shipped bundle (no torch needed):
a full device as stdout, a closed stdout, a file-size limit standing in for a full disk, SIGINT at
points of start-up found in the process's own memory map.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from captool.inputs import Item, expand_glob, expand_inputs, find_images
from captool.preprocess import IMAGE_EXTENSIONS, IMAGE_FORMATS, MAX_ASPECT_RATIO, preprocess
from captool.run import caption_items, printable

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "shapes-attention"
CAPTOOL = [sys.executable, "-c", "from captool.cli import main; main()"]
pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason="the shipped bundle is missing")


# ---- making files ---------------------------------------------------------------------------------

def picture(path: Path, seed: int = 0, size=(40, 30), mode: str = "RGB", fmt: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, format=fmt, **save)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width×height; its data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def run_captool(args, *, stdout=subprocess.PIPE, timeout=120, preexec_fn=None, text_mode=False):
    """`captool run --model BUNDLE --json ARGS` in a fresh process; returns (rc, stdout bytes, stderr str)."""
    command = [*CAPTOOL, "run", "--model", str(BUNDLE), "--device", "cpu", *([] if text_mode else ["--json"]), *args]
    p = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout, preexec_fn=preexec_fn)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("captool: running on CPU")]


# ---- the corpus: one `captool run` over every input case --------------------------------------------
# Each case makes its files in its own folder d and returns (arguments, expected records). An expected
# record is (path as printed, None) for a caption, or (path as printed, fragment of the error).

def _good(d):
    return [str(picture(d / "ok.png"))], [(f"{d}/ok.png", None)]


def _fifo(d):
    d.mkdir()
    os.mkfifo(d / "pipe.png")
    return [str(d / "pipe.png")], [(f"{d}/pipe.png", "is a FIFO, not an image file")]


def _fifo_in_folder(d):
    picture(d / "b.png")
    os.mkfifo(d / "a.png")  # not a regular file: not listed, never opened
    return [str(d)], [(f"{d}/b.png", None)]


def _char_device(d):
    d.mkdir()
    os.symlink("/dev/zero", d / "zero.png")
    return [str(d / "zero.png")], [(f"{d}/zero.png", "is a character device")]


def _dev_null(d):
    d.mkdir()
    os.symlink("/dev/null", d / "null.jpg")
    return [str(d / "null.jpg")], [(f"{d}/null.jpg", "is a character device")]


def _socket(d):
    d.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "s.png"))
    s.close()
    return [str(d / "s.png")], [(f"{d}/s.png", "is a socket")]


def _socket_in_folder(d):
    _socket(d)
    picture(d / "t.png")
    return [str(d)], [(f"{d}/t.png", None)]


def _name_10000_bytes(d):
    d.mkdir()
    name = f"{d}/" + "n" * 10_000 + ".png"
    return [name], [(name, "file name too long")]


def _path_6k(d):
    d.mkdir()
    name = f"{d}/" + "/".join(["p" * 200] * 30) + "/x.png"
    return [name], [(name, "file name too long")]


def _name_255_bytes(d):
    path = picture(d / ("m" * 251 + ".png"))
    return [str(path)], [(str(path), None)]


def _name_256_bytes(d):
    d.mkdir()
    name = f"{d}/" + "m" * 252 + ".png"
    return [name], [(name, "file name too long")]


def _deeper_than_path_max(d):
    # A folder nested past PATH_MAX: the walk skips what cannot be named, keeps the rest.
    picture(d / "top.png")
    fd = os.open(d, os.O_RDONLY)
    try:
        for _ in range(20):
            os.mkdir("q" * 250, dir_fd=fd)
            fd, old = os.open("q" * 250, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write((d / "top.png").read_bytes())
    finally:
        os.close(fd)
    return [str(d)], [(f"{d}/top.png", None)]


def _not_utf8_name(d):
    d.mkdir()
    raw = os.fsencode(str(d)) + b"/caf\xe9.png"
    picture(Path(os.fsdecode(raw)))
    return [os.fsdecode(raw)], [(f"{d}/caf\\xe9.png", None)]


def _not_utf8_in_folder(d):
    d.mkdir()
    picture(Path(os.fsdecode(os.fsencode(str(d)) + b"/\xff\xfe.png")))
    return [str(d)], [(f"{d}/\\xff\\xfe.png", None)]


def _not_utf8_missing(d):
    d.mkdir()
    name = os.fsdecode(os.fsencode(str(d)) + b"/gone\x80.png")
    return [name], [(f"{d}/gone\\x80.png", "gone\\x80.png: no such file")]


def _newline_in_name(d):
    path = picture(d / "two\nlines.png")
    return [str(path)], [(f"{d}/two\nlines.png", None)]


def _self_link(d):
    picture(d / "a.png")
    os.symlink(".", d / "again")  # the glob of old followed this 40 times
    return [str(d)], [(f"{d}/a.png", None)]


def _link_loop_between_folders(d):
    picture(d / "x" / "1.png")
    picture(d / "y" / "2.png", 1)
    os.symlink("../y", d / "x" / "to_y")
    os.symlink("../x", d / "y" / "to_x")
    return [str(d)], [(f"{d}/x/1.png", None), (f"{d}/x/to_y/2.png", None)]


def _link_to_parent(d):
    picture(d / "sub" / "b.png")
    os.symlink("..", d / "sub" / "up")
    return [str(d)], [(f"{d}/sub/b.png", None)]


def _file_link_and_hard_link(d):
    picture(d / "a.png")
    os.symlink("a.png", d / "b.png")
    os.link(d / "a.png", d / "c.png")
    return [str(d)], [(f"{d}/a.png", None)]


def _file_self_link(d):
    d.mkdir()
    os.symlink("loop.png", d / "loop.png")
    return [str(d / "loop.png")], [(f"{d}/loop.png", "too many levels of symbolic links")]


def _dangling_link(d):
    d.mkdir()
    os.symlink("nowhere.png", d / "dangling.png")
    return [str(d / "dangling.png")], [(f"{d}/dangling.png", "no such file")]


def _dangling_link_in_folder(d):
    picture(d / "real.png")
    os.symlink("nowhere.png", d / "dangling.png")
    return [str(d)], [(f"{d}/real.png", None)]


def _hidden_skipped_in_folder(d):
    picture(d / "seen.png")
    picture(d / ".hidden.png")
    picture(d / ".cache" / "x.png")
    (d / "._seen.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    return [str(d)], [(f"{d}/seen.png", None)]


def _hidden_named_is_read(d):
    path = picture(d / ".hidden.png")
    return [str(path)], [(str(path), None)]


def _glob_through_loop(d):
    picture(d / "in" / "p.png")
    os.symlink("..", d / "in" / "loop")
    return [f"{d}/**/*.png"], [(f"{d}/in/p.png", None)]


def _glob_self_link(d):
    picture(d / "a.png")
    os.symlink(".", d / "self")
    return [f"{d}/**"], [(f"{d}/a.png", None)]


def _glob_hidden(d):
    picture(d / "v.png")
    picture(d / ".h.png")
    return [f"{d}/*.png"], [(f"{d}/v.png", None)]


def _glob_dot_pattern(d):
    picture(d / ".h.png")
    return [f"{d}/.*.png"], [(f"{d}/.h.png", None)]


def _glob_matches_fifo(d):
    d.mkdir()
    os.mkfifo(d / "f.png")
    return [f"{d}/*.png"], [(f"{d}/f.png", "is a FIFO")]


def _glob_no_match(d):
    d.mkdir()
    return [f"{d}/*.png"], [(f"{d}/*.png", "no files match this pattern")]


def _glob_too_long(d):
    d.mkdir()
    pattern = f"{d}/*" + "g" * 10_000
    return [pattern], [(pattern, "no files match this pattern")]


def _glob_matching_empty_folders(d):
    (d / "e1").mkdir(parents=True)
    (d / "e2").mkdir()
    return [f"{d}/e*"], [(f"{d}/e*", "no image files in the folders this pattern matches")]


def _glob_folder_and_its_files(d):
    picture(d / "s" / "1.png")
    return [f"{d}/**"], [(f"{d}/s/1.png", None)]


def _empty_folder(d):
    d.mkdir()
    return [str(d)], [(str(d), "no image files in this directory")]


def _missing(d):
    d.mkdir()
    return [f"{d}/missing.png"], [(f"{d}/missing.png", "no such file")]


def _under_a_file(d):
    picture(d / "f.png")
    return [f"{d}/f.png/x.png"], [(f"{d}/f.png/x.png", "no such file")]


def _empty_file(d):
    d.mkdir()
    (d / "empty.png").write_bytes(b"")
    return [str(d / "empty.png")], [(f"{d}/empty.png", "not an image file captool reads")]


def _text_file(d):
    d.mkdir()
    (d / "notes.jpg").write_text("not an image\n")
    return [str(d / "notes.jpg")], [(f"{d}/notes.jpg", "not an image file captool reads")]


def _eps(d):
    d.mkdir()
    (d / "doc.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    return [str(d / "doc.eps")], [(f"{d}/doc.eps", "not an image file captool reads")]


def _eps_named_png(d):
    d.mkdir()
    (d / "doc.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    return [str(d / "doc.png")], [(f"{d}/doc.png", "not an image file captool reads")]


def _unsupported(fmt, suffix):
    def make(d):
        path = picture(d / f"x{suffix}", size=(16, 16), fmt=fmt)
        return [str(path)], [(str(path), "not an image file captool reads")]
    return make


def _supported(fmt, suffix, mode="RGB"):
    def make(d):
        path = picture(d / f"x{suffix}", mode=mode, fmt=fmt)
        return [str(path)], [(str(path), None)]
    return make


def _png_named_jpg(d):
    path = picture(d / "really_png.jpg", fmt="PNG")
    return [str(path)], [(str(path), None)]


def _shape(width, height, outcome):
    def make(d):
        d.mkdir()
        Image.new("L", (width, height), 128).save(d / "s.png")
        return [str(d / "s.png")], [(f"{d}/s.png", outcome)]
    return make


def _bomb(d):
    d.mkdir()
    png_header_only(d / "bomb.png", 30000, 30000)
    return [str(d / "bomb.png")], [(f"{d}/bomb.png", "decompression bomb")]


def _claims_a_million_wide(d):
    d.mkdir()
    png_header_only(d / "wide.png", 1_000_000, 1)  # 3 kB on disk; ~37 GB if resized
    return [str(d / "wide.png")], [(f"{d}/wide.png", "1000000×1 pixels")]


def _truncated(d):
    good = picture(d / "g.png", size=(64, 64)).read_bytes()
    (d / "cut.png").write_bytes(good[: len(good) // 2])
    return [str(d / "cut.png")], [(f"{d}/cut.png", "cannot decode image")]


def _animated_gif(d):
    d.mkdir()
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    return [str(d / "anim.gif")], [(f"{d}/anim.gif", None)]


def _sixteen_bit(d):
    d.mkdir()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(d / "deep.png")
    return [str(d / "deep.png")], [(f"{d}/deep.png", None)]


CORPUS = {
    "good image": _good,
    "fifo": _fifo,
    "fifo in a folder": _fifo_in_folder,
    "character device": _char_device,
    "/dev/null": _dev_null,
    "socket": _socket,
    "socket in a folder": _socket_in_folder,
    "10000-byte name": _name_10000_bytes,
    "6 kB path": _path_6k,
    "255-byte name": _name_255_bytes,
    "256-byte name": _name_256_bytes,
    "folder deeper than PATH_MAX": _deeper_than_path_max,
    "non-UTF-8 name": _not_utf8_name,
    "non-UTF-8 name in a folder": _not_utf8_in_folder,
    "non-UTF-8 missing name": _not_utf8_missing,
    "newline in a name": _newline_in_name,
    "self-link folder": _self_link,
    "link loop between folders": _link_loop_between_folders,
    "link to the parent": _link_to_parent,
    "symlink and hard link to one file": _file_link_and_hard_link,
    "file linked to itself": _file_self_link,
    "dangling link": _dangling_link,
    "dangling link in a folder": _dangling_link_in_folder,
    "hidden names in a folder": _hidden_skipped_in_folder,
    "hidden file named": _hidden_named_is_read,
    "** glob through a loop": _glob_through_loop,
    "** glob with a self-link": _glob_self_link,
    "glob skips hidden": _glob_hidden,
    "glob .* matches hidden": _glob_dot_pattern,
    "glob matching a fifo": _glob_matches_fifo,
    "glob matching nothing": _glob_no_match,
    "glob too long": _glob_too_long,
    "glob matching a folder and its files": _glob_folder_and_its_files,
    "glob matching empty folders": _glob_matching_empty_folders,
    "empty folder": _empty_folder,
    "missing file": _missing,
    "path under a file": _under_a_file,
    "empty file": _empty_file,
    "text file": _text_file,
    "eps": _eps,
    "eps named .png": _eps_named_png,
    "ico": _unsupported("ICO", ".ico"),
    "tga": _unsupported("TGA", ".tga"),
    "pcx": _unsupported("PCX", ".pcx"),
    "sgi": _unsupported("SGI", ".sgi"),
    "jpeg": _supported("JPEG", ".jpg"),
    "cmyk jpeg": _supported("JPEG", ".jpeg", "CMYK"),
    "bmp": _supported("BMP", ".bmp"),
    "tiff": _supported("TIFF", ".tif"),
    "webp": _supported("WEBP", ".webp"),
    "ppm": _supported("PPM", ".ppm"),
    "pgm": _supported("PPM", ".pgm", "L"),
    "png named .jpg": _png_named_jpg,
    "65500×1": _shape(65500, 1, f"a side more than {MAX_ASPECT_RATIO} times the other"),
    "1×65500": _shape(1, 65500, f"a side more than {MAX_ASPECT_RATIO} times the other"),
    "101×1": _shape(101, 1, "101×1 pixels"),
    "100×1 (the limit)": _shape(100, 1, None),
    "1×1": _shape(1, 1, None),
    "1,000,000×1 header": _claims_a_million_wide,
    "decompression bomb": _bomb,
    "truncated png": _truncated,
    "animated gif": _animated_gif,
    "16-bit png": _sixteen_bit,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every case's inputs in one `captool run --json --batch-size 4`, good images between them."""
    root = tmp_path_factory.mktemp("hostile")
    args, expected = [], {}
    for i, (name, make) in enumerate(CORPUS.items()):
        d = root / f"c{i:02d}"
        case_args, expected[name] = make(d)
        args += case_args + [str(picture(root / "between" / f"{i:02d}.png", i))]
    t0 = time.perf_counter()
    rc, out, err = run_captool(["--batch-size", "4", *args])
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in out.decode("utf-8").splitlines()]  # strict UTF-8, whole lines
    return SimpleNamespace(rc=rc, out=out, err=err, records=records, expected=expected, root=root, seconds=seconds)


def test_corpus_run_exits_1_with_no_traceback_and_one_record_per_input(corpus):
    assert corpus.rc == 1, corpus.err
    assert "Traceback" not in corpus.err and error_lines(corpus.err) == []
    assert corpus.out.endswith(b"\n")
    between = [r for r in corpus.records if "/between/" in r["path"]]
    assert len(between) == len(CORPUS) and all("caption" in r for r in between)
    assert len(corpus.records) == len(CORPUS) + sum(len(e) for e in corpus.expected.values())
    assert corpus.seconds < 60  # no FIFO waited on, no 37 GB resize, no loop walked for ever


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_case(corpus, case):
    want = corpus.expected[case]
    case_dir = f"{corpus.root}/c{list(CORPUS).index(case):02d}"
    got = [r for r in corpus.records if r["path"] == case_dir or r["path"].startswith(case_dir + "/")]
    assert [r["path"] for r in got] == [printable(path) for path, _ in want]
    for record, (path, fragment) in zip(got, want):
        if fragment is None:
            assert set(record) == {"path", "caption", "tokens"}, record
            assert record["caption"] and all(isinstance(t, int) for t in record["tokens"])
        else:
            assert set(record) == {"path", "error"}, record
            assert fragment in record["error"] and "\n" not in record["error"]
            assert record["error"].startswith(printable(path)[:200])


def test_text_mode_keeps_one_line_per_record(tmp_path):
    odd = picture(tmp_path / "tab\there.png")
    nl = picture(tmp_path / "new\nline.png", 1)
    bad = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xe9t\xe9.png"))
    picture(bad, 2)
    rc, out, err = run_captool([str(odd), str(nl), str(bad)], text_mode=True)
    assert rc == 0 and "Traceback" not in err
    lines = out.decode("utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{tmp_path}/tab\\there.png", f"{tmp_path}/new\\nline.png",
                                                       f"{tmp_path}/\\xe9t\\xe9.png"]
    assert all(len(line.split("\t")) == 2 for line in lines)


# ---- the one image finder, in process ----------------------------------------------------------------

def test_find_images_rule_sorted_recursive_images_only(tmp_path):
    for rel in ["b/2.png", "a/z.jpg", "a/sub/1.PNG", "0.bmp", "a-b/x.gif"]:
        picture(tmp_path / rel)
    (tmp_path / "readme.txt").write_text("no")
    picture(tmp_path / "photo.eps", fmt="PNG")  # not an image name: not listed
    got = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert got == ["0.bmp", "a/sub/1.PNG", "a/z.jpg", "a-b/x.gif", "b/2.png"]


@pytest.mark.parametrize("links, want", [
    ({"self": "."}, ["a.png", "sub/b.png"]),
    ({"sub/up": ".."}, ["a.png", "sub/b.png"]),
    ({"a_link.png": "a.png", "sub/dup.png": "../a.png"}, ["a.png", "sub/b.png"]),
    ({"zz": "sub"}, ["a.png", "sub/b.png"]),
    ({"aa": "sub"}, ["a.png", "aa/b.png"]),  # the first path in walk order wins
    ({"dangling.png": "nowhere.png", "loop.png": "loop.png"}, ["a.png", "sub/b.png"]),
])
def test_find_images_follows_links_once_per_real_file(tmp_path, links, want):
    picture(tmp_path / "a.png")
    picture(tmp_path / "sub" / "b.png")
    for link, target in links.items():
        os.symlink(target, tmp_path / link)
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == want


def test_find_images_ends_on_a_link_pointing_above_the_root(tmp_path):
    root = tmp_path / "r"
    picture(root / "deep" / "x.png")
    os.symlink(str(tmp_path), root / "deep" / "top")  # the walk reaches root again through top/r
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == ["deep/x.png"]


@pytest.mark.parametrize("make, error", [
    (lambda p: None, FileNotFoundError),
    (lambda p: p.write_bytes(b"x"), NotADirectoryError),
])
def test_find_images_raises_for_a_root_it_cannot_list(tmp_path, make, error):
    make(tmp_path / "root")
    with pytest.raises(error):
        find_images(tmp_path / "root")


@pytest.mark.parametrize("pattern, want", [
    ("*.png", ["a.png"]),
    ("**/*.png", ["a.png", "d/b.png", "d/e/c.png"]),
    ("d/**/*.png", ["d/b.png", "d/e/c.png"]),
    ("*/e/*.png", ["d/e/c.png"]),
    ("?.png", ["a.png"]),
    ("[ab].png", ["a.png"]),
    (".*", [".h.png", ".hid"]),
    ("nothing/*.png", []),
])
def test_expand_glob(tmp_path, monkeypatch, pattern, want):
    for rel in ["a.png", "d/b.png", "d/e/c.png", ".h.png", ".hid/x.png"]:
        picture(tmp_path / rel)
    os.symlink("..", tmp_path / "d" / "e" / "back")  # a loop `**` must not follow for ever
    monkeypatch.chdir(tmp_path)
    assert expand_glob(pattern) == want
    assert expand_glob(f"{tmp_path}/{pattern}") == [f"{tmp_path}/{w}" for w in want]


def test_expand_inputs_never_raises_and_keeps_argument_order(tmp_path):
    good = picture(tmp_path / "g.png")
    os.mkfifo(tmp_path / "f.png")
    long_name = "x" * 5000
    items = expand_inputs([long_name, str(good), str(tmp_path / "f.png"), str(good), "bad\udcff*.png"])
    assert items[:4] == [Item(long_name), Item(str(good)), Item(str(tmp_path / "f.png")), Item(str(good))]
    assert items[4].error == "bad\udcff*.png: no files match this pattern"
    assert expand_glob("nul\0*.png") == [] and expand_inputs(["nul\0.png"]) == [Item("nul\0.png")]


# ---- preprocessing limits, in process ---------------------------------------------------------------

@pytest.mark.parametrize("width, height", [(65500, 1), (1, 65500), (1_000_000, 1), (101, 1)])
def test_extreme_shapes_are_refused_from_the_header(tmp_path, width, height):
    png_header_only(tmp_path / "s.png", width, height)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=f"{width}×{height} pixels, a side more than 100 times the other"):
        preprocess(tmp_path / "s.png")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("shape", [(1, 2000, 3), (3000, 2, 3)])
def test_extreme_arrays_are_refused_before_the_resize(shape):
    with pytest.raises(Exception, match="a side more than 100 times the other"):
        preprocess(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("extension", IMAGE_EXTENSIONS)
def test_every_image_extension_is_decoded_by_an_allowed_plugin(extension):
    Image.init()
    assert Image.registered_extensions()[extension] in IMAGE_FORMATS


# ---- a batch that fails to caption loses no other batch's records -----------------------------------

class _FailingBatch:
    """A captioner whose `generate` raises (as onnxruntime would) on one batch."""

    def __init__(self, fail_on: int):
        self.manifest = SimpleNamespace(image_size=112, jpeg_decode="full")
        self.fail_on, self.calls = fail_on, 0

    def generate(self, images, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code\nsecond line")
        return np.full((len(images), 2), 7)  # (n, L)

    def to_caption(self, row):
        return SimpleNamespace(text="seven", tokens=[int(t) for t in row])


@pytest.mark.parametrize("fail_on", [1, 2, 3])
def test_a_failed_batch_gives_its_inputs_error_records_and_the_rest_go_on(tmp_path, fail_on):
    paths = [str(picture(tmp_path / f"{i}.png", i, size=(8, 8))) for i in range(6)]
    items = [Item(p) for p in paths]
    items[1] = Item(paths[1], f"{paths[1]}: own error")
    records = list(caption_items(_FailingBatch(fail_on), items, batch_size=2))
    assert [r.path for r in records] == paths
    for i, r in enumerate(records):
        if i == 1:
            assert r.error == f"{paths[1]}: own error"
        elif i // 2 == fail_on - 1:
            assert r.error == (f"{paths[i]}: captioning failed (RuntimeError: [ONNXRuntimeError] : 6 : "
                               f"RUNTIME_EXCEPTION : Non-zero status code second line)")
        else:
            assert r.error is None and r.caption == "seven" and r.tokens == [7, 7]


# ---- outputs: a failed write is exit 3, one line, whole records on disk -----------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    return [str(picture(d / f"{i:03d}.png", i, size=(16, 16))) for i in range(12)]


def _one_error_line(err: str, fragment: str) -> None:
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("captool: error: ") and fragment in lines[0], err


@pytest.mark.parametrize("text_mode", [False, True], ids=["json", "text"])
def test_dev_full_is_exit_3_with_one_line(images, text_mode):
    with open("/dev/full", "wb") as full:
        rc, _, err = run_captool(images, stdout=full, text_mode=text_mode)
    assert rc == 3
    _one_error_line(err, "cannot write the records to <stdout>: No space left on device; 0 whole records written")


def test_closed_stdout_is_exit_3_before_any_image_is_read(images):
    rc, _, err = run_captool(images, stdout=None, preexec_fn=lambda: os.close(1))
    assert rc == 3
    _one_error_line(err, "stdout is closed: nowhere to write the records")


def test_read_only_stdout_is_exit_3(images, tmp_path):
    (tmp_path / "ro").write_bytes(b"")
    with open(tmp_path / "ro", "rb") as read_only:
        rc, _, err = run_captool(images, stdout=read_only)
    assert rc == 3 and (tmp_path / "ro").read_bytes() == b""
    _one_error_line(err, "Bad file descriptor")


def _file_size_limit(limit: int):
    # RLIMIT_FSIZE stands in for a full disk: the write that crosses it is short, the next one fails.
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("limit", [100, 1000, 1500])
def test_full_file_is_cut_back_to_its_last_whole_record(images, tmp_path, limit):
    out = tmp_path / "captions.jsonl"
    with open(out, "wb") as f:
        rc, _, err = run_captool(images, stdout=f, preexec_fn=_file_size_limit(limit))
    assert rc == 3
    data = out.read_bytes()
    assert len(data) <= limit and (data == b"" or data.endswith(b"\n"))
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert [r["path"] for r in records] == images[: len(records)] and len(records) < len(images)
    _one_error_line(err, f"File too large; {len(records)} whole records written, the partial one removed")


def test_appending_to_a_full_file_keeps_what_was_there(images, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_bytes(b'{"earlier": "run"}\n')
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)  # as the shell's >> opens it: offset 0, O_APPEND
    try:
        rc, _, err = run_captool(images, stdout=fd, preexec_fn=_file_size_limit(600))
    finally:
        os.close(fd)
    assert rc == 3
    lines = out.read_bytes().decode("utf-8").splitlines(keepends=True)
    assert lines[0] == '{"earlier": "run"}\n' and all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["path"] for line in lines[1:]] == images[: len(lines) - 1]
    _one_error_line(err, "the partial one removed")


def test_reader_leaving_is_exit_0_without_a_traceback(images):
    p = subprocess.Popen([*CAPTOOL, "run", "--model", str(BUNDLE), "--device", "cpu", "--json",
                          "--batch-size", "1", *(images * 20)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and json.loads(first)["path"] == images[0]
    assert "Traceback" not in err and error_lines(err) == []


# ---- SIGINT during start-up: one line, exit 130 --------------------------------------------------------

def _wait_for_mapping(pid: int, marker: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if marker in f.read():
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return False
        time.sleep(0.0005)
    return False


@pytest.mark.parametrize("marker, delay", [
    ("_multiarray_umath", 0.0),  # numpy's import, as `captool run` imports its machinery
    ("onnxruntime_pybind11_state", 0.0),  # onnxruntime's import (used to end in "ImportError: initialization failed")
    ("onnxruntime_pybind11_state", 0.05),  # the bundle's sessions being made
    ("onnxruntime_pybind11_state", 0.15),
], ids=["numpy import", "onnxruntime import", "sessions +50ms", "sessions +150ms"])
def test_sigint_during_start_up_is_one_line_and_130(images, marker, delay):
    p = subprocess.Popen([*CAPTOOL, "run", "--model", str(BUNDLE), "--device", "cpu", "--json", *(images * 30)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for_mapping(p.pid, marker), "the process never loaded " + marker
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err.decode()
    _one_error_line(err.decode(), "captool: error: interrupted")
    assert all(json.loads(line) for line in out.decode("utf-8").splitlines())  # whole records, if any


def test_sigint_while_captioning_is_one_line_and_130(images):
    p = subprocess.Popen([*CAPTOOL, "run", "--model", str(BUNDLE), "--device", "cpu", "--json", "--batch-size", "1",
                          *(images * 40)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and json.loads(first)["path"] == images[0]
    _one_error_line(err.decode(), "captool: error: interrupted")
    assert all(json.loads(line) for line in rest.decode("utf-8").splitlines())
