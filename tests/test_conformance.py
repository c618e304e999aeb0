"""Conformance: captool's runtime against the shipped vectors, and docs/bundle-format.md against the code.

The pixel tests need only numpy and Pillow (CI runs them on the lowest and highest supported Pillow);
the token tests and `captool conform` need onnxruntime and the shipped bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from captool.errors import ImageError
from captool.preprocess import IMAGE_SIZE, PREPROCESSING, load_image, preprocess, resize_crop, resized_size

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = ROOT / "conformance"
DOC = ROOT / "docs" / "bundle-format.md"
VECTORS = json.loads((CONFORMANCE / "vectors.json").read_text())
sys.path.insert(0, str(CONFORMANCE))
import reference  # noqa: E402  (conformance/reference.py: the spec written out in numpy)

IDS = [v["file"] for v in VECTORS["vectors"]]


def test_vectors_cover_the_issue_and_stay_small():
    assert VECTORS["preprocessing"] == PREPROCESSING and VECTORS["image_size"] == IMAGE_SIZE
    assert 40 <= len(VECTORS["vectors"]) <= 80
    size = sum(p.stat().st_size for p in CONFORMANCE.rglob("*") if p.is_file())
    assert size < 1 << 20, f"conformance/ is {size} bytes; keep it under 1 MB"
    files = {p.name for p in (CONFORMANCE / "images").iterdir()}
    assert files == {Path(f).name for f in IDS}, "images/ and vectors.json disagree: run conformance/generate.py --vectors"


def test_generator_is_deterministic():
    """The committed images are the generator's output (byte for byte on the Pillow that made them:
    other releases' encoders write other bytes for the same pixels)."""
    import PIL

    import generate  # conformance/generate.py

    if PIL.__version__ != VECTORS["pillow"]:
        pytest.skip(f"the images were encoded by Pillow {VECTORS['pillow']}, this is {PIL.__version__}")

    for name, (data, _) in generate.images().items():
        assert (CONFORMANCE / "images" / name).read_bytes() == data, f"{name}: rerun conformance/generate.py"


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=IDS)
def test_pixels(vector):
    """captool's preprocessing gives the recorded pixels, on whatever Pillow is installed."""
    path = CONFORMANCE / vector["file"]
    if vector.get("error"):
        with pytest.raises(ImageError):
            preprocess(path)
        return
    x = preprocess(path)
    assert hashlib.sha256(x.tobytes()).hexdigest() == vector["sha256"], vector["what"]


@pytest.mark.parametrize("vector", [v for v in VECTORS["vectors"] if not v.get("error")],
                         ids=[v["file"] for v in VECTORS["vectors"] if not v.get("error")])
def test_reference_implementation_of_the_spec(vector):
    """conformance/reference.py (the document's algorithm, no Pillow resize or convert) gives the same pixels."""
    with Image.open(CONFORMANCE / vector["file"]) as img:
        img.load()
        fmt = img.format
        upright = ImageOps.exif_transpose(img)
    rgb = reference.to_rgb(upright, fmt)
    np.testing.assert_array_equal(rgb, np.asarray(load_image(CONFORMANCE / vector["file"])), err_msg="to RGB")
    assert list(reference.resized_size(*upright.size, IMAGE_SIZE)) == vector["resized"] or upright.size == (112, 112)
    x = reference.resize_crop(rgb, IMAGE_SIZE).transpose(2, 0, 1)  # (H,W,3) -> (3,H,W)
    assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == vector["sha256"]


SCALED = [v for v in VECTORS["vectors"] if "sha256_scaled" in v]


def test_the_scaled_jpeg_rule_has_vectors_and_the_tokens_say_which_rule_made_them():
    assert SCALED and all(v["file"].endswith(".jpg") for v in SCALED)
    shipped = json.loads((ROOT / "models" / "shapes-attention" / "manifest.json").read_text())
    assert VECTORS["jpeg_decode"] == shipped["image"].get("jpeg_decode", "full")


