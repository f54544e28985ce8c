# Memory-efficient softmax attention: walk the keys in chunks with a running max and
# denominator (never a Tq x Tk matrix).  One job per (batch, head); the block matmuls run on
# statescan's micro-kernel where it is compiled for AVX-512 (uk_forward_job / uk_backward_job,
# see SS_ATTENTION_MICROKERNEL), elsewhere through BLAS (single-threaded tiles:
# flash_forward_job / flash_backward_job); the softmax bookkeeping is vectorised loops.  A
# job's arithmetic never depends on the number of jobs or threads, so results are
# bit-identical for any thread count.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.math cimport log, logf, INFINITY

from _gemm cimport gemm
from _math cimport exp_, row_max
from _scratch cimport scratch_alloc, scratch_free
from _microkernel cimport NT, matmul_acc, matmul_store, pack_panels, transpose

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


cdef extern from *:
    """
    /* The block products on statescan's micro-kernel (_microkernel.pxd) where it is compiled
       for AVX-512: there it runs at about twice the speed of OpenBLAS's kernels on the
       attention's blocks (AVX2 kernels on the AMD EPYC Zen 5 it was measured on, and small
       tiles).  Elsewhere (the portable SSE2 build: 1.7x slower than BLAS) through BLAS. */
    #if defined(__AVX512F__)
    #define SS_ATTENTION_MICROKERNEL 1
    #else
    #define SS_ATTENTION_MICROKERNEL 0
    #endif
    """
    bint SS_ATTENTION_MICROKERNEL


cdef inline void softmax_step(floating* row, Py_ssize_t nv, Py_ssize_t bk, floating* m,
                              floating* l, floating* out, Py_ssize_t n) noexcept nogil:
    """One query's online-softmax step over a key chunk: its scaled scores row[:nv] become
    exp(score - new max) and row[nv:bk] 0; its running max *m and denominator *l are updated
    and its running numerator out[:n] rescaled."""
    cdef Py_ssize_t t
    cdef floating mx = row_max(row, nv, m[0]), base, alpha, acc
    # rows that have seen no key keep m = -inf: rescale nothing, add nothing
    base = mx if mx > -INFINITY else 0
    alpha = exp_(m[0] - base)
    for t in range(nv):
        row[t] = exp_(row[t] - base)
    acc = row_sum(row, nv)
    for t in range(nv, bk):
        row[t] = 0
    l[0] = alpha * l[0] + acc
    m[0] = mx
    if alpha != 1:
        scale(out, n, alpha)


cdef inline floating normalise(floating* out, Py_ssize_t n, floating m, floating l) noexcept nogil:
    """A query's output out[:n] divided by its denominator l; returns its log-sum-exp."""
    if l > 0:
        scale(out, n, 1 / l)
        if floating is float:
            return m + logf(l)
        else:
            return m + log(l)
    if l == 0:
        return -INFINITY
    scale(out, n, l)        # NaN
    return l


cdef inline void probability_grads(floating* row, floating* drow, Py_ssize_t nv,
                                   Py_ssize_t bk, floating L, floating Di, floating s_scale,
                                   floating sc) noexcept nogil:
    """A query's probabilities and score gradients over a key chunk: from its scores row[:nv]
    (times s_scale) and dP drow[:nv], row = P = exp(score - L) and drow = P (dP - Di) sc, both
    0 from nv to bk.  L is the query's log-sum-exp, Di its sum of dO * O."""
    cdef Py_ssize_t t
    if L == -INFINITY:      # every visible score is -inf: P = 0, not exp(-inf + inf)
        L = INFINITY
    for t in range(nv):
        row[t] = exp_(s_scale * row[t] - L)
        drow[t] = row[t] * (drow[t] - Di) * sc
    for t in range(nv, bk):
        row[t] = 0
        drow[t] = 0


