"""captool on a local Ray cluster (2 CPUs, a small object store): one record per input, equal to
`captool run --json`'s, across a killed actor and an interrupted, rerun driver."""

from __future__ import annotations

import faulthandler
import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from captool.ray.actor import CaptionActor  # noqa: E402
from captool.ray.folder import caption_to_folder  # noqa: E402
from captool.run import run_inputs  # noqa: E402

pytestmark = pytest.mark.slow
HARD_TIMEOUT_S = 300  # the whole module: a hung cluster must fail CI, not stall it


@pytest.fixture(scope="module", autouse=True)
def cluster():
    faulthandler.dump_traceback_later(HARD_TIMEOUT_S, exit=True)
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 inputs: PNGs of several sizes, EXIF-rotated JPEGs, RGBA PNGs, truncated and zero-byte files."""
    root = tmp_path_factory.mktemp("ray_e2e") / "images"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        h, w = 112 + 8 * (i % 4), 112 + 16 * (i % 3)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"p{i:02d}.png")
    for i in range(3):
        exif = Image.Exif()
        exif[0x0112] = (3, 6, 8)[i]
        Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(root / f"r{i}.jpg", exif=exif)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (112, 112, 4), dtype=np.uint8), "RGBA").save(root / f"a{i}.png")
    for i in range(2):
        (root / f"t{i}.png").write_bytes((root / f"p{i:02d}.png").read_bytes()[: 100 + 50 * i])
    for i in range(2):
        (root / f"z{i}.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def want(images) -> list[str]:
    out = io.StringIO()
    run_inputs([str(images)], device="cpu", threads=1, as_json=True, out=out, err=io.StringIO())
    lines = out.getvalue().splitlines()
    assert len(lines) == 40
    return lines


def folder_lines(out) -> list[str]:
    return [line for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text(encoding="utf-8").splitlines()]


def test_one_record_per_input_equal_to_captool_run(images, want, tmp_path):
    out = tmp_path / "out"
    summary = caption_to_folder([str(images)], out, actors=2, batch_size=4)
    assert summary["written"] == 40 and summary["failed"] == 4
    assert sorted(folder_lines(out)) == sorted(want)
    again = caption_to_folder([str(images)], out, actors=2, batch_size=4)  # a rerun: nothing to do
    assert again["written"] == 0 and again["skipped"] == 40 and sorted(folder_lines(out)) == sorted(want)


def dies_once(flag: str) -> type:
    """A CaptionActor that kills its own process on its third batch, once per job (the flag file says it
    happened). Made inside a function: Ray ships such a class by value, a test module's by name."""

    class DiesOnce(CaptionActor):
        def __call__(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                try:
                    os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return DiesOnce


def test_an_actor_killed_mid_job_loses_and_duplicates_nothing(images, want, tmp_path):
    flag = tmp_path / "killed"
    out = tmp_path / "out"
    summary = caption_to_folder([str(images)], out, actors=2, batch_size=2, actor=dies_once(str(flag)))
    assert flag.exists(), "no actor was killed"
    assert summary["written"] == 40 and sorted(folder_lines(out)) == sorted(want)


def test_a_driver_stopped_mid_job_goes_on_where_it_stopped(images, want, tmp_path):
    out = tmp_path / "out"

    def stop(written: int) -> None:
        if written >= 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption_to_folder([str(images)], out, actors=2, batch_size=4, on_part=stop)
    first = folder_lines(out)
    assert 10 <= len(first) < 40
    summary = caption_to_folder([str(images)], out, actors=2, batch_size=4)
    assert summary["skipped"] == len(first) and summary["written"] == 40 - len(first)
    assert sorted(folder_lines(out)) == sorted(want)
