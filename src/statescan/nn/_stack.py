"""The computation behind the recurrent stacks of :mod:`statescan.nn.rnn`: per layer and
direction one input GEMM (over the previous layer's concatenated directions) and one
cell-kernel call; the two directions run concurrently when there are threads for both; and
the reverse pass through the same calls.

Everything here works on validated arrays; the layer classes do the checking.
"""
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from .. import _dispatch, _memory, _threads
from ..autodiff import vjp as _vjp

_POOL = []      # one worker thread, made on first use, for the second direction


def project(x, W, b, lengths=None):
    """``x @ W.T + b`` over the rows of x, [B, T, M] (W [M, I], b [M] or None); with
    `lengths`, only the valid steps (the padded ones are 0 and cost nothing).

    The cell kernels' own input projection: a row's result does not depend on the batch it
    sits in or on the chunk of time, so a layer run in chunks, by
    :func:`statescan.run_sequences` or through a stream gives the same bits.
    """
    B, T, M = x.shape[0], x.shape[1], W.shape[0]
    empty = x.size == 0 or W.size == 0
    out = lambda: _memory.empty((B, T, M), x.dtype)      # noqa: E731
    if lengths is None:
        return _dispatch.run("rnn", "project", x, W, b, out=out, empty=empty)
    return _dispatch.run("rnn", "project_valid", x, W, b, lengths, out=out, empty=empty)


def _direction_kw(d, lengths):
    """Keywords of the cell call for direction d (1 = backward: each row read from its last
    valid step down to step 0)."""
    kw = {} if lengths is None else {"lengths": lengths}
    if d == 1:
        kw["reverse"] = True
    return kw


def _each_direction(tasks):
    """Run the directions' kernel calls (zero-argument callables) and return their results.

    With two or more kernel threads the two directions run at the same time, each with half
    the threads: they are independent, and one sequence per core scales better than one
    sequence split over cores with a barrier per step.  Results do not depend on this.
    """
    n = _threads.get_num_threads()
    if len(tasks) == 1 or n < 2 or not _dispatch.use_compiled():
        return [task() for task in tasks]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="statescan-direction"))

    def run(task):
        with _threads.threads(n // 2):
            return task()
    other = _POOL[0].submit(run, tasks[1])
    first = run(tasks[0])
    return [first, other.result()]


def _direction_forward(fn, save, inp, W, b, R, b_hh, lengths, kw):
    """One direction of one layer: its input projection (its rows of weight_ih, into a
    contiguous array: no copy of a strided slice for the kernel), then the cell on these
    pre-activations (W=None); with `save`, the cell's vjp.  Returns ((y, state), pullback
    or None)."""
    args = (project(inp, W, b, lengths), None, R, None, b_hh)
    return _vjp(fn, *args, **kw) if save else (fn(*args, **kw), None)


def _split(a, d, size, dirs, axis=-1):
    """Direction d's part of `axis` (the whole array for one direction)."""
    if dirs == 1:
        return a
    index = [slice(None)] * a.ndim
    index[axis] = slice(d * size, (d + 1) * size)
    return a[tuple(index)]


def forward(spec, params, x, state0, lengths, save=False):
    """Run the stack.

    spec: the layer (cell function, sizes); params: per layer (W_ih [dirs*G*H, I_l],
    R [dirs, ...], b_ih [dirs*G*H] or None, b_hh [dirs, G*H] or None); state0: per layer and
    direction the cell's initial state (None for zeros).  Returns y [B, T, dirs*H], the
    final states per layer and direction, and (with `save`) what :func:`backward` needs.
    """
    dirs, GH, H = spec.num_directions, spec._gates * spec.hidden_size, spec.hidden_size
    fn, heads = spec._cell_fn, spec.heads
    inp, finals, tape = x, [], []
    for layer, (W_ih, R, b_ih, b_hh) in enumerate(params):
        results = _each_direction([
            partial(_direction_forward, fn, save, inp, _split(W_ih, d, GH, dirs, axis=0),
                    None if b_ih is None else _split(b_ih, d, GH, dirs), R[d],
                    None if b_hh is None else b_hh[d], lengths,
                    dict(heads=heads, state=state0[layer * dirs + d], **_direction_kw(d, lengths)))
            for d in range(dirs)])
        ys = [y_d for (y_d, _), _ in results]
        finals.extend(s_d for (_, s_d), _ in results)
        if save:
            tape.append((inp, [pullback for _, pullback in results]))
        inp = ys[0] if dirs == 1 else np.concatenate(ys, axis=2)
    return inp, finals, tape


def backward(spec, params, tape, dy, dstates):
    """Gradients from the saved forward: dx, per layer (dW_ih, dR [dirs, ...], db_ih,
    db_hh [dirs, G*H]) and the initial states' gradients per layer and direction.

    dy [B, T, dirs*H]; dstates per layer and direction: the cell's state cotangent (or None).
    The forward must have been run with an explicit initial state for every direction, so
    that each cell pullback returns the state gradient last.
    """
    dirs, H = spec.num_directions, spec.hidden_size
    grads, dstate0 = [None] * len(params), [None] * (len(params) * dirs)
    d_out = dy
    for layer in reversed(range(len(params))):
        W_ih, _, b_ih, b_hh = params[layer]
        inp, pullbacks = tape[layer]
        dax, dR, db_hh = [], [], []
        results = _each_direction([
            partial(pullbacks[d], (np.ascontiguousarray(_split(d_out, d, H, dirs)),
                                   dstates[layer * dirs + d]))
            for d in range(dirs)])
        for d, g in enumerate(results):
            dax.append(g[0])
            dR.append(g[2])
            if b_hh is not None:
                db_hh.append(g[4])
            dstate0[layer * dirs + d] = g[-1]
        B, T, I = inp.shape
        inp2 = inp.reshape(B * T, I)
        dax = [g.reshape(B * T, g.shape[2]) for g in dax]
        dW = np.concatenate([g.T @ inp2 for g in dax])
        db = None if b_ih is None else np.concatenate([g.sum(axis=0) for g in dax])
        grads[layer] = (dW, np.stack(dR), db, None if b_hh is None else np.stack(db_hh))
        GH = dax[0].shape[1]
        d_out = dax[0] @ W_ih[:GH]
        for d in range(1, dirs):
            d_out += dax[d] @ W_ih[d * GH:(d + 1) * GH]
        d_out = d_out.reshape(B, T, I)
    return d_out, grads, dstate0
