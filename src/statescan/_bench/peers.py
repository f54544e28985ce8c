"""Peer implementations of the RNN cells, built outside the timing.

Each ``build_*`` takes numpy inputs in statescan's convention (x [B,T,I], W [G*H,I],
R [G*H,H] or [heads,G*D,D], b, b_r [G*H], gate order as PyTorch) and returns a zero-argument
callable that runs the peer and returns y [B,T,H] (or dx for the forward+backward runners).
Packages are imported here, lazily, through :func:`core.import_peer`.
"""
import os
import sys

import numpy as np

from .._cells import CELLS
from .._reference.rnn import ArrayOps, recurrent_preactivation
from . import core

# ONNX gate orders, as indices into PyTorch's gate blocks (LSTM i,f,g,o -> iofc; GRU r,z,n -> zrh)
_ONNX_GATES = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "elman": (0,)}
_ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}
_TORCH_MODULES = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}


# ---- PyTorch's fused modules (nn.LSTM / nn.GRU / nn.RNN), heads = 1 -------------------------

def _torch_module(cell, W, R, b, b_r):
    torch = core.import_peer("torch")
    H, I = R.shape[1], W.shape[1]
    module = getattr(torch.nn, _TORCH_MODULES[cell])(I, H, batch_first=True)
    module = module.to(torch.float64 if W.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(W))
        module.weight_hh_l0.copy_(torch.from_numpy(R))
        module.bias_ih_l0.copy_(torch.from_numpy(b))
        module.bias_hh_l0.copy_(torch.from_numpy(b_r))
    return torch, module


def build_torch(cell, x, W, R, b, b_r):
    torch, module = _torch_module(cell, W, R, b, b_r)
    xt = torch.from_numpy(x)

    def run():
        with torch.no_grad():
            return module(xt)[0]
    return run


def build_torch_backward(cell, x, W, R, b, b_r, dy):
    """Forward + backward with autograd; returns dx."""
    torch, module = _torch_module(cell, W, R, b, b_r)
    xt, dyt = torch.from_numpy(x.copy()).requires_grad_(), torch.from_numpy(dy)

    def run():
        xt.grad = None
        module.zero_grad(set_to_none=True)
        y = module(xt)[0]
        y.backward(dyt)
        return xt.grad
    return run


# ---- ONNX Runtime's LSTM / GRU / RNN operators, heads = 1 ----------------------------------

