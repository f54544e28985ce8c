# One decoding step (T = 1) of Mamba-2's SSD on the state in its public layout [B, NH, P, N]:
# no transposes, no copies, the state may be updated in place.  The chunked prefill runs on
# linear_attention.pyx's recurrence.
#
#   delta = softplus(dt + dt_bias) (or without softplus / bias),  a = exp(delta * A[h])
#   h[p, :] = a h[p, :] + (delta x[p]) B[g, :];   y[p] = h[p, :] . C[g, :] + D x[p]
#   y[p] *= silu(z[p])                              (g = h // heads per group)
#
# One job per (batch row, head); each state row is read once and written once (the step is
# bound by streaming the state).
from cython cimport floating
from cython.parallel cimport prange

from _math cimport exp_, sigmoid, softplus

cimport numpy as cnp

cnp.import_array()

cdef enum:
    PARTS = 16     # partial sums per row: a fixed association that vectorises


cdef inline floating row_step(const floating* h_in, floating* h_out, const floating* Bv,
                              const floating* Cv, floating a, floating u,
                              Py_ssize_t N) noexcept nogil:
    """h_out = a h_in + u Bv, returns h_out . Cv (h_out may be h_in)."""
    cdef floating part[PARTS]
    cdef floating hv[PARTS]
    cdef floating acc = 0, s
    cdef Py_ssize_t n = 0, j
    for j in range(PARTS):
        part[j] = 0
    while n + PARTS <= N:
        # every load of the block before any store: vectorises even when h_out is h_in
        for j in range(PARTS):
            hv[j] = a * h_in[n + j] + u * Bv[n + j]
        for j in range(PARTS):
            h_out[n + j] = hv[j]
            part[j] = part[j] + hv[j] * Cv[n + j]
        n += PARTS
    while n < N:
        s = a * h_in[n] + u * Bv[n]
        h_out[n] = s
        acc = acc + s * Cv[n]
        n += 1
    for j in range(PARTS):
        acc = acc + part[j]
    return acc


cdef void ssd_step_job(Py_ssize_t P, Py_ssize_t N, floating delta, floating A,
                       const floating* x, const floating* Bv, const floating* Cv,
                       const floating* D, Py_ssize_t sD, const floating* z,
                       const floating* h_in, floating* h_out, floating* y) noexcept nogil:
    cdef floating a = exp_(delta * A), out, zp
    cdef Py_ssize_t p
    for p in range(P):
        out = row_step(h_in + p * N, h_out + p * N, Bv, Cv, a, delta * x[p], N)
        if D != NULL:
            out = out + D[p * sD] * x[p]
        if z != NULL:
            zp = z[p]
            out = out * (zp * sigmoid(zp))
        y[p] = out


cdef void ssd_step_impl(Py_ssize_t Bt, Py_ssize_t NH, Py_ssize_t P, Py_ssize_t N,
                        Py_ssize_t G, const floating* x, const floating* dt,
                        const floating* A, const floating* Bm, const floating* Cm,
                        const floating* D, Py_ssize_t sD, const floating* z,
                        const floating* bias, bint sp, const floating* h_in, floating* y,
                        floating* h_out, int num_threads) noexcept nogil:
    cdef Py_ssize_t job, b, h, grp, hpg = NH // G
    cdef floating delta
    if num_threads <= 1 or Bt * NH * P * N < 262144:     # a parallel region costs more
        num_threads = 1
    for job in prange(Bt * NH, schedule="static", num_threads=num_threads):
        b = job // NH
        h = job % NH
        grp = b * G + h // hpg
        delta = dt[job] + bias[h] if bias != NULL else dt[job]
        if sp:
            delta = softplus(delta)
        ssd_step_job(P, N, delta, A[h], x + job * P, Bm + grp * N, Cm + grp * N,
                     (D + h * (P if sD else 1)) if D != NULL else NULL, sD,
                     (z + job * P) if z != NULL else NULL,
                     h_in + job * P * N, h_out + job * P * N, y + job * P)


cdef inline char* data(object a) noexcept:
    """The data pointer of a (C-contiguous) ndarray, NULL for None."""
    return <char*> cnp.PyArray_DATA(<cnp.ndarray> a) if a is not None else NULL


def ssd_step(x, dt, A, B, C, D, z, dt_bias, bint dt_softplus, state, y, out_state,
             int num_threads):
    """One SSD step on the state in place of its public layout.

    x [Bt,1,NH,P], dt [Bt,1,NH], A [NH], B, C [Bt,1,G,N] or [Bt,1,N] (G = 1), D None, [NH]
    or [NH,P], z None or [Bt,1,NH,P], dt_bias None or [NH], state [Bt,NH,P,N]; outputs
    y [Bt,1,NH,P] and out_state [Bt,NH,P,N] (may be `state` itself).  Every array
    C-contiguous, one dtype, shapes checked by the caller."""
    cdef Py_ssize_t Bt = x.shape[0], NH = x.shape[2], P = x.shape[3], N = B.shape[B.ndim - 1]
    cdef Py_ssize_t G = B.shape[2] if B.ndim == 4 else 1
    cdef Py_ssize_t sD = 1 if D is not None and D.ndim == 2 else 0
    cdef char* px = data(x)
    cdef char* pdt = data(dt)
    cdef char* pA = data(A)
    cdef char* pB = data(B)
    cdef char* pC = data(C)
    cdef char* pD = data(D)
    cdef char* pz = data(z)
    cdef char* pbias = data(dt_bias)
    cdef char* ph = data(state)
    cdef char* py = data(y)
    cdef char* pho = data(out_state)
    if x.dtype.itemsize == 4:
        with nogil:
            ssd_step_impl[float](Bt, NH, P, N, G, <float*> px, <float*> pdt, <float*> pA,
                                 <float*> pB, <float*> pC, <float*> pD, sD, <float*> pz,
                                 <float*> pbias, dt_softplus, <float*> ph, <float*> py,
                                 <float*> pho, num_threads)
    else:
        with nogil:
            ssd_step_impl[double](Bt, NH, P, N, G, <double*> px, <double*> pdt, <double*> pA,
                                  <double*> pB, <double*> pC, <double*> pD, sD, <double*> pz,
                                  <double*> pbias, dt_softplus, <double*> ph, <double*> py,
                                  <double*> pho, num_threads)
