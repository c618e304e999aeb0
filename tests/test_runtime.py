"""The Captioner on tiny exported bundles: PyTorch parity (greedy, beam, IO binding), load checks, providers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from captool import Captioner
from captool import sessions
from captool.bundle import STATE_FROM_ENCODER, STATE_FROM_STEP
from captool.decode import FeedStep
from captool.steps import BufferedStep, DeviceStep
from captool.errors import BundleError, CaptoolError, DeviceError

torch = pytest.importorskip("torch")

CELLS = ["rnn", "lstm", "attention"]


def images(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)  # (N,3,S,S)


@pytest.fixture(scope="module")
def loaded(tiny_bundle, tiny_checkpoint):
    """cell -> (Captioner, PyTorch model) for the same tiny checkpoint."""
    from captool.training import load_checkpoint

    cache = {}

    def get(cell):
        if cell not in cache:
            cache[cell] = Captioner(tiny_bundle(cell), device="cpu"), load_checkpoint(tiny_checkpoint(cell)).eval()
        return cache[cell]

    return get


@torch.no_grad()
def torch_beam_search(model, imgs: np.ndarray, k: int, max_length: int, alpha: float = 0.0):
    """The reference: the same beam search written in torch, with the PyTorch model as the step.

    Full stable descending sorts where the runtime partitions; torch.log_softmax where it has its
    own; index_select on torch tensors where it indexes numpy arrays. Returns (tokens [N,k,L], scores).
    """
    null, start, end = 0, 1, 2
    encoded = model.encode(torch.from_numpy(imgs))
    state = {STATE_FROM_ENCODER[n]: v.repeat_interleave(k, dim=0) for n, v in encoded.items()}  # (N*k, ...)
    n = imgs.shape[0]
    tokens = torch.full((n, k, max_length), null, dtype=torch.long)
    log_probs = torch.full((n, k), float("-inf"), dtype=torch.float64)
    log_probs[:, 0] = 0.0
    lengths = torch.zeros((n, k), dtype=torch.long)
    done = torch.zeros((n, k), dtype=torch.bool)
    word = torch.full((n * k,), start, dtype=torch.long)
    for t in range(max_length):
        out = model.step(word, **state)
        logp = torch.log_softmax(out["logits"].double(), dim=1)  # (N*k, V)
        vocab_size = logp.shape[1]
        logp = logp.view(n, k, vocab_size).clone()
        ended = torch.full((vocab_size,), float("-inf"), dtype=torch.float64)
        ended[null] = 0.0
        logp[done] = ended
        candidates = (log_probs[:, :, None] + logp).view(n, k * vocab_size)
        best = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]  # (N, k)
        parent, new_word = best // vocab_size, best % vocab_size
        log_probs = candidates.gather(1, best)
        tokens = tokens.gather(1, parent[:, :, None].expand(-1, -1, max_length)).clone()
        tokens[:, :, t] = new_word
        parent_done = done.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~parent_done).long()
        done = parent_done | (new_word == end) | torch.isneginf(log_probs)
        if bool(done.all()):
            break
        rows = (torch.arange(n)[:, None] * k + parent).view(-1)
        state.update({STATE_FROM_STEP[name]: v for name, v in out.items() if name in STATE_FROM_STEP})
        state = {name: v if name == "features" else v.index_select(0, rows) for name, v in state.items()}
        word = new_word.view(-1)
    scores = log_probs / ((5.0 + lengths) / 6.0) ** alpha if alpha else log_probs
    rank = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return tokens.gather(1, rank[:, :, None].expand(-1, -1, max_length)).numpy(), scores.gather(1, rank).numpy()


# --- parity with PyTorch --------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_greedy_equals_pytorch_sample(loaded, cell):
    captioner, model = loaded(cell)
    x = images(5, seed=1)
    want = model.sample(torch.from_numpy(x), max_length=captioner.manifest.max_length).numpy()
    np.testing.assert_array_equal(captioner.generate(x), want)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("k, alpha", [(3, 0.0), (4, 0.7)])
def test_beam_search_equals_the_pytorch_reference(loaded, cell, k, alpha):
    captioner, model = loaded(cell)
    x = images(4, seed=2)
    beams = captioner.beam_search(x, beam_size=k, length_penalty=alpha)
    want_tokens, want_scores = torch_beam_search(model, x, k, captioner.manifest.max_length, alpha)
    np.testing.assert_array_equal(beams.tokens, want_tokens)  # every beam, in rank order
    np.testing.assert_allclose(beams.scores, want_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(captioner.generate(x, beam_size=k, length_penalty=alpha), want_tokens[:, 0])


@pytest.mark.parametrize("cell", CELLS)
def test_beam_size_one_equals_greedy_on_the_bundle(loaded, cell):
    captioner, _ = loaded(cell)
    x = images(6, seed=3)
    np.testing.assert_array_equal(captioner.beam_search(x, 1).best, captioner.generate(x))


@pytest.mark.parametrize("cell", CELLS)
def test_device_step_gives_the_same_tokens(loaded, cell):
    # The CUDA code path (state kept as OrtValues between steps), run on the CPU provider.
    from captool.decode import beam_search, greedy

    plain, _ = loaded(cell)
    v = plain.vocab
    ids = dict(start_id=v.start_id, end_id=v.end_id, null_id=v.null_id, max_length=plain.manifest.max_length)
    x = images(3, seed=4)
    device_step = DeviceStep(plain.step_session(3), "cpu")
    np.testing.assert_array_equal(greedy(plain.encode(x), device_step, **ids), plain.generate(x))
    beams = beam_search(plain.encode(x), DeviceStep(plain.step_session(9), "cpu"), beam_size=3, **ids)
    np.testing.assert_array_equal(beams.best, plain.generate(x, beam_size=3))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("n", [1, 4])
def test_buffered_greedy_equals_greedy_over_session_run(loaded, tiny_bundle, cell, n):
    """generate() on the CPU steps on bound buffers; the same loop over `session.run` is the reference."""
    captioner, _ = loaded(cell)
    plain = Captioner(tiny_bundle(cell), device="cpu", io_binding=False)
    assert isinstance(captioner.decoding_step(captioner.encode(images(n, seed=5))), BufferedStep)
    assert isinstance(plain.decoding_step(plain.encode(images(n, seed=5))), FeedStep)
    for seed in (6, 7):  # the second call reuses this thread's buffers: nothing may leak from the first
        x = images(n, seed=seed)
        np.testing.assert_array_equal(captioner.generate(x), plain.generate(x))


@pytest.mark.parametrize("cell", CELLS)
def test_buffered_step_carries_the_state_like_session_run(loaded, cell):
    captioner, _ = loaded(cell)
    x = images(2, seed=8)
    encoded = captioner.encode(x)
    state = {STATE_FROM_ENCODER[k]: v for k, v in encoded.items()}
    step = captioner.decoding_step(encoded)
    feeds = dict(state)
    for token in (1, 5, 9):  # three steps: the ping-pong buffers swap twice
        step.tokens[:] = token
        feeds["token"] = np.full(2, token, dtype=np.int64)
        logits = step()
        want = captioner.step(feeds)
        np.testing.assert_allclose(logits, want["logits"], rtol=1e-5, atol=1e-6)
        feeds.update({STATE_FROM_STEP[k]: v for k, v in want.items() if k in STATE_FROM_STEP})
        for name, value in step.state().items():
            np.testing.assert_allclose(value, feeds[name], rtol=1e-5, atol=1e-6)


def test_switches_are_checked_keywords(tiny_bundle):
    assert not Captioner(tiny_bundle("rnn"), device="cpu", io_binding=False).io_binding
    for bad in ({"io_binding": None}, {"io_binding": "yes"}, {"spin": 1}, {"attention_cache": "off"}):
        with pytest.raises(CaptoolError, match="must be True or False"):
            Captioner(tiny_bundle("rnn"), device="cpu", **bad)


def test_caption_takes_paths_pil_images_and_arrays(loaded, tmp_path):
    captioner, _ = loaded("rnn")
    rgb = np.random.default_rng(5).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    by_path, by_pil, by_array = captioner.caption([tmp_path / "a.png", Image.fromarray(rgb), rgb])
    assert by_path.path == str(tmp_path / "a.png") and by_pil.path is None
    assert by_path.text == by_pil.text == by_array.text and by_path.tokens == by_array.tokens
    assert by_path.text == " ".join(captioner.vocab.idx_to_token[i] for i in by_path.tokens)
    assert not {0, 1, 2} & set(by_path.tokens)  # words only: no <NULL>, <START> or <END>
    single = captioner.caption(rgb)
    assert [c.text for c in single] == [by_array.text]


def test_bad_arguments_are_captool_errors(loaded):
    captioner, _ = loaded("rnn")
    with pytest.raises(CaptoolError, match="uint8"):
        captioner.encode(np.zeros((1, 3, 112, 112), np.float32))
    with pytest.raises(CaptoolError, match="beam_size"):
        captioner.generate(images(1), beam_size=0)
    with pytest.raises(CaptoolError, match="max_length"):
        captioner.generate(images(1), max_length=0)


# --- load checks: each problem its own message -----------------------------------------------------

def _copy(tiny_bundle, tmp_path, cell="rnn"):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(cell), dst)
    return dst


def _edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _tamper_graph_names(manifest):
    manifest["graphs"]["decoder_step"]["outputs"][0]["name"] = "scores"


TAMPERINGS = {
    "schema version": (lambda b: _edit_manifest(b, lambda m: m.update(schema_version=99)), "schema version 99"),
    "missing file": (lambda b: (b / "decoder_step.onnx").unlink(), "decoder_step.onnx is missing"),
    "changed bytes": (lambda b: (b / "encoder.onnx").write_bytes((b / "encoder.onnx").read_bytes()[:-1] + b"\0"),
                      "does not match the manifest"),
    "vocab size": (lambda b: _edit_manifest(b, lambda m: m["vocab"].append("extra")), "vocabulary has"),
    "cell type": (lambda b: _edit_manifest(b, lambda m: m.update(cell_type="lstm")), "a lstm bundle needs"),
    "promised names": (lambda b: _edit_manifest(b, _tamper_graph_names), "the manifest promises"),
    "image size": (lambda b: _edit_manifest(b, lambda m: m["image"].update(size=224)), "input 'image' has shape"),
    "hidden size": (lambda b: _edit_manifest(b, lambda m: m["dims"].update(hidden_dim=7)), "input 'h' has shape"),
    "not json": (lambda b: (b / "manifest.json").write_text("{not json"), "not valid JSON"),
    "no manifest": (lambda b: (b / "manifest.json").unlink(), "not a captool bundle"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_tampered_bundle_is_refused_with_its_own_message(tiny_bundle, tmp_path, case):
    tamper, message = TAMPERINGS[case]
    bundle = _copy(tiny_bundle, tmp_path)
    tamper(bundle)
    with pytest.raises(BundleError, match=message) as e:
        Captioner(bundle, device="cpu")
    assert "\n" not in str(e.value)


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Captioner(tmp_path / "nowhere")


# --- providers -------------------------------------------------------------------------------------

def test_auto_without_cuda_runs_on_cpu_with_a_notice(tiny_bundle, monkeypatch):
    monkeypatch.setattr(sessions, "_can_load", lambda lib: False)  # no driver, as on this CPU box
    c = Captioner(tiny_bundle("rnn"), device="auto")
    assert c.device == "cpu" and c.providers == ["CPUExecutionProvider"]
    assert c.notice.startswith("running on CPU:") and "libcuda.so.1" in c.notice and "\n" not in c.notice
    assert Captioner(tiny_bundle("rnn"), device="cpu").notice is None


def test_cuda_without_driver_is_a_clear_error(tiny_bundle, monkeypatch):
    monkeypatch.setattr(sessions, "_can_load", lambda lib: False)
    with pytest.raises(DeviceError, match="no NVIDIA driver.*fix: .*install the NVIDIA driver.*captool\\[gpu\\]"):
        Captioner(tiny_bundle("rnn"), device="cuda")


def test_cuda_libraries_missing_names_them_and_the_fix(monkeypatch):
    present = {"libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libcurand.so.10"}
    monkeypatch.setattr(sessions, "_can_load", lambda lib: lib in present)
    monkeypatch.setattr(sessions, "_cuda_major", lambda: "13")
    monkeypatch.setattr(sessions, "_preload_pip_cuda", lambda: None)
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: [sessions.CUDA, sessions.CPU])
    with pytest.raises(DeviceError) as e:
        sessions.place("cuda")
    message = str(e.value)
    assert "libcublasLt.so.13" in message and "libcudnn.so.9" in message and "libcudart" not in message
    assert "pip install 'captool[gpu]'" in message and "CUDA 13 and cuDNN 9" in message
    auto = sessions.place("auto")  # a driver is there, so the notice names the fix as well
    assert auto.device == "cpu" and "libcudnn.so.9" in auto.notice and "captool[gpu]" in auto.notice


def test_cpu_only_onnxruntime_build(monkeypatch):
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: [sessions.CPU])
    with pytest.raises(DeviceError, match="CPU-only build; fix: pip uninstall onnxruntime"):
        sessions.place("cuda")
    assert "captool[gpu]" not in sessions.place("auto").notice  # no GPU here: no GPU advice


def test_cuda_that_loads_but_falls_back_is_caught_after_session_creation(tiny_bundle, monkeypatch):
    # Pretend every library loads: onnxruntime is then really asked for CUDA and, with no GPU
    # here, quietly falls back to CPU. The session's own provider list is what tells.
    monkeypatch.setattr(sessions, "cuda_problem", lambda: None)
    auto = Captioner(tiny_bundle("rnn"), device="auto")
    assert auto.device == "cpu" and auto.providers == ["CPUExecutionProvider"]
    assert "could not start its CUDA provider" in auto.notice
    with pytest.raises(DeviceError, match="could not start its CUDA provider"):
        Captioner(tiny_bundle("rnn"), device="cuda")


def test_unknown_device():
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        sessions.place("tpu")


def test_decoder_step_session_options():
    opts = sessions.session_options("decoder_step", None)
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert sessions.session_options("encoder", 3).intra_op_num_threads == 3
    assert sessions.session_options("decoder_step", 4).intra_op_num_threads == 1
    assert sessions.session_options("decoder_step_cached", 4).intra_op_num_threads == 1  # the cached step too
    cache = sessions.session_options("attention_cache", 4)  # one big matmul per batch: the pool, not spinning
    assert cache.intra_op_num_threads == 4 and cache.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_encoder_threads_spin_unless_turned_off():
    spinning = "session.intra_op.allow_spinning"
    encoder = sessions.session_options("encoder", None)
    assert encoder.get_session_config_entry(spinning) == "1"
    assert encoder.get_session_config_entry("session.force_spinning_stop") == "1"  # not after a run
    assert sessions.session_options("decoder_step_wide", 2).get_session_config_entry(spinning) == "0"
    assert sessions.session_options("encoder", None, spin=False).get_session_config_entry(spinning) == "0"


def test_wide_batches_step_on_a_multithreaded_session_with_the_same_results(tiny_bundle):
    """From WIDE_BATCH rows the step runs on a second, multi-threaded session: same outputs."""
    from captool.captioner import WIDE_BATCH

    bundle = tiny_bundle("lstm")
    captioner = Captioner(bundle, device="cpu")
    n = WIDE_BATCH + 3
    images = np.random.default_rng(5).integers(0, 256, (n, 3, 112, 112), dtype=np.uint8)
    state = captioner.encode(images)
    feeds = {"token": np.full(n, captioner.vocab.start_id, np.int64), "h": state["h0"], "c": state["c0"]}
    wide_session = captioner.step_session(n)
    assert wide_session is not captioner.step_session(1)
    wide = captioner.step(feeds)
    narrow_session = captioner.step_session(1)
    names = [o.name for o in narrow_session.get_outputs()]
    narrow = dict(zip(names, narrow_session.run(names, feeds)))
    for name in narrow:
        np.testing.assert_allclose(wide[name], narrow[name], rtol=1e-5, atol=1e-6)
    single = Captioner(bundle, device="cpu", threads=1)
    assert single.step_session(n) is single.step_session(1)  # threads=1 means one thread everywhere
    assert (captioner.generate(images) == single.generate(images)).all()


def test_info_says_what_the_shipped_bundle_is_and_how_it_decodes_jpegs(tmp_path):
    from typer.testing import CliRunner

    from captool.cli import app
    from captool.models import default_bundle

    manifest = json.loads((default_bundle() / "manifest.json").read_text())
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert f"model       {manifest['cell_type']} (" in result.output
    assert f"JPEG decode {manifest['image'].get('jpeg_decode', 'full')}" in result.output
    batches = manifest["parity"]["batches"]
    assert (f"parity      passed at export ({len(batches)} batches, {sum(b['batch_size'] for b in batches)} images"
            in result.output)
    if "jpeg_decode" in manifest["parity"]:  # the gate's measurement, as export printed it
        assert manifest["parity"]["jpeg_decode"]["summary"] in result.output
    as_json = json.loads(CliRunner().invoke(app, ["info", "--json"]).output)
    assert as_json["jpeg_decode"] == manifest["image"].get("jpeg_decode", "full")
    # a bundle without the field decodes in full, and says nothing of a measurement
    plain = tmp_path / "plain"
    shutil.copytree(default_bundle(), plain)
    edited = {**manifest, "image": {k: v for k, v in manifest["image"].items() if k != "jpeg_decode"},
              "parity": {k: v for k, v in manifest["parity"].items() if k != "jpeg_decode"}}
    (plain / "manifest.json").write_text(json.dumps(edited))
    text = CliRunner().invoke(app, ["info", str(plain)]).output
    assert "JPEG decode full" in text and "held-out JPEGs" not in text
