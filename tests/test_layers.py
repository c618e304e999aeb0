"""The seed's layers against numeric gradients, autograd, and independent numpy computations (float64)."""

import math

import numpy as np
import pytest
torch = pytest.importorskip("torch")

from captool.training import (
    LSTM,
    RNN,
    AttentionLSTM,
    WordEmbedding,
    attention_forward,
    dot_product_attention,
    lstm_forward,
    lstm_step_forward,
    rnn_backward,
    rnn_forward,
    rnn_step_backward,
    rnn_step_forward,
    temporal_softmax_loss,
)

F64 = dict(dtype=torch.float64)
N, T, D, H = 3, 4, 5, 6


def rel_error(x, y, eps=1e-10):
    """The course's relative error: max |x - y| over max (|x| + |y|)."""
    return ((x - y).abs().max() / (x.abs() + y.abs()).clamp(min=eps).max()).item()


def numeric_gradient(f, x, dout, h=1e-6):
    """Central differences of sum(f() * dout) with respect to every element of x (changed in place)."""
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        pos = f().clone()
        flat[i] = old - h
        neg = f().clone()
        flat[i] = old
        gflat[i] = ((pos - neg) * dout).sum() / (2 * h)
    return grad


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def np_lstm_step(x, h, c, Wx, Wh, b, attn=None, Wattn=None):
    a = x @ Wx + h @ Wh + b
    if attn is not None:
        a = a + attn @ Wattn
    Hd = h.shape[1]
    i, f, o, g = sigmoid(a[:, :Hd]), sigmoid(a[:, Hd:2 * Hd]), sigmoid(a[:, 2 * Hd:3 * Hd]), np.tanh(a[:, 3 * Hd:])
    c = f * c + i * g
    return o * np.tanh(c), c


def np_attention(h, A):
    n, hd = A.shape[:2]
    flat = A.reshape(n, hd, -1)
    scores = np.einsum("nh,nhk->nk", h, flat) / math.sqrt(hd)
    w = np.exp(scores - scores.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nhk,nk->nh", flat, w), w.reshape(n, *A.shape[2:])


@pytest.fixture
def rnn_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(N, T, D, generator=g, **F64), h0=torch.randn(N, H, generator=g, **F64),
        Wx=torch.randn(D, H, generator=g, **F64) * 0.5, Wh=torch.randn(H, H, generator=g, **F64) * 0.5,
        b=torch.randn(H, generator=g, **F64),
    )


def test_rnn_step_forward_matches_numpy(rnn_inputs):
    x, h, Wx, Wh, b = (rnn_inputs[k].numpy() for k in ("x", "h0", "Wx", "Wh", "b"))
    next_h, _ = rnn_step_forward(rnn_inputs["x"][:, 0], rnn_inputs["h0"], rnn_inputs["Wx"], rnn_inputs["Wh"], rnn_inputs["b"])
    np.testing.assert_allclose(next_h.numpy(), np.tanh(x[:, 0] @ Wx + h @ Wh + b), rtol=1e-12, atol=1e-14)


def test_rnn_forward_matches_numpy(rnn_inputs):
    x, h, Wx, Wh, b = (rnn_inputs[k].numpy() for k in ("x", "h0", "Wx", "Wh", "b"))
    expected = []
    for t in range(T):
        h = np.tanh(x[:, t] @ Wx + h @ Wh + b)
        expected.append(h)
    out, _ = rnn_forward(**rnn_inputs)
    assert out.shape == (N, T, H)
    np.testing.assert_allclose(out.numpy(), np.stack(expected, axis=1), rtol=1e-12, atol=1e-14)


