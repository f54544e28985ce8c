"""Benchmark grid of causal_conv1d (Mamba's depthwise causal convolution, K = 4, SiLU):
prefill of a sequence, forward+backward, and one-token decoding steps with a state.

Peers: PyTorch's ``Conv1d(C, C, K, groups=C, padding=K-1)`` cut to the first T outputs, then
SiLU ("torch": what mamba_ssm and Hugging Face transformers run on a CPU; for
forward+backward, autograd), and for decoding Hugging Face's CPU step ("torch": roll the
[B, C, K] window, write the token, multiply-sum with the weight, SiLU).  Every case also runs
statescan's numpy reference.
"""
import numpy as np

import statescan as ss

from .core import NUMPY_REF, STATESCAN, Case, Runner, add_peer, import_peer, numpy_reference

# (B, T, C, K, backward); C = 1536 is Mamba-130m's d_inner, 1792 Mamba-2-130m's conv width
_PREFILL_FULL = [(1, 512, 1536, 4, False), (8, 512, 1536, 4, False), (1, 512, 1792, 4, False),
                 (1, 512, 1536, 4, True)]
_PREFILL_QUICK = [(1, 512, 1536, 4, False)]
_DECODE_FULL = [(1, 1536, 4), (1, 1792, 4), (8, 1536, 4)]      # (B, C, K)
_DECODE_QUICK = [(1, 1536, 4)]
_REF_STEPS = 64            # the numpy reference loops over time in Python: a shorter prefix


def cases(quick):
    out = []
    for dtype in ("float32", "float64"):
        for B, T, C, K, backward in (_PREFILL_QUICK if quick else _PREFILL_FULL):
            out.append(_prefill_case(B, T, C, K, backward, dtype))
        for B, C, K in (_DECODE_QUICK if quick else _DECODE_FULL):
            out.append(_decode_case(B, C, K, dtype))
    return out


def _inputs(B, T, C, K, dtype):
    rng = np.random.default_rng(B * 7919 + T * 31 + C)
    x = rng.standard_normal((B, T, C)).astype(dtype)
    w = (rng.standard_normal((C, K)) / np.sqrt(K)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    return x, w, b, dy


# ---- prefill ---------------------------------------------------------------------------------

def _prefill_case(B, T, C, K, backward, dtype):
    # per output: K multiply-adds, SiLU ~ 12; the backward about three times that
    flops = (2.0 * K + 12) * B * T * C * (3 if backward else 1)
    name = "causal_conv1d-fwdbwd" if backward else "causal_conv1d"
    return Case("conv", name, {"B": B, "T": T, "C": C, "K": K}, dtype, T, flops,
                lambda: _prefill_make(B, T, C, K, dtype, backward))


def _statescan_run(x, w, b, dy, backward):
    if backward:
        def run():
            _, pullback = ss.vjp(ss.causal_conv1d, x, w, b, activation="silu")
            return pullback((dy, None))[0]
    else:
        def run():
            return ss.causal_conv1d(x, w, b, activation="silu")[0]
    return run


def _prefill_make(B, T, C, K, dtype, backward):
    x, w, b, dy = _inputs(B, T, C, K, dtype)
    n = min(T, _REF_STEPS)
    short = (np.ascontiguousarray(x[:, :n]), w, b, np.ascontiguousarray(dy[:, :n]))
    runners = {STATESCAN: _statescan_run(x, w, b, dy, backward),
               NUMPY_REF: Runner(numpy_reference(_statescan_run(*short, backward)), steps=n,
                                 expected=_statescan_run(*short, backward))}
    add_peer(runners, "torch", _torch_prefill, x, w, b, dy, backward)
    return runners


def _torch_prefill(x, w, b, dy, backward):
    torch = import_peer("torch")
    B, T, C = x.shape
    K = w.shape[1]
    conv = torch.nn.Conv1d(C, C, K, groups=C, padding=K - 1,
                           dtype=torch.float32 if x.dtype == np.float32 else torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w[:, None, :]))
        conv.bias.copy_(torch.from_numpy(b))
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)

    def forward(inp):      # [B, T, C] -> [B, T, C], as Mamba's blocks call it
        return torch.nn.functional.silu(conv(inp.transpose(1, 2))[..., :T]).transpose(1, 2)

    if backward:
        def run():
            inp = tx.detach().requires_grad_(True)
            forward(inp).backward(tdy)
            return inp.grad.numpy()
    else:
        def run():
            with torch.no_grad():
                return forward(tx).numpy()
    return run


# ---- one-token decode ------------------------------------------------------------------------

def _decode_case(B, C, K, dtype):
    """One token with a state: the decode path, the new window written into a preallocated
    array (out_state), as a decoding loop does."""
    return Case("conv", "causal_conv1d-decode", {"B": B, "C": C, "K": K}, dtype, 1,
                (2.0 * K + 12) * B * C, lambda: _decode_make(B, C, K, dtype))


def _decode_make(B, C, K, dtype):
    x, w, b, _ = _inputs(B, 1, C, K, dtype)
    state = np.random.default_rng(C).standard_normal((B, C, K - 1)).astype(dtype)
    new_state = np.empty_like(state)

    def run():
        return ss.causal_conv1d(x, w, b, activation="silu", state=state,
                                out_state=new_state)[0]
    runners = {STATESCAN: run, NUMPY_REF: numpy_reference(run)}
    add_peer(runners, "torch", _torch_decode, x, w, b, state)
    return runners


def _torch_decode(x, w, b, state):
    torch = import_peer("torch")
    B, _, C = x.shape
    # Hugging Face's window holds K inputs, newest last: ours with one older column in front
    window = torch.from_numpy(np.concatenate([np.zeros((B, C, 1), x.dtype), state], axis=2))
    tx, tw, tb = torch.from_numpy(x[:, 0]), torch.from_numpy(w), torch.from_numpy(b)

    def run():
        with torch.no_grad():
            new = torch.roll(window, shifts=-1, dims=-1)
            new[:, :, -1] = tx
            return torch.nn.functional.silu(torch.sum(new * tw, dim=-1) + tb)[:, None].numpy()
    return run
