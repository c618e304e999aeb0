"""Interrupted saves: real processes killed at every step of a training save and of a bundle swap, and from outside.

A kill -9 at any point of an epoch's save leaves the last complete epoch resumable, and `--resume`
then ends on the weights and Adam state of an uninterrupted run. A killed export leaves a temporary
directory that the next export removes (never one a live export holds), and `--force` never leaves
`--out` without a bundle. The kill points are found from outside (a test-only driver that wraps the
file system calls and sends itself SIGKILL, or files appearing in the run directory); captool itself
has no hook for them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captool.cli import app  # noqa: E402
from captool.files import hold, make_temp_dir, remove_stale  # noqa: E402
from captool.training.checkpoint import load_checkpoint, read_checkpoint_metadata  # noqa: E402
from captool.training.errors import TrainingError  # noqa: E402
from captool.training.train import TrainConfig, TrainingRun, read_run, train  # noqa: E402

TINY = dict(hidden_dim=16, wordvec_dim=16, backbone_width=0.25, batch_size=4, device="cpu", cell="lstm")

# Kills the training it runs at the `kill_at`-th file move (os.replace / os.rename / os.rmdir) of
# epoch 2's save; 0: inside the weights write, half a file written; -1: as the save starts.
TRAIN_DRIVER = r'''
import json, os, signal, sys
import safetensors.torch
import captool.training.train as train_module
config, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
saving, moves = [], []
real_save, real_write = train_module.save_epoch, safetensors.torch.save_file

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_epoch(run_dir, model, cfg, epoch, *rest):
    if epoch == 2:
        saving.append(epoch)
        if kill_at == -1:
            die()
    return real_save(run_dir, model, cfg, epoch, *rest)

def half_then_die(tensors, filename, metadata=None):
    if saving and kill_at == 0:
        with open(filename, "wb") as f:
            f.write(b"half a file")
        die()
    return real_write(tensors, filename, metadata=metadata)

def counted(real):
    def move(*args, **kwargs):
        if saving:
            moves.append(args)
            if len(moves) == kill_at:
                die()
        return real(*args, **kwargs)
    return move

train_module.save_epoch = save_epoch
safetensors.torch.save_file = half_then_die
os.replace, os.rename, os.rmdir = counted(os.replace), counted(os.rename), counted(os.rmdir)
train_module.train(train_module.TrainConfig(**config), log=lambda m: None)
'''

# Kills a `swap_into_place(tmp, out)` at its `kill_at`-th step (the swap itself, each rename, the
# removal of the old directory); "fallback" runs it as on a system without an atomic swap.
SWAP_DRIVER = r'''
import os, signal, sys
from pathlib import Path
import captool.files as files
mode, kill_at, tmp, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
steps = []
def counted(real):
    def step(*args, **kwargs):
        steps.append(args)
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return step
exchange = (lambda a, b: False) if mode == "fallback" else files._exchange
files._exchange = counted(exchange)
os.rename = counted(os.rename)
files.shutil.rmtree = counted(files.shutil.rmtree)
files.swap_into_place(tmp, out)
'''


@pytest.fixture(scope="module")
def synth_dir(synth_data) -> Path:
    return synth_data(6, 2, 5)


def config(synth_dir, backbone_file, out, epochs) -> TrainConfig:
    return TrainConfig(data=str(synth_dir), out=str(out), epochs=epochs, backbone=str(backbone_file), **TINY)


@pytest.fixture(scope="module")
def straight(synth_dir, backbone_file, tmp_path_factory):
    """Uninterrupted runs: epochs -> run directory."""
    runs = {}

    def run(epochs: int) -> Path:
        if epochs not in runs:
            out = tmp_path_factory.mktemp(f"straight-{epochs}") / "run"
            train(config(synth_dir, backbone_file, out, epochs), log=lambda m: None)
            runs[epochs] = out
        return runs[epochs]

    return run


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = load_file(a / "optimizer.safetensors"), load_file(b / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert json.loads((a / "train_state.json").read_text())["epoch"] == json.loads((b / "train_state.json").read_text())["epoch"]


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in [*run.glob(".*"), *run.glob("features/.*")])


# Epoch 2's save: -1 before it, 0 in the weights write, then the moves: 1 weights, 2 model.json,
# 3 optimizer, 4 train_state (all in the staging directory), 5 the commit rename, 6-9 the installs
# (model.json, weights, optimizer, train_state), 10 the staging directory's removal.
KILL_POINTS = list(range(-1, 11))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_during_an_epoch_save_leaves_the_last_complete_epoch(synth_dir, backbone_file, straight, tmp_path,
                                                                  kill_at):
    run = tmp_path / "run"
    cfg = config(synth_dir, backbone_file, run, epochs=2)
    killed = subprocess.run([sys.executable, "-c", TRAIN_DRIVER, json.dumps(cfg.__dict__), str(kill_at)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = kill_at > 5
    # A reader that changes nothing (an export of the run while it trains) loads a whole checkpoint.
    assert read_checkpoint_metadata(run)["extra"]["epoch"] in (1, 2)
    load_checkpoint(run)

    assert read_run(run)["epoch"] == (2 if committed else 1)  # finishes or clears the interrupted save
    assert leftovers(run) == []
    assert read_checkpoint_metadata(run)["extra"]["epoch"] == (2 if committed else 1)
    with pytest.raises(TrainingError, match="already holds a training run.*--resume"):
        TrainingRun(cfg)
    train(config(synth_dir, backbone_file, run, epochs=3), resume=True, log=lambda m: None)
    assert_same_run(run, straight(3))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0, 3, 5])
def test_kill_during_the_first_save_leaves_a_fresh_start_possible(synth_dir, backbone_file, straight, tmp_path,
                                                                  kill_at):
    run = tmp_path / "run"
    driver = TRAIN_DRIVER.replace("if epoch == 2:", "if epoch == 1:")
    cfg = config(synth_dir, backbone_file, run, epochs=2)
    killed = subprocess.run([sys.executable, "-c", driver, json.dumps(cfg.__dict__), str(kill_at)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(TrainingError, match="there is no run to resume"):
        read_run(run)
    train(cfg, log=lambda m: None)  # not refused: no epoch was ever complete
    assert leftovers(run) == []
    assert_same_run(run, straight(2))


def start_training(synth_dir, backbone_file, run, epochs=400) -> subprocess.Popen:
    args = ["train", "--data", str(synth_dir), "--out", str(run), "--epochs", str(epochs),
            "--backbone", str(backbone_file), *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    return subprocess.Popen([sys.executable, "-m", "captool.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds=120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_say_how_to_resume(synth_dir, backbone_file, straight, tmp_path, sig):
    run = tmp_path / "run"
    proc = start_training(synth_dir, backbone_file, run)
    wait_for(lambda: (run / "train_state.json").exists())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    epoch = read_run(run)["epoch"]
    assert last == f"captool: interrupted: epoch {epoch} is saved in {run}; resume with: captool train --out {run} --resume"
    assert "Traceback" not in err and leftovers(run) == []
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", str(epoch + 1)])
    assert result.exit_code == 0, result.output
    assert_same_run(run, straight(epoch + 1))


@pytest.mark.slow
def test_sigkill_from_outside_while_an_epoch_is_being_saved(synth_dir, backbone_file, straight, tmp_path):
    run = tmp_path / "run"
    proc = start_training(synth_dir, backbone_file, run)
    wait_for(lambda: (run / "train_state.json").exists())
    # A save under way (or, on a machine too fast to catch one, the run's end).
    wait_for(lambda: proc.poll() is not None or any(name.startswith(".epoch-") for name in os.listdir(run)))
    proc.kill()
    proc.communicate(timeout=60)
    epoch = read_run(run)["epoch"]
    assert epoch >= 1 and leftovers(run) == []
    train(config(synth_dir, backbone_file, run, epochs=epoch + 1), resume=True, log=lambda m: None)
    assert_same_run(run, straight(epoch + 1))


def test_a_run_directory_in_use_is_refused(synth_dir, backbone_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = hold(run)  # as a live `captool train` holds it
    try:
        with pytest.raises(TrainingError, match="in use by another `captool train`"):
            TrainingRun(config(synth_dir, backbone_file, run, epochs=1))
    finally:
        os.close(fd)


def test_stale_staging_and_temporary_files_are_cleared(straight, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight(2), run)
    (run / ".epoch-0003.abcdefgh.tmp").mkdir()
    (run / ".epoch-0003.abcdefgh.tmp" / "model.safetensors").write_bytes(b"half")
    (run / ".train_state.json.k2j3h4g5.tmp").write_text("{")
    (run / "features" / ".train-0123.safetensors.zzzzzzzz.tmp").write_bytes(b"")
    assert read_run(run)["epoch"] == 2 and leftovers(run) == []


# ---- export: temporary directories and --force --------------------------------------------------

STALE = {  # name beside the bundle "b" -> removed by the next export of "b"
    ".b.abcd1234.tmp": True,
    ".b.old-abcd1234.tmp": True,
    ".b.x.abcd1234.tmp": False,  # the temporary directory of bundle "b.x"
    ".bb.abcd1234.tmp": False,
    ".b.abcd1234.tmp.keep": False,
    ".b.abc.tmp": False,
}


@pytest.mark.parametrize("name", list(STALE))
def test_only_our_stale_temporary_directories_are_removed(tmp_path, name):
    from captool.export.bundle import clear_leftovers

    (tmp_path / name).mkdir()
    old = time.time() - 60
    os.utime(tmp_path / name, (old, old))
    clear_leftovers(tmp_path / "b")
    assert (tmp_path / name).exists() is not STALE[name]


def test_a_temporary_directory_a_live_export_holds_is_kept(tmp_path):
    out = tmp_path / "b"
    live = make_temp_dir(out)
    os.utime(live, (time.time() - 60,) * 2)
    fd = hold(live)
    try:
        assert remove_stale(out, older_than=time.time()) == [] and live.exists()
    finally:
        os.close(fd)
    assert remove_stale(out, older_than=time.time()) == [live] and not live.exists()


def test_a_directory_newer_than_the_run_is_kept(tmp_path):
    out = tmp_path / "b"
    started = time.time() - 60
    young = make_temp_dir(out)
    assert remove_stale(out, older_than=started) == [] and young.exists()


# (mode, kill_at) -> what is at --out afterwards, once the next run has cleared the leftovers.
SWAP_POINTS = {("exchange", 1): "old", ("exchange", 2): "new", ("exchange", 3): "new",
               ("fallback", 2): "old", ("fallback", 3): "old", ("fallback", 4): "new", ("fallback", 5): "new"}


@pytest.mark.parametrize("mode,kill_at", list(SWAP_POINTS))
def test_force_never_leaves_out_without_a_bundle(tmp_path, mode, kill_at):
    from captool.export.bundle import clear_leftovers

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    tmp = make_temp_dir(out)
    (tmp / "manifest.json").write_text("new")
    done = subprocess.run([sys.executable, "-c", SWAP_DRIVER, mode, str(kill_at), str(tmp), str(out)],
                          capture_output=True, text=True, timeout=60)
    finished = kill_at == 3 if mode == "exchange" else kill_at == 5
    assert done.returncode == (0 if finished else -signal.SIGKILL), done.stderr
    if mode == "exchange" or kill_at != 3:  # only the fallback's moment between its two renames lacks --out
        assert (out / "manifest.json").read_text() in ("old", "new")
    for path in tmp_path.iterdir():
        os.utime(path, (time.time() - 60,) * 2)
    clear_leftovers(out)
    assert (out / "manifest.json").read_text() == SWAP_POINTS[(mode, kill_at)]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_existing_out_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "bundle").mkdir()
    code = ("import sys\nfrom captool.cli import app\n"
            f"try:\n    app(['export', {str(tmp_path)!r}, '--out', {str(tmp_path / 'bundle')!r}])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.strip() == f"captool: error: {tmp_path / 'bundle'} already exists; pass --force to replace it"


def start_export(checkpoint: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captool.cli", "export", str(checkpoint), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def export_temp_dirs(out: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.*.tmp")]


@pytest.mark.slow
def test_killed_export_leaves_a_temp_dir_the_next_export_removes(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = start_export(tiny_checkpoint("rnn"), out)
    wait_for(lambda: export_temp_dirs(out))
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists() and len(export_temp_dirs(out)) == 1
    # The next export clears it first (then fails fast here, on a missing --images folder).
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint("rnn")), "--out", str(out),
                                      "--images", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "--images" in result.output
    assert export_temp_dirs(out) == [] and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_during_export_remove_the_temp_dir(tiny_checkpoint, tmp_path, sig):
    out = tmp_path / "bundle"
    proc = start_export(tiny_checkpoint("rnn"), out)
    wait_for(lambda: export_temp_dirs(out))
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"captool: error: interrupted; {out} was left as it was"
    assert "Traceback" not in err
    assert export_temp_dirs(out) == [] and not out.exists()
