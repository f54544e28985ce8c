# Memory-efficient softmax attention: walk the keys in chunks with a running max and
# denominator (never a Tq x Tk matrix).  One job per (batch, head); the block matmuls go to
# BLAS (single-threaded at these sizes), the softmax bookkeeping is vectorised loops.  A job's
# arithmetic never depends on the number of jobs or threads, so results are bit-identical for
# any thread count.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.math cimport log, logf, INFINITY

from _gemm cimport gemm
from _math cimport exp_, row_max
from _scratch cimport scratch_alloc, scratch_free

import numpy as np

cdef enum:
    BLOCK_Q = 128       # query rows per block


cdef void scale(floating* X, Py_ssize_t n, floating w) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        X[i] = w * X[i]


# ---- softmax attention: walk key chunks with a running max / denominator -------------------

cdef inline Py_ssize_t n_visible(Py_ssize_t i, Py_ssize_t j0, Py_ssize_t bk, Py_ssize_t off,
                                 bint causal) noexcept nogil:
    """How many keys j0..j0+bk-1 query i sees (causal: j <= i + off)."""
    if not causal:
        return bk
    return max(0, min(bk, i + off - j0 + 1))


cdef inline floating row_sum(const floating* x, Py_ssize_t n) noexcept nogil:
    # 16 partial sums: a fixed association (so the loop vectorises without -ffast-math)
    cdef floating part[16]
    cdef Py_ssize_t t, u
    cdef floating acc = 0
    for u in range(16):
        part[u] = 0
    t = 0
    while t + 16 <= n:
        for u in range(16):
            part[u] = part[u] + x[t + u]
        t += 16
    while t < n:
        acc = acc + x[t]
        t += 1
    for u in range(16):
        acc = acc + part[u]
    return acc


cdef extern from *:
    """
    #include <stddef.h>
    /* 0 for finite entries, NaN once one is inf or NaN: the sum is 0 or NaN in any order, so
       `omp simd` may split it into vector lanes (the serial sum's add latency cost as much as
       a tenth of the forward, in every block that needs the check). */
    static inline int statescan_all_finitef(const float* x, ptrdiff_t n) {
        float acc = 0;
        #pragma omp simd reduction(+:acc)
        for (ptrdiff_t i = 0; i < n; i++) acc += x[i] * 0.0f;
        return acc == 0;
    }
    static inline int statescan_all_finite(const double* x, ptrdiff_t n) {
        double acc = 0;
        #pragma omp simd reduction(+:acc)
        for (ptrdiff_t i = 0; i < n; i++) acc += x[i] * 0.0;
        return acc == 0;
    }
    """
    bint statescan_all_finitef(const float* x, Py_ssize_t n) noexcept nogil
    bint statescan_all_finite(const double* x, Py_ssize_t n) noexcept nogil


cdef inline bint all_finite(const floating* x, Py_ssize_t n) noexcept nogil:
    """No inf or NaN among x[0..n-1]."""
    if floating is float:
        return statescan_all_finitef(x, n)
    else:
        return statescan_all_finite(x, n)


cdef void add_values(const floating* P, Py_ssize_t ldp, Py_ssize_t nq, Py_ssize_t bk,
                     const floating* V, Py_ssize_t dv, floating* O, Py_ssize_t i0,
                     Py_ssize_t j0, Py_ssize_t off, bint causal) noexcept nogil:
    """O += P V for a block of nq queries and bk keys (also dQ += dS K).  P is 0 where a query
    does not see a key, but 0 times a non-finite value is NaN: when V holds one, the rows that
    see only part of the chunk multiply only their visible keys (causality holds for any
    input)."""
    cdef Py_ssize_t i, nv, full = 0
    if causal:
        full = max(0, min(nq, j0 + bk - 1 - off - i0))    # rows before `full` see < bk keys
    if full == 0 or all_finite(V, bk * dv):
        gemm(False, False, nq, dv, bk, 1, P, ldp, V, dv, 1, O, dv)
        return
    for i in range(full):
        nv = n_visible(i0 + i, j0, bk, off, causal)
        gemm(False, False, 1, dv, nv, 1, P + i * ldp, ldp, V, dv, 1, O + i * dv, dv)
    gemm(False, False, nq - full, dv, bk, 1, P + full * ldp, ldp, V, dv, 1, O + full * dv, dv)


