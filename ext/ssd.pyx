# Mamba-2's SSD (state-space duality) on CPU: the chunked prefill and one decoding step.
#
#   delta = softplus(dt + dt_bias) (or without softplus / bias),  a = exp(delta * A[h])
#   h[p, :] = a h[p, :] + (delta x[p]) B[g, :];   y[p] = h[p, :] . C[g, :] + D x[p]
#   y[p] *= silu(z[p])                              (g = h // heads per group)
#
# Prefill (`ssd_forward`): the chunked linear recurrence of _linear_blocks.pxd with q = C,
# k = B, v = delta x and log-decay delta A, read straight from the public layouts (no
# transposed or scaled copies of the inputs in numpy).  The block scores C B^T are the same
# for every head of a group: they are computed once per (row, group) and shared, then one job
# per (row, head) runs its blocks in order.  Each job's arithmetic is fixed by the shapes and
# the chunk, so results are bit-identical for any thread count (and to linear_attention.pyx's
# kernel on the same operands when both run their block products the same way: see
# _use_microkernel_gemm).
#
# Decode (`ssd_step`, T = 1): the state in its public layout [B, NH, P, N], no transposes, no
# copies, may be updated in place.  One job per (batch row, head); each state row is read once
# and written once (the step is bound by streaming the state); the row updates are C in
# _ssd_step.h (blocks of rows with their sums reduced together, then single rows).
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint8_t

from _uk_gemm cimport gemm, uk_gemm_use
from _linear_blocks cimport Block, apply_mask, block_decay, block_end, decayed, state_update
from _math cimport exp_, sigmoid, softplus
from _scratch cimport scratch_alloc, scratch_free
from _arrays cimport c_array, data, dim, float_type, ndim

cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "_ssd_step.h":
    int STATESCAN_SSD_BLOCK
    void statescan_ssd_rowsf(const float* h_in, float* h_out, Py_ssize_t N, const float* B,
                             const float* C, float a, const float* u, float* out) noexcept nogil
    void statescan_ssd_rowsd(const double* h_in, double* h_out, Py_ssize_t N, const double* B,
                             const double* C, double a, const double* u,
                             double* out) noexcept nogil
    float statescan_ssd_rowf(const float* h_in, float* h_out, Py_ssize_t N, const float* B,
                             const float* C, float a, float u) noexcept nogil
    double statescan_ssd_rowd(const double* h_in, double* h_out, Py_ssize_t N, const double* B,
                              const double* C, double a, double u) noexcept nogil


cdef enum:
    ROWS_MAX = 8        # rows of the block form (8 floats or 4 doubles: 32 bytes of outputs)


cdef inline Py_ssize_t block_rows(floating a) noexcept nogil:
    """Rows the block form takes at once (0: not compiled in)."""
    if not STATESCAN_SSD_BLOCK:
        return 0
    return 8 if floating is float else 4


cdef inline void rows_block(const floating* h_in, floating* h_out, Py_ssize_t N,
                            const floating* Bv, const floating* Cv, floating a,
                            const floating* u, floating* out) noexcept nogil:
    """block_rows() state rows: h_out = a h_in + u[r] Bv, out[r] = h_out[r] . Cv."""
    if floating is float:
        statescan_ssd_rowsf(h_in, h_out, N, Bv, Cv, a, u, out)
    else:
        statescan_ssd_rowsd(h_in, h_out, N, Bv, Cv, a, u, out)


cdef inline floating row1(const floating* h_in, floating* h_out, Py_ssize_t N,
                          const floating* Bv, const floating* Cv, floating a,
                          floating u) noexcept nogil:
    if floating is float:
        return statescan_ssd_rowf(h_in, h_out, N, Bv, Cv, a, u)
    else:
        return statescan_ssd_rowd(h_in, h_out, N, Bv, Cv, a, u)


