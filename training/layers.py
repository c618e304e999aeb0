"""The seed's recurrent layers (vanilla RNN with hand-written backward), the course's LSTM cells, and the loss.

Functions take and return tensors, as in the course assignment the seed follows. The RNN's backward
is written by hand and the `RNN` module trains through it (`_RNNFunction`); the LSTM cells use
autograd. Every module's `step_forward` is plain tensor algebra (MatMul/Add/Tanh/Sigmoid), so one
decoder step traces to ONNX without control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# ---------------------------------------------------------------------------------------------------
# Vanilla RNN (the seed's Part II)


def rnn_step_forward(x: Tensor, prev_h: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor):
    """One tanh RNN step: x (N, D), prev_h (N, H), Wx (D, H), Wh (H, H), b (H,) -> next_h (N, H), cache."""
    next_h = torch.tanh(x @ Wx + prev_h @ Wh + b)
    cache = (x, prev_h, Wx, Wh, next_h)  # next_h, not the pre-activation: tanh' = 1 - tanh^2
    return next_h, cache


def rnn_step_backward(dnext_h: Tensor, cache):
    """Gradients of one step from dnext_h (N, H): (dx, dprev_h, dWx, dWh, db)."""
    x, prev_h, Wx, Wh, next_h = cache
    da = dnext_h * (1 - next_h * next_h)  # (N, H), through tanh
    dx = da @ Wx.t()  # (N, D)
    dprev_h = da @ Wh.t()  # (N, H)
    dWx = x.t() @ da  # (D, H)
    dWh = prev_h.t() @ da  # (H, H)
    db = da.sum(dim=0)  # (H,)
    return dx, dprev_h, dWx, dWh, db


def rnn_forward(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor):
    """The RNN over a sequence: x (N, T, D), h0 (N, H) -> h (N, T, H), cache.

    The cache is (x, h0, Wx, Wh, h): every step's cache can be rebuilt from it, so the autograd
    wrapper can keep it with `save_for_backward` instead of T tuples.
    """
    prev_h = h0
    hs = []
    for t in range(x.shape[1]):
        prev_h, _ = rnn_step_forward(x[:, t], prev_h, Wx, Wh, b)
        hs.append(prev_h)
    h = torch.stack(hs, dim=1)  # T × (N, H) -> (N, T, H)
    return h, (x, h0, Wx, Wh, h)


def rnn_backward(dh: Tensor, cache):
    """Backward over the sequence from dh (N, T, H), the upstream gradient of every hidden state.

    Returns (dx (N, T, D), dh0 (N, H), dWx (D, H), dWh (H, H), db (H,)).
    """
    x, h0, Wx, Wh, h = cache
    T = x.shape[1]
    dx = torch.empty_like(x)
    dWx, dWh = torch.zeros_like(Wx), torch.zeros_like(Wh)
    db = torch.zeros(Wh.shape[0], dtype=dh.dtype, device=dh.device)
    dprev_h = torch.zeros_like(h0)
    for t in reversed(range(T)):
        prev_h = h[:, t - 1] if t > 0 else h0
        step_cache = (x[:, t], prev_h, Wx, Wh, h[:, t])
        # The loss reaches h_t directly (dh) and through h_{t+1} (dprev_h from the later step).
        dx_t, dprev_h, dWx_t, dWh_t, db_t = rnn_step_backward(dh[:, t] + dprev_h, step_cache)
        dx[:, t] = dx_t
        dWx += dWx_t
        dWh += dWh_t
        db += db_t
    return dx, dprev_h, dWx, dWh, db


class _RNNFunction(torch.autograd.Function):
    """rnn_forward with rnn_backward as its gradient: training runs the seed's backward pass."""

    @staticmethod
    def forward(ctx, x, h0, Wx, Wh, b):
        h, cache = rnn_forward(x, h0, Wx, Wh, b)
        ctx.save_for_backward(*cache)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        return rnn_backward(dh.contiguous(), ctx.saved_tensors)