def build_onnxruntime(cell, x, W, R, b, b_r):
    if x.dtype != np.float32:
        return core.Skipped("ONNX Runtime's LSTM/GRU/RNN kernels are float32 only")
    ort = core.import_peer("onnxruntime")
    onnx = core.import_peer("onnx")
    from onnx import helper, numpy_helper
    H = R.shape[1]
    order = _ONNX_GATES[cell]

    def reorder(a):
        return np.concatenate([a[g * H:(g + 1) * H] for g in order])[None]

    weights = {"W": reorder(W), "R": reorder(R),
               "B": np.concatenate([reorder(b), reorder(b_r)], axis=1)}
    attrs = {"hidden_size": H}
    if cell == "gru":
        attrs["linear_before_reset"] = 1     # PyTorch's GRU: r multiplies (R_n h + b_r,n)
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    B, T, I = x.shape
    node = helper.make_node(_ONNX_OPS[cell], ["X", "W", "R", "B"], ["Y"], **attrs)
    graph = helper.make_graph(
        [node], f"{cell}_bench",
        [helper.make_tensor_value_info("X", elem, [T, B, I])],
        [helper.make_tensor_value_info("Y", elem, [T, 1, B, H])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = core.threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    xs = np.ascontiguousarray(x.transpose(1, 0, 2))        # ONNX RNN ops are sequence-first

    def run():
        return session.run(["Y"], {"X": xs})[0][:, 0].transpose(1, 0, 2)
    return run


# ---- step loops written in a framework: vanilla PyTorch and JAX lax.scan ------------------

def _step(ops, cell, ax, state, R, b_r):
    """One step of `cell` with the reference's equations in `ops`' array library: (h, state)."""
    ar = recurrent_preactivation(state[0], R, b_r, ops)
    state = CELLS[cell].step(ax, ar, state, ops)
    return state[0], state


def build_torch_loop(cell, x, W, R3, b, b_r, dy=None):
    """A vanilla PyTorch step loop (FlashRNN's baseline): one GEMM for the input side, then
    a Python loop of per-step recurrent matmuls and pointwise ops.  With `dy`: forward and
    backward through autograd, returning dx."""
    torch = core.import_peer("torch")
    ops = ArrayOps(torch.sigmoid, torch.nn.functional.logsigmoid, torch.tanh, torch.exp,
                   torch.where, lambda h, R: torch.einsum("bkd,kgd->bkg", h, R),
                   lambda a, k: torch.chunk(a, k, dim=-1),
                   lambda a, axes: a.permute(*axes))
    # With dy every input gets a gradient, as statescan's vjp computes them all.
    xt, Wt, Rt, bt, brt = (None if a is None else
                           torch.from_numpy(a.copy()).requires_grad_(dy is not None)
                           for a in (x, W, R3, b, b_r))
    B, T, _ = x.shape
    H = R3.shape[0] * R3.shape[2]

    def forward():
        ax = (xt + bt if Wt is None       # W=None: x holds the input-side pre-activations
              else torch.addmm(bt, xt.reshape(B * T, -1), Wt.T).reshape(B, T, -1))
        state = tuple(torch.zeros(B, H, dtype=xt.dtype) for _ in range(CELLS[cell].states))
        ys = []
        for t in range(T):
            y, state = _step(ops, cell, ax[:, t], state, Rt, brt)
            ys.append(y)
        return torch.stack(ys, dim=1)

    if dy is None:
        def run():
            with torch.no_grad():
                return forward()
        return run
    dyt = torch.from_numpy(dy)

    def run_backward():
        for t in (xt, Wt, Rt, bt, brt):
            if t is not None:
                t.grad = None
        forward().backward(dyt)
        return xt.grad
    return run_backward


def build_jax(cell, x, W, R3, b, b_r, dy=None):
    """The cell as a jax.lax.scan under jit (JAX's way to write a fused recurrence).  With
    `dy`: forward and backward (jax.vjp), returning dx."""
    _configure_jax_threads()
    jax = core.import_peer("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    ops = ArrayOps(jax.nn.sigmoid, jax.nn.log_sigmoid, jnp.tanh, jnp.exp, jnp.where,
                   lambda h, R: jnp.einsum("bkd,kgd->bkg", h, R),
                   lambda a, k: jnp.split(a, k, axis=-1), jnp.transpose)
    B, T, _ = x.shape
    H = R3.shape[0] * R3.shape[2]

    def forward(x, W, R, b, b_r):
        ax = x + b if W is None else (x.reshape(B * T, -1) @ W.T + b).reshape(B, T, -1)
        ax = ax.transpose(1, 0, 2)
        state = tuple(jnp.zeros((B, H), x.dtype) for _ in range(CELLS[cell].states))

        def body(state, ax_t):
            y, state = _step(ops, cell, ax_t, state, R, b_r)
            return state, y
        _, ys = jax.lax.scan(body, state, ax)
        return ys.transpose(1, 0, 2)

    args = [jax.device_put(a) for a in (x, W, R3, b, b_r)]
    if dy is None:
        fn = jax.jit(forward)
    else:
        args.append(jax.device_put(dy))

        @jax.jit
        def fn(x, W, R, b, b_r, dy):
            # every input's gradient, as statescan's vjp computes them all; dx is verified
            _, pullback = jax.vjp(forward, x, W, R, b, b_r)
            grads = pullback(dy)
            return grads[0], grads[1:]

    def run():
        out = jax.block_until_ready(fn(*args))
        return np.asarray(out[0] if dy is not None else out)
    return run


def _configure_jax_threads():
    """XLA reads its CPU thread count from XLA_FLAGS when jax starts: set it before."""
    if "jax" in sys.modules:
        return
    n = core.threads()
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        extra = f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} " \
                f"intra_op_parallelism_threads={n}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