def test_rnn_step_backward_matches_numeric_and_autograd(rnn_inputs):
    x, h, Wx, Wh, b = (rnn_inputs[k] for k in ("x", "h0", "Wx", "Wh", "b"))
    x = x[:, 0].clone()
    dnext_h = torch.randn(N, H, generator=torch.Generator().manual_seed(1), **F64)
    _, cache = rnn_step_forward(x, h, Wx, Wh, b)
    grads = rnn_step_backward(dnext_h, cache)
    inputs = (x, h, Wx, Wh, b)

    def f():
        return rnn_step_forward(*inputs)[0]

    for value, grad in zip(inputs, grads):
        assert rel_error(grad, numeric_gradient(f, value, dnext_h)) < 1e-6
    leaves = [v.clone().requires_grad_() for v in inputs]
    rnn_step_forward(*leaves)[0].backward(dnext_h)
    for leaf, grad in zip(leaves, grads):
        assert rel_error(grad, leaf.grad) < 1e-10


def test_rnn_backward_matches_numeric_and_autograd(rnn_inputs):
    inputs = tuple(rnn_inputs[k] for k in ("x", "h0", "Wx", "Wh", "b"))
    dh = torch.randn(N, T, H, generator=torch.Generator().manual_seed(2), **F64)
    _, cache = rnn_forward(*inputs)
    grads = rnn_backward(dh, cache)

    def f():
        return rnn_forward(*inputs)[0]

    for value, grad in zip(inputs, grads):
        assert grad.shape == value.shape
        assert rel_error(grad, numeric_gradient(f, value, dh)) < 1e-6
    leaves = [v.clone().requires_grad_() for v in inputs]
    rnn_forward(*leaves)[0].backward(dh)
    for leaf, grad in zip(leaves, grads):
        assert rel_error(grad, leaf.grad) < 1e-10


def test_rnn_module_trains_through_the_hand_written_backward(rnn_inputs, monkeypatch):
    rnn = RNN(D, H, dtype=torch.float64)
    with torch.no_grad():
        for name in ("Wx", "Wh", "b"):
            getattr(rnn, name).copy_(rnn_inputs[name])
    x = rnn_inputs["x"].clone().requires_grad_()
    h0 = rnn_inputs["h0"].clone().requires_grad_()
    dh = torch.randn(N, T, H, generator=torch.Generator().manual_seed(3), **F64)

    calls = []
    import captool.training.layers as layers

    real = layers.rnn_backward
    monkeypatch.setattr(layers, "rnn_backward", lambda *a: calls.append(1) or real(*a))
    out = rnn(x, h0)
    out.backward(dh)
    assert calls == [1]  # the module's gradient is the seed's backward, not autograd's
    torch.testing.assert_close(out, rnn_forward(**rnn_inputs)[0], rtol=0, atol=0)

    leaves = [v.detach().clone().requires_grad_() for v in (rnn_inputs["x"], rnn_inputs["h0"], rnn.Wx, rnn.Wh, rnn.b)]
    rnn_forward(*leaves)[0].backward(dh)
    for got, leaf in zip((x.grad, h0.grad, rnn.Wx.grad, rnn.Wh.grad, rnn.b.grad), leaves):
        assert rel_error(got, leaf.grad) < 1e-10

    step = rnn.step_forward(rnn_inputs["x"][:, 0], rnn_inputs["h0"])
    torch.testing.assert_close(step, out[:, 0].detach(), rtol=0, atol=0)


def test_module_initialisation_follows_the_course():
    torch.manual_seed(0)
    rnn, lstm, att = RNN(400, 300), LSTM(400, 300), AttentionLSTM(400, 300)
    assert rnn.Wx.shape == (400, 300) and rnn.Wh.shape == (300, 300) and rnn.b.shape == (300,)
    assert lstm.Wx.shape == (400, 1200) and lstm.Wh.shape == (300, 1200) and lstm.b.shape == (1200,)
    assert att.Wattn.shape == (300, 1200)
    for m in (rnn, lstm, att):
        assert torch.count_nonzero(m.b) == 0
        assert abs(m.Wx.std().item() * math.sqrt(400) - 1) < 0.05
        assert abs(m.Wh.std().item() * math.sqrt(300) - 1) < 0.05
    emb = WordEmbedding(1000, 64)
    assert abs(emb.W_embed.std().item() * math.sqrt(1000) - 1) < 0.05


