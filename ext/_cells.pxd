# The pointwise part of each RNN cell: one small inline function per cell and direction.
# Layout seen by a cell (one batch row, one head, D units):
#   ax[g*sx + d]  input-side pre-activation of gate g (W x + b)
#   ar[g*sr + d]  recurrent-side pre-activation of gate g (R h + b_r)
#   st[s*ss + d]  state component s (0 = h; lstm: c; slstm: c, n, m), updated in place
# The backward recomputes the gates from (ax, ar, previous state) instead of storing them.
from cython cimport floating
from _math cimport exp_, tanh_, sigmoid, log_sigmoid

cdef enum:
    ELMAN = 0
    LSTM = 1
    GRU = 2
    SLSTM = 3


cdef inline dict cell_ids():
    """Kernel id by cell name (the names of src/statescan/_cells.py), for rnn.pyx's CELL_IDS."""
    return {"elman": ELMAN, "lstm": LSTM, "gru": GRU, "slstm": SLSTM}


cdef inline void elman_forward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                               const floating* ar, Py_ssize_t sr,
                               floating* st, Py_ssize_t ss) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(D):
        st[d] = tanh_(ax[d] + ar[d])


cdef inline void lstm_forward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                              const floating* ar, Py_ssize_t sr,
                              floating* st, Py_ssize_t ss) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating i, f, g, o, c
    for d in range(D):
        i = sigmoid(ax[d] + ar[d])
        f = sigmoid(ax[sx + d] + ar[sr + d])
        g = tanh_(ax[2 * sx + d] + ar[2 * sr + d])
        o = sigmoid(ax[3 * sx + d] + ar[3 * sr + d])
        c = f * st[ss + d] + i * g
        st[ss + d] = c
        st[d] = o * tanh_(c)


cdef inline void gru_forward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                             const floating* ar, Py_ssize_t sr,
                             floating* st, Py_ssize_t ss) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating r, z, n
    for d in range(D):
        r = sigmoid(ax[d] + ar[d])
        z = sigmoid(ax[sx + d] + ar[sr + d])
        n = tanh_(ax[2 * sx + d] + r * ar[2 * sr + d])
        st[d] = (one - z) * n + z * st[d]


cdef inline void slstm_forward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                               const floating* ar, Py_ssize_t sr,
                               floating* st, Py_ssize_t ss) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating it, ft, zt, ot, n_prev, l, e, i, f, c, n
    cdef bint m_is_i
    for d in range(D):
        it = ax[d] + ar[d]
        ft = ax[sx + d] + ar[sr + d]
        zt = ax[2 * sx + d] + ar[2 * sr + d]
        ot = ax[3 * sx + d] + ar[3 * sr + d]
        n_prev = st[2 * ss + d]
        l = log_sigmoid(ft) + st[3 * ss + d]
        # m = i~ (first step) or max(i~, l); one of exp(i~ - m), exp(l - m) is exp(0) = 1.
        m_is_i = not (n_prev != 0 and l > it)
        e = exp_(l - it if m_is_i else it - l)
        i = one if m_is_i else e
        f = e if m_is_i else one
        c = f * st[ss + d] + i * tanh_(zt)
        n = f * n_prev + i
        if n < one:       # written so that NaN passes through
            n = 1
        st[ss + d] = c
        st[2 * ss + d] = n
        st[3 * ss + d] = it if m_is_i else l
        st[d] = c / (n * (one + exp_(-ot)))     # sigmoid(o~) * c / n with one division


cdef inline void cell_forward(int cell, Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                              const floating* ar, Py_ssize_t sr,
                              floating* st, Py_ssize_t ss) noexcept nogil:
    if cell == LSTM:
        lstm_forward(D, ax, sx, ar, sr, st, ss)
    elif cell == GRU:
        gru_forward(D, ax, sx, ar, sr, st, ss)
    elif cell == ELMAN:
        elman_forward(D, ax, sx, ar, sr, st, ss)
    else:
        slstm_forward(D, ax, sx, ar, sr, st, ss)


# Backward: `dst` holds the gradient w.r.t. the state after the step (dh includes dy) and is
# overwritten with the gradient w.r.t. the state before it -- for h only the direct pointwise
# part; the caller adds R^T dgr.  dgx / dgr receive the gradients of the input-side and the
# recurrent-side pre-activations (they differ only for the GRU's n gate).

cdef inline void elman_backward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                                const floating* ar, Py_ssize_t sr,
                                const floating* prev, Py_ssize_t sp,
                                floating* dst, Py_ssize_t sds,
                                floating* dgx, Py_ssize_t sgx,
                                floating* dgr, Py_ssize_t sgr) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating h, ga
    for d in range(D):
        h = tanh_(ax[d] + ar[d])
        ga = dst[d] * (one - h * h)
        dgx[d] = ga
        dgr[d] = ga
        dst[d] = 0