class RNN(nn.Module):
    """The seed's vanilla RNN: Wx (D, H), Wh (H, H), b (H,), initialised as in the course."""

    def __init__(self, input_dim: int, hidden_dim: int, device="cpu", dtype=torch.float32):
        super().__init__()
        self.Wx = nn.Parameter(torch.randn(input_dim, hidden_dim, device=device, dtype=dtype) / math.sqrt(input_dim))
        self.Wh = nn.Parameter(torch.randn(hidden_dim, hidden_dim, device=device, dtype=dtype) / math.sqrt(hidden_dim))
        self.b = nn.Parameter(torch.zeros(hidden_dim, device=device, dtype=dtype))

    def forward(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (N, T, D), h0 (N, H) -> h (N, T, H); gradients come from rnn_backward."""
        return _RNNFunction.apply(x, h0, self.Wx, self.Wh, self.b)

    def step_forward(self, x: Tensor, prev_h: Tensor) -> Tensor:
        """x (N, D), prev_h (N, H) -> next_h (N, H)."""
        next_h, _ = rnn_step_forward(x, prev_h, self.Wx, self.Wh, self.b)
        return next_h


# ---------------------------------------------------------------------------------------------------
# LSTM and attention LSTM (the course assignment's later parts; autograd serves their backward)


def lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b, attn=None, Wattn=None):
    """One LSTM step: x (N, D), prev_h/prev_c (N, H), Wx (D, 4H), Wh (H, 4H), b (4H,) -> (next_h, next_c).

    Gates are i, f, o, g in that order in the 4H vector. With attention, attn (N, H) enters through
    Wattn (H, 4H) like a second input.
    """
    a = x @ Wx + prev_h @ Wh + b  # (N, 4H)
    if attn is not None:
        a = a + attn @ Wattn
    i, f, o, g = a.chunk(4, dim=1)  # 4 × (N, H)
    next_c = torch.sigmoid(f) * prev_c + torch.sigmoid(i) * torch.tanh(g)
    next_h = torch.sigmoid(o) * torch.tanh(next_c)
    return next_h, next_c


def lstm_forward(x: Tensor, h0: Tensor, Wx: Tensor, Wh: Tensor, b: Tensor) -> Tensor:
    """The LSTM over a sequence, c0 = 0: x (N, T, D), h0 (N, H) -> h (N, T, H)."""
    prev_h, prev_c = h0, torch.zeros_like(h0)
    hs = []
    for t in range(x.shape[1]):
        prev_h, prev_c = lstm_step_forward(x[:, t], prev_h, prev_c, Wx, Wh, b)
        hs.append(prev_h)
    return torch.stack(hs, dim=1)  # T × (N, H) -> (N, T, H)


def dot_product_attention(prev_h: Tensor, A: Tensor):
    """Scaled dot-product attention of prev_h (N, H) over the grid A (N, H, 4, 4).

    Returns attn (N, H), the attention-weighted sum of A's 16 vectors, and attn_weights (N, 4, 4).
    """
    H = A.shape[1]
    A_flat = A.flatten(2)  # (N, H, 16)
    scores = (prev_h.unsqueeze(1) @ A_flat) / math.sqrt(H)  # (N, 1, H) @ (N, H, 16) -> (N, 1, 16)
    weights = F.softmax(scores, dim=2)  # (N, 1, 16)
    attn = (A_flat @ weights.transpose(1, 2))[:, :, 0]  # (N, H, 16) @ (N, 16, 1) -> (N, H)
    # reshape with -1 for N: a traced unflatten would bake the example's batch size into the graph.
    attn_weights = weights.reshape(-1, A.shape[2], A.shape[3])  # (N, 1, 16) -> (N, 4, 4)
    return attn, attn_weights


def attention_cache(A: Tensor, Wattn: Tensor) -> tuple[Tensor, Tensor]:
    """What every attention step of one image recomputes from A alone, computed once for deployment.

    A (N, H, 4, 4), Wattn (H, 4H) -> keys (N, H, 16), A's grid scaled by 1/sqrt(H), and values
    (N, 16, 4H), each grid vector's contribution to the gates (A_i @ Wattn). A step then takes
    `attn @ Wattn` as `weights @ values`: the same sum, reassociated, so it no longer reads Wattn
    (1 MB of the shipped model's 2 MB per step). The training code keeps the course's form.
    """
    A_flat = A.flatten(2)  # (N, H, 16)
    return A_flat / math.sqrt(A.shape[1]), A_flat.transpose(1, 2) @ Wattn


def cached_attention_step(x: Tensor, prev_h: Tensor, prev_c: Tensor, keys: Tensor, values: Tensor,
                          Wx: Tensor, Wh: Tensor, b: Tensor):
    """The attention LSTM's step on `attention_cache`'s keys and values -> (next_h, next_c, attn_weights).

    Equal, up to float rounding, to dot_product_attention + lstm_step_forward. The i, f, o gates lie
    side by side in the 4H vector, so one sigmoid covers them (one graph node instead of three).
    """
    H = prev_h.shape[1]
    weights = F.softmax(prev_h.unsqueeze(1) @ keys, dim=2)  # (N, 1, H) @ (N, H, 16) -> (N, 1, 16)
    a = x @ Wx + prev_h @ Wh + b + (weights @ values).squeeze(1)  # (N, 4H)
    ifo, g = a.split([3 * H, H], dim=1)
    i, f, o = torch.sigmoid(ifo).chunk(3, dim=1)
    next_c = f * prev_c + i * torch.tanh(g)
    next_h = o * torch.tanh(next_c)
    return next_h, next_c, weights.reshape(-1, 4, 4)


def attention_forward(x: Tensor, A: Tensor, Wx: Tensor, Wh: Tensor, Wattn: Tensor, b: Tensor) -> Tensor:
    """The attention LSTM over a sequence: x (N, T, D), A (N, H, 4, 4) -> h (N, T, H).

    h0 = c0 = the mean of A over the grid, as in the course.
    """
    prev_h = A.mean(dim=(2, 3))  # (N, H, 4, 4) -> (N, H)
    prev_c = prev_h
    hs = []
    for t in range(x.shape[1]):
        attn, _ = dot_product_attention(prev_h, A)
        prev_h, prev_c = lstm_step_forward(x[:, t], prev_h, prev_c, Wx, Wh, b, attn, Wattn)
        hs.append(prev_h)
    return torch.stack(hs, dim=1)  # T × (N, H) -> (N, T, H)


class LSTM(nn.Module):
    """LSTM cell: Wx (D, 4H), Wh (H, 4H), b (4H,), initialised as in the course."""

    def __init__(self, input_dim: int, hidden_dim: int, device="cpu", dtype=torch.float32):
        super().__init__()
        H4 = 4 * hidden_dim
        self.Wx = nn.Parameter(torch.randn(input_dim, H4, device=device, dtype=dtype) / math.sqrt(input_dim))
        self.Wh = nn.Parameter(torch.randn(hidden_dim, H4, device=device, dtype=dtype) / math.sqrt(hidden_dim))
        self.b = nn.Parameter(torch.zeros(H4, device=device, dtype=dtype))

    def forward(self, x: Tensor, h0: Tensor) -> Tensor:
        """x (N, T, D), h0 (N, H) -> h (N, T, H)."""
        return lstm_forward(x, h0, self.Wx, self.Wh, self.b)

    def step_forward(self, x: Tensor, prev_h: Tensor, prev_c: Tensor):
        """x (N, D), prev_h/prev_c (N, H) -> (next_h, next_c)."""
        return lstm_step_forward(x, prev_h, prev_c, self.Wx, self.Wh, self.b)


class AttentionLSTM(nn.Module):
    """Attention LSTM cell: the LSTM's parameters plus Wattn (H, 4H) for the attended features."""

    def __init__(self, input_dim: int, hidden_dim: int, device="cpu", dtype=torch.float32):
        super().__init__()
        H4 = 4 * hidden_dim
        self.Wx = nn.Parameter(torch.randn(input_dim, H4, device=device, dtype=dtype) / math.sqrt(input_dim))
        self.Wh = nn.Parameter(torch.randn(hidden_dim, H4, device=device, dtype=dtype) / math.sqrt(hidden_dim))
        self.Wattn = nn.Parameter(torch.randn(hidden_dim, H4, device=device, dtype=dtype) / math.sqrt(hidden_dim))
        self.b = nn.Parameter(torch.zeros(H4, device=device, dtype=dtype))

    def forward(self, x: Tensor, A: Tensor) -> Tensor:
        """x (N, T, D), A (N, H, 4, 4) -> h (N, T, H)."""
        return attention_forward(x, A, self.Wx, self.Wh, self.Wattn, self.b)

    def step_forward(self, x: Tensor, prev_h: Tensor, prev_c: Tensor, attn: Tensor):
        """x (N, D), prev_h/prev_c (N, H), attn (N, H) from dot_product_attention -> (next_h, next_c)."""
        return lstm_step_forward(x, prev_h, prev_c, self.Wx, self.Wh, self.b, attn, self.Wattn)


# ---------------------------------------------------------------------------------------------------
# Words in, scores out


class WordEmbedding(nn.Module):
    """Word ids -> vectors through the table W_embed (V, D), initialised randn / sqrt(V) as in the course."""

    def __init__(self, vocab_size: int, embed_size: int, device="cpu", dtype=torch.float32):
        super().__init__()
        self.W_embed = nn.Parameter(
            torch.randn(vocab_size, embed_size, device=device, dtype=dtype) / math.sqrt(vocab_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x int64 (N,) or (N, T) -> (N, D) or (N, T, D).

        F.embedding is W_embed[x] exactly; it traces to one Gather where indexing traces to
        Unsqueeze + GatherND (one node less in every exported step).
        """
        return F.embedding(x, self.W_embed)


def temporal_softmax_loss(x: Tensor, y: Tensor, ignore_index: int | None = None) -> Tensor:
    """Cross entropy of scores x (N, T, V) against targets y (N, T): summed over time, mean over the batch.

    Targets equal to `ignore_index` (the <NULL> padding) contribute nothing, to the loss or its gradient.
    """
    N, T, V = x.shape
    loss = F.cross_entropy(
        x.reshape(N * T, V),
        y.reshape(N * T),
        ignore_index=-100 if ignore_index is None else ignore_index,
        reduction="sum",
    )
    return loss / N
