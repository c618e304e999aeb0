"""The training loop and `captool train`: a CLI run on a synth dataset, exact resume, NaN stop, settings."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
load_file = pytest.importorskip("safetensors.torch").load_file
from typer.main import get_command
from typer.testing import CliRunner

from captool.cli import app
from captool.training.checkpoint import load_checkpoint, read_checkpoint_metadata
from captool.training.errors import TrainingError
from captool.training.model import CaptioningRNN
from captool.training.train import TrainConfig, TrainingRun, train

TINY = ["--hidden-dim", "16", "--wordvec-dim", "16", "--backbone-width", "0.25", "--batch-size", "8"]


@pytest.fixture(scope="module")
def synth_dir(synth_data) -> Path:
    return synth_data(8, 2, 3)


def tiny(data, out, **changes) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), epochs=2, hidden_dim=16, wordvec_dim=16, backbone_width=0.25,
                    batch_size=8, backbone="none", device="cpu")
    return TrainConfig(**{**settings, **changes})


def test_cli_two_epochs_on_synth(synth_dir, backbone_file, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(synth_dir), "--out", str(run), "--epochs", "2",
                                      "--backbone", str(backbone_file), "--device", "cpu", *TINY])
    assert result.exit_code == 0, result.output
    assert "epoch 1/2  train loss" in result.output and "epoch 2/2  train loss" in result.output
    assert "val loss" in result.output and "samples/s" in result.output
    assert f"{run}: 2 epochs" in result.output

    model = load_checkpoint(run)
    assert model.config.cell_type == "rnn" and model.config.hidden_dim == 16
    assert read_checkpoint_metadata(run)["extra"]["epoch"] == 2
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    captions = model.sample(images)
    assert captions.shape == (3, 15) and captions.dtype == torch.long
    assert int(captions.max()) < model.config.vocab_size
    state = json.loads((run / "train_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert all(h["val_loss"] > 0 for h in state["history"])
    # The frozen backbone ran once per split; its features are cached beside the checkpoint.
    assert sorted(p.name.split("-")[0] for p in (run / "features").iterdir()) == ["train", "val"]
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_cli_resume_equals_straight_run(synth_dir, tmp_path):
    """1 + 1 resumed epochs give the weights, Adam moments and RNG state of 2 straight epochs."""
    args = ["--data", str(synth_dir), "--backbone", "none", "--cell", "lstm", "--overfit", "8", "--device", "cpu",
            "--hidden-dim", "16", "--wordvec-dim", "16", "--backbone-width", "0.25", "--batch-size", "3"]
    runner = CliRunner()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = runner.invoke(app, ["train", "--out", str(straight), "--epochs", "2", *args])
    assert result.exit_code == 0, result.output
    assert "--backbone none" in result.output and "--train-backbone" in result.output
    assert runner.invoke(app, ["train", "--out", str(resumed), "--epochs", "1", *args]).exit_code == 0
    result = runner.invoke(app, ["train", "--out", str(resumed), "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output and "epoch 2/2" in result.output and "epoch 1/2" not in result.output

    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert a.keys() == b.keys()
    assert any("running_mean" in k for k in a)  # BatchNorm trained too (--backbone none)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a, opt_b = load_file(straight / "optimizer.safetensors"), load_file(resumed / "optimizer.safetensors")
    assert opt_a.keys() == opt_b.keys()
    # Adam holds moments for every parameter, the backbone's included: it was trained end to end.
    assert sum(k.endswith(".exp_avg") for k in opt_a) == len(list(load_checkpoint(straight).parameters()))
    for name in opt_a:
        assert torch.equal(opt_a[name], opt_b[name]), name


def test_warm_up_then_frozen_backbone(synth_dir, tmp_path):
    """--backbone none --warmup-epochs N without --train-backbone: trained as a concept detector, then frozen."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    untrained = CaptioningRNN({"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}, backbone_width=0.25,
                              wordvec_dim=16, hidden_dim=16).feature_extractor.state_dict()
    lines = []
    result = train(tiny(synth_dir, run, warmup_epochs=2, seed=0), log=lines.append)
    assert result.epochs == 2 and not any("--train-backbone;" in line for line in lines)
    model = load_checkpoint(run)
    warmed = model.feature_extractor.state_dict()
    assert any(not torch.equal(untrained[k], warmed[k]) for k in untrained if k.endswith("weight"))
    assert not model.backbone_trainable
    # Captioning epochs ran on features computed once, after the warm-up, with the backbone frozen.
    assert sorted(p.name.split("-")[0] for p in (run / "features").iterdir()) == ["train", "val"]
    moments = [k for k in load_file(run / "optimizer.safetensors") if k.endswith(".exp_avg")]
    head = [p for name, p in model.named_parameters() if not name.startswith("feature_extractor.")]
    assert len(moments) == len(head)
    state = json.loads((run / "train_state.json").read_text())
    assert state["config"]["train_backbone"] is False and state["config"]["warmup_epochs"] == 2
    # Resuming does not warm up again, and the cached features are those of the warmed backbone.
    resumed = TrainingRun(tiny(synth_dir, run, warmup_epochs=2, seed=0, epochs=3), resume=True, log=lines.append)
    assert resumed.features["train"] is not None
    before = {k: v.clone() for k, v in resumed.model.feature_extractor.state_dict().items()}
    resumed.fit()
    after = load_checkpoint(run).feature_extractor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_other_settings_and_new_run_refuses_old_dir(synth_dir, backbone_file, tmp_path):
    run = tmp_path / "run"
    config = tiny(synth_dir, run, epochs=1, backbone=str(backbone_file))
    train(config, log=lambda m: None)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "2", "--hidden-dim", "32"])
    assert result.exit_code == 2 and "hidden_dim=16, not 32" in result.output
    result = runner.invoke(app, ["train", "--data", str(synth_dir), "--out", str(run), *TINY])
    assert result.exit_code == 2 and "already holds a training run" in result.output and "--resume" in result.output
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "nothing"), "--resume"])
    assert result.exit_code == 2 and "there is no run to resume" in result.output
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "1"])
    assert result.exit_code == 0 and "nothing to do" in result.output


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_dir, backbone_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(synth_dir, run, epochs=1, backbone=str(backbone_file)), log=lambda m: None)
    weights = (run / "model.safetensors").read_bytes()

    real = CaptioningRNN.loss_from_features
    calls = []

    def diverging(self, features, captions):
        calls.append(1)
        loss = real(self, features, captions)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(CaptioningRNN, "loss_from_features", diverging)
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3"])
    assert result.exit_code == 1
    assert "training loss is nan at epoch 2, batch 3/5: training stopped" in result.output
    assert f"{run} keeps the checkpoint of epoch 1" in result.output
    assert (run / "model.safetensors").read_bytes() == weights
    assert read_checkpoint_metadata(run)["extra"]["epoch"] == 1
    assert json.loads((run / "train_state.json").read_text())["epoch"] == 1


