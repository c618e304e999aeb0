"""Decoding loops over a single-step decoder: greedy and beam search, in numpy.

One greedy loop (`greedy_loop`) runs every greedy decode: on the runtime's bound buffers
(captool.steps), on a plain step function (`FeedStep`: onnxruntime's `session.run`, or the PyTorch
model in export's parity check). Beam search is its own loop over a step function, because it
reorders the state between steps. Whatever a loop keeps between steps lives in objects made per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np

from .bundle import IMAGE_STATE, STATE_FROM_ENCODER, STATE_FROM_STEP

Arrays = Mapping[str, np.ndarray]
StepFn = Callable[[dict[str, np.ndarray]], Arrays]


def initial_state(encoder_out: Arrays) -> dict[str, np.ndarray]:
    """The decoder step's state feeds (h, c, features) from the encoder's outputs (h0, c0, features)."""
    return {STATE_FROM_ENCODER[k]: v for k, v in encoder_out.items() if k in STATE_FROM_ENCODER}


def next_state(state: dict[str, np.ndarray], step_out: Arrays) -> dict[str, np.ndarray]:
    """Carry h_next/c_next into h/c; features stay as they are."""
    new = dict(state)
    for out_name, in_name in STATE_FROM_STEP.items():
        if out_name in step_out:
            new[in_name] = step_out[out_name]
    return new


class FeedStep:
    """A step function (feeds -> outputs by name) as the greedy loop's step: it carries the state.

    The function may be a plain onnxruntime `session.run`, the IO-bound `DeviceStep`, or the PyTorch
    model in export's parity check. Made per decoding call; `tokens` is the next call's token input.
    """

    def __init__(self, step: StepFn, encoder_out: Arrays):
        self.step = step
        self.state = initial_state(encoder_out)
        n = next(iter(self.state.values())).shape[0]
        self.tokens = np.zeros((n,), dtype=np.int64)

    def __call__(self) -> np.ndarray:
        out = self.step({"token": self.tokens.copy(), **self.state})  # a copy: the loop rewrites tokens
        self.state = next_state(self.state, out)
        return np.asarray(out["logits"])


class Step(Protocol):
    """What the greedy loop runs: one decoder step on `tokens` and the state the step carries."""

    tokens: np.ndarray  # int64 [N]: the token input of the next call, written by the loop

    def __call__(self) -> np.ndarray:  # float [N, V]: the logits; the state moves one step on
        ...


def greedy_loop(step: Step, *, start_id: int, end_id: int, null_id: int, max_length: int) -> np.ndarray:
    """Greedy decoding, batched, on a step that carries its state: int64 [N, max_length], `<END>`
    kept, `<NULL>` after it. The one greedy loop: every runtime path and export's check run it.

    Stops as soon as every sequence has ended. The argmax takes the first maximum, as torch.argmax
    does, and is written straight into the step's token input.
    """
    word = step.tokens
    n = word.shape[0]
    word.fill(start_id)
    tokens = np.full((n, max_length), null_id, dtype=np.int64)
    done = np.zeros((n,), dtype=bool)
    for t in range(max_length):
        logits = step()
        np.argmax(logits, axis=1, out=word)  # (N, V) -> (N,)
        np.copyto(tokens[:, t], word, where=~done)
        done |= word == end_id
        if done.all():
            break
    return tokens


def greedy(encoder_out: Arrays, step: StepFn, *, start_id: int, end_id: int, null_id: int,
           max_length: int) -> np.ndarray:
    """`greedy_loop` over a step function (feeds -> outputs by name), from the encoder's outputs."""
    return greedy_loop(FeedStep(step, encoder_out), start_id=start_id, end_id=end_id, null_id=null_id,
                       max_length=max_length)