def test_word_embedding_looks_up_rows():
    emb = WordEmbedding(7, 3, dtype=torch.float64)
    ids = torch.tensor([[0, 3, 1], [6, 6, 2]])
    out = emb(ids)
    assert out.shape == (2, 3, 3) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.detach().numpy(), emb.W_embed.detach().numpy()[ids.numpy()])


@pytest.mark.parametrize("T_, expected", [(1, math.log(10)), (10, 10 * math.log(10))])
def test_softmax_loss_of_near_zero_scores_is_T_log_V(T_, expected):
    g = torch.Generator().manual_seed(0)
    x = 0.001 * torch.randn(1000, T_, 10, generator=g, **F64)
    y = torch.randint(1, 10, (1000, T_), generator=g)  # no <NULL>: every position counts
    loss = temporal_softmax_loss(x, y, ignore_index=0).item()
    assert abs(loss - expected) < 1e-3 * T_


def test_softmax_loss_matches_numpy_and_ignores_masked_positions_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, 8, generator=g, **F64)
    y = torch.randint(0, 8, (50, 6), generator=g)
    masked = y == 0
    assert masked.any()
    loss = temporal_softmax_loss(x, y, ignore_index=0)

    xs, ys = x.numpy(), y.numpy()
    logp = xs - xs.max(axis=2, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=2, keepdims=True))
    picked = np.take_along_axis(logp, ys[..., None], axis=2)[..., 0]
    assert abs(loss.item() - (-picked[ys != 0].sum() / 50)) < 1e-12
    assert abs(temporal_softmax_loss(x, y).item() - (-picked.sum() / 50)) < 1e-12  # None: nothing ignored

    noisy = x.clone()
    noisy[masked] = 100 * torch.randn(int(masked.sum()), 8, generator=g, **F64)
    noisy.requires_grad_()
    loss2 = temporal_softmax_loss(noisy, y, ignore_index=0)
    assert loss2.item() == loss.item()  # scores at masked positions change nothing
    loss2.backward()
    assert torch.count_nonzero(noisy.grad[masked]) == 0


@pytest.fixture
def lstm_inputs():
    g = torch.Generator().manual_seed(4)
    return dict(
        x=torch.randn(N, T, D, generator=g, **F64), h0=torch.randn(N, H, generator=g, **F64),
        Wx=torch.randn(D, 4 * H, generator=g, **F64) * 0.4, Wh=torch.randn(H, 4 * H, generator=g, **F64) * 0.4,
        Wattn=torch.randn(H, 4 * H, generator=g, **F64) * 0.4, b=torch.randn(4 * H, generator=g, **F64),
        A=torch.randn(N, H, 4, 4, generator=g, **F64),
    )


def test_lstm_step_forward_matches_numpy_with_and_without_attention(lstm_inputs):
    p = {k: v.numpy() for k, v in lstm_inputs.items()}
    c = np.random.default_rng(0).standard_normal((N, H))
    attn = np.random.default_rng(1).standard_normal((N, H))
    t = lstm_inputs
    h1, c1 = lstm_step_forward(t["x"][:, 0], t["h0"], torch.from_numpy(c), t["Wx"], t["Wh"], t["b"])
    eh, ec = np_lstm_step(p["x"][:, 0], p["h0"], c, p["Wx"], p["Wh"], p["b"])
    np.testing.assert_allclose(h1.numpy(), eh, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c1.numpy(), ec, rtol=1e-12, atol=1e-14)
    h2, c2 = lstm_step_forward(t["x"][:, 0], t["h0"], torch.from_numpy(c), t["Wx"], t["Wh"], t["b"],
                               torch.from_numpy(attn), t["Wattn"])
    eh, ec = np_lstm_step(p["x"][:, 0], p["h0"], c, p["Wx"], p["Wh"], p["b"], attn, p["Wattn"])
    np.testing.assert_allclose(h2.numpy(), eh, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c2.numpy(), ec, rtol=1e-12, atol=1e-14)


