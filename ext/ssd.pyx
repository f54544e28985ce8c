# One decoding step (T = 1) of Mamba-2's SSD on the state in its public layout [B, NH, P, N]:
# no transposes, no copies, the state may be updated in place.  The chunked prefill runs on
# linear_attention.pyx's recurrence.
#
#   delta = softplus(dt + dt_bias) (or without softplus / bias),  a = exp(delta * A[h])
#   h[p, :] = a h[p, :] + (delta x[p]) B[g, :];   y[p] = h[p, :] . C[g, :] + D x[p]
#   y[p] *= silu(z[p])                              (g = h // heads per group)
#
# One job per (batch row, head); each state row is read once and written once (the step is
# bound by streaming the state); the row updates are C in _ssd_step.h.
from cython cimport floating
from cython.parallel cimport prange

from _math cimport exp_, sigmoid, softplus

cimport numpy as cnp

cnp.import_array()

cdef extern from "_ssd_step.h":
    void statescan_ssd_rows4f(const float* h_in, float* h_out, Py_ssize_t N, const float* B,
                              const float* C, float a, const float* u, float* out) noexcept nogil
    void statescan_ssd_rows4(const double* h_in, double* h_out, Py_ssize_t N, const double* B,
                             const double* C, double a, const double* u,
                             double* out) noexcept nogil
    float statescan_ssd_row1f(const float* h_in, float* h_out, Py_ssize_t N, const float* B,
                              const float* C, float a, float u) noexcept nogil
    double statescan_ssd_row1(const double* h_in, double* h_out, Py_ssize_t N, const double* B,
                              const double* C, double a, double u) noexcept nogil


cdef inline void rows4(const floating* h_in, floating* h_out, Py_ssize_t N,
                       const floating* Bv, const floating* Cv, floating a, const floating* u,
                       floating* out) noexcept nogil:
    """Four state rows: h_out = a h_in + u[r] Bv, out[r] = h_out[r] . Cv."""
    if floating is float:
        statescan_ssd_rows4f(h_in, h_out, N, Bv, Cv, a, u, out)
    else:
        statescan_ssd_rows4(h_in, h_out, N, Bv, Cv, a, u, out)


cdef inline floating row1(const floating* h_in, floating* h_out, Py_ssize_t N,
                          const floating* Bv, const floating* Cv, floating a,
                          floating u) noexcept nogil:
    if floating is float:
        return statescan_ssd_row1f(h_in, h_out, N, Bv, Cv, a, u)
    else:
        return statescan_ssd_row1(h_in, h_out, N, Bv, Cv, a, u)


cdef void ssd_step_job(Py_ssize_t P, Py_ssize_t N, floating delta, floating A,
                       const floating* x, const floating* Bv, const floating* Cv,
                       const floating* D, Py_ssize_t sD, const floating* z,
                       const floating* h_in, floating* h_out, floating* y) noexcept nogil:
    cdef floating a = exp_(delta * A), out, zp
    cdef floating u[4]
    cdef floating acc[4]
    cdef Py_ssize_t p = 0, r, nr
    while p < P:
        nr = 4 if p + 4 <= P else 1
        if nr == 4:
            for r in range(4):
                u[r] = delta * x[p + r]
            rows4(h_in + p * N, h_out + p * N, N, Bv, Cv, a, u, acc)
        else:
            acc[0] = row1(h_in + p * N, h_out + p * N, N, Bv, Cv, a, delta * x[p])
        for r in range(nr):
            out = acc[r]
            if D != NULL:
                out = out + D[(p + r) * sD] * x[p + r]
            if z != NULL:
                zp = z[p + r]
                out = out * (zp * sigmoid(zp))
            y[p + r] = out
        p += nr


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
