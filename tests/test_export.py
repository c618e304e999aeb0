"""captool.export: clean graphs, the bundle on disk, parity to the token, and the export/verify commands."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captool.bundle import (ATTENTION_CACHE, DECODER_STEP, DECODER_STEP_CACHED, ENCODER, GRAPH_FILES, MANIFEST,  # noqa: E402
                            cache_signature, graph_signature, load_manifest, sha256_file)
from captool.captioner import Captioner  # noqa: E402
from captool.cli import app  # noqa: E402
from captool.decode import greedy  # noqa: E402
from captool.errors import BundleError  # noqa: E402
from captool.export import ExportError, ParityReport, check_graph, export_encoder, verify_bundle  # noqa: E402
from captool.export import bundle as bundle_module  # noqa: E402
from captool.export.graphs import io_specs  # noqa: E402
from captool.export.validate import BatchResult, OutputDiff, compare_batch, load_model  # noqa: E402

CELLS = ["rnn", "lstm", "attention"]
runner = CliRunner()


def perturb_initializer(path, name="out_projector.bias", delta=0.01):
    """Add `delta` to one initializer of an ONNX file in place: a graph that no longer equals PyTorch."""
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(delta), name))
    onnx.save_model(model, str(path))


def rehash(bundle):
    """Make the manifest's sha256 agree with the files again, as a careless re-packager would."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("cell", CELLS)
def test_bundle_is_proven_equal_at_several_batch_sizes(tiny_bundle, tiny_checkpoint, cell):
    bundle = tiny_bundle(cell)
    manifest = load_manifest(bundle)  # schema and every sha256
    raw = manifest.raw
    assert raw["cell_type"] == cell and raw["precision"] == "fp32" and raw["opset"] >= 18
    cached = [ATTENTION_CACHE, DECODER_STEP_CACHED] if cell == "attention" else []  # the attention cache
    assert set(raw["files"]) == {ENCODER, DECODER_STEP, *cached}
    assert sorted(p.name for p in bundle.iterdir()) == sorted([ENCODER, DECODER_STEP, MANIFEST, *cached])
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp dir left beside it
    parity = raw["parity"]
    assert parity["ok"] is True
    steps = ["decoder_step"] + (["decoder_step_cached"] if cached else [])
    # Every step the runtime may decode with is proven on its own batches.
    assert [(b["step_graph"], b["batch_size"]) for b in parity["batches"]] == [(s, n) for s in steps for n in (1, 3, 17)]
    outputs = {(d["graph"], d["output"]) for b in parity["batches"] for d in b["diffs"]}
    sig = {**graph_signature(cell), **(cache_signature() if cached else {})}
    assert outputs == {(g, n) for g in ["encoder", *steps, *(["attention_cache"] if cached else [])]
                       for n in sig[g]["outputs"]}
    for b in parity["batches"]:
        assert b["equal"] == b["batch_size"] and not b["mismatches"] and b["steps"] >= 1
        assert all(d["max_abs"] <= 1e-4 and d["bound"] <= 1 for d in b["diffs"])
    # The tiny model's captions end: the <END>/<NULL> rule is exercised, not only max_length.
    tokens = Captioner(bundle, device="cpu").generate(np.zeros((2, 3, 112, 112), np.uint8))
    model = load_model(tiny_checkpoint(cell))
    assert np.array_equal(tokens, model.sample(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).numpy())
    assert (tokens == 2).any(axis=1).all()


@pytest.mark.parametrize("cell", CELLS)
def test_graphs_are_clean_with_a_dynamic_batch(tiny_bundle, tiny_checkpoint, cell):
    bundle = tiny_bundle(cell)
    model = load_model(tiny_checkpoint(cell))
    specs = io_specs(model.config)
    assert set(specs) == {"encoder", "decoder_step"} | ({"attention_cache", "decoder_step_cached"} if cell == "attention" else set())
    for graph, name in ((graph, GRAPH_FILES[graph]) for graph in specs):
        info = check_graph(bundle / name, graph, specs[graph])  # raises on anything unclean
        assert not {"If", "Loop", "Scan"} & set(info.op_types)
        proto = onnx.load(str(bundle / name))
        for value in list(proto.graph.input) + list(proto.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "N" and all(d.HasField("dim_value") for d in dims[1:])
        assert not proto.graph.metadata_props  # no stack traces with build paths in the bundle
    # Traced at N=2; runs at N=5 too, equal to PyTorch.
    captioner = Captioner(bundle, device="cpu")
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 112, 112), dtype=np.uint8)
    encoded = captioner.encode(images)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(images))
    for name, value in ref.items():
        assert encoded[name].shape[0] == 5
        np.testing.assert_allclose(encoded[name], value.numpy(), atol=1e-4)