def test_lstm_forward_matches_numpy(lstm_inputs):
    p = {k: v.numpy() for k, v in lstm_inputs.items()}
    h, c = p["h0"], np.zeros((N, H))
    expected = []
    for t in range(T):
        h, c = np_lstm_step(p["x"][:, t], h, c, p["Wx"], p["Wh"], p["b"])
        expected.append(h)
    t = lstm_inputs
    out = lstm_forward(t["x"], t["h0"], t["Wx"], t["Wh"], t["b"])
    assert out.shape == (N, T, H)
    np.testing.assert_allclose(out.numpy(), np.stack(expected, axis=1), rtol=1e-12, atol=1e-14)
    module = LSTM(D, H, dtype=torch.float64)
    with torch.no_grad():
        for name in ("Wx", "Wh", "b"):
            getattr(module, name).copy_(t[name])
        torch.testing.assert_close(module(t["x"], t["h0"]), out, rtol=0, atol=0)
        step_h, _ = module.step_forward(t["x"][:, 0], t["h0"], torch.zeros(N, H, **F64))
        torch.testing.assert_close(step_h, out[:, 0], rtol=0, atol=0)


def test_dot_product_attention_matches_numpy(lstm_inputs):
    h, A = lstm_inputs["h0"], lstm_inputs["A"]
    attn, weights = dot_product_attention(h, A)
    assert attn.shape == (N, H) and weights.shape == (N, 4, 4)
    e_attn, e_weights = np_attention(h.numpy(), A.numpy())
    np.testing.assert_allclose(attn.numpy(), e_attn, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(weights.numpy(), e_weights, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(weights.sum(dim=(1, 2)).numpy(), np.ones(N), rtol=1e-12)


def test_attention_forward_matches_numpy(lstm_inputs):
    p = {k: v.numpy() for k, v in lstm_inputs.items()}
    h = p["A"].mean(axis=(2, 3))
    c = h.copy()
    expected = []
    for t in range(T):
        attn, _ = np_attention(h, p["A"])
        h, c = np_lstm_step(p["x"][:, t], h, c, p["Wx"], p["Wh"], p["b"], attn, p["Wattn"])
        expected.append(h)
    t = lstm_inputs
    out = attention_forward(t["x"], t["A"], t["Wx"], t["Wh"], t["Wattn"], t["b"])
    assert out.shape == (N, T, H)
    np.testing.assert_allclose(out.numpy(), np.stack(expected, axis=1), rtol=1e-12, atol=1e-14)
    module = AttentionLSTM(D, H, dtype=torch.float64)
    with torch.no_grad():
        for name in ("Wx", "Wh", "Wattn", "b"):
            getattr(module, name).copy_(t[name])
        torch.testing.assert_close(module(t["x"], t["A"]), out, rtol=0, atol=0)
        h0 = t["A"].mean(dim=(2, 3))
        attn, _ = dot_product_attention(h0, t["A"])
        step_h, _ = module.step_forward(t["x"][:, 0], h0, h0, attn)
        torch.testing.assert_close(step_h, out[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "attention"])
def test_lstm_autograd_matches_numeric_gradient(lstm_inputs, cell):
    t = lstm_inputs
    names = ("x", "h0", "Wx", "Wh", "b") if cell == "lstm" else ("x", "A", "Wx", "Wh", "Wattn", "b")
    inputs = [t[k] for k in names]
    fn = lstm_forward if cell == "lstm" else attention_forward
    dh = torch.randn(N, T, H, generator=torch.Generator().manual_seed(5), **F64)
    leaves = [v.clone().requires_grad_() for v in inputs]
    fn(*leaves).backward(dh)
    for value, leaf in zip(inputs, leaves):
        assert rel_error(leaf.grad, numeric_gradient(lambda: fn(*inputs), value, dh)) < 1e-6
