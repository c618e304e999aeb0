"""`captool run`: inputs, records in input order, hostile inputs among good ones, exit codes, streaming."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captool import Captioner, sessions
from captool import run as run_module
from captool.cli import app
from captool.errors import BundleError
from captool.models import default_bundle
from captool.run import Item, expand_inputs, load_batches, progress_bar

runner = CliRunner()


def picture(path, seed, size=(60, 48)):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def run(*args, **kwargs):
    return runner.invoke(app, ["run", *map(str, args)], catch_exceptions=False, **kwargs)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("rnn")


@pytest.fixture(scope="module")
def captioner(bundle):
    return Captioner(bundle, device="cpu")


def no_traceback(result):
    assert "Traceback" not in result.output and "Traceback" not in result.stderr


# --- output and exit codes ---------------------------------------------------------------------

def test_text_output_is_path_tab_caption_in_order(bundle, captioner, tmp_path):
    paths = [picture(tmp_path / f"{name}.png", seed) for seed, name in enumerate(["c", "a", "b"])]
    result = run(*paths, "--model", bundle, "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    want = captioner.caption(paths)
    assert lines == [f"{p}\t{c.text}" for p, c in zip(paths, want)]
    no_traceback(result)


def test_hostile_inputs_get_records_between_good_ones_in_order(bundle, captioner, tmp_path):
    good = [picture(tmp_path / f"good{i}.png", i) for i in range(3)]
    data = good[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    # A header claiming 30000×30000 pixels: refused before any decoding.
    Image.new("L", (1, 1)).save(tmp_path / "bomb.png")
    raw = bytearray((tmp_path / "bomb.png").read_bytes())
    raw[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # and its checksum
    (tmp_path / "bomb.png").write_bytes(bytes(raw))
    inputs = [good[0], tmp_path / "missing.png", tmp_path / "truncated.png", good[1], tmp_path / "notes.jpg",
              tmp_path / "empty_dir", tmp_path / "bomb.png", good[2], tmp_path / "nothing*.png"]
    result = run(*inputs, "--model", bundle, "--json", "--batch-size", "2")
    assert result.exit_code == 1
    no_traceback(result)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    want = {str(p): c for p, c in zip(good, captioner.caption(good))}
    reasons = {"missing.png": "no such file", "truncated.png": "cannot decode", "notes.jpg": "not an image",
               "empty_dir": "no image files", "bomb.png": "decompression bomb", "nothing*.png": "no files match"}
    for r in records:
        if r["path"] in want:
            assert set(r) == {"path", "caption", "tokens"}
            assert r["caption"] == want[r["path"]].text and r["tokens"] == want[r["path"]].tokens
        else:
            assert set(r) == {"path", "error"}
            reason = next(v for k, v in reasons.items() if r["path"].endswith(k))
            assert reason in r["error"] and "\n" not in r["error"]


def test_text_mode_reports_failures_on_stderr(bundle, tmp_path):
    good = picture(tmp_path / "ok.png", 0)
    result = run(good, tmp_path / "missing.png", "--model", bundle)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith(f"{good}\t") and len(result.stdout.splitlines()) == 1
    assert "missing.png: no such file" in result.stderr


def test_directories_recurse_sorted_images_only_and_globs_expand(bundle, tmp_path):
    for rel in ["b/2.png", "a/z.jpg", "a/sub/1.PNG", "0.bmp"]:
        picture(tmp_path / "photos" / rel, len(rel))
    (tmp_path / "photos" / "readme.txt").write_text("skip me")
    result = run(tmp_path / "photos", "--model", bundle, "--json")
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert got == [str(tmp_path / "photos" / rel) for rel in ["0.bmp", "a/sub/1.PNG", "a/z.jpg", "b/2.png"]]
    # A quoted glob, for shells that do not expand it: captool does (sorted, recursive with **).
    result = run(str(tmp_path / "photos" / "**" / "*.png"), "--model", bundle, "--json")
    got = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert got == [str(tmp_path / "photos" / "b" / "2.png")]


def test_beam_and_max_length_options(bundle, captioner, tmp_path):
    p = picture(tmp_path / "a.png", 3)
    result = run(p, "--model", bundle, "--json", "--beam-size", "3", "--max-length", "4")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    want = captioner.caption([p], beam_size=3, max_length=4)[0]
    assert record["tokens"] == want.tokens and len(record["tokens"]) <= 4


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch-size"),
    (["--device", "tpu"], "unknown --device"),
    (["--beam-size", "-1"], "beam-size"),
])
def test_usage_errors_exit_2(bundle, tmp_path, args, message):
    result = run(picture(tmp_path / "a.png", 0), "--model", bundle, *args)
    assert result.exit_code == 2 and message in result.stderr
    no_traceback(result)


def test_bundle_errors_exit_2_before_reading_images(bundle, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / "decoder_step.onnx").write_bytes(b"\0" + (tampered / "decoder_step.onnx").read_bytes()[1:])
    for model, message in ((tampered, "does not match the manifest"), (tmp_path / "none", "does not exist")):
        result = run(tmp_path / "whatever.png", "--model", model, "--json")
        assert result.exit_code == 2 and message in result.stderr and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1
        no_traceback(result)


def test_device_notice_and_cuda_refusal(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "_can_load", lambda lib: False)
    p = picture(tmp_path / "a.png", 0)
    auto = run(p, "--model", bundle)
    assert auto.exit_code == 0 and "captool: running on CPU: no NVIDIA driver" in auto.stderr
    assert auto.stderr.count("\n") == 1 and "\t" in auto.stdout  # one notice line; captions on stdout
    cuda = run(p, "--model", bundle, "--device", "cuda")
    assert cuda.exit_code == 2 and "--device cuda: no NVIDIA driver" in cuda.stderr
    no_traceback(cuda)


def test_verbose_names_the_providers(bundle, tmp_path):
    result = run(picture(tmp_path / "a.png", 0), "--model", bundle, "--device", "cpu", "--verbose")
    assert result.exit_code == 0 and "CPUExecutionProvider" in result.stderr


# --- the default bundle ------------------------------------------------------------------------

def test_default_bundle_from_environment(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTOOL_MODEL", str(bundle))
    assert default_bundle() == bundle
    result = run(picture(tmp_path / "a.png", 0), "--json")
    assert result.exit_code == 0 and "caption" in json.loads(result.stdout)


@pytest.mark.parametrize("value", ["", "  ", "/no/such/bundle", __file__])
def test_default_bundle_variable_that_names_no_directory_is_a_clear_error(value, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTOOL_MODEL", value)
    with pytest.raises(BundleError, match="CAPTOOL_MODEL=.* is not a bundle directory: set it to .* or unset it"):
        default_bundle()
    result = run(picture(tmp_path / "a.png", 0), "--json")
    assert result.exit_code == 2 and "CAPTOOL_MODEL" in result.stderr and result.stdout == ""


def test_default_bundle_is_the_shipped_one_in_the_models_package(monkeypatch):
    import captool.models

    monkeypatch.delenv("CAPTOOL_MODEL", raising=False)
    assert default_bundle() == Path(captool.models.__file__).resolve().parent / "shapes-attention"
    monkeypatch.setattr(captool.models, "DEFAULT_BUNDLE", "no-such-bundle")
    with pytest.raises(BundleError, match="the shipped bundle is missing from this install .*no-such-bundle"):
        default_bundle()


# --- streaming ---------------------------------------------------------------------------------

def test_loader_stays_a_bounded_number_of_batches_ahead(tmp_path):
    # Memory stays flat because the loader never runs more than `depth` batches ahead of the decoder.
    paths = [picture(tmp_path / f"{i:03d}.png", i, size=(8, 8)) for i in range(40)]
    read = []
    lock = threading.Lock()
    original = run_module._read

    def counting_read(item, size, jpeg_decode):
        with lock:
            read.append(item.path)
        return original(item, size, jpeg_decode)

    run_module._read = counting_read
    try:
        consumed, ahead = 0, []
        for batch in load_batches([Item(str(p)) for p in paths], 112, batch_size=4, depth=2):
            consumed += len(batch.items)
            time.sleep(0.02)  # a slow decoder
            with lock:
                ahead.append(len(read) - consumed)
            assert batch.images.shape == (len(batch.readable), 3, 112, 112)
    finally:
        run_module._read = original
    assert consumed == 40
    assert max(ahead) <= (2 + 1) * 4  # the queue's two batches plus the one being read


def test_expand_inputs_keeps_a_file_named_like_a_glob(tmp_path):
    odd = picture(tmp_path / "shot[1].png", 0)
    assert expand_inputs([str(odd)]) == [Item(str(odd))]


def test_progress_bar_only_on_a_terminal_for_many_inputs():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    quiet, loud, few = io.StringIO(), Terminal(), Terminal()
    for stream, total in ((quiet, 100), (loud, 100), (few, 3)):
        bar = progress_bar(total, stream)
        for _ in range(total):
            bar.update()
        bar.close()
    assert quiet.getvalue() == "" and few.getvalue() == ""
    assert "100/100 images" in loud.getvalue()