def test_absurd_lr_is_caught(synth_dir, backbone_file, tmp_path):
    """A real divergence, not a patched loss: inf weights are never saved as a checkpoint."""
    with pytest.raises(TrainingError, match="training stopped; no checkpoint was written"):
        train(tiny(synth_dir, tmp_path / "run", epochs=1, lr=1e30, backbone=str(backbone_file)), log=lambda m: None)
    assert not (tmp_path / "run" / "model.json").exists()


def test_overfit_takes_first_examples(synth_dir, backbone_file, tmp_path):
    lines = []
    run = TrainingRun(tiny(synth_dir, tmp_path / "run", overfit=7, backbone=str(backbone_file)), log=lines.append)
    assert len(run.train_split) == 7 and len(run.val_split) == 2  # val: as many, where there are
    assert any("7 training examples (7 images)" in line for line in lines)  # one caption per image
    assert run.features["train"].shape == (7, 1280)  # one frozen feature row per image


def test_config_errors_name_the_value():
    with pytest.raises(TrainingError, match="invalid cell 'gru'; only rnn, lstm, attention"):
        TrainConfig(cell="gru")
    with pytest.raises(TrainingError, match="--batch-size must be at least 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainingError, match="invalid device 'tpu'"):
        TrainConfig(device="tpu")


def test_cli_defaults_are_train_configs():
    """The CLI passes only the options given and takes its defaults from TrainConfig (its default_map):
    every TrainConfig field with a default is an option, and --help shows TrainConfig's value."""
    command = get_command(app).commands["train"]
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    options = {p.name for p in command.params}
    assert set(defaults) - options == {"cache_features"}  # the one setting only the Python API offers
    shown = dict(command.context_settings["default_map"])
    assert shown and all(shown[name] == defaults[name] for name in shown), shown
    assert all(p.default in (None, False) for p in command.params if p.name in defaults)  # no second copy
    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "[default: 512]" in text and "[default: attention]" not in text


def test_train_without_torch_names_the_extra(tmp_path):
    """`captool train` imports training lazily: without torch it says which extra to install, exit 2."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from typer.testing import CliRunner\nfrom captool.cli import app\n"
            "r = CliRunner().invoke(app, ['train', '--data', 'd', '--out', 'o'])\n"
            "print(r.exit_code, r.output)")
    (tmp_path / "d").mkdir()  # a --data that exists: the path checks pass without torch
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.startswith("2 ") and "pip install 'captool[train]'" in done.stdout, done.stdout + done.stderr