@dataclass(frozen=True)
class Beams:
    """Beam search's result: every image's k hypotheses, best first."""

    tokens: np.ndarray  # int64 [N, k, L]: `<END>` kept, `<NULL>` after it
    scores: np.ndarray  # float64 [N, k]: the ranking score (length-normalized if length_penalty > 0)
    log_probs: np.ndarray  # float64 [N, k]: the sum of the tokens' log-probabilities
    lengths: np.ndarray  # int64 [N, k]: tokens generated, `<END>` included

    @property
    def best(self) -> np.ndarray:
        """int64 [N, L]: each image's best hypothesis."""
        return self.tokens[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis; float64 so that distinct logits stay distinct."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def length_normalizer(lengths: np.ndarray, alpha: float) -> np.ndarray:
    """GNMT's length penalty lp(len) = ((5 + len) / 6) ** alpha; scores are divided by it."""
    return ((5.0 + lengths) / 6.0) ** alpha


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first; ties go to the lower index.

    The order of a stable descending sort, by k rounds of argmax (which takes the first maximum):
    for the few beams a caption needs this is far cheaper than sorting or partitioning N×kV rows.
    """
    n, m = values.shape
    work = np.array(values, dtype=np.float64)  # a copy: picked entries are struck out below
    rows = np.arange(n)
    picks = np.empty((n, k), dtype=np.int64)
    for j in range(k):
        best = work.argmax(axis=1)  # (N,)
        # Where only -inf is left, argmax may return an entry already picked: take the first one free.
        for i in np.flatnonzero(np.isneginf(work[rows, best])):
            free = np.ones(m, dtype=bool)
            free[picks[i, :j]] = False
            best[i] = np.flatnonzero(free)[0]
        picks[:, j] = best
        work[rows, best] = -np.inf
    return picks


def _take_rows(value, rows: np.ndarray) -> np.ndarray:
    # State may be an onnxruntime OrtValue left on the device by an IO-bound step: fetch it first.
    if not isinstance(value, np.ndarray):
        value = value.numpy()
    return value[rows]


def beam_search(
    encoder_out: Arrays,
    step: StepFn,
    *,
    beam_size: int,
    start_id: int,
    end_id: int,
    null_id: int,
    max_length: int,
    length_penalty: float = 0.0,
) -> Beams:
    """Beam search, batched: the k beams of all N images run as N*k rows of one step call.

    The beams compete on the sum of log-probabilities. A beam that has produced `<END>` stays in the
    beam, extended by `<NULL>` at no cost, so it keeps its score and its place unless k better
    continuations displace it. At the end (every beam ended, or `max_length`) the k hypotheses of
    each image are ranked by score / lp(length), lp as in `length_normalizer` (alpha =
    `length_penalty`; 0 ranks by the plain sum). beam_size=1 gives exactly `greedy`'s tokens.
    Where k exceeds the number of distinct hypotheses, the extra beams score -inf.
    """
    state = initial_state(encoder_out)
    n = next(iter(state.values())).shape[0]
    k = beam_size
    if k < 1:
        raise ValueError(f"beam_size must be at least 1, got {k}")
    state = {name: np.repeat(v, k, axis=0) for name, v in state.items()}  # (N, ...) -> (N*k, ...)
    tokens = np.full((n, k, max_length), null_id, dtype=np.int64)
    # All k beams of an image start identical; only beam 0 may expand at the first step.
    log_probs = np.full((n, k), -np.inf)
    log_probs[:, 0] = 0.0
    lengths = np.zeros((n, k), dtype=np.int64)
    done = np.zeros((n, k), dtype=bool)
    word = np.full((n * k,), start_id, dtype=np.int64)
    first_row = np.arange(n)[:, None] * k  # (N, 1): row of each image's beam 0
    for t in range(max_length):
        out = step({"token": word, **state})
        logp = log_softmax(out["logits"])  # (N*k, V)
        vocab_size = logp.shape[1]
        logp = logp.reshape(n, k, vocab_size)
        ended = np.full((vocab_size,), -np.inf)
        ended[null_id] = 0.0
        logp[done] = ended  # an ended beam continues only with <NULL>, at no cost
        candidates = (log_probs[:, :, None] + logp).reshape(n, k * vocab_size)
        best = top_k(candidates, k)  # (N, k) into the k*V candidates of each image
        parent, word_nk = best // vocab_size, best % vocab_size
        log_probs = np.take_along_axis(candidates, best, axis=1)
        tokens = np.take_along_axis(tokens, parent[:, :, None], axis=1)
        tokens[:, :, t] = word_nk
        parent_done = np.take_along_axis(done, parent, axis=1)
        lengths = np.take_along_axis(lengths, parent, axis=1) + ~parent_done
        # A beam with no finite score (k wider than the hypotheses so far) is dead: it ends too.
        done = parent_done | (word_nk == end_id) | np.isneginf(log_probs)
        if done.all():
            break
        state = next_state(state, out)
        rows = (first_row + parent).reshape(-1)  # (N*k,) the parent's row for each new beam
        if not np.array_equal(rows, np.arange(n * k)):
            # features (or the attention cache) are the same for all beams of an image: only h and c move.
            state = {name: v if name in IMAGE_STATE else _take_rows(v, rows) for name, v in state.items()}
        word = word_nk.reshape(-1)
    scores = log_probs / length_normalizer(lengths, length_penalty) if length_penalty else log_probs
    rank = np.argsort(-scores, axis=1, kind="stable")  # (N, k) best first
    return Beams(
        tokens=np.take_along_axis(tokens, rank[:, :, None], axis=1),
        scores=np.take_along_axis(scores, rank, axis=1),
        log_probs=np.take_along_axis(log_probs, rank, axis=1),
        lengths=np.take_along_axis(lengths, rank, axis=1),
    )