cdef void add_keys(const floating* A, Py_ssize_t lda, Py_ssize_t nq, Py_ssize_t bk,
                   const floating* X, Py_ssize_t n, floating* Y, Py_ssize_t i0, Py_ssize_t j0,
                   Py_ssize_t off, bint causal) noexcept nogil:
    """Y += A^T X for a block of nq queries and bk keys (A [nq, bk], X [nq, n], Y [bk, n]).
    A is 0 where a query does not see a key, but 0 times a non-finite entry of X is NaN: when
    X holds one, the keys seen by only part of the block add only the queries that see them
    (a key's gradient never depends on earlier queries)."""
    cdef Py_ssize_t t, first, part = bk
    if causal:
        part = max(0, min(bk, i0 + off - j0 + 1))     # keys before `part` see the whole block
    if part == bk or all_finite(X, nq * n):
        gemm(True, False, bk, n, nq, 1, A, lda, X, n, 1, Y, n)
        return
    if part > 0:
        gemm(True, False, part, n, nq, 1, A, lda, X, n, 1, Y, n)
    for t in range(part, bk):
        first = j0 + t - off - i0                     # the block's first query seeing key t
        if first < nq:
            gemm(True, False, 1, n, nq - first, 1, A + first * lda + t, lda, X + first * n, n,
                 1, Y + t * n, n)