cdef void ssd_step_job(Py_ssize_t P, Py_ssize_t N, floating delta, floating A,
                       const floating* x, const floating* Bv, const floating* Cv,
                       const floating* D, Py_ssize_t sD, const floating* z,
                       const floating* h_in, floating* h_out, floating* y) noexcept nogil:
    cdef floating a = exp_(delta * A), out, zp
    cdef floating u[ROWS_MAX]
    cdef floating acc[ROWS_MAX]
    cdef Py_ssize_t p = 0, r, nr, R = block_rows(a)
    while p < P:
        nr = R if R > 0 and p + R <= P and N % R == 0 else 1
        if nr > 1:
            for r in range(nr):
                u[r] = delta * x[p + r]
            rows_block(h_in + p * N, h_out + p * N, N, Bv, Cv, a, u, acc)
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


def ssd_step(x, dt, A, B, C, D, z, dt_bias, bint dt_softplus, state, y, out_state,
             int num_threads):
    """One SSD step on the state in place of its public layout.

    x [Bt,1,NH,P], dt [Bt,1,NH], A [NH], B, C [Bt,1,G,N] or [Bt,1,N] (G = 1), D None, [NH]
    or [NH,P], z None or [Bt,1,NH,P], dt_bias None or [NH], state [Bt,NH,P,N]; outputs
    y [Bt,1,NH,P] and out_state [Bt,NH,P,N] (may be `state` itself).  Every array
    C-contiguous, one dtype, shapes checked by the caller; dtypes, ranks and layouts are
    checked here (the arrays are read through their pointers: see _arrays.pxd)."""
    cdef int t = float_type(x)
    if not (t >= 0 and c_array(x, t, 4) and c_array(dt, t, 3) and c_array(A, t, 1)
            and (c_array(B, t, 3) or c_array(B, t, 4)) and c_array(C, t, ndim(B))
            and (D is None or c_array(D, t, 1) or c_array(D, t, 2))
            and (z is None or c_array(z, t, 4)) and (dt_bias is None or c_array(dt_bias, t, 1))
            and c_array(state, t, 4) and c_array(y, t, 4, True)
            and c_array(out_state, t, 4, True)):
        raise ValueError("ssd_step: C-contiguous arrays of one float dtype and the documented "
                         "ranks, y and out_state writeable")
    cdef Py_ssize_t Bt = dim(x, 0), NH = dim(x, 2), P = dim(x, 3), N = dim(B, ndim(B) - 1)
    cdef Py_ssize_t G = dim(B, 2) if ndim(B) == 4 else 1
    cdef Py_ssize_t sD = 1 if D is not None and ndim(D) == 2 else 0
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
    if t == cnp.NPY_FLOAT:
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


# ---- chunked prefill ---------------------------------------------------------------------------

cdef void scores_job(Py_ssize_t t0, Py_ssize_t t_stop, Py_ssize_t N, Py_ssize_t C,
                     const floating* Cm, const floating* Bm, Py_ssize_t ld, const uint8_t* rs,
                     floating* out) noexcept nogil:
    """The block scores C_blk B_blk^T of one (row, group) for its blocks in steps [t0, t_stop)
    (t0 a multiple of C, t_stop one too or the row's valid length: no block crosses a multiple
    of C, resets only cut blocks shorter): the block starting at t0 lands at out + t0 * C (rows
    of C entries)."""
    cdef Py_ssize_t t1, c
    while t0 < t_stop:
        t1 = block_end(t0, t_stop, C, rs)
        c = t1 - t0
        gemm(False, True, c, c, N, 1, Cm + t0 * ld, ld, Bm + t0 * ld, ld, 0, out + t0 * C, C)
        t0 = t1


