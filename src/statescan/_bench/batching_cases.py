"""Benchmark of continuous batching (E-BATCH): many sequences with long-tailed lengths
through an LSTM, batch 64.

Runners (each processes the same valid tokens; ``steps`` = total valid tokens, so the table's
us/step is per token and the ratio column is a throughput ratio):

* ``statescan``: ``ss.run_sequences(ss.lstm, sequences, ...)``: finished rows are refilled.
* ``padded-static``: batches of 64 consecutive sequences (arrival order), each padded to its
  longest sequence, run without lengths: the usual static batching.
* ``padded-lengths``: the same batches with ``lengths=`` (the kernel skips padded steps, but
  a batch still waits for its longest row and runs emptier meanwhile).
* ``ideal``: the total valid tokens as one full batch of 64 rows (the kernel's full-batch
  per-step rate, no idle rows); run_sequences should stay within 1.2x of it.
"""
import numpy as np

import statescan as ss

from .core import STATESCAN, Case

BATCH = 64


def cases(quick):
    grid = ([(256, 64, 30, 400)] if quick
            else [(4096, 256, 100, 2000), (1024, 256, 100, 2000)])
    return [_case(n, hidden, median, longest, dtype)
            for n, hidden, median, longest in grid for dtype in ("float32", "float64")]


def _lengths(n, median, longest, seed=0):
    """Lognormal lengths with the given median; sigma puts the largest of n near `longest`."""
    rng = np.random.default_rng(seed)
    z = np.sqrt(2 * np.log(n))                 # the largest of n standard normals, roughly
    sigma = np.log(longest / median) / z
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 1,
                   longest).astype(np.int64)


def _case(n, hidden, median, longest, dtype):
    lengths = _lengths(n, median, longest)
    tokens = int(lengths.sum())
    flops = 2.0 * tokens * 4 * hidden * 2 * hidden
    return Case("batching", "lstm-ebatch", {"seqs": n, "H": hidden, "median": median,
                                            "max": longest}, dtype, tokens, flops,
                lambda: _make(lengths, hidden, dtype))


def _make(lengths, hidden, dtype):
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(dtype)
    R = (rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(dtype)
    b = (0.1 * rng.standard_normal(4 * hidden)).astype(dtype)
    weights = (W, R, b, b)
    seqs = [rng.standard_normal((n, hidden)).astype(dtype) for n in lengths]
    batches = [_pad(seqs[i:i + BATCH]) for i in range(0, len(seqs), BATCH)]
    tokens = int(lengths.sum())
    full = rng.standard_normal((BATCH, -(-tokens // BATCH), hidden)).astype(dtype)

    def continuous():
        return ss.run_sequences(ss.lstm, seqs, *weights, batch_size=BATCH)[-1][0]

    def static(use_lengths):
        def run():
            for x, lens in batches:
                y = ss.lstm(x, *weights, lengths=lens if use_lengths else None)[0]
            return y[-1, :lens[-1]] if use_lengths else None
        return run

    def ideal():              # different data: not verified
        ss.lstm(full, *weights)

    return {STATESCAN: continuous, "padded-static": static(False),
            "padded-lengths": static(True), "ideal": ideal}


def _pad(seqs):
    lens = np.array([len(s) for s in seqs])
    x = np.zeros((len(seqs), lens.max(), seqs[0].shape[1]), seqs[0].dtype)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = s
    return x, lens
