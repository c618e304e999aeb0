"""`captool train` as a newcomer meets it: progress on a log, a warm-up stopped by a signal and resumed
exactly, the quality report, cheap refusals before torch, and the progress helper itself."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captool.progress import Progress, duration, phase

TINY = ["--backbone", "none", "--backbone-width", "0.25", "--hidden-dim", "16", "--wordvec-dim", "16",
        "--batch-size", "8", "--device", "cpu", "--seed", "1"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


# ---- the progress helper (torch-free) ------------------------------------------------------------


def test_progress_on_a_terminal_is_a_bar_with_rate_and_eta():
    stream = Terminal()
    bar = Progress("epoch 1/3", total=100, unit="samples", stream=stream)
    bar.start -= 10.0  # as if 10 s had passed: 50 samples in 10 s leave 10 s for the other 50
    bar.update(50, note="loss 2.5000")
    drawn = stream.getvalue()
    assert drawn.startswith("\r\033[Kepoch 1/3  [############............]  50/100 samples")
    assert "5.0 samples/s" in drawn and "ETA 0:10" in drawn and "loss 2.5000" in drawn
    bar.finish("epoch 1/3  train loss 2.5")
    assert stream.getvalue().endswith("\r\033[Kepoch 1/3  train loss 2.5\n")


def test_progress_off_a_terminal_is_one_line_per_phase_and_an_occasional_one():
    stream = io.StringIO()
    bar = Progress("warm-up 1/2", total=10, unit="images", stream=stream, every=0.05)
    bar.update(3)
    assert stream.getvalue() == ""  # nothing before `every` seconds
    time.sleep(0.06)
    bar.update(3)
    bar.update(4)  # under `every` seconds since the last line: none
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 2
    assert lines[0].startswith("warm-up 1/2  6/10 images (60%)") and "ETA" in lines[0]
    assert lines[1].startswith("warm-up 1/2  10/10 images (100%)")


def test_progress_without_a_total_and_quiet_modes():
    stream = io.StringIO()
    bar = Progress("tracing", stream=stream, lines=False)
    bar.update(5)
    bar.finish()
    assert stream.getvalue() == ""  # `captool run`'s mode: nothing on a log
    loud = Terminal()
    Progress("x", stream=loud).update(5)
    assert "x  5  " in loud.getvalue() and "ETA" not in loud.getvalue()
    log = io.StringIO()
    with phase("export: tracing encoder", stream=log):
        pass
    assert log.getvalue().startswith("export: tracing encoder  0:0") and log.getvalue().count("\n") == 1
    assert [duration(s) for s in (0, 65, 3723)] == ["0:00", "1:05", "1:02:03"]


# ---- captool train ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(synth_data) -> Path:
    pytest.importorskip("torch")
    return synth_data(32, 8, 2)


def captool(*args, timeout=300) -> subprocess.CompletedProcess:
    """`captool ...` in a process of its own, stderr a pipe (not a terminal), as in a log or CI."""
    return subprocess.run([sys.executable, "-m", "captool.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def straight(synth_dir, tmp_path_factory):
    """An uninterrupted run: 3 warm-up epochs, 1 captioning epoch, stderr captured."""
    run = tmp_path_factory.mktemp("straight") / "run"
    done = captool("train", "--data", synth_dir, "--out", run, "--warmup-epochs", 3, "--epochs", 1, *TINY)
    assert done.returncode == 0, done.stderr
    return run, done.stderr


@pytest.mark.slow
def test_progress_lines_on_a_log(straight):
    run, err = straight
    assert "\r" not in err and "\033" not in err  # no bar drawn on a pipe
    lines = err.splitlines()
    for e in (1, 2, 3):
        assert any(line.startswith(f"warm-up {e}/3  concept-detector loss") and "images/s" in line for line in lines)
    assert any(line.startswith("train features (frozen backbone)  32/32 images") for line in lines)
    assert any(line.startswith("epoch 1/1  train loss") and "samples/s" in line for line in lines)
    assert sum(line.startswith("warm-up") for line in lines) == 3  # one line per phase, no more


@pytest.mark.slow
def test_quality_report_at_the_end_of_each_epoch_and_run(straight):
    run, err = straight
    assert "quality after epoch 1: BLEU-4" in err and "CIDEr-D" in err and "facts" in err
    assert "captions of val images after epoch 1 (caption | a reference):" in err
    report = json.loads((run / "quality.json").read_text())
    assert {"format", "version", "epochs", "last"} <= set(report)
    assert [e["epoch"] for e in report["epochs"]] == [1]
    last = report["last"]
    assert {"epoch", "split", "n_images", "decoding", "metrics", "distinct_captions", "all_same", "examples"} <= set(last)
    assert set(last["metrics"]) == {"bleu4", "cider", "fact_accuracy"}  # synth data: facts too
    assert last["split"] == "val" and last["n_images"] == 8 and len(last["examples"]) == 5
    assert all(e["caption"] and e["references"] for e in last["examples"])
    # The all-equal warning is printed exactly when the report says so (a 1-epoch tiny model: usually so).
    assert ("captions of the val sample are the same" in err) == last["all_same"]


def test_all_captions_equal_is_warned(tmp_path):
    torch = pytest.importorskip("torch")
    from captool.training import quality

    class Constant(torch.nn.Module):
        """A model that captions every image 'a red circle'."""
        idx_to_token = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "circle", "blue"]
        backbone_trainable = True

        def sample(self, images, features=None):
            return torch.tensor([[4, 5, 6, 2]]).repeat(images.shape[0], 1)  # (N, L)

    images = torch.zeros(3, 3, 112, 112, dtype=torch.uint8)
    sample = quality.QualitySample("val", [7, 8, 9], images, {i: ["a red circle", "a blue circle"] for i in (7, 8, 9)})
    warnings = []
    entry = quality.report(Constant(), sample, 4, torch.device("cpu"), warn=warnings.append)
    assert entry["all_same"] and entry["distinct_captions"] == 1 and entry["metrics"]["cider"] >= 0
    assert warnings == ["all 3 captions of the val sample are the same: 'a red circle'; the model ignores the image "
                        "so far: train more epochs, or warm the backbone up (--warmup-epochs N)"]
    quality.write_quality(tmp_path, entry)
    assert json.loads((tmp_path / "quality.json").read_text())["epochs"][0]["all_same"] is True


@pytest.mark.slow
def test_warm_up_stopped_by_a_signal_resumes_to_the_same_weights(synth_dir, straight, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from captool.training import load_checkpoint

    run = tmp_path / "run"
    args = ["train", "--data", synth_dir, "--out", run, "--warmup-epochs", 3, "--epochs", 1, *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "captool.cli", *map(str, args)], stderr=subprocess.PIPE, text=True)
    err = ""
    for line in proc.stderr:  # warm-up epoch 1 committed: stop it in epoch 2, as Ctrl-C would
        err += line
        if line.startswith("warm-up 1/3"):
            proc.send_signal(signal.SIGINT)
            break
    err += proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("captool: interrupted: warm-up epoch ") and "/3 is saved in" in last, err
    assert last.endswith(f"resume with: captool train --out {run} --resume") and "Traceback" not in err
    saved = json.loads((run / "train_state.json").read_text())
    assert saved["epoch"] == 0 and 1 <= len(saved["history"]) <= 2  # stopped within the warm-up
    assert len(list(run.glob("warmup-head-*.safetensors"))) == 1

    resumed = captool("train", "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run} after warm-up epoch" in resumed.stderr and "warm-up 3/3" in resumed.stderr
    assert "warm-up 1/3" not in resumed.stderr and not list(run.glob("warmup-head-*"))
    a, b = load_checkpoint(straight[0]).state_dict(), load_checkpoint(run).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = load_file(straight[0] / "optimizer.safetensors"), load_file(run / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_refused_before_torch_loads(synth_dir, tmp_path):
    """A finished --out without --resume, --resume on nothing, a missing --data: one line, exit 2, no torch."""
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "train_state.json").write_text("{}")
    code = ("import sys; sys.modules['torch'] = None\n"  # torch unimportable: the checks must not need it
            "from typer.testing import CliRunner\nfrom captool.cli import app\n"
            "for args in sys.argv[1:]:\n"
            "    r = CliRunner().invoke(app, args.split('|'))\n"
            "    print(r.exit_code, r.output.strip())\n")
    cases = [f"train|--data|{synth_dir}|--out|{finished}", f"train|--out|{tmp_path / 'none'}|--resume",
             f"train|--data|{tmp_path / 'missing'}|--out|{tmp_path / 'new'}"]
    done = subprocess.run([sys.executable, "-c", code, *cases], capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr
    assert lines[0] == (f"2 captool: error: {finished} already holds a training run (train_state.json): pass "
                        f"--resume to continue it, or choose another --out")
    assert lines[1].startswith("2 captool: error:") and "there is no run to resume" in lines[1]
    assert lines[2].startswith(f"2 captool: error: --data {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "new").exists()


def test_threads_option_is_set_and_resumable(synth_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from captool.training.config import DEFAULT_THREADS, TrainConfig
    from captool.training.train import use_threads

    assert TrainConfig().threads == DEFAULT_THREADS
    before = torch.get_num_threads()
    try:
        use_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="--threads must be at least 1, got 0"):
        TrainConfig(threads=0)
    assert "threads" in __import__("captool.training.config", fromlist=["RESUMABLE"]).RESUMABLE