cdef void forward_job(Py_ssize_t T, Py_ssize_t Tb, Py_ssize_t NH, Py_ssize_t P,
                      Py_ssize_t N, Py_ssize_t C, const floating* x, const floating* delta,
                      floating A, const floating* Cm, const floating* Bm, Py_ssize_t ld,
                      const floating* scores, const uint8_t* rs, const floating* h0,
                      floating* y, floating* h_out, floating* S, floating* Ab, floating* g,
                      floating* G, floating* V, floating* W) noexcept nogil:
    """One (row, head): x, y at the head's first entry (rows of NH*P), delta likewise (rows of
    NH), C / B rows of its group (rows of ld), scores as scores_job's (NULL: computed here),
    h0 / h_out [P, N] (h0 NULL: zeros; h_out may be h0).  Tb <= T valid steps, later rows of
    y are padding (zeros).  The carried state S is [N, P] (the recurrence's k v^T layout)."""
    cdef Py_ssize_t ldy = NH * P, t0 = 0, t1, c, s, i, n, p, ldx
    cdef Block blk
    cdef floating d
    cdef const floating* X
    if h0 != NULL:
        for p in range(P):
            for n in range(N):
                S[n * P + p] = h0[p * N + n]
    else:
        for i in range(N * P):
            S[i] = 0
    for s in range(Tb):                  # log-decays, rounded before block_decay sums them
        g[s] = delta[s * NH] * A
    while t0 < Tb:
        t1 = block_end(t0, Tb, C, rs)
        c = t1 - t0
        blk = block_decay(g, 1, rs, t0, c, G)
        for s in range(c):               # v = delta x
            d = delta[(t0 + s) * NH]
            for p in range(P):
                V[s * P + p] = d * x[(t0 + s) * ldy + p]
        # intra-block: ((C B^T) * M) V
        if scores != NULL:
            for s in range(c):
                for i in range(c):
                    Ab[s * C + i] = scores[(t0 + s) * C + i]
            apply_mask(Ab, C, c, G)
        else:
            gemm(False, True, c, c, N, 1, Cm + t0 * ld, ld, Bm + t0 * ld, ld, 0, Ab, C)
            apply_mask(Ab, C, c, G)
        gemm(False, False, c, P, c, 1, Ab, C, V, P, 0, y + t0 * ldy, ldy)
        # inter-block: diag(exp(G)) C S_prev (unless the block starts with a reset)
        if blk.m > 0:
            ldx = ld
            X = decayed(Cm + t0 * ld, &ldx, c, c, N, G, False, W)
            gemm(False, False, c, P, N, 1, X, ldx, S, P, 1, y + t0 * ldy, ldy)
        state_update(Bm + t0 * ld, ld, V, P, blk, N, P, G, True, S, W)
        t0 = t1
    for s in range(Tb, T):
        for p in range(P):
            y[s * ldy + p] = 0
    for p in range(P):
        for n in range(N):
            h_out[p * N + n] = S[n * P + p]


cdef Py_ssize_t forward_impl(Py_ssize_t Bt, Py_ssize_t T, Py_ssize_t NH, Py_ssize_t P,
                             Py_ssize_t N, Py_ssize_t G, Py_ssize_t C, const floating* x,
                             const floating* delta, const floating* A, const floating* Bm,
                             const floating* Cm, const floating* h0, const int64_t* lengths,
                             const uint8_t* reset, floating* y, floating* h_out,
                             int num_threads) noexcept nogil:
    """Every (row, head) job; returns the number of jobs that found no scratch memory."""
    cdef Py_ssize_t job, b, h, grp, Tb, hpg = NH // G, ld = G * N, failed = 0, i
    cdef Py_ssize_t nchunks = (T + C - 1) // C
    cdef Py_ssize_t per_job = N * P + C * C + T + C + C * P + C * max(N, P)
    cdef floating* buf
    cdef floating* scores = NULL
    # share the block scores when a group has several heads and the buffer (T x chunk per
    # row and group) is no larger than x
    if hpg >= 2 and G * C <= NH * P:
        scores = <floating*> scratch_alloc(Bt * G * T * C * sizeof(floating))
        if scores == NULL:
            return 1
    with parallel(num_threads=num_threads):
        buf = <floating*> scratch_alloc(per_job * sizeof(floating))
        if scores != NULL:      # jobs of C steps: one group (ngroups = 1) uses every thread
            for job in prange(Bt * G * nchunks, schedule="dynamic"):
                b = job // (G * nchunks)
                grp = job // nchunks % G
                i = job % nchunks
                Tb = lengths[b] if lengths != NULL else T
                if i * C < Tb:
                    scores_job(i * C, min(Tb, (i + 1) * C), N, C, Cm + b * T * ld + grp * N,
                               Bm + b * T * ld + grp * N, ld,
                               (reset + b * T) if reset != NULL else NULL,
                               scores + (b * G + grp) * T * C)
        for job in prange(Bt * NH, schedule="dynamic"):
            if buf == NULL:
                failed += 1
                continue
            b = job // NH
            h = job % NH
            grp = h // hpg
            Tb = lengths[b] if lengths != NULL else T
            forward_job(T, Tb, NH, P, N, C, x + b * T * NH * P + h * P, delta + b * T * NH + h,
                        A[h], Cm + b * T * ld + grp * N, Bm + b * T * ld + grp * N, ld,
                        (scores + (b * G + grp) * T * C) if scores != NULL else NULL,
                        (reset + b * T) if reset != NULL else NULL,
                        (h0 + job * P * N) if h0 != NULL else NULL,
                        y + b * T * NH * P + h * P, h_out + job * P * N,
                        buf, buf + N * P, buf + N * P + C * C, buf + N * P + C * C + T,
                        buf + N * P + C * C + T + C, buf + N * P + C * C + T + C + C * P)
        scratch_free(buf)
    scratch_free(scores)
    return failed


