"""Greedy and beam search over a numpy step function: exactness, equality at k=1, batching, stopping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from captool.decode import beam_search, greedy, length_normalizer, log_softmax, top_k

START, END, NULL = 1, 2, 0


class TinyRNN:
    """A random vanilla-RNN decoder step in numpy, with the bundle's names; it records each call's N."""

    def __init__(self, vocab_size=9, hidden=6, seed=0, end_bias=0.0):
        rng = np.random.default_rng(seed)
        self.embed = rng.normal(size=(vocab_size, hidden)).astype(np.float32)
        self.wh = rng.normal(size=(hidden, hidden)).astype(np.float32) * 0.8
        self.wo = rng.normal(size=(hidden, vocab_size)).astype(np.float32) * 2.0
        self.wo[:, END] += end_bias
        self.calls: list[int] = []

    def encode(self, n, seed=1):
        return {"h0": np.random.default_rng(seed).normal(size=(n, self.wh.shape[0])).astype(np.float32)}

    def step(self, feeds):
        token, h = feeds["token"], feeds["h"]
        assert token.dtype == np.int64 and token.shape == (h.shape[0],)
        self.calls.append(h.shape[0])
        h_next = np.tanh(self.embed[token] + h @ self.wh)  # (N, H)
        return {"logits": h_next @ self.wo, "h_next": h_next}

    def sequence_log_prob(self, h0, seq):
        """Teacher-forced log-probability of one hypothesis up to and including its <END>."""
        h, word, total = h0[None], np.array([START]), 0.0
        for tok in seq:
            out = self.step({"token": word, "h": h})
            total += log_softmax(out["logits"])[0, tok]
            if tok == END:
                break
            h, word = out["h_next"], np.array([tok])
        return total


def decode_kwargs(max_length=6):
    return dict(start_id=START, end_id=END, null_id=NULL, max_length=max_length)


def test_top_k_matches_a_stable_descending_sort_with_ties():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4, size=(50, 30)).astype(np.float64)  # many ties
    values[3] = 1.0  # a row of one value
    values[4, :25] = -np.inf
    for k in (1, 3, 5, 30):
        want = np.argsort(-values, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(top_k(values, k), want)


def test_log_softmax_is_normalized_and_float64():
    x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32) * 30
    lp = log_softmax(x)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_beam_size_one_equals_greedy(seed):
    model = TinyRNN(seed=seed, end_bias=1.0)
    enc = model.encode(7, seed=seed)
    g = greedy(enc, model.step, **decode_kwargs(8))
    b = beam_search(enc, model.step, beam_size=1, **decode_kwargs(8))
    np.testing.assert_array_equal(b.best, g)
    assert b.tokens.shape == (7, 1, 8)


def test_greedy_keeps_end_then_null_and_stops_when_all_ended():
    model = TinyRNN(seed=3, end_bias=3.0)
    tokens = greedy(model.encode(5), model.step, **decode_kwargs(12))
    for row in tokens:
        ends = np.flatnonzero(row == END)
        assert ends.size and (row[ends[0] + 1:] == NULL).all()
    last_end = max(np.flatnonzero(row == END)[0] for row in tokens)
    assert len(model.calls) == last_end + 1 < 12


def _all_sequences(vocab_size, length):
    """Every distinct hypothesis of at most `length` tokens (an <END> ends it; NULL-padded)."""
    seqs = set()
    for seq in itertools.product(range(vocab_size), repeat=length):
        seq = list(seq)
        if END in seq:
            i = seq.index(END)
            seq = seq[: i + 1] + [NULL] * (length - i - 1)
        seqs.add(tuple(seq))
    return seqs


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_a_beam_wide_enough_is_exhaustive_search(alpha):
    # With k >= V**(L-1) nothing is ever pruned, so the best beam is the best sequence outright.
    vocab_size, length = 4, 3
    model = TinyRNN(vocab_size=vocab_size, hidden=5, seed=11, end_bias=0.5)
    enc = model.encode(3, seed=4)
    beams = beam_search(enc, model.step, beam_size=vocab_size ** (length - 1), length_penalty=alpha,
                        **decode_kwargs(length))
    for i in range(3):
        def score(seq):
            n = seq.index(END) + 1 if END in seq else length
            return model.sequence_log_prob(enc["h0"][i], seq) / length_normalizer(np.array(n), alpha)

        best = max(_all_sequences(vocab_size, length), key=score)
        assert tuple(beams.best[i]) == best
        np.testing.assert_allclose(beams.scores[i, 0], score(best), rtol=1e-9)


def test_beams_are_ranked_and_scores_are_their_log_probabilities():
    model = TinyRNN(seed=5, end_bias=0.8)
    enc = model.encode(4, seed=2)
    beams = beam_search(enc, model.step, beam_size=3, length_penalty=0.6, **decode_kwargs(7))
    assert beams.tokens.shape == (4, 3, 7) and beams.scores.shape == (4, 3)
    assert (np.diff(beams.scores, axis=1) <= 0).all()
    np.testing.assert_allclose(beams.scores, beams.log_probs / length_normalizer(beams.lengths, 0.6))
    for i in range(4):
        assert len({tuple(t) for t in beams.tokens[i]}) == 3  # k distinct hypotheses
        for j in range(3):
            seq = list(beams.tokens[i, j])
            ended = END in seq
            assert beams.lengths[i, j] == (seq.index(END) + 1 if ended else 7)
            if ended:
                assert all(t == NULL for t in seq[seq.index(END) + 1:])
            np.testing.assert_allclose(beams.log_probs[i, j], model.sequence_log_prob(enc["h0"][i], seq))


def test_all_beams_of_the_batch_go_through_one_step_call_and_stop_when_ended():
    model = TinyRNN(seed=2, end_bias=4.0)
    beams = beam_search(model.encode(6), model.step, beam_size=4, **decode_kwargs(15))
    assert set(model.calls) == {6 * 4}
    assert len(model.calls) < 15  # every beam ended early, and the loop stopped there
    assert (beams.tokens == END).any(axis=2).all()


def test_a_wider_beam_never_finds_a_worse_best_under_exhaustive_width():
    model = TinyRNN(vocab_size=5, seed=8, end_bias=0.3)
    enc = model.encode(5, seed=9)
    narrow = beam_search(enc, model.step, beam_size=1, **decode_kwargs(3))
    wide = beam_search(enc, model.step, beam_size=25, **decode_kwargs(3))
    assert (wide.scores[:, 0] >= narrow.scores[:, 0] - 1e-12).all()


def test_beam_size_checks():
    model = TinyRNN(vocab_size=5)
    with pytest.raises(ValueError, match="at least 1"):
        beam_search(model.encode(1), model.step, beam_size=0, **decode_kwargs())
    # Wider than the hypotheses there are (5 first tokens, 1 step): the extra beams are dead.
    wide = beam_search(model.encode(2), model.step, beam_size=7, **decode_kwargs(1))
    assert np.isfinite(wide.scores[:, :5]).all() and np.isneginf(wide.scores[:, 5:]).all()
    assert {tuple(t) for t in wide.tokens[0, :5]} == {(w,) for w in range(5)}


def test_features_are_not_reordered_but_h_is():
    # An attention-style state: features must reach every step unchanged for each image's beams.
    model = TinyRNN(seed=4, end_bias=0.5)
    enc = model.encode(3)
    features = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    seen = []

    def step(feeds):
        seen.append(feeds["features"])
        return model.step(feeds)

    beam_search({**enc, "features": features}, step, beam_size=2, **decode_kwargs(5))
    for f in seen:
        np.testing.assert_array_equal(f, np.repeat(features, 2, axis=0))
