"""Checkpoints: exact round trips, atomic saves, tamper and mismatch detection, and no pickle."""

import json
import os
import struct

import pytest
torch = pytest.importorskip("torch")

import captool.training.checkpoint as checkpoint
from captool.training import CaptioningRNN, TrainingError, load_checkpoint, read_checkpoint_metadata, save_checkpoint

TOKENS = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "circle"]


def tiny_model(cell="rnn", seed=0, hidden_dim=16, dtype=torch.float32):
    torch.manual_seed(seed)
    return CaptioningRNN({t: i for i, t in enumerate(TOKENS)}, wordvec_dim=8, hidden_dim=hidden_dim,
                         cell_type=cell, backbone_width=0.25, dtype=dtype)


def images(n=3):
    return torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cell", ["rnn", "attention"])
def test_round_trip_gives_identical_weights_and_samples(tmp_path, cell):
    model = tiny_model(cell).eval()
    with torch.no_grad():
        model.out_projector.bias[2] += 1.0  # some captions end, so the comparison covers END/NULL
    save_checkpoint(model, tmp_path / "run", epoch=3, val_loss=1.25)
    for path in (tmp_path / "run", tmp_path / "run" / "model.safetensors", tmp_path / "run" / "model.json"):
        loaded = load_checkpoint(path)
        assert not loaded.training and loaded.config == model.config and loaded.idx_to_token == TOKENS
        assert_same_weights(model, loaded)
        assert torch.equal(loaded.sample(images()), model.sample(images()))
    meta = read_checkpoint_metadata(tmp_path / "run")
    assert meta["extra"] == {"epoch": 3, "val_loss": 1.25}
    assert meta["config"]["cell_type"] == cell and meta["idx_to_token"] == TOKENS


def test_load_gives_cpu_float32_eval_from_a_float64_training_model(tmp_path):
    model = tiny_model(dtype=torch.float64).train()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert not loaded.training and not loaded.feature_extractor.backbone.training
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(loaded.cell.Wx, model.cell.Wx.float(), rtol=0, atol=0)


def test_files_are_safetensors_and_json_and_loading_unpickles_nothing(tmp_path, monkeypatch):
    save_checkpoint(tiny_model(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, then a JSON header
    header = json.loads(raw[8:8 + header_len])
    assert "cell.Wx" in header and header["cell.Wx"]["dtype"] == "F32"
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["format"] == "captool-checkpoint" and len(meta["weights"]["sha256"]) == 64

    def forbidden(*args, **kwargs):
        raise AssertionError("load_checkpoint must not unpickle")

    import pickle

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    load_checkpoint(tmp_path)


def test_a_crash_between_the_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    save_checkpoint(first, tmp_path, epoch=1)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(second, tmp_path, epoch=2)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert [os.path.basename(c) for c in calls] == ["model.safetensors", "model.json"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary files left
    with pytest.warns(RuntimeWarning, match="interrupted"):
        loaded = load_checkpoint(tmp_path)
    assert_same_weights(first, loaded)
    assert read_checkpoint_metadata(tmp_path)["extra"] == {"epoch": 1}

    save_checkpoint(second, tmp_path, epoch=2)  # the next save repairs the directory
    assert_same_weights(second, load_checkpoint(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]


def test_a_crash_while_writing_the_weights_changes_nothing(tmp_path, monkeypatch):
    first = tiny_model(seed=0)
    save_checkpoint(first, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(seed=1), tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    assert_same_weights(first, load_checkpoint(tmp_path))


def test_tampered_weights_are_rejected(tmp_path):
    save_checkpoint(tiny_model(seed=0), tmp_path)
    save_checkpoint(tiny_model(seed=1), tmp_path)  # a completed second save leaves no backup to fall back on
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="model.safetensors: sha256 does not match"):
        load_checkpoint(tmp_path)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    save_checkpoint(tiny_model(hidden_dim=16), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["config"]["hidden_dim"] = 32  # the sha256 still matches: only the description lies
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match="does not fit the architecture in model.json: .* has shape"):
        load_checkpoint(tmp_path)
    meta["config"]["cell_type"] = "lstm"
    meta["config"]["hidden_dim"] = 16
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match="does not fit the architecture"):
        load_checkpoint(tmp_path)


def test_missing_and_damaged_files_name_the_path(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(TrainingError, match="has no model.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny_model(), tmp_path / "run")
    run = tmp_path / "run"
    text = (run / "model.json").read_text()
    (run / "model.json").write_text(text[:-20])
    with pytest.raises(TrainingError, match=r"model.json: not valid JSON"):
        load_checkpoint(run)
    (run / "model.json").write_text(json.dumps({"format": "captool-checkpoint", "format_version": 99}))
    with pytest.raises(TrainingError, match="format version 99"):
        load_checkpoint(run)
    (run / "model.json").write_text(text)
    (run / "model.safetensors").unlink()
    with pytest.raises(TrainingError, match="no model.safetensors"):
        load_checkpoint(run)
    (run / "notes.txt").write_text("x")
    with pytest.raises(TrainingError, match="is not a checkpoint"):
        load_checkpoint(run / "notes.txt")


def test_metadata_must_be_json_and_a_refused_save_writes_nothing(tmp_path):
    with pytest.raises(TrainingError, match="JSON-serializable"):
        save_checkpoint(tiny_model(), tmp_path / "run", optimizer=torch.zeros(2))
    assert not (tmp_path / "run").exists()
