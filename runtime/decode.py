"""Decoding loops over a single-step decoder: greedy and beam search, in numpy.

The loops take the step as a function from feeds to outputs (names as in the bundle), so the same
code runs on onnxruntime sessions in deployment and on the PyTorch model in export's parity check.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .bundle import STATE_FROM_ENCODER, STATE_FROM_STEP

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


def greedy(
    encoder_out: Arrays,
    step: StepFn,
    *,
    start_id: int,
    end_id: int,
    null_id: int,
    max_length: int,
) -> np.ndarray:
    """Greedy decoding, batched: int64 [N, max_length], `<END>` kept, `<NULL>` after it.

    Stops as soon as every sequence has ended. The argmax takes the first maximum, as torch.argmax does.
    """
    state = initial_state(encoder_out)
    n = next(iter(state.values())).shape[0]
    tokens = np.full((n, max_length), null_id, dtype=np.int64)
    word = np.full((n,), start_id, dtype=np.int64)
    done = np.zeros((n,), dtype=bool)
    for t in range(max_length):
        out = step({"token": word, **state})
        word = np.asarray(out["logits"]).argmax(axis=1).astype(np.int64)  # (N, V) -> (N,)
        tokens[:, t] = np.where(done, null_id, word)
        done |= word == end_id
        if done.all():
            break
        state = next_state(state, out)
    return tokens