cdef inline Py_ssize_t padded(Py_ssize_t n) noexcept nogil:
    """n rounded up to whole panels of NT columns."""
    return (n + NT - 1) // NT * NT


cdef void uk_forward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                            Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                            const floating* q, const floating* k, const floating* v,
                            floating* o, floating* lse, floating* S, floating* m,
                            floating* l, floating* Kp, floating* Vp,
                            floating* O) noexcept nogil:
    """One (batch, head).  The block products run on the micro-kernel of the cells' projections
    (_microkernel.pxd, this machine's SIMD): a key chunk's K^T and V are packed into panels of NT
    columns (S [BQ, padded(BK)], the running numerators O [BQ, padded(dv)], both scratch)."""
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, t, c, nv, jend, iblk, jblk, tile, full
    cdef Py_ssize_t ldS = padded(BK), ldO = padded(dv), vt = padded(dv) // NT
    cdef floating* row
    cdef bint finite
    for iblk in range((Tq + BQ - 1) // BQ):
        i0 = iblk * BQ
        nq = min(BQ, Tq - i0)
        for i in range(nq):
            m[i] = -INFINITY
            l[i] = 0
        for i in range(nq * ldO):
            O[i] = 0
        jend = Tk if not causal else max(0, min(Tk, i0 + nq - 1 + off + 1))
        for jblk in range((jend + BK - 1) // BK):
            j0 = jblk * BK
            bk = min(BK, jend - j0)
            # S = q_blk K_chunk^T (unscaled), then scale
            if d > 0:
                pack_panels(k + j0 * d, 1, d, d, bk, Kp)
                matmul_store(q + i0 * d, d, Kp, d, padded(bk) // NT, NULL, S, ldS, nq)
            else:
                for i in range(nq * ldS):
                    S[i] = 0
            pack_panels(v + j0 * dv, dv, 1, bk, dv, Vp)
            for i in range(nq):
                row = S + i * ldS
                nv = n_visible(i0 + i, j0, bk, off, causal)
                for t in range(nv):
                    row[t] = sc * row[t]
                softmax_step(row, nv, bk, &m[i], &l[i], O + i * ldO, ldO)
            # O += P V.  P is 0 where a query does not see a key, but 0 times a non-finite
            # value is NaN: when V holds one, the rows that see only part of the chunk multiply
            # only their visible keys (causality holds for any input)
            full = 0
            if causal:
                full = max(0, min(nq, j0 + bk - 1 - off - i0))   # rows before `full` see < bk
            finite = full == 0 or all_finite(v + j0 * dv, bk * dv)
            if finite:
                full = 0
            for i in range(full):
                nv = n_visible(i0 + i, j0, bk, off, causal)
                for tile in range(vt):
                    matmul_acc(S + i * ldS, ldS, Vp + tile * bk * NT, nv, 1,
                               O + i * ldO + tile * NT, ldO, 1)
            matmul_acc(S + full * ldS, ldS, Vp, bk, vt, O + full * ldO, ldO, nq - full)
        for i in range(nq):
            row = O + i * ldO
            lse[i0 + i] = normalise(row, dv, m[i], l[i])
            for c in range(dv):
                o[(i0 + i) * dv + c] = row[c]


cdef void flash_forward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                            Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                            const floating* q, const floating* k, const floating* v,
                            floating* o, floating* lse, floating* S, floating* m,
                            floating* l) noexcept nogil:
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, nv, jend, iblk, jblk
    cdef floating* row
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
                softmax_step(row, nv, bk, &m[i], &l[i], o + (i0 + i) * dv, dv)
            add_values(S, BK, nq, bk, v + j0 * dv, dv, o + i0 * dv, i0, j0, off, causal)
        for i in range(nq):
            lse[i0 + i] = normalise(o + (i0 + i) * dv, dv, m[i], l[i])


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
    cdef floating* Kp
    cdef floating* Vp
    cdef floating* O
    cdef Py_ssize_t failed = 0
    # scratch: S [BQ, BK] and m, l [BQ]; the micro-kernel's S rows and O padded to whole
    # panels, plus the chunk's packed K^T and V
    cdef Py_ssize_t ldS = padded(BK) if SS_ATTENTION_MICROKERNEL else BK
    cdef Py_ssize_t extra = (padded(BK) * d + padded(dv) * BK + BQ * padded(dv)
                             if SS_ATTENTION_MICROKERNEL else 0)
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> scratch_alloc((BQ * ldS + 2 * BQ + extra) * sizeof(floating))
        m = S + BQ * ldS
        l = m + BQ
        Kp = l + BQ
        Vp = Kp + padded(BK) * d
        O = Vp + padded(dv) * BK
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed += 1
                continue
            if SS_ATTENTION_MICROKERNEL:
                uk_forward_job(Tq, Tk, d, dv, BQ, BK, causal, sc, &q[b, h, 0, 0],
                               &k[b, h, 0, 0], &v[b, h, 0, 0], &o[b, h, 0, 0], &lse[b, h, 0],
                               S, m, l, Kp, Vp, O)
            else:
                flash_forward_job(Tq, Tk, d, dv, BQ, BK, causal, sc, &q[b, h, 0, 0],
                                  &k[b, h, 0, 0], &v[b, h, 0, 0], &o[b, h, 0, 0], &lse[b, h, 0],
                                  S, m, l)
        scratch_free(S)
    if failed:
        raise MemoryError(f"attention: no memory for a {BQ} x {BK} block (chunk)")


cdef inline void add_product(const floating* a, Py_ssize_t lda, Py_ssize_t K,
                             const floating* Mp, Py_ssize_t mstride, Py_ssize_t n,
                             floating* Y, Py_ssize_t ldy, Py_ssize_t rows,
                             floating* tmp) noexcept nogil:
    """Y[:rows, :n] += a[:rows, :K] @ M, M's panels NT wide at Mp + tile * mstride; a last
    partial panel goes through tmp [rows, NT] (0 + acc, then added: the same bits as adding in
    place)."""
    cdef Py_ssize_t tile, i, c, w
    for tile in range(n // NT):
        matmul_acc(a, lda, Mp + tile * mstride, K, 1, Y + tile * NT, ldy, rows)
    w = n % NT
    if w:
        tile = n // NT
        matmul_store(a, lda, Mp + tile * mstride, K, 1, NULL, tmp, NT, rows)
        for i in range(rows):
            for c in range(w):
                Y[i * ldy + tile * NT + c] = Y[i * ldy + tile * NT + c] + tmp[i * NT + c]


cdef void uk_backward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                             Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                             const floating* q, const floating* k, const floating* v,
                             const floating* lse, const floating* D, const floating* do,
                             floating* dq, floating* dk, floating* dv_,
                             floating* buf) noexcept nogil:
    """One (batch, head) on the micro-kernel: per key chunk K^T, V^T and K packed; per query
    block its q and dO packed; dK, dV of the chunk accumulated in scratch.  P^T and dS^T are
    transposed into scratch (the kernel reads its left operand by rows)."""
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, t, c, nv, i_first, iblk, jblk, full
    cdef Py_ssize_t part, first
    cdef Py_ssize_t ldS = padded(BK), pd = padded(d), pdv = padded(dv)
    cdef floating* S = buf
    cdef floating* dP = S + BQ * ldS
    cdef floating* PT = dP + BQ * ldS            # [BK, BQ]
    cdef floating* Kt = PT + BK * BQ            # K chunk^T panels [padded(BK) / NT][d][NT]
    cdef floating* Vt = Kt + ldS * d            # V chunk^T panels [padded(BK) / NT][dv][NT]
    cdef floating* Kc = Vt + ldS * dv           # K chunk panels [pd / NT][BK][NT]
    cdef floating* Qp = Kc + pd * BK            # q block panels [pd / NT][BQ][NT]
    cdef floating* Dp = Qp + pd * BQ            # dO block panels [pdv / NT][BQ][NT]
    cdef floating* dKc = Dp + pdv * BQ          # [BK, pd]
    cdef floating* dVc = dKc + BK * pd          # [BK, pdv]
    cdef floating* tmp = dVc + BK * pdv         # [max(BQ, BK), NT]
    cdef floating* row
    cdef floating* drow
    cdef bint finite
    for i in range(Tq * d):
        dq[i] = 0
    for jblk in range((Tk + BK - 1) // BK):
        j0 = jblk * BK
        bk = min(BK, Tk - j0)
        for i in range(bk * pd):
            dKc[i] = 0
        for i in range(bk * pdv):
            dVc[i] = 0
        if d > 0:
            pack_panels(k + j0 * d, 1, d, d, bk, Kt)
            pack_panels(k + j0 * d, d, 1, bk, d, Kc)
        if dv > 0:
            pack_panels(v + j0 * dv, 1, dv, dv, bk, Vt)
        # causal: the first query that sees key j0 is i = j0 - off
        i_first = max(0, j0 - off) if causal else 0
        for iblk in range(i_first // BQ, (Tq + BQ - 1) // BQ):
            i0 = iblk * BQ
            nq = min(BQ, Tq - i0)
            if d > 0:
                matmul_store(q + i0 * d, d, Kt, d, padded(bk) // NT, NULL, S, ldS, nq)
                pack_panels(q + i0 * d, d, 1, nq, d, Qp)
            else:
                for i in range(nq * ldS):
                    S[i] = 0
            if dv > 0:
                matmul_store(do + i0 * dv, dv, Vt, dv, padded(bk) // NT, NULL, dP, ldS, nq)
                pack_panels(do + i0 * dv, dv, 1, nq, dv, Dp)
            else:
                for i in range(nq * ldS):
                    dP[i] = 0
            for i in range(nq):
                row = S + i * ldS
                drow = dP + i * ldS
                probability_grads(row, drow, n_visible(i0 + i, j0, bk, off, causal), bk,
                                  lse[i0 + i], D[i0 + i], sc, sc)
            # P^T dO -> dV, dS K -> dQ, dS^T Q -> dK, skipping masked pairs of non-finite
            # rows: keys before `part` are seen by the whole block, rows before `full` see
            # fewer than bk keys
            part = bk
            full = 0
            if causal:
                part = max(0, min(bk, i0 + off - j0 + 1))
                full = max(0, min(nq, j0 + bk - 1 - off - i0))
            transpose(S, ldS, nq, bk, PT, BQ)
            finite = part == bk or all_finite(do + i0 * dv, nq * dv)
            _add_keys(PT, BQ, nq, bk, Dp, dv, dVc, pdv, i0, j0, off, part, finite, tmp)
            finite = full == 0 or all_finite(k + j0 * d, bk * d)
            if finite:
                add_product(dP, ldS, bk, Kc, bk * NT, d, dq + i0 * d, d, nq, tmp)
            else:
                for i in range(full):
                    nv = n_visible(i0 + i, j0, bk, off, causal)
                    add_product(dP + i * ldS, ldS, nv, Kc, bk * NT, d, dq + (i0 + i) * d, d,
                                1, tmp)
                add_product(dP + full * ldS, ldS, bk, Kc, bk * NT, d, dq + (i0 + full) * d, d,
                            nq - full, tmp)
            transpose(dP, ldS, nq, bk, PT, BQ)
            finite = part == bk or all_finite(q + i0 * d, nq * d)
            _add_keys(PT, BQ, nq, bk, Qp, d, dKc, pd, i0, j0, off, part, finite, tmp)
        for t in range(bk):
            for c in range(d):
                dk[(j0 + t) * d + c] = dKc[t * pd + c]
            for c in range(dv):
                dv_[(j0 + t) * dv + c] = dVc[t * pdv + c]


cdef inline void _add_keys(const floating* AT, Py_ssize_t ldat, Py_ssize_t nq, Py_ssize_t bk,
                           const floating* Xp, Py_ssize_t n, floating* Y, Py_ssize_t ldy,
                           Py_ssize_t i0, Py_ssize_t j0, Py_ssize_t off, Py_ssize_t part,
                           bint finite, floating* tmp) noexcept nogil:
    """Y[:bk, :n] += A^T X for a block of nq queries and bk keys, given AT = A^T [bk, nq] and
    X [nq, n] packed in panels of NT (stride nq * NT).  A is 0 where a query does not see a
    key, but 0 times a non-finite entry of X is NaN: when X holds one (not finite), the keys
    seen by only part of the block (from `part` on) add only the queries that see them (a
    key's gradient never depends on earlier queries)."""
    cdef Py_ssize_t t, first
    if n == 0:
        return
    if finite:
        add_product(AT, ldat, nq, Xp, nq * NT, n, Y, ldy, bk, tmp)
        return
    if part > 0:
        add_product(AT, ldat, nq, Xp, nq * NT, n, Y, ldy, part, tmp)
    for t in range(part, bk):
        first = j0 + t - off - i0                     # the block's first query seeing key t
        if first < nq:
            add_product(AT + t * ldat + first, ldat, nq - first, Xp + first * NT, nq * NT, n,
                        Y + t * ldy, ldy, 1, tmp)


cdef void flash_backward_job(Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t d, Py_ssize_t dv,
                             Py_ssize_t BQ, Py_ssize_t BK, bint causal, floating sc,
                             const floating* q, const floating* k, const floating* v,
                             const floating* lse, const floating* D, const floating* do,
                             floating* dq, floating* dk, floating* dv_, floating* S,
                             floating* dP) noexcept nogil:
    cdef Py_ssize_t off = Tk - Tq, i0, j0, nq, bk, i, i_first, iblk, jblk
    cdef floating* row
    cdef floating* drow
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
                probability_grads(row, drow, n_visible(i0 + i, j0, bk, off, causal), bk,
                                  lse[i0 + i], D[i0 + i], 1, sc)     # S holds sc * q k^T
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
    # scratch: S, dP [BQ, BK]; the micro-kernel's (see uk_backward_job) padded S, dP, P^T,
    # the chunk's packed K^T, V^T, K, the block's packed q, dO, the chunk's dK, dV
    cdef Py_ssize_t size = 2 * BQ * BK
    if SS_ATTENTION_MICROKERNEL:
        size = (2 * BQ * padded(BK) + BK * BQ + padded(BK) * (d + dv_)
                + padded(d) * (BK + BQ) + padded(dv_) * BQ + BK * (padded(d) + padded(dv_))
                + max(BQ, BK) * NT)
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> scratch_alloc(size * sizeof(floating))
        dP = S + BQ * BK
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed += 1
                continue
            if SS_ATTENTION_MICROKERNEL:
                uk_backward_job(Tq, Tk, d, dv_, BQ, BK, causal, sc, &q[b, h, 0, 0],
                                &k[b, h, 0, 0], &v[b, h, 0, 0], &lse[b, h, 0], &D[b, h, 0],
                                &do[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                                &dv[b, h, 0, 0], S)
            else:
                flash_backward_job(Tq, Tk, d, dv_, BQ, BK, causal, sc, &q[b, h, 0, 0],
                                   &k[b, h, 0, 0], &v[b, h, 0, 0], &lse[b, h, 0], &D[b, h, 0],
                                   &do[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                                   &dv[b, h, 0, 0], S, dP)
        scratch_free(S)
    if failed:
        raise MemoryError(f"attention: no memory for two {BQ} x {BK} blocks (chunk)")
