"""captool.records and captool.ray's actor, called directly: no Ray cluster, no torch.

One record per input whatever the input, from paths or from bytes, equal to `captool run --json`'s.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from captool import BundleError, Captioner
from captool.models import default_bundle
from captool.ray.actor import BundleFiles, CaptionActor
from captool.records import COLUMNS, Record, bundle_id, caption_batch
from captool.run import run_inputs


def hostile_folder(root):
    """Good PNGs, an EXIF-rotated JPEG, an RGBA PNG, a truncated PNG, a zero-byte file, text named .png."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (112, 140, 3), dtype=np.uint8)).save(root / f"good{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (112, 112, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    (root / "truncated.png").write_bytes((root / "good0.png").read_bytes()[:200])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    return sorted(root.iterdir())


@pytest.fixture(scope="module")
def captioner():
    return Captioner(default_bundle(), device="cpu", threads=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return hostile_folder(tmp_path_factory.mktemp("ray_records") / "images")


def run_json(paths) -> list[str]:
    """`captool run --json`'s lines for these inputs."""
    out = io.StringIO()
    run_inputs([str(p) for p in paths], device="cpu", threads=1, as_json=True, out=out, err=io.StringIO())
    return out.getvalue().splitlines()


def test_records_from_paths_and_bytes_equal_captool_runs(captioner, files):
    want = run_json(files)
    from_paths = caption_batch(captioner, files)
    from_bytes = caption_batch(captioner, [p.read_bytes() for p in files], [str(p) for p in files])
    assert [r.to_json() for r in from_paths] == want
    assert [r.to_json() for r in from_bytes] == want
    assert sum(r.error is not None for r in from_paths) == 3  # truncated, empty, text
    bundle = bundle_id(default_bundle())
    assert all(r.bundle == bundle for r in from_paths + from_bytes)


def test_bad_and_zero_byte_inputs_are_error_records_naming_the_file(captioner, files):
    bad = [p for p in files if p.name in ("empty.png", "truncated.png", "text.png")]
    for record in caption_batch(captioner, [p.read_bytes() for p in bad], [str(p) for p in bad]):
        assert record.caption is None and record.tokens is None
        assert record.error.startswith(record.path + ": ") and "\n" not in record.error
        assert set(json.loads(record.to_json())) == {"path", "error"}


def test_an_all_error_batch_keeps_the_schema(captioner, tmp_path):
    records = caption_batch(captioner, [b"", b"junk"], ["a.png", "b.jpg"])
    assert [r.path for r in records] == ["a.png", "b.jpg"] and all(r.error for r in records)
    assert all(list(r.to_row()) == list(COLUMNS) for r in records)
    assert caption_batch(captioner, []) == []


def test_names_are_needed_for_bytes(captioner):
    with pytest.raises(ValueError, match="need names"):
        caption_batch(captioner, [b"x"])
    with pytest.raises(ValueError, match="one name per source"):
        caption_batch(captioner, [b"x", b"y"], ["a.png"])


def test_a_record_survives_a_row(captioner, files):
    for record in caption_batch(captioner, files[:2] + [b""], [str(files[0]), str(files[1]), "e.png"]):
        assert Record.from_row(record.to_row()) == record


def test_the_actor_called_directly_with_paths_and_bytes(files):
    actor = CaptionActor(default_bundle(), threads=1)
    want = run_json(files)
    paths = np.array([str(p) for p in files], dtype=object)
    by_value = np.array([p.read_bytes() for p in files], dtype=object)
    assert [r.to_json() for r in actor.records({"path": paths})] == want
    assert [r.to_json() for r in actor.records({"path": paths, "bytes": by_value})] == want


def test_the_actors_table_has_one_schema_for_every_batch(files):
    pytest.importorskip("pyarrow")
    actor = CaptionActor(default_bundle(), threads=1)
    mixed = actor({"path": [str(p) for p in files], "bytes": [p.read_bytes() for p in files]})
    errors = actor({"path": ["a.png", "b.png"], "bytes": [b"", b"junk"]})
    assert mixed.schema == errors.schema and mixed.column_names == list(COLUMNS)
    assert mixed.num_rows == len(files) and errors.column("caption").null_count == 2


def test_a_bundle_shipped_by_value_is_checked_on_the_worker(files):
    shipped = BundleFiles.read(default_bundle())
    actor = CaptionActor(shipped, threads=1)
    assert actor.bundle == shipped.id == bundle_id(default_bundle())
    assert [r.to_json() for r in actor.records({"path": [str(files[0])]})] == run_json(files[:1])

    encoder = dict(shipped.files)
    encoder["encoder.onnx"] = encoder["encoder.onnx"][:-1] + bytes([encoder["encoder.onnx"][-1] ^ 1])
    with pytest.raises(BundleError, match="sha256"):
        CaptionActor(BundleFiles(shipped.id, encoder), threads=1)
    manifest = dict(shipped.files, **{"manifest.json": shipped.files["manifest.json"] + b" "})
    with pytest.raises(BundleError, match="damaged in transit"):
        CaptionActor(BundleFiles(shipped.id, manifest), threads=1)
    with pytest.raises(BundleError, match="outside its folder"):
        CaptionActor(BundleFiles(shipped.id, dict(shipped.files, **{"../x.onnx": b""})), threads=1)


def test_a_worker_with_another_bundle_is_refused():
    with pytest.raises(BundleError, match="not the driver's"):
        CaptionActor(default_bundle(), threads=1, expect="0" * 64)


def test_a_folder_keeps_its_bundle(tmp_path):
    from captool.errors import CaptoolError
    from captool.ray.folder import commit, open_folder, written_paths

    out = tmp_path / "out"
    open_folder(out, "a" * 64)
    commit(out, 0, [Record("x.png", "a cat", [4, 5]), Record("y.png", error="y.png: no such file")])
    (out / ".part-000001.jsonl.tmp").write_text("half a part")  # a crashed run's
    open_folder(out, "a" * 64)
    assert written_paths(out) == {"x.png": 1, "y.png": 1} and not list(out.glob(".part-*"))
    with pytest.raises(CaptoolError, match="another --out"):
        open_folder(out, "b" * 64)


def test_engine_ray_usage_errors_are_one_line(files):
    from typer.testing import CliRunner

    from captool.cli import app

    for args in (["--engine", "ray"], ["--out", "x"], ["--engine", "spark", "--out", "x"]):
        result = CliRunner().invoke(app, ["run", str(files[0]), *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and "--engine" in result.stderr