# delta and the D skip are elementwise passes over every step: split over the steps when they
# are large (the same arithmetic per element whatever the split), or on 2 threads they cost as
# much as a tenth of a prefill that the heads split evenly

cdef enum:
    SPLIT_MIN = 1 << 16     # elements below which a pass stays on the calling thread


cdef void delta_rows(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t NH, const floating* dt,
                     const floating* bias, bint sp, floating* delta) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating d
    for i in range(i0 * NH, i1 * NH):
        d = dt[i] + bias[i % NH] if bias != NULL else dt[i]
        delta[i] = softplus(d) if sp else d


cdef void delta_impl(Py_ssize_t n, Py_ssize_t NH, const floating* dt, const floating* bias,
                     bint sp, floating* delta, int num_threads) noexcept nogil:
    """delta = dt (+ dt_bias[h]) over n steps of [NH], through softplus when `sp`: the decode
    step's arithmetic."""
    cdef Py_ssize_t part
    if num_threads == 1 or n * NH < SPLIT_MIN:
        delta_rows(0, n, NH, dt, bias, sp, delta)
        return
    for part in prange(num_threads, schedule="static", num_threads=num_threads):
        delta_rows(part * n // num_threads, (part + 1) * n // num_threads, NH, dt, bias, sp,
                   delta)


cdef void skip_rows(Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t NH, Py_ssize_t P,
                    const floating* D, Py_ssize_t sD, const floating* x,
                    floating* y) noexcept nogil:
    cdef Py_ssize_t i, h, p, o
    for i in range(i0, i1):
        for h in range(NH):
            o = (i * NH + h) * P
            for p in range(P):
                y[o + p] = y[o + p] + D[h * (P if sD else 1) + p * sD] * x[o + p]


