# The pointwise part of each RNN cell, by kernel id: the cell functions themselves are C, in
# ext/_cell_simd.h (vector code that computes every unit with the same instructions, whatever
# the number of units in a call; its comment gives the layout: gate g of the input side at
# ax[g*sx + d], of the recurrent side at ar[g*sr + d], state component s at st[s*ss + d]).
# The backward recomputes the gates from (ax, ar, previous state) instead of storing them.
from cython cimport floating

cdef extern from "_cell_simd.h" nogil:
    enum:
        ELMAN "SS_CELL_ELMAN"
        LSTM "SS_CELL_LSTM"
        GRU "SS_CELL_GRU"
        SLSTM "SS_CELL_SLSTM"
    void ss_cv_forward_f(int cell, Py_ssize_t D, const float* ax, Py_ssize_t sx,
                         const float* ar, Py_ssize_t sr, float* st, Py_ssize_t ss)
    void ss_cv_forward_d(int cell, Py_ssize_t D, const double* ax, Py_ssize_t sx,
                         const double* ar, Py_ssize_t sr, double* st, Py_ssize_t ss)
    void ss_cv_backward_f(int cell, Py_ssize_t D, const float* ax, Py_ssize_t sx,
                          const float* ar, Py_ssize_t sr, const float* prev, Py_ssize_t sp,
                          float* dst, Py_ssize_t sds, float* dgx, Py_ssize_t sgx, float* dgr,
                          Py_ssize_t sgr)
    void ss_cv_backward_d(int cell, Py_ssize_t D, const double* ax, Py_ssize_t sx,
                          const double* ar, Py_ssize_t sr, const double* prev, Py_ssize_t sp,
                          double* dst, Py_ssize_t sds, double* dgx, Py_ssize_t sgx, double* dgr,
                          Py_ssize_t sgr)


cdef inline dict cell_ids():
    """Kernel id by cell name (the names of src/statescan/_cells.py), for rnn.pyx's CELL_IDS."""
    return {"elman": ELMAN, "lstm": LSTM, "gru": GRU, "slstm": SLSTM}


cdef inline void cell_forward(int cell, Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                              const floating* ar, Py_ssize_t sr,
                              floating* st, Py_ssize_t ss) noexcept nogil:
    if floating is float:
        ss_cv_forward_f(cell, D, ax, sx, ar, sr, st, ss)
    else:
        ss_cv_forward_d(cell, D, ax, sx, ar, sr, st, ss)


# Backward: `dst` holds the gradient w.r.t. the state after the step (dh includes dy) and is
# overwritten with the gradient w.r.t. the state before it -- for h only the direct pointwise
# part; the caller adds R^T dgr.  dgx / dgr receive the gradients of the input-side and the
# recurrent-side pre-activations (they differ only for the GRU's n gate).

cdef inline void cell_backward(int cell, Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                               const floating* ar, Py_ssize_t sr,
                               const floating* prev, Py_ssize_t sp,
                               floating* dst, Py_ssize_t sds,
                               floating* dgx, Py_ssize_t sgx,
                               floating* dgr, Py_ssize_t sgr) noexcept nogil:
    if floating is float:
        ss_cv_backward_f(cell, D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
    else:
        ss_cv_backward_d(cell, D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
