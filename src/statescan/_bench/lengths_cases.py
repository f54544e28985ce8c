"""Benchmark of variable-length batches: an LSTM (H = I = 256, batch 64) on a padded batch whose
rows have lengths uniform in [1, T] (mean ~T/2).

Runners (all on the same padded batch [B, T, I]; ``steps`` = T, so the ratio column compares
the time per call):

* ``statescan``: ``ss.lstm(x, W, R, b, b_r, lengths=lengths)``: padded steps are skipped, so
  the cost should follow sum(lengths) (target: <= 0.6x the padded run).
* ``padded-static``: the same call without ``lengths`` (every row runs all T steps).
* ``torch-packed``: PyTorch's ``nn.LSTM`` on the ``pack_padded_sequence`` of the batch (packed
  once, outside the timing; unpacked to [B, T, H] inside it).
"""
import numpy as np

import statescan as ss

from .core import STATESCAN, Case, Runner, add_peer, import_peer

B, HIDDEN = 64, 256


def cases(quick):
    T = 32 if quick else 128
    return [_case(T, dtype) for dtype in ("float32", "float64")]


def _lengths(T, seed=0):
    return np.random.default_rng(seed).integers(1, T + 1, B).astype(np.int64)


def _case(T, dtype):
    lengths = _lengths(T)
    flops = 2.0 * int(lengths.sum()) * 4 * HIDDEN * 2 * HIDDEN     # W x and R h per valid step
    return Case("lengths", "lstm-lengths", {"B": B, "H": HIDDEN, "T": T}, dtype, T, flops,
                lambda: _make(T, lengths, dtype))


def _make(T, lengths, dtype):
    rng = np.random.default_rng(1)
    H = HIDDEN
    x = rng.standard_normal((B, T, H)).astype(dtype)
    W = (rng.standard_normal((4 * H, H)) / np.sqrt(H)).astype(dtype)
    R = (rng.standard_normal((4 * H, H)) / np.sqrt(H)).astype(dtype)
    b = (0.1 * rng.standard_normal(4 * H)).astype(dtype)
    b_r = (0.1 * rng.standard_normal(4 * H)).astype(dtype)
    padded_flops = 2.0 * B * T * 4 * H * 2 * H
    runners = {
        STATESCAN: lambda: ss.lstm(x, W, R, b, b_r, lengths=lengths)[0],
        # its outputs at padded steps are not 0: not compared
        "padded-static": Runner(lambda: (ss.lstm(x, W, R, b, b_r), None)[1],
                                flops=padded_flops),
    }
    add_peer(runners, "torch-packed", _torch_packed, x, W, R, b, b_r, lengths)
    return runners


def _torch_packed(x, W, R, b, b_r, lengths):
    torch = import_peer("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    H = R.shape[1]
    module = torch.nn.LSTM(W.shape[1], H, batch_first=True)
    module = module.to(torch.float64 if x.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(W))
        module.weight_hh_l0.copy_(torch.from_numpy(R))
        module.bias_ih_l0.copy_(torch.from_numpy(b))
        module.bias_hh_l0.copy_(torch.from_numpy(b_r))
    packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                  batch_first=True, enforce_sorted=False)
    T = x.shape[1]

    def run():
        with torch.no_grad():
            out, _ = module(packed)
            return pad_packed_sequence(out, batch_first=True, total_length=T)[0]
    return run
