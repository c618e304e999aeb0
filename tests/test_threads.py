"""One Captioner called from 8 threads at once gives exactly the serial results (DESIGN.md's contract).

Every batch is captioned serially first; then 8 threads caption all batches together, several
rounds, with equal batch sizes (the case that once shared step buffers) and with mixed ones, greedy
and beam search. The shipped bundle runs without torch; the tiny bundles cover all three cells.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from captool import Captioner

THREADS = 8
CELLS = ["rnn", "lstm", "attention"]


def batches(sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 3, 112, 112), dtype=np.uint8) for n in sizes]  # (n,3,S,S) each


def assert_threads_equal_serial(captioner: Captioner, work: list[np.ndarray], beam_size: int = 1, rounds: int = 3):
    serial = [captioner.generate(x, beam_size=beam_size) for x in work]
    start = threading.Barrier(THREADS)

    def caption(x: np.ndarray) -> np.ndarray:
        return captioner.generate(x, beam_size=beam_size)

    def first(x: np.ndarray) -> np.ndarray:
        start.wait(timeout=60)  # every thread is inside `generate` at the same time
        return caption(x)

    with ThreadPoolExecutor(THREADS) as pool:
        for r in range(rounds):
            got = list(pool.map(first if r == 0 else caption, work))
            differ = [i for i, (a, b) in enumerate(zip(got, serial)) if not np.array_equal(a, b)]
            assert not differ, f"round {r}: batches {differ} of {len(work)} differ from the serial run"


@pytest.mark.parametrize("sizes", [[4] * THREADS * 2, [1, 2, 3, 5, 8, 13, 1, 4] * 2], ids=["equal", "mixed"])
def test_shipped_bundle_from_eight_threads(sizes):
    captioner = Captioner(device="cpu")
    assert_threads_equal_serial(captioner, batches(sizes, seed=len(sizes) + sizes[1]))


def test_shipped_bundle_caption_api_from_eight_threads():
    captioner = Captioner(device="cpu")
    rng = np.random.default_rng(3)
    inputs = [[rng.integers(0, 256, (60 + 7 * i, 90, 3), dtype=np.uint8) for _ in range(3)] for i in range(16)]
    serial = [captioner.caption(chunk) for chunk in inputs]
    with ThreadPoolExecutor(THREADS) as pool:
        assert list(pool.map(captioner.caption, inputs)) == serial


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("sizes", [[3] * THREADS * 2, [1, 6, 2, 33, 3, 5, 1, 4] * 2], ids=["equal", "mixed"])
def test_every_cell_from_eight_threads(tiny_bundle, cell, sizes):
    pytest.importorskip("torch")
    captioner = Captioner(tiny_bundle(cell), device="cpu")  # 33 rows: the wide step's session, made once
    assert_threads_equal_serial(captioner, batches(sizes, seed=CELLS.index(cell)))


@pytest.mark.parametrize("cell", CELLS)
def test_beam_search_and_plain_steps_from_eight_threads(tiny_bundle, cell):
    pytest.importorskip("torch")
    work = batches([2, 1, 3, 2, 1, 4, 2, 3], seed=11)
    assert_threads_equal_serial(Captioner(tiny_bundle(cell), device="cpu"), work, beam_size=3, rounds=2)
    assert_threads_equal_serial(Captioner(tiny_bundle(cell), device="cpu", io_binding=False), work, rounds=2)
