"""Train a small character-level LSTM language model with statescan and numpy only.

The model: one-hot characters -> statescan.nn.LSTM -> a linear layer -> softmax.  Gradients
come from ``statescan.vjp`` (exact backpropagation through the LSTM kernels), the optimiser
is a few lines of numpy Adam.  The loss printed every few steps goes down; at the end the
model writes a little text one character at a time through ``layer.stream()``.

    python examples/train_char_lstm.py [steps]
"""
import sys

import numpy as np

import statescan as ss
from statescan import nn

TEXT = ("the quick brown fox jumps over the lazy dog. "
        "a stitch in time saves nine. "
        "all that glitters is not gold. "
        "the early bird catches the worm. ") * 8


class Adam:
    """Adam on a dict of numpy arrays (updated in place)."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            self.params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def one_hot(ids, vocab, dtype=np.float32):
    return np.eye(vocab, dtype=dtype)[ids]


def loss_and_grads(layer, head, x, targets):
    """Mean cross-entropy of the next character, and the gradient of every parameter."""
    (y, _), pullback = ss.vjp(layer, x)                     # y [B, T, H]
    logits = y @ head["weight"].T + head["bias"]            # [B, T, V]
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    B, T, V = p.shape
    picked = np.take_along_axis(p, targets[..., None], axis=-1)[..., 0]
    loss = -np.log(picked).mean()
    dlogits = p
    np.put_along_axis(dlogits, targets[..., None], picked[..., None] - 1, axis=-1)
    dlogits /= B * T
    flat = dlogits.reshape(B * T, V)
    grads = {"head.weight": flat.T @ y.reshape(B * T, -1), "head.bias": flat.sum(axis=0)}
    _, layer_grads = pullback((dlogits @ head["weight"], None))
    grads.update(layer_grads)
    return float(loss), grads


def sample(layer, head, chars, start, n):
    """Greedy generation, one character per call through a stream (weights packed once)."""
    stream = layer.stream()
    index = {c: i for i, c in enumerate(chars)}
    state, out = None, list(start)
    x = one_hot(np.array([[index[c] for c in start]]), len(chars), layer.dtype)
    for _ in range(n):
        y, state = stream(x, state)
        nxt = int(np.argmax(y[0, -1] @ head["weight"].T + head["bias"]))
        out.append(chars[nxt])
        x = one_hot(np.array([[nxt]]), len(chars), layer.dtype)
    return "".join(out)


def train(steps=200, hidden=64, batch=16, seq=32, lr=1e-2, seed=0, log_every=20):
    """Train and return the list of per-step losses."""
    chars = sorted(set(TEXT))
    data = np.array([chars.index(c) for c in TEXT])
    V, rng = len(chars), np.random.default_rng(seed)
    layer = nn.LSTM(V, hidden, seed=seed)
    head = {"weight": (rng.standard_normal((V, hidden)) / np.sqrt(hidden)).astype(np.float32),
            "bias": np.zeros(V, np.float32)}
    params = {**{f"head.{k}": v for k, v in head.items()}, **layer.state_dict()}
    opt = Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, batch)
        ids = np.stack([data[s:s + seq + 1] for s in starts])
        loss, grads = loss_and_grads(layer, head, one_hot(ids[:, :-1], V), ids[:, 1:])
        opt.step(grads)
        head = {"weight": params["head.weight"], "bias": params["head.bias"]}
        layer.load_state_dict({k: v for k, v in params.items() if not k.startswith("head.")})
        losses.append(loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.3f}")
    if log_every:
        print("sample:", repr(sample(layer, head, chars, "the ", 60)))
    return losses


if __name__ == "__main__":
    train(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