cdef inline void lstm_backward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                               const floating* ar, Py_ssize_t sr,
                               const floating* prev, Py_ssize_t sp,
                               floating* dst, Py_ssize_t sds,
                               floating* dgx, Py_ssize_t sgx,
                               floating* dgr, Py_ssize_t sgr) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating i, f, g, o, c_prev, tc, dh, dc, gi, gf, gg, go
    for d in range(D):
        i = sigmoid(ax[d] + ar[d])
        f = sigmoid(ax[sx + d] + ar[sr + d])
        g = tanh_(ax[2 * sx + d] + ar[2 * sr + d])
        o = sigmoid(ax[3 * sx + d] + ar[3 * sr + d])
        c_prev = prev[sp + d]
        tc = tanh_(f * c_prev + i * g)
        dh = dst[d]
        dc = dst[sds + d] + dh * o * (one - tc * tc)
        gi = dc * g * i * (one - i)
        gf = dc * c_prev * f * (one - f)
        gg = dc * i * (one - g * g)
        go = dh * tc * o * (one - o)
        dgx[d] = gi
        dgx[sgx + d] = gf
        dgx[2 * sgx + d] = gg
        dgx[3 * sgx + d] = go
        dgr[d] = gi
        dgr[sgr + d] = gf
        dgr[2 * sgr + d] = gg
        dgr[3 * sgr + d] = go
        dst[sds + d] = dc * f
        dst[d] = 0


cdef inline void gru_backward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                              const floating* ar, Py_ssize_t sr,
                              const floating* prev, Py_ssize_t sp,
                              floating* dst, Py_ssize_t sds,
                              floating* dgx, Py_ssize_t sgx,
                              floating* dgr, Py_ssize_t sgr) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating r, z, n, h_prev, dh, gn, gr, gz
    for d in range(D):
        r = sigmoid(ax[d] + ar[d])
        z = sigmoid(ax[sx + d] + ar[sr + d])
        n = tanh_(ax[2 * sx + d] + r * ar[2 * sr + d])
        h_prev = prev[d]
        dh = dst[d]
        gn = dh * (one - z) * (one - n * n)
        gr = gn * ar[2 * sr + d] * r * (one - r)
        gz = dh * (h_prev - n) * z * (one - z)
        dgx[d] = gr
        dgx[sgx + d] = gz
        dgx[2 * sgx + d] = gn
        dgr[d] = gr
        dgr[sgr + d] = gz
        dgr[2 * sgr + d] = gn * r
        dst[d] = dh * z


cdef inline void slstm_backward(Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                                const floating* ar, Py_ssize_t sr,
                                const floating* prev, Py_ssize_t sp,
                                floating* dst, Py_ssize_t sds,
                                floating* dgx, Py_ssize_t sgx,
                                floating* dgr, Py_ssize_t sgr) noexcept nogil:
    cdef Py_ssize_t d
    cdef floating one = 1
    cdef floating it, ft, zt, ot, c_prev, n_prev, l, e, i, f, tz, o, c, nn, n
    cdef floating dh, dc, dn, dm, go, di, df, gz, dit, dl, gf
    cdef bint m_is_i
    for d in range(D):
        it = ax[d] + ar[d]
        ft = ax[sx + d] + ar[sr + d]
        zt = ax[2 * sx + d] + ar[2 * sr + d]
        ot = ax[3 * sx + d] + ar[3 * sr + d]
        c_prev = prev[sp + d]
        n_prev = prev[2 * sp + d]
        l = log_sigmoid(ft) + prev[3 * sp + d]
        m_is_i = not (n_prev != 0 and l > it)
        e = exp_(l - it if m_is_i else it - l)
        i = one if m_is_i else e
        f = e if m_is_i else one
        tz = tanh_(zt)
        o = sigmoid(ot)
        c = f * c_prev + i * tz
        nn = f * n_prev + i
        n = 1 if nn < one else nn
        dh = dst[d]
        dc = dst[sds + d] + dh * o / n
        dn = dst[2 * sds + d] - dh * o * c / (n * n)
        dm = dst[3 * sds + d]
        if nn < one:
            dn = 0
        go = dh * c / n * o * (one - o)
        di = dc * tz + dn
        df = dc * c_prev + dn * n_prev
        gz = dc * i * (one - tz * tz)
        dit = di * i
        dl = df * f
        dm = dm - dit - dl          # i and f both divide by exp(m)
        if m_is_i:
            dit = dit + dm
        else:
            dl = dl + dm
        gf = dl * (one - sigmoid(ft))  # d log_sigmoid(x)/dx = 1 - sigmoid(x)
        dgx[d] = dit
        dgx[sgx + d] = gf
        dgx[2 * sgx + d] = gz
        dgx[3 * sgx + d] = go
        dgr[d] = dit
        dgr[sgr + d] = gf
        dgr[2 * sgr + d] = gz
        dgr[3 * sgr + d] = go
        dst[sds + d] = dc * f
        dst[2 * sds + d] = dn * f
        dst[3 * sds + d] = dl
        dst[d] = 0


cdef inline void cell_backward(int cell, Py_ssize_t D, const floating* ax, Py_ssize_t sx,
                               const floating* ar, Py_ssize_t sr,
                               const floating* prev, Py_ssize_t sp,
                               floating* dst, Py_ssize_t sds,
                               floating* dgx, Py_ssize_t sgx,
                               floating* dgr, Py_ssize_t sgr) noexcept nogil:
    if cell == LSTM:
        lstm_backward(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
    elif cell == GRU:
        gru_backward(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
    elif cell == ELMAN:
        elman_backward(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
    else:
        slstm_backward(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr)