cdef void flash_forward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                            Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                            const floating* q, const floating* k, const floating* v,
                            floating* o, floating* lse, floating* S, floating* m,
                            floating* l) noexcept nogil:
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, t, nv, jend, iblk, jblk
    cdef floating* row
    cdef floating mx, alpha, acc, base
    for iblk in range((Tq + BQ - 1) // BQ):
        i0 = iblk * BQ
        nq = min(BQ, Tq - i0)
        for i in range(nq):
            m[i] = -INFINITY
            l[i] = 0
        for i in range(nq * dv):
            o[i0 * dv + i] = 0
        jend = Tk if not causal else max(0, min(Tk, i0 + nq - 1 + off + 1))
        for jblk in range((jend + BK - 1) // BK):
            j0 = jblk * BK
            bk = min(BK, jend - j0)
            gemm(False, True, nq, bk, d, sc, q + i0 * d, d,
                 k + j0 * d, d, 0, S, BK)
            for i in range(nq):
                row = S + i * BK
                nv = n_visible(i0 + i, j0, bk, off, causal)
                mx = row_max(row, nv, m[i])
                # rows that have seen no key keep m = -inf: rescale nothing, add nothing
                base = mx if mx > -INFINITY else 0
                alpha = exp_(m[i] - base)
                for t in range(nv):
                    row[t] = exp_(row[t] - base)
                acc = row_sum(row, nv)
                for t in range(nv, bk):
                    row[t] = 0
                l[i] = alpha * l[i] + acc
                m[i] = mx
                if alpha != 1:
                    scale(o + (i0 + i) * dv, dv, alpha)
            add_values(S, BK, nq, bk, v + j0 * dv, dv, o + i0 * dv, i0, j0, off, causal)
        for i in range(nq):
            if l[i] > 0:
                scale(o + (i0 + i) * dv, dv, 1 / l[i])
                if floating is float:
                    lse[i0 + i] = m[i] + logf(l[i])
                else:
                    lse[i0 + i] = m[i] + log(l[i])
            elif l[i] == 0:
                lse[i0 + i] = -INFINITY
            else:               # NaN
                lse[i0 + i] = l[i]
                scale(o + (i0 + i) * dv, dv, l[i])


def flash_forward(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                  const floating[:, :, :, ::1] v, bint causal, double scale_, Py_ssize_t chunk,
                  floating[:, :, :, ::1] o, floating[:, :, ::1] lse, int num_threads):
    """o = softmax(q k^T * scale) v (causal: key j visible to query i when j <= i + Tk - Tq)
    and lse [B,NH,Tq], the log-sum-exp of each query's scores.  q [B,NH,Tq,d],
    k [B,NH,Tk,d], v [B,NH,Tk,dv], o [B,NH,Tq,dv], contiguous.  Requires every size >= 1
    (d may be 0: every visible key scores 0)."""
    cdef Py_ssize_t B = q.shape[0], NH = q.shape[1], Tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t Tk = k.shape[2], dv = v.shape[3]
    cdef Py_ssize_t BQ = min(BLOCK_Q, Tq), BK = min(chunk, Tk), job, b, h
    cdef floating sc = <floating> scale_
    cdef floating* S
    cdef floating* m
    cdef floating* l
    cdef Py_ssize_t failed = 0
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> scratch_alloc((BQ * BK + 2 * BQ) * sizeof(floating))
        m = S + BQ * BK
        l = m + BQ
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed += 1
                continue
            flash_forward_job(Tq, Tk, d, dv, BQ, BK, causal, sc, &q[b, h, 0, 0], &k[b, h, 0, 0],
                              &v[b, h, 0, 0], &o[b, h, 0, 0], &lse[b, h, 0], S, m, l)
        scratch_free(S)
    if failed:
        raise MemoryError(f"attention: no memory for a {BQ} x {BK} block (chunk)")


cdef void flash_backward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                             Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                             const floating* q, const floating* k, const floating* v,
                             const floating* lse, const floating* D, const floating* do,
                             floating* dq, floating* dk, floating* dv_, floating* S,
                             floating* dP) noexcept nogil:
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, t, nv, i_first, iblk, jblk
    cdef floating* row
    cdef floating* drow
    cdef floating L, Di
    for i in range(Tq * d):
        dq[i] = 0
    for jblk in range((Tk + BK - 1) // BK):
        j0 = jblk * BK
        bk = min(BK, Tk - j0)
        for i in range(bk * d):
            dk[j0 * d + i] = 0
        for i in range(bk * dv):
            dv_[j0 * dv + i] = 0
        # causal: the first query that sees key j0 is i = j0 - off
        i_first = max(0, j0 - off) if causal else 0
        for iblk in range(i_first // BQ, (Tq + BQ - 1) // BQ):
            i0 = iblk * BQ
            nq = min(BQ, Tq - i0)
            gemm(False, True, nq, bk, d, sc, q + i0 * d, d,
                 k + j0 * d, d, 0, S, BK)
            gemm(False, True, nq, bk, dv, 1, do + i0 * dv, dv,
                 v + j0 * dv, dv, 0, dP, BK)
            for i in range(nq):
                row = S + i * BK
                drow = dP + i * BK
                nv = n_visible(i0 + i, j0, bk, off, causal)
                L = lse[i0 + i]
                if L == -INFINITY:      # every visible score is -inf: P = 0, not exp(-inf + inf)
                    L = INFINITY
                Di = D[i0 + i]
                for t in range(nv):
                    row[t] = exp_(row[t] - L)
                    drow[t] = row[t] * (drow[t] - Di) * sc
                for t in range(nv, bk):
                    row[t] = 0
                    drow[t] = 0
            # P^T dO -> dV, dS K -> dQ, dS^T Q -> dK, skipping masked pairs of non-finite rows
            add_keys(S, BK, nq, bk, do + i0 * dv, dv, dv_ + j0 * dv, i0, j0, off, causal)
            add_values(dP, BK, nq, bk, k + j0 * d, d, dq + i0 * d, i0, j0, off, causal)
            add_keys(dP, BK, nq, bk, q + i0 * d, d, dk + j0 * d, i0, j0, off, causal)


def flash_backward(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                   const floating[:, :, :, ::1] v, o, const floating[:, :, ::1] lse,
                   const floating[:, :, :, ::1] do, bint causal, double scale_,
                   Py_ssize_t chunk, floating[:, :, :, ::1] dq, floating[:, :, :, ::1] dk,
                   floating[:, :, :, ::1] dv, int num_threads):
    """Gradients of `flash_forward`, recomputing each block's probabilities from lse:
    P = exp(S - lse), dS = P (dO V^T - D), D = rowsum(dO * O).  Requires every size >= 1
    (d may be 0); rows with lse = -inf have P = 0."""
    cdef const floating[:, :, ::1] D = np.einsum("bhtd,bhtd->bht", do, o)
    cdef Py_ssize_t B = q.shape[0], NH = q.shape[1], Tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t Tk = k.shape[2], dv_ = v.shape[3]
    cdef Py_ssize_t BQ = min(BLOCK_Q, Tq), BK = min(chunk, Tk), job, b, h
    cdef floating sc = <floating> scale_
    cdef floating* S
    cdef floating* dP
    cdef Py_ssize_t failed = 0
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> scratch_alloc(2 * BQ * BK * sizeof(floating))
        dP = S + BQ * BK
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed += 1
                continue
            flash_backward_job(Tq, Tk, d, dv_, BQ, BK, causal, sc, &q[b, h, 0, 0],
                               &k[b, h, 0, 0], &v[b, h, 0, 0], &lse[b, h, 0], &D[b, h, 0],
                               &do[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                               &dv[b, h, 0, 0], S, dP)
        scratch_free(S)
    if failed:
        raise MemoryError(f"attention: no memory for two {BQ} x {BK} blocks (chunk)")