def test_verify_other_batch_sizes_and_user_images(tiny_bundle, tiny_checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for i, size in enumerate([(150, 90), (112, 112), (64, 200)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    report = verify_bundle(tiny_bundle("lstm"), tiny_checkpoint("lstm"), images=tmp_path, batch_sizes=(4, 9))
    assert report.ok, report.table()
    assert [(b.source, b.batch_size) for b in report.batches] == [("random", 4), ("random", 9), (str(tmp_path), 3)]
    assert "PASS" in report.table()


def test_verify_command_exit_codes(tiny_bundle, tiny_checkpoint, tmp_path):
    good = runner.invoke(app, ["verify", str(tiny_bundle("rnn")), "--checkpoint", str(tiny_checkpoint("rnn"))])
    assert good.exit_code == 0, good.output
    assert "result: PASS" in good.output

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle("rnn"), bad)
    perturb_initializer(bad / DECODER_STEP)
    rehash(bad)
    result = runner.invoke(app, ["verify", str(bad), "--checkpoint", str(tiny_checkpoint("rnn")), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    worst = {d["output"]: d["max_abs"] for b in report["batches"] for d in b["diffs"]}
    assert report["ok"] is False and worst["logits"] > 1e-3 and worst["h0"] <= 1e-4

    other = runner.invoke(app, ["verify", str(tiny_bundle("rnn")), "--checkpoint", str(tiny_checkpoint("lstm"))])
    assert other.exit_code == 1 and "not exported from this checkpoint" in other.output


@pytest.mark.parametrize("damage, message", [
    ("byte", "sha256"), ("missing", "is missing"), ("schema", "schema version 99"),
])
def test_tampered_bundle_is_rejected_at_load(tiny_bundle, tiny_checkpoint, tmp_path, damage, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("rnn"), bundle)
    if damage == "byte":
        data = bytearray((bundle / ENCODER).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / ENCODER).write_bytes(bytes(data))
    elif damage == "missing":
        (bundle / DECODER_STEP).unlink()
    else:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["schema_version"] = 99
        (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        Captioner(bundle, device="cpu")
    result = runner.invoke(app, ["verify", str(bundle), "--checkpoint", str(tiny_checkpoint("rnn"))])
    assert result.exit_code == 2 and message in result.output


def _reuse_graphs(monkeypatch, source, perturb=False):
    """Export without tracing: copy the session bundle's graphs (the exporter is deterministic, so they are
    what tracing the same checkpoint writes); optionally perturb the step's weights after "export"."""
    def encoder(model, path, **kw):
        shutil.copy(source / ENCODER, path)

    def decoder_step(model, path, **kw):
        shutil.copy(source / DECODER_STEP, path)
        if perturb:
            perturb_initializer(path)

    monkeypatch.setattr(bundle_module, "export_encoder", encoder)
    monkeypatch.setattr(bundle_module, "export_decoder_step", decoder_step)


def test_failed_validation_exits_1_and_leaves_nothing(tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch):
    _reuse_graphs(monkeypatch, tiny_bundle("rnn"), perturb=True)
    out = tmp_path / "out" / "bundle"
    result = runner.invoke(app, ["export", str(tiny_checkpoint("rnn")), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert re.search(r"decoder_step +logits .* FAIL", result.output) and "result: FAIL" in result.output
    assert "no bundle was written" in result.output
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp dir either


def test_export_refuses_to_overwrite_without_force(tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch):
    run = str(tiny_checkpoint("rnn"))
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("lstm"), out)
    refused = runner.invoke(app, ["export", run, "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert load_manifest(out).cell_type == "lstm"  # untouched

    _reuse_graphs(monkeypatch, tiny_bundle("rnn"))
    forced = runner.invoke(app, ["export", run, "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_manifest(out).cell_type == "rnn" and load_manifest(out).raw["parity"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # old bundle and temp dir gone

    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    kept = runner.invoke(app, ["export", run, "--out", str(other), "--force"])
    assert kept.exit_code == 2 and "not a captool bundle" in kept.output
    assert (other / "keep.txt").read_text() == "mine"


def test_opset_below_18_is_refused_with_the_fix(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--opset 18"):
        export_encoder(load_model(tiny_checkpoint("rnn")), tmp_path / "e.onnx", opset=17)


class TorchAsBundle:
    """A stand-in for Captioner that runs the PyTorch model and nudges chosen logits (for the tie rules)."""

    def __init__(self, model, vocab, nudge):
        self.model, self.vocab, self.nudge = model, vocab, nudge
        self.manifest = type("M", (), {"max_length": 4})()

    def encode(self, images):
        with torch.no_grad():
            return {k: v.numpy() for k, v in self.model.encode(torch.from_numpy(images)).items()}

    def step(self, feeds):
        with torch.no_grad():
            out = {k: v.numpy().copy() for k, v in self.model.step(*(torch.from_numpy(feeds[n]) for n in ("token", "h"))).items()}
        out["logits"][:, self.nudge[0]] += self.nudge[1]
        return out

    def generate(self, images):
        return greedy(self.encode(images), self.step, start_id=1, end_id=2, null_id=0, max_length=4)


def test_near_tie_is_reported_apart_and_other_differences_fail(tiny_checkpoint):
    model = load_model(tiny_checkpoint("rnn"))
    from captool.vocab import Vocab

    vocab = Vocab(model.idx_to_token)
    a, b = 5, 6  # make a and b the two best words, b below a by 3e-7 (a near-tie)
    with torch.no_grad():
        model.out_projector.weight[b] = model.out_projector.weight[a]
        model.out_projector.bias[a] = 20.0
        model.out_projector.bias[b] = 20.0 - 3e-7 * 8  # ~2.4e-6 apart, well below the 1e-5 tie gap
    images = np.zeros((2, 3, 112, 112), np.uint8)
    tie = compare_batch(TorchAsBundle(model, vocab, (b, 5e-6)), model, images, "random")
    assert tie.equal == 0 and len(tie.near_ties) == 2 and not tie.mismatches
    assert tie.near_ties[0]["step"] == 0 and tie.near_ties[0]["gap"] < 1e-5
    assert ParityReport(batches=[tie]).ok

    model = load_model(tiny_checkpoint("rnn"))  # no tie now: a different word is a real difference
    real = compare_batch(TorchAsBundle(model, vocab, (7, 50.0)), model, images, "random")
    assert len(real.mismatches) == 2 and not real.near_ties
    report = ParityReport(batches=[real])
    assert not report.ok and "image 0: step 0" in report.table()


def test_report_treats_nan_as_failure_and_stays_valid_json():
    nan = BatchResult(source="random", batch_size=1, steps=1, equal=1,
                      diffs=[OutputDiff("encoder", "h0", float("nan"), float("nan"))])
    report = ParityReport(batches=[nan])
    assert not report.ok and "FAIL" in report.table()
    json.dumps(report.to_json(), allow_nan=False)


def test_missing_export_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if `pip install captool` without [export]
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "captool[export]" in result.output


@pytest.mark.parametrize("cell", CELLS)
def test_step_looks_up_the_folded_input_projection(tiny_bundle, tiny_checkpoint, cell):
    """W_embed @ Wx + b is one table in each step graph: no Wx, no bias add, the same numbers."""
    from onnx import numpy_helper

    from captool.export.fold import TABLE

    model = load_model(tiny_checkpoint(cell))
    with torch.no_grad():
        want = (model.word_embedding.W_embed @ model.cell.Wx + model.cell.b).numpy()  # (V, G)
    gone = [model.cell.Wx.detach().numpy(), model.word_embedding.W_embed.detach().numpy(), model.cell.b.detach().numpy()]
    steps = [DECODER_STEP] + ([DECODER_STEP_CACHED] if cell == "attention" else [])
    for step in steps:
        proto = onnx.load(str(tiny_bundle(cell) / step))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        np.testing.assert_allclose(inits[TABLE], want, rtol=1e-5, atol=1e-6)
        assert not any(v.shape == g.shape and np.array_equal(v, g) for v in inits.values() for g in gone)
        consumers = [n.op_type for n in proto.graph.node if TABLE in n.input]
        assert consumers == ["Gather"]  # one lookup node: F.embedding traces to a plain Gather


def test_fold_leaves_a_graph_without_the_pattern_alone():
    from onnx import TensorProto, helper, numpy_helper

    from captool.export.fold import fold_input_projection

    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert fold_input_projection(model) is False
    assert model.SerializeToString() == before
