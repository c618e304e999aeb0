"""The attention cache: keys and values computed once per image, a step that reads them instead of Wattn.

Its math against the course's attention step, the runtime's two decoding paths against each other and
PyTorch, the switches, older bundles without a cache, and validation catching a wrong cached step.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captool import Captioner  # noqa: E402
from captool.bundle import ATTENTION_CACHE, DECODER_STEP_CACHED, MANIFEST, sha256_file  # noqa: E402
from captool.cli import app  # noqa: E402
from captool.errors import BundleError  # noqa: E402
from captool.export import verify_bundle  # noqa: E402
from captool.training import load_checkpoint  # noqa: E402
from captool.training.errors import TrainingError  # noqa: E402
from captool.training.layers import (attention_cache, cached_attention_step, dot_product_attention,  # noqa: E402
                                     lstm_step_forward)

runner = CliRunner()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 112, 112), dtype=np.uint8)  # (N, 3, S, S)


def _rewrite_manifest(bundle, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_cached_step_is_the_course_attention_step_reassociated():
    g = torch.Generator().manual_seed(0)
    N, D, H = 3, 5, 8
    x, h, c = (torch.randn(N, k, generator=g, dtype=torch.float64) for k in (D, H, H))
    A = torch.randn(N, H, 4, 4, generator=g, dtype=torch.float64)
    Wx, Wh, Wattn = (torch.randn(k, 4 * H, generator=g, dtype=torch.float64) for k in (D, H, H))
    b = torch.randn(4 * H, generator=g, dtype=torch.float64)

    attn, weights = dot_product_attention(h, A)
    want_h, want_c = lstm_step_forward(x, h, c, Wx, Wh, b, attn, Wattn)
    keys, values = attention_cache(A, Wattn)
    assert keys.shape == (N, H, 16) and values.shape == (N, 16, 4 * H)
    got_h, got_c, got_weights = cached_attention_step(x, h, c, keys, values, Wx, Wh, b)
    for got, want in ((got_h, want_h), (got_c, want_c), (got_weights, weights)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_model_step_cached_equals_step(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("attention")).eval()
    x = torch.from_numpy(images(4, seed=11))
    token = torch.tensor([1, 4, 7, 2])
    with torch.no_grad():
        state = model.encode(x)
        want = model.step(token, state["h0"], state["c0"], state["features"])
        got = model.step_cached(token, state["h0"], state["c0"], **model.attention_cache(state["features"]))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    lstm = load_checkpoint(tiny_checkpoint("lstm"))
    with pytest.raises(TrainingError, match="attention models"):
        lstm.attention_cache(state["features"])


def test_both_decoding_paths_give_pytorchs_tokens(tiny_bundle, tiny_checkpoint):
    bundle = tiny_bundle("attention")
    model = load_checkpoint(tiny_checkpoint("attention")).eval()
    cached, plain = Captioner(bundle, device="cpu"), Captioner(bundle, device="cpu", attention_cache=False)
    assert cached.attention_cache and cached.step_graph == "decoder_step_cached"  # the default where present
    assert not plain.attention_cache and plain.step_graph == "decoder_step"
    x = images(5, seed=12)
    encoded = cached.encode(x)
    H = cached.manifest.hidden_dim
    assert encoded["attention_keys"].shape == (5, H, 16) and encoded["attention_values"].shape == (5, 16, 4 * H)
    assert "attention_keys" not in plain.encode(x)
    want = model.sample(torch.from_numpy(x), max_length=cached.manifest.max_length).numpy()
    np.testing.assert_array_equal(cached.generate(x), want)
    np.testing.assert_array_equal(plain.generate(x), want)
    for k in (2, 3):  # beams reorder h and c; the cache, like the features, stays as it is
        np.testing.assert_array_equal(cached.beam_search(x, k).tokens, plain.beam_search(x, k).tokens)
    plain_run = Captioner(bundle, device="cpu", io_binding=False)  # every step through session.run
    np.testing.assert_array_equal(plain_run.generate(x), want)


def test_switches_and_a_bundle_without_a_cache(tiny_bundle):
    assert Captioner(tiny_bundle("attention"), device="cpu", attention_cache=False).step_graph == "decoder_step"
    assert Captioner(tiny_bundle("attention"), device="cpu").step_graph == "decoder_step_cached"
    with pytest.raises(BundleError, match="has no attention cache .*lstm bundle"):
        Captioner(tiny_bundle("lstm"), device="cpu", attention_cache=True)
    assert not Captioner(tiny_bundle("lstm"), device="cpu").attention_cache
    with pytest.raises(BundleError, match="has no attention cache"):
        Captioner(tiny_bundle("rnn"), device="cpu", attention_cache=True)


def test_an_attention_bundle_from_before_the_cache_still_runs(tiny_bundle, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle("attention"), bundle)
    for name in (ATTENTION_CACHE, DECODER_STEP_CACHED):
        (bundle / name).unlink()

    def drop_cache(manifest):
        for graph, name in (("attention_cache", ATTENTION_CACHE), ("decoder_step_cached", DECODER_STEP_CACHED)):
            del manifest["files"][name], manifest["graphs"][graph]
    _rewrite_manifest(bundle, drop_cache)
    old = Captioner(bundle, device="cpu")
    assert old.step_graph == "decoder_step"
    x = images(3, seed=13)
    np.testing.assert_array_equal(old.generate(x), Captioner(tiny_bundle("attention"), device="cpu").generate(x))
    with pytest.raises(BundleError, match="exported before captool had one"):
        Captioner(bundle, device="cpu", attention_cache=True)


def test_half_a_cache_is_a_damaged_manifest(tiny_bundle, tmp_path):
    bundle = tmp_path / "half"
    shutil.copytree(tiny_bundle("attention"), bundle)
    _rewrite_manifest(bundle, lambda m: m["files"].pop(ATTENTION_CACHE))
    with pytest.raises(BundleError, match="decoder_step_cached.onnx without its pair"):
        Captioner(bundle, device="cpu")


def test_verify_catches_a_cached_step_that_differs(tiny_bundle, tiny_checkpoint, tmp_path):
    bundle = tmp_path / "wrong"
    shutil.copytree(tiny_bundle("attention"), bundle)
    path = bundle / DECODER_STEP_CACHED
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name == "out_projector.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.01), init.name))
    onnx.save_model(proto, str(path))

    def rehash(manifest):
        manifest["files"][DECODER_STEP_CACHED] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    _rewrite_manifest(bundle, rehash)

    report = verify_bundle(bundle, tiny_checkpoint("attention"))
    assert not report.ok
    failing = {(d.graph, d.output) for d, _ in report.worst() if not report.within(d)}
    assert failing == {("decoder_step_cached", "logits")}  # decoder_step.onnx itself still passes
    result = runner.invoke(app, ["verify", str(bundle), "--checkpoint", str(tiny_checkpoint("attention"))])
    assert result.exit_code == 1 and "result: FAIL" in result.output
