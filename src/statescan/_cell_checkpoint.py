"""Bounded-memory vjp of the RNN cells: time blocks with recomputation (checkpointing).

The plain vjp (``rnn._cell_vjp``) saves the input pre-activations ax, the recurrent ones
ar_seq (each G*H per step) and every state component per step: about 2*G + S times the
output, and the backward adds dgx (G times more).  For a large call this runs the forward in
blocks of K time steps instead, keeping only y and the state at each block boundary.  The
pullback walks the blocks in reverse processing order: it projects the block's input again,
reruns the block's forward from its checkpoint with everything saved, backpropagates through
the block with the state cotangent coming from the later blocks, writes the block's slice of
dx and adds the block's share of dW, dR, db, db_r.  The extra memory is then one block's
buffers (about 1/BLOCKS of the unblocked saves) instead of all of them, for one more forward
pass of compute.

Outputs are bit-identical to the unblocked path (a sequence processed in chunks gives the
same result as one call, and the projection's rows do not depend on how many are projected
at once); gradients equal it to rounding (the weight gradients are summed block by block).

``lengths`` with ``reverse=True`` keeps the unblocked path: each row then runs backwards from
its own last valid step, so a processing step is not one time slice of the batch.
"""
from dataclasses import replace

import numpy as np

from . import _cell_call, _memory

# Calls whose saved arrays (ax, ar_seq and every state per step) exceed this many bytes run
# in time blocks; smaller calls keep the unblocked path (faster: one forward pass).
THRESHOLD_BYTES = 64 << 20
# Number of time blocks: the block buffers are about 1/BLOCKS of the unblocked saves.
BLOCKS = 16


def applies(call):
    """True when the vjp of `call` (a sequential :class:`_cell_call.CellCall`) runs blocked."""
    B, T, H = call.shape
    if T < 2 or (call.lengths is not None and call.reverse):
        return False
    GH = call.R.shape[0] * call.R.shape[1]
    saved = B * T * (2 * GH + call.cell.states * H) * call.R.dtype.itemsize
    return saved > THRESHOLD_BYTES


def _bounds(T, reverse):
    """The (t0, t1) time blocks in processing order (the last block first when `reverse`)."""
    K = -(-T // BLOCKS)
    blocks = [(t0, min(t0 + K, T)) for t0 in range(0, T, K)]
    return blocks[::-1] if reverse else blocks


def _block(call, t0, t1, state0):
    """The sub-call of time steps t0:t1 starting from `state0` [S, B, H]."""
    lengths = None if call.lengths is None else np.clip(call.lengths - t0, 0, t1 - t0)
    reset = None if call.reset is None else np.ascontiguousarray(call.reset[:, t0:t1])
    return replace(call, x=np.ascontiguousarray(call.x[:, t0:t1]), state0=state0,
                   state_given=False, lengths=lengths, reset=reset)


def vjp(call):
    """The vjp of a sequential cell call, blocked in time: ``(out, pullback)`` as
    ``rnn._cell_vjp`` returns them."""
    B, T, H = call.shape
    blocks = _bounds(T, call.reverse)
    y = _memory.empty((B, T, H), call.R.dtype)
    checkpoints = []                       # the state entering each block
    state = call.state0
    for t0, t1 in blocks:
        sub = _block(call, t0, t1, state)
        seq, _, state = _cell_call.forward(sub, _cell_call.input_preactivation(sub),
                                           save=False)
        y[:, t0:t1] = seq[0]
        checkpoints.append(sub.state0)
        del seq, sub
    final = state

    def pullback(cotangent):
        dy, dstate = _cell_call.cotangent(call, cotangent)
        dx = _memory.empty(call.x.shape, dy.dtype)
        sums = None
        for (t0, t1), state0 in zip(blocks[::-1], checkpoints[::-1]):
            sub = _block(call, t0, t1, state0)
            ax = _cell_call.input_preactivation(sub)
            seq, ar_seq, _ = _cell_call.forward(sub, ax, save=True)
            dgx, dgr, dstate = _cell_call.backward(
                sub, ax, ar_seq, seq, np.ascontiguousarray(dy[:, t0:t1]), dstate,
                consume=_cell_call.owns_preactivation(sub))     # ax: computed for this block
            del ax, ar_seq                 # the largest block buffers, not needed any more
            grads = _cell_call.parameter_grads(sub, seq[0], dgx, dgr, dstate)
            del seq, dgx, dgr
            dx[:, t0:t1] = grads[0]
            if sums is None:
                sums = list(grads[1:])
            else:
                for total, g in zip(sums, grads[1:]):
                    if total is not None:
                        total += g
            del grads
        grads = (dx, *sums)
        if call.state_given:
            grads = grads + (_cell_call.outputs(call.cell, None, dstate)[1],)
        return grads

    return _cell_call.outputs(call.cell, y, final), pullback