cdef void skip_impl(Py_ssize_t n, Py_ssize_t NH, Py_ssize_t P, const floating* D,
                    Py_ssize_t sD, const floating* x, floating* y,
                    int num_threads) noexcept nogil:
    """y += D x over n steps of [NH, P] (D [NH] when sD = 0, [NH, P] when sD = 1): the decode
    step's arithmetic; padded steps too (the caller zeroes them)."""
    cdef Py_ssize_t part
    if num_threads == 1 or n * NH * P < SPLIT_MIN:
        skip_rows(0, n, NH, P, D, sD, x, y)
        return
    for part in prange(num_threads, schedule="static", num_threads=num_threads):
        skip_rows(part * n // num_threads, (part + 1) * n // num_threads, NH, P, D, sD, x, y)


def ssd_forward(x, dt, dt_bias, bint dt_softplus, A, B, C, D, state, Py_ssize_t chunk,
                lengths, reset, y, h_out, int num_threads):
    """y, h_out = the chunked SSD without z (blocks of `chunk` steps).

    x [Bt,T,NH,P], dt [Bt,T,NH] (delta = dt + dt_bias [NH] or None, through softplus when
    `dt_softplus`: as the decode step), A [NH], B, C [Bt,T,N] or [Bt,T,G,N], D None, [NH] or
    [NH,P] (y += D x, padded steps included), state [Bt,NH,P,N] or None (zeros), lengths int64
    [Bt] or None, reset bool [Bt,T] or None; outputs y [Bt,T,NH,P] and h_out [Bt,NH,P,N] (may
    be `state`).  Every array C-contiguous, one dtype, every size >= 1 (the caller checks the
    sizes; dtypes, ranks and layouts are checked here: the arrays are read through their
    pointers, see _arrays.pxd)."""
    cdef int t = float_type(x)
    if not (t >= 0 and c_array(x, t, 4) and c_array(dt, t, 3) and c_array(A, t, 1)
            and (c_array(B, t, 3) or c_array(B, t, 4)) and c_array(C, t, ndim(B))
            and (D is None or c_array(D, t, 1) or c_array(D, t, 2))
            and (dt_bias is None or c_array(dt_bias, t, 1))
            and (state is None or c_array(state, t, 4))
            and (lengths is None or c_array(lengths, cnp.NPY_INT64, 1))
            and (reset is None or c_array(reset, cnp.NPY_BOOL, 2)
                 or c_array(reset, cnp.NPY_UINT8, 2))
            and c_array(y, t, 4, True) and c_array(h_out, t, 4, True)):
        raise ValueError("ssd_forward: C-contiguous arrays of one float dtype and the "
                         "documented ranks, lengths int64, reset bool, y and h_out writeable")
    cdef Py_ssize_t Bt = dim(x, 0), T = dim(x, 1), NH = dim(x, 2), P = dim(x, 3)
    cdef Py_ssize_t N = dim(B, ndim(B) - 1), G = dim(B, 2) if ndim(B) == 4 else 1
    cdef Py_ssize_t Ch = min(chunk, T), failed
    cdef Py_ssize_t sD = 1 if D is not None and ndim(D) == 2 else 0
    delta = dt if dt_bias is None and not dt_softplus else np.empty_like(dt)
    cdef char* px = data(x)
    cdef char* pdt = data(dt)
    cdef char* pbias = data(dt_bias)
    cdef char* pd = data(delta)
    cdef char* pA = data(A)
    cdef char* pB = data(B)
    cdef char* pC = data(C)
    cdef char* pD = data(D)
    cdef char* ph = data(state)
    cdef const int64_t* pl = <const int64_t*> data(lengths)
    cdef const uint8_t* pr = <const uint8_t*> data(reset)      # numpy bools are bytes
    cdef char* py = data(y)
    cdef char* pho = data(h_out)
    if t == cnp.NPY_FLOAT:
        with nogil:
            if pd != pdt:
                delta_impl[float](Bt * T, NH, <float*> pdt, <float*> pbias, dt_softplus,
                                  <float*> pd, num_threads)
            failed = forward_impl[float](Bt, T, NH, P, N, G, Ch, <float*> px, <float*> pd,
                                         <float*> pA, <float*> pB, <float*> pC, <float*> ph,
                                         pl, pr, <float*> py, <float*> pho, num_threads)
            if pD != NULL and not failed:
                skip_impl[float](Bt * T, NH, P, <float*> pD, sD, <float*> px, <float*> py,
                                 num_threads)
    else:
        with nogil:
            if pd != pdt:
                delta_impl[double](Bt * T, NH, <double*> pdt, <double*> pbias,
                                   dt_softplus, <double*> pd, num_threads)
            failed = forward_impl[double](Bt, T, NH, P, N, G, Ch, <double*> px, <double*> pd,
                                          <double*> pA, <double*> pB, <double*> pC,
                                          <double*> ph, pl, pr, <double*> py, <double*> pho,
                                          num_threads)
            if pD != NULL and not failed:
                skip_impl[double](Bt * T, NH, P, <double*> pD, sD, <double*> px,
                                  <double*> py, num_threads)
    if failed:
        raise MemoryError(f"ssd: no memory for the {Ch} x {Ch} blocks (chunk)")


def _use_microkernel_gemm(bint on):
    """Run this module's block products on statescan's micro-kernel (where it is built for
    AVX-512) when `on`, else through scipy's BLAS; returns whether the micro-kernel is used.
    statescan._dispatch chooses when the module loads (ext/_uk_gemm.pxd says why)."""
    return uk_gemm_use(on)
