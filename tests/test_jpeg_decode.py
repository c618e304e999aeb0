"""JPEG decoding rule "scaled": libjpeg's DCT scaling (Pillow's draft) down to twice the model's size.

The policy is recomputed here with Pillow alone (draft, load, exif_transpose, RGB, resize_crop) and
compared with captool's preprocess; the manifest's image.jpeg_decode drives Captioner, caption_batch and
`captool run`; export measures the rule on held-out photos and refuses it past --max-caption-change;
training's ModelConfig/TrainConfig/load_data carry it; `captool synth --photo` writes the photos.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from typer.testing import CliRunner

from captool.cli import app
from captool.errors import BundleError, CaptoolError
from captool.preprocess import (JPEG_DECODES, EncodedImage, _upright, jpeg_scale, load_image, preprocess,
                                resize_crop)

runner = CliRunner()
S = 112


def photo(path: Path, size: tuple[int, int], seed: int = 0, *, orientation: int | None = None,
          fmt: str = "JPEG") -> Path:
    """A width×height picture with detail at every scale: gradients, noise and filled shapes."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / w, y * 255.0 / h, (x + y) * 127.0 / (w + h)], axis=2)  # (h, w, 3)
    img = Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))
        pen.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pen.rectangle([0, 0, w // 4, h // 5], fill=(250, 10, 10))  # a mark in one corner: orientation shows
    path.parent.mkdir(parents=True, exist_ok=True)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, format=fmt, quality=90, exif=exif)
    elif fmt == "JPEG":
        img.save(path, format=fmt, quality=90)
    else:
        img.save(path, format=fmt)
    return path


def policy(source, size: int = S, *, exif: bool = False) -> np.ndarray:
    """The documented "scaled" rule, by Pillow directly: draft(mode, (W//s, H//s)), load, (EXIF), RGB, resize_crop."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(fp) as img:
        assert img.format in ("JPEG", "MPO")
        w, h = img.size
        s = jpeg_scale(w, h, size)
        img.draft(img.mode, (w // s, h // s))
        assert img.size == (math.ceil(w / s), math.ceil(h / s)), (img.size, w, h, s)
        img.load()
        if exif:
            img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
    return np.asarray(resize_crop(img, size), dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- 1. jpeg_scale ------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, size, scale", [
    (640, 480, 112, 2), (480, 640, 112, 2), (4000, 3000, 112, 8), (3000, 4000, 112, 8),
    (447, 447, 112, 1), (448, 448, 112, 2), (895, 2000, 112, 2), (896, 1000, 112, 4), (1000, 896, 112, 4),
    (1791, 1791, 112, 4), (1792, 1792, 112, 8), (100000, 1792, 112, 8), (223, 5000, 112, 1),
    (5000, 223, 112, 1), (1, 1, 112, 1), (640, 480, 56, 4), (640, 480, 224, 1),
])
def test_jpeg_scale_table(width, height, size, scale):
    assert jpeg_scale(width, height, size) == scale
    assert JPEG_DECODES == ("full", "scaled")


# --- 2. "scaled" pixels are the documented policy -----------------------------------------------

@pytest.mark.parametrize("size", [(640, 480), (1000, 2000), (641, 479), (1001, 2003), (1800, 1797)])
def test_scaled_equals_the_documented_policy(tmp_path, size):
    path = photo(tmp_path / "p.jpg", size, seed=sum(size))
    want = policy(path)
    got = preprocess(path, S, "scaled")
    assert got.dtype == np.uint8 and got.shape == (3, S, S) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    # The same bytes under any name, handed over as EncodedImage.
    data = path.read_bytes()
    np.testing.assert_array_equal(preprocess(EncodedImage(data, "upload.bin"), S, "scaled"), want)
    np.testing.assert_array_equal(policy(data), want)
    # Decoded smaller, by exactly jpeg_scale.
    s = jpeg_scale(*size, S)
    assert s > 1
    assert load_image(path, jpeg_decode="scaled", size=S).size == (math.ceil(size[0] / s), math.ceil(size[1] / s))
    assert load_image(path).size == size
    # ... and not the full decode, though close to it.
    full = preprocess(path, S, "full")
    assert not np.array_equal(got, full)
    assert mad(got, full) < 2.0


def test_a_multi_picture_jpeg_is_scaled_on_its_first_picture(tmp_path):
    """A camera's MPO file (Pillow's format "MPO": JPEG pictures one after another) is a JPEG to the rule."""
    first = Image.open(photo(tmp_path / "a.jpg", (640, 480), seed=1))
    second = Image.open(photo(tmp_path / "b.jpg", (640, 480), seed=2))
    path = tmp_path / "camera.jpg"
    first.save(path, format="MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(path) as img:
        assert img.format == "MPO" and img.n_frames == 2
    got = preprocess(path, S, "scaled")
    np.testing.assert_array_equal(got, policy(path))
    assert not np.array_equal(got, preprocess(path, S, "full"))
    assert load_image(path, jpeg_decode="scaled", size=S).size == (320, 240)


def test_the_gates_line_gives_the_limit_as_set():
    from captool.export.jpeg_decode import DecodeReport

    assert "(2.00%)" in DecodeReport("held", 100, 2, 0.015).line() and "at most 1.5%" in DecodeReport("held", 100, 2, 0.015).line()
    assert "at most 0.5%" in DecodeReport("held", 1000, 5, 0.005).line() and DecodeReport("held", 1000, 5, 0.005).ok
    assert not DecodeReport("held", 1000, 6, 0.005).ok


@pytest.mark.parametrize("mode, progressive", [("L", False), ("CMYK", False), ("RGB", True)])
def test_scaled_grey_cmyk_and_progressive_jpegs(tmp_path, mode, progressive):
    rgb = photo(tmp_path / "rgb.png", (640, 480), seed=4, fmt="PNG")
    path = tmp_path / "p.jpg"
    with Image.open(rgb) as img:
        img.convert(mode).save(path, format="JPEG", quality=90, progressive=progressive)
    got = preprocess(path, S, "scaled")
    np.testing.assert_array_equal(got, policy(path))
    assert load_image(path, jpeg_decode="scaled").size == (320, 240)
    assert not np.array_equal(got, preprocess(path, S, "full"))


def test_scaled_is_not_full_on_a_640x480_jpeg(tmp_path):
    path = photo(tmp_path / "p.jpg", (640, 480), seed=5)
    full, scaled = preprocess(path, S, "full"), preprocess(path, S, "scaled")
    assert preprocess(path, S).tobytes() == full.tobytes()  # "full" is the default
    assert not np.array_equal(full, scaled)
    assert 0 < mad(full, scaled) < 2.0
    # The size given to load_image picks the scale: 56 -> s = 4 (160x120).
    assert load_image(path, jpeg_decode="scaled", size=56).size == (160, 120)
    np.testing.assert_array_equal(preprocess(path, 56, "scaled"), policy(path, 56))


@pytest.mark.parametrize("name, size, fmt", [
    ("same.png", (640, 480), "PNG"), ("small.jpg", (200, 150), "JPEG"), ("edge.jpg", (447, 600), "JPEG"),
    ("photo.webp", (640, 480), "WEBP"),
])
def test_scaled_leaves_other_formats_and_small_jpegs_alone(tmp_path, name, size, fmt):
    path = photo(tmp_path / name, size, seed=1, fmt=fmt)
    full = preprocess(path, S, "full")
    np.testing.assert_array_equal(preprocess(path, S, "scaled"), full)
    np.testing.assert_array_equal(preprocess(EncodedImage(path.read_bytes(), name), S, "scaled"), full)
    assert load_image(path, jpeg_decode="scaled").size == size


def test_in_memory_images_and_arrays_are_not_affected(tmp_path):
    path = photo(tmp_path / "p.jpg", (640, 480), seed=2)
    with Image.open(path) as img:
        img.load()
        array = np.asarray(img.convert("RGB"))
        full = preprocess(img, S, "full")
        np.testing.assert_array_equal(preprocess(img, S, "scaled"), full)
    np.testing.assert_array_equal(preprocess(array, S, "scaled"), preprocess(array, S, "full"))
    np.testing.assert_array_equal(full, preprocess(path, S, "full"))


# --- 3. EXIF orientation --------------------------------------------------------------------------

def test_scaled_applies_exif_orientation_after_the_draft(tmp_path):
    path = photo(tmp_path / "rot6.jpg", (640, 480), seed=6, orientation=6)
    want = policy(path, exif=True)
    got = preprocess(path, S, "scaled")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(preprocess(EncodedImage(path.read_bytes(), "rot6.jpg"), S, "scaled"), want)
    # Portrait: decoded at 1/2 then turned upright, as the full decode is.
    assert load_image(path, jpeg_decode="scaled").size == (240, 320)
    assert load_image(path).size == (480, 640)
    full = preprocess(path, S, "full")
    assert full.shape == got.shape == (3, S, S)
    assert not np.array_equal(got, full)
    assert mad(got, full) < 3.0
    # Not the pixels as stored (landscape): those are far from both.
    with Image.open(path) as img:
        stored = np.asarray(resize_crop(img.convert("RGB"), S)).transpose(2, 0, 1)
    assert mad(got, stored) > 10 * mad(got, full)


def test_upright_copies_only_what_it_rotates(tmp_path):
    plain = photo(tmp_path / "plain.jpg", (64, 48), seed=0)
    one = photo(tmp_path / "one.jpg", (64, 48), seed=0, orientation=1)
    six = photo(tmp_path / "six.jpg", (64, 48), seed=0, orientation=6)
    for path in (plain, one):
        with Image.open(path) as img:
            img.load()
            assert _upright(img) is img
    with Image.open(six) as img:
        img.load()
        turned = _upright(img)
        assert turned is not img
        assert img.size == (64, 48) and turned.size == (48, 64)
        np.testing.assert_array_equal(np.asarray(turned), np.asarray(ImageOps.exif_transpose(img)))
    # In memory: a PIL image with nothing to rotate is the caller's own object.
    fresh = Image.new("RGB", (10, 20))
    assert _upright(fresh) is fresh


# --- 4. an unknown rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["fast", "Scaled", "", None])
def test_an_unknown_rule_is_refused_naming_the_rules(tmp_path, rule):
    path = photo(tmp_path / "p.jpg", (640, 480))
    for call in (lambda: preprocess(path, S, rule), lambda: load_image(path, jpeg_decode=rule),
                 lambda: preprocess(np.zeros((8, 8, 3), np.uint8), S, rule)):
        with pytest.raises(CaptoolError) as e:
            call()
        assert "full" in str(e.value) and "scaled" in str(e.value)


# --- 5. the manifest names the rule ---------------------------------------------------------------

def _bundle_with(tiny_bundle, dest: Path, rule) -> Path:
    shutil.copytree(tiny_bundle("rnn"), dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    if rule is None:
        manifest["image"].pop("jpeg_decode", None)
    else:
        manifest["image"]["jpeg_decode"] = rule
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


@pytest.fixture
def encoder_inputs(monkeypatch):
    """Every batch the encoder graph is given (Captioner.encode, all paths to it), recorded and passed on."""
    from captool.captioner import Captioner

    seen: list[np.ndarray] = []
    original = Captioner.encode

    def encode(self, images):
        seen.append(np.array(images, copy=True))
        return original(self, images)

    monkeypatch.setattr(Captioner, "encode", encode)
    return seen


def test_a_scaled_bundle_decodes_jpegs_scaled_everywhere(tiny_bundle, tmp_path, encoder_inputs):
    pytest.importorskip("torch")
    from captool import Captioner
    from captool.bundle import load_manifest
    from captool.records import caption_batch

    bundle = _bundle_with(tiny_bundle, tmp_path / "scaled", "scaled")
    assert load_manifest(bundle).jpeg_decode == "scaled"
    jpegs = [photo(tmp_path / f"in/{i}.jpg", (640, 480), seed=10 + i) for i in range(2)]
    png = photo(tmp_path / "in/2.png", (640, 480), seed=12, fmt="PNG")
    inputs = [*jpegs, png]
    scaled = np.stack([preprocess(p, S, "scaled") for p in inputs])  # (3, 3, S, S)
    full = np.stack([preprocess(p, S, "full") for p in inputs])
    assert not np.array_equal(scaled[:2], full[:2]) and np.array_equal(scaled[2], full[2])

    captioner = Captioner(bundle, device="cpu")
    assert captioner.manifest.jpeg_decode == "scaled"
    for p, want in zip(inputs, scaled):
        np.testing.assert_array_equal(captioner.preprocess(p), want)
    encoder_inputs.clear()
    want = [captioner.to_caption(row).tokens for row in captioner.generate(scaled)]

    encoder_inputs.clear()
    got = captioner.caption(inputs)
    assert [c.tokens for c in got] == want
    assert len(encoder_inputs) == 1
    np.testing.assert_array_equal(encoder_inputs[0], scaled)

    encoder_inputs.clear()
    records = caption_batch(captioner, [*jpegs[:1], EncodedImage(jpegs[1].read_bytes(), "b.jpg"), png])
    assert [r.error for r in records] == [None] * 3
    assert [r.tokens for r in records] == want
    np.testing.assert_array_equal(np.concatenate(encoder_inputs), scaled)

    encoder_inputs.clear()
    result = runner.invoke(app, ["run", *map(str, inputs), "--model", str(bundle), "--json", "--device", "cpu"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in inputs]
    assert [line["tokens"] for line in lines] == want
    np.testing.assert_array_equal(np.concatenate(encoder_inputs), scaled)


def test_a_full_bundle_decodes_jpegs_in_full(tiny_bundle, tmp_path, encoder_inputs):
    pytest.importorskip("torch")
    from captool import Captioner
    from captool.bundle import load_manifest
    from captool.records import caption_batch

    original = json.loads((tiny_bundle("rnn") / "manifest.json").read_text())
    assert original["image"]["jpeg_decode"] == "full"  # export writes the rule it was given
    bundle = _bundle_with(tiny_bundle, tmp_path / "absent", None)
    assert "jpeg_decode" not in json.loads((bundle / "manifest.json").read_text())["image"]
    assert load_manifest(bundle).jpeg_decode == "full"
    jpeg = photo(tmp_path / "a.jpg", (640, 480), seed=3)
    full = preprocess(jpeg, S, "full")
    captioner = Captioner(bundle, device="cpu")
    np.testing.assert_array_equal(captioner.preprocess(jpeg), full)
    encoder_inputs.clear()
    captioner.caption([jpeg])
    caption_batch(captioner, [jpeg])
    assert len(encoder_inputs) == 2
    for batch in encoder_inputs:
        np.testing.assert_array_equal(batch, full[None])


@pytest.mark.parametrize("rule", ["fast", "FULL", 2])
def test_an_unknown_rule_in_the_manifest_is_refused_at_load(tiny_bundle, tmp_path, rule):
    pytest.importorskip("torch")
    from captool import Captioner
    from captool.bundle import load_manifest

    bundle = _bundle_with(tiny_bundle, tmp_path / "bad", rule)
    for load in (lambda: load_manifest(bundle), lambda: Captioner(bundle, device="cpu")):
        with pytest.raises(BundleError) as e:
            load()
        message = str(e.value)
        assert "image.jpeg_decode" in message and "\n" not in message
    result = runner.invoke(app, ["run", str(photo(tmp_path / "a.jpg", (64, 48))), "--model", str(bundle),
                                 "--device", "cpu"])
    assert result.exit_code == 2
    assert "image.jpeg_decode" in result.output and "Traceback" not in result.output


def test_the_schema_names_the_rule():
    schema = json.loads((Path(__file__).parents[1] / "docs" / "manifest.schema.json").read_text())
    image = schema["properties"]["image"]
    assert image["properties"]["jpeg_decode"]["enum"] == list(JPEG_DECODES)
    assert "jpeg_decode" not in image.get("required", [])


# --- 6. synth --photo ---------------------------------------------------------------------------

def test_synth_photo_writes_camera_sized_jpegs(tmp_path):
    from captool.datasets.synth import PHOTO_QUALITY, write_dataset

    out = tmp_path / "held"
    write_dataset(out, train=0, val=3, seed=1, photo=(320, 240))
    files = sorted((out / "val").iterdir())
    assert [f.name for f in files] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    for f in files:
        with Image.open(f) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", (320, 240), "RGB")
    assert PHOTO_QUALITY == 90
    doc = json.loads((out / "annotations" / "captions_val.json").read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in doc["images"]] == \
        [(f.name, 320, 240) for f in files]
    assert doc["info"]["photo"] == "320x240"
    assert list((out / "train").iterdir()) == []
    # The scene is drawn as a centred square of the shorter side on its background.
    with Image.open(files[0]) as img:
        a = np.asarray(img, dtype=np.int16)
    grey = doc["images"][0]["scene"]["background"]
    assert np.abs(a[:, :30] - grey).mean() < 4 and np.abs(a[:, -30:] - grey).mean() < 4


def test_synth_default_is_still_112_pixel_pngs(tmp_path):
    from captool.datasets.synth import write_dataset

    out = tmp_path / "plain"
    write_dataset(out, train=0, val=2, seed=1)
    files = sorted((out / "val").iterdir())
    assert [f.name for f in files] == ["000000.png", "000001.png"]
    for f in files:
        with Image.open(f) as img:
            assert (img.format, img.size) == ("PNG", (112, 112))
    doc = json.loads((out / "annotations" / "captions_val.json").read_text())
    assert {(i["width"], i["height"]) for i in doc["images"]} == {(112, 112)}
    assert "photo" not in doc["info"]


@pytest.mark.parametrize("value", ["12x", "x480", "640", "640x480x3", "axb", "640×480"])
def test_synth_refuses_a_malformed_photo_option(tmp_path, value):
    out = tmp_path / "out"
    result = runner.invoke(app, ["synth", str(out), "--train", "0", "--val", "1", "--photo", value])
    assert result.exit_code == 2, result.output
    assert "--photo" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", ["100x480", "640x9000", "0x0"])
def test_synth_refuses_a_photo_size_out_of_range(tmp_path, value):
    out = tmp_path / "out"
    result = runner.invoke(app, ["synth", str(out), "--train", "0", "--val", "1", "--photo", value])
    assert result.exit_code == 2, result.output
    assert "--photo" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_synth_cli_photo(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["synth", str(out), "--train", "1", "--val", "1", "--photo", "300X200"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "train" / "000000.jpg") as img:
        assert (img.format, img.size) == ("JPEG", (300, 200))


# --- 7. export: the rule, its gate -----------------------------------------------------------------

@pytest.fixture(scope="module")
def held_photos(tmp_path_factory) -> Path:
    """100 synth scenes as 448×448 JPEGs (jpeg_scale 2), plus a small JPEG and a PNG the rule leaves alone."""
    from captool.datasets.synth import write_dataset

    root = tmp_path_factory.mktemp("held") / "data"
    write_dataset(root, train=0, val=100, seed=5, photo=(448, 448))
    assert jpeg_scale(448, 448, S) == 2
    photo(root / "val" / "small.jpg", (200, 150), seed=1)
    photo(root / "val" / "wide.png", (640, 480), seed=2, fmt="PNG")
    return root / "val"


def _no_bundle(out: Path) -> None:
    """Nothing at `out`, and no temporary directory left beside it."""
    assert not out.exists()
    if out.parent.exists():
        assert sorted(p.name for p in out.parent.iterdir()) == []


def test_export_scaled_needs_held_out_photos(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    from captool.export import ExportError, export_bundle

    checkpoint = tiny_checkpoint("rnn")
    out = tmp_path / "exports" / "bundle"
    with pytest.raises(ExportError) as e:
        export_bundle(checkpoint, out, jpeg_decode="scaled")
    assert "--images" in str(e.value)
    _no_bundle(out)

    five = tmp_path / "five"
    for i in range(5):
        photo(five / f"{i}.jpg", (448, 448), seed=i)
    with pytest.raises(ExportError) as e:
        export_bundle(checkpoint, out, jpeg_decode="scaled", images=five)
    assert "100" in str(e.value) and "5 JPEGs" in str(e.value)
    _no_bundle(out)

    with pytest.raises(ExportError) as e:
        export_bundle(checkpoint, out, jpeg_decode="fast")
    assert "full" in str(e.value) and "scaled" in str(e.value)
    _no_bundle(out)

    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--jpeg-decode", "scaled"])
    assert result.exit_code == 2, result.output
    assert "--images" in result.output and "Traceback" not in result.output
    _no_bundle(out)


@pytest.mark.parametrize("share", [1.0, -0.1, 2.0])
def test_export_refuses_a_max_caption_change_out_of_range(tiny_checkpoint, held_photos, tmp_path, share):
    pytest.importorskip("onnx")
    from captool.export import ExportError, export_bundle

    out = tmp_path / "exports" / "bundle"
    with pytest.raises(ExportError) as e:
        export_bundle(tiny_checkpoint("rnn"), out, jpeg_decode="scaled", images=held_photos,
                      max_caption_change=share)
    assert "--max-caption-change" in str(e.value)
    _no_bundle(out)


def test_scaled_photos_picks_the_jpegs_the_rule_changes(held_photos):
    from captool.export.jpeg_decode import MIN_IMAGES, scaled_photos

    files, skipped = scaled_photos(held_photos, S)
    assert MIN_IMAGES == 100
    assert len(files) == 100 and skipped == 2
    assert all(f.suffix == ".jpg" and f.name != "small.jpg" for f in files)


@pytest.mark.slow  # a full export: 20-50 s on a busy 2-core machine
def test_export_scaled_measures_captions_on_held_out_photos(tiny_checkpoint, held_photos, tmp_path):
    pytest.importorskip("onnx")
    from captool import Captioner
    from captool.export import export_bundle
    from captool.export.jpeg_decode import MAX_CAPTION_CHANGE, scaled_photos

    out = tmp_path / "exports" / "bundle"
    report = export_bundle(tiny_checkpoint("rnn"), out, jpeg_decode="scaled", images=held_photos)
    assert report.ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["jpeg_decode"] == "scaled"
    decoding = manifest["parity"]["jpeg_decode"]

    # The count, by the written bundle, file by file.
    captioner = Captioner(out, device="cpu")
    assert captioner.manifest.jpeg_decode == "scaled"
    files, _ = scaled_photos(held_photos, S)
    full = captioner.generate(np.stack([preprocess(p, S, "full") for p in files]))
    scaled = captioner.generate(np.stack([preprocess(p, S, "scaled") for p in files]))
    changed = [str(p) for p, a, b in zip(files, full, scaled) if not np.array_equal(a, b)]

    assert decoding["images"] == 100 and decoding["skipped"] == 2
    assert decoding["changed"] == len(changed)
    assert decoding["share"] == pytest.approx(len(changed) / 100)
    assert decoding["max_share"] == MAX_CAPTION_CHANGE == 0.01
    assert decoding["ok"] is True
    assert f"{len(changed)} of 100" in decoding["summary"]
    assert [x["file"] for x in decoding["examples"]] == changed[:5]
    assert decoding["source"] == str(held_photos)


@pytest.mark.slow  # a full export: 20-50 s on a busy 2-core machine
def test_export_refuses_scaled_past_max_caption_change(tiny_checkpoint, held_photos, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from captool.export import ExportError, export_bundle
    from captool.export import jpeg_decode as gate

    calls = []

    def measure(bundle_dir, folder, max_share=gate.MAX_CAPTION_CHANGE, progress=None, photos=None):
        manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
        calls.append((Path(folder), max_share, manifest["image"]["jpeg_decode"]))
        return gate.DecodeReport(str(folder), images=100, changed=2, max_share=max_share)

    monkeypatch.setattr(gate, "measure", measure)
    # Only the gate is under test here: 3 photos stand for the 100 (the export validates the graphs on
    # every --images file, ~0.3 s each on a busy 2-core machine).
    monkeypatch.setattr(gate, "MIN_IMAGES", 3)
    three = tmp_path / "three"
    three.mkdir()
    for f in sorted(held_photos.glob("*.jpg"))[:3]:
        shutil.copy(f, three / f.name)
    assert not gate.DecodeReport("x", 100, 2, 0.01).ok and gate.DecodeReport("x", 100, 1, 0.01).ok
    out = tmp_path / "exports" / "bundle"
    with pytest.raises(ExportError) as e:
        export_bundle(tiny_checkpoint("rnn"), out, jpeg_decode="scaled", images=three)
    assert "--max-caption-change" in str(e.value) and "2 of 100" in str(e.value)
    assert calls == [(three, 0.01, "scaled")]
    _no_bundle(out)


def test_model_config_keeps_the_rule(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    from captool.export import ExportError, export_bundle
    from captool.training import CaptioningRNN, ModelConfig, TrainingError, load_checkpoint, save_checkpoint
    from captool.training.config import TrainConfig

    with pytest.raises(TrainingError) as e:
        ModelConfig(cell_type="rnn", vocab_size=16, jpeg_decode="fast")
    assert "full" in str(e.value) and "scaled" in str(e.value)
    with pytest.raises(TrainingError):
        TrainConfig(jpeg_decode="fast")
    assert TrainConfig().jpeg_decode == "full" and TrainConfig(jpeg_decode="scaled").jpeg_decode == "scaled"
    assert ModelConfig(cell_type="rnn", vocab_size=16).jpeg_decode == "full"

    base = load_checkpoint(tiny_checkpoint("rnn"))
    assert base.config.jpeg_decode == "full"
    model = CaptioningRNN({t: i for i, t in enumerate(base.idx_to_token)}, cell_type="rnn", wordvec_dim=16,
                          hidden_dim=16, backbone_width=0.25, jpeg_decode="scaled")
    assert model.config.jpeg_decode == "scaled"
    run_dir = tmp_path / "run"
    save_checkpoint(model, run_dir)
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["config"]["jpeg_decode"] == "scaled"
    assert load_checkpoint(run_dir).config.jpeg_decode == "scaled"

    out = tmp_path / "exports" / "bundle"
    for checkpoint in (model, run_dir):  # its own rule is the default: "scaled" wants held-out photos
        with pytest.raises(ExportError) as e:
            export_bundle(checkpoint, out)
        assert "--images" in str(e.value)
        _no_bundle(out)

    del meta["config"]["jpeg_decode"]  # a model.json from before the rule existed
    (run_dir / "model.json").write_text(json.dumps(meta))
    assert load_checkpoint(run_dir).config.jpeg_decode == "full"


def test_train_cli_refuses_an_unknown_rule(synth_data, tmp_path):
    pytest.importorskip("torch")
    data = synth_data(4, 2, 0)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--data", str(data),
                                 "--jpeg-decode", "fast"])
    assert result.exit_code == 2, result.output
    assert "--jpeg-decode" in result.output and "Traceback" not in result.output


# --- 8. training data is decoded by the model's rule ---------------------------------------------

def test_load_data_decodes_by_the_rule(tmp_path):
    pytest.importorskip("torch")
    from captool.datasets.synth import write_dataset
    from captool.training.data import load_data

    root = tmp_path / "photos"
    write_dataset(root, train=4, val=2, seed=2, photo=(480, 480))
    assert jpeg_scale(480, 480, S) == 2
    by_rule = {rule: load_data(root, jpeg_decode=rule) for rule in JPEG_DECODES}
    for split in ("train", "val"):
        files = sorted((root / split).glob("*.jpg"))
        assert len(files) == (4 if split == "train" else 2)
        for rule, data in by_rule.items():
            images = getattr(data, split).images.numpy()
            assert images.dtype == np.uint8 and images.shape == (len(files), 3, S, S)
            np.testing.assert_array_equal(images, np.stack([preprocess(f, S, rule) for f in files]))
        assert not np.array_equal(getattr(by_rule["full"], split).images.numpy(),
                                  getattr(by_rule["scaled"], split).images.numpy())
    np.testing.assert_array_equal(load_data(root).train.images.numpy(), by_rule["full"].train.images.numpy())