@pytest.mark.parametrize("vector", SCALED, ids=[v["file"] for v in SCALED])
def test_scaled_jpeg_pixels_by_captool_and_by_the_reference(vector):
    """image.jpeg_decode "scaled": captool's preprocess, and the spec (libjpeg's DCT scaling at 1/s by
    Pillow's draft, then reference.py's arithmetic), give the recorded pixels."""
    path = CONFORMANCE / vector["file"]
    x = preprocess(path, IMAGE_SIZE, "scaled")
    assert hashlib.sha256(x.tobytes()).hexdigest() == vector["sha256_scaled"]
    with Image.open(path) as img:
        W, H = img.size
        s = reference.jpeg_scale(W, H, IMAGE_SIZE)
        assert s > 1  # else the rule would not change these pixels
        img.draft(img.mode, (W // s, H // s))
        assert img.size == (-(-W // s), -(-H // s))  # libjpeg's scaled size
        img.load()
        fmt = img.format
        upright = ImageOps.exif_transpose(img)
    x = reference.resize_crop(reference.to_rgb(upright, fmt), IMAGE_SIZE).transpose(2, 0, 1)
    assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == vector["sha256_scaled"]


def test_reference_resize_on_random_sizes():
    rng = np.random.default_rng(5)
    for _ in range(25):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        if max(w, h) > 100 * min(w, h):
            continue
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(reference.resize_crop(a, IMAGE_SIZE),
                                      np.asarray(resize_crop(Image.fromarray(a))), err_msg=f"{w}x{h}")


def test_colour_formulas_exhaustively():
    """The document's integer formulas for compositing and CMYK equal the code on every 8-bit pair."""
    c, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.dstack([c, c, c, a])  # (256, 256, 4)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba, "RGBA"))),
                                  reference.composite_on_white(rgba[..., :3], a))
    cmyk = np.dstack([c, c, c, a])
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(cmyk, "CMYK"))),
                                  reference.to_rgb(Image.fromarray(cmyk, "CMYK"), None))
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(v)))[..., 0], (v.astype(np.int64) + 128) // 257)


# --- the document's numbers against the code -------------------------------------------------------

def doc_section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_size_table_in_the_doc():
    rows = re.findall(r"^\| (\d+) × (\d+) \| (\d+) × (\d+) \|", doc_section("### The size table"), re.M)
    assert len(rows) >= 8
    for w, h, nw, nh in rows:
        assert resized_size(int(w), int(h)) == (int(nw), int(nh)), f"{w}×{h}"


def test_size_formula_is_exact_rounding_half_up():
    from fractions import Fraction

    for m in range(1, 400):
        for side in range(m, 100 * m + 1, 37):
            exact = Fraction(2 * side * IMAGE_SIZE + m, 2 * m)
            assert resized_size(side, m) == (int(exact), IMAGE_SIZE)


def test_token_rows_in_the_doc():
    """The doc's example rows are the shipped bundle's tokens for those conformance images."""
    rows = re.findall(r"^\| `(images/[^`]+)` \| ([\d, ]+) \| ([\d, ]+) \|", doc_section("## Conformance"), re.M)
    assert len(rows) >= 3
    by_file = {v["file"]: v for v in VECTORS["vectors"]}
    for file, greedy, beam3 in rows:
        assert [int(t) for t in greedy.split(",")] == by_file[file]["greedy"], file
        assert [int(t) for t in beam3.split(",")] == by_file[file]["beam3"], file


# --- tokens: the shipped bundle, through `captool conform` ------------------------------------------

def test_captool_conform_with_captools_own_client():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from captool.cli import app

    client = f"{sys.executable} {CONFORMANCE / 'client.py'}"
    result = CliRunner().invoke(app, ["conform", str(ROOT / "models" / "shapes-attention"), "--client", client,
                                      "--vectors", str(CONFORMANCE)])
    assert result.exit_code == 0, result.output
    assert f"{len(IDS)} of {len(IDS)} images agree" in result.output


def test_captool_conform_reports_a_wrong_client(tmp_path):
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from captool.cli import app

    liar = tmp_path / "liar.py"
    liar.write_text("import json, sys\nfor p in sys.stdin:\n    print(json.dumps({'path': p.strip(), 'sha256': '0' * 64}))\n")
    result = CliRunner().invoke(app, ["conform", str(ROOT / "models" / "shapes-attention"), "--pixels-only",
                                      "--client", f"{sys.executable} {liar}", "--vectors", str(CONFORMANCE)])
    assert result.exit_code == 1
    assert "size_105x96.png: pixels" in result.output
