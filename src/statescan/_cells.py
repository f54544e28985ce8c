"""The registry of recurrent cells: everything the package, the solvers, the benchmarks and
the tests need to know about a cell, in one place.

Adding a cell touches exactly these files:

1. ``src/statescan/_cells.py``: its :class:`Cell` entry in :data:`CELLS`;
2. ``ext/_cell_simd.h``: its id (``SS_CELL_*``), named in ``ext/_cells.pxd``'s enum and
   ``cell_ids()`` (the name -> id map that ``ext/rnn.pyx`` exports as ``CELL_IDS``: the
   kernels take the cell's name, so no id is written anywhere else); its pointwise forward
   and backward and their cases in ``forward`` / ``backward`` in ``ext/_cell_simd_impl.h``
   (C on vectors of units, included once per dtype by ``ext/_cell_simd.h``);
3. ``src/statescan/_reference/rnn.py``: ``<name>_step`` and ``<name>_step_backward``, the
   numpy definition the kernels are tested against.

The registry drives the solvers, the benchmarks' cases and peers (``statescan bench``) and the
tests' cell lists.  The public API is written out, not generated: a cell that should be public
also gets its function in ``rnn.py`` (a docstring and one ``_run`` call) and its name in
``__init__.py``.
"""
from dataclasses import dataclass
from typing import Callable

from ._reference import rnn as _ref


@dataclass(frozen=True)
class Cell:
    """One recurrent cell.

    name : the public function's name and the key of the compiled kernels' ``CELL_IDS``.
    gates : G, the pre-activation blocks of H rows each (gate-major: gate g at g*H:(g+1)*H).
    state_names : the components of the state, h first (S = their number).
    step : ``step(ax, ar, state, ops=NUMPY) -> state``, the pointwise update given the
        input-side ax and recurrent-side ar pre-activations [B, G*H] and the state tuple.
    step_backward : ``step_backward(ax, ar, prev, dstate) -> (dgx, dgr, dprev)``, its
        derivative (dprev's h entry without the R^T dgr term).
    separate_dgr : True when the gradient of ar differs from that of ax (the GRU: r scales
        R_n h + b_r,n), so the compiled backward needs a second output array.
    """
    name: str
    gates: int
    state_names: tuple
    step: Callable
    step_backward: Callable
    separate_dgr: bool = False

    @property
    def states(self):
        """S, the number of state components."""
        return len(self.state_names)


CELLS = {cell.name: cell for cell in (
    Cell("elman", 1, ("h",), _ref.elman_step, _ref.elman_step_backward),
    Cell("lstm", 4, ("h", "c"), _ref.lstm_step, _ref.lstm_step_backward),
    Cell("gru", 3, ("h",), _ref.gru_step, _ref.gru_step_backward, separate_dgr=True),
    Cell("slstm", 4, ("h", "c", "n", "m"), _ref.slstm_step, _ref.slstm_step_backward),
)}
