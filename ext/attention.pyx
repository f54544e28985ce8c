# Chunked linear attention / SSD and memory-efficient softmax attention.
# One job per (batch, head) runs the whole sequence in blocks of `chunk` rows; the block
# matmuls go to BLAS (single-threaded at these sizes), the masks and softmax bookkeeping are
# vectorised loops.  A job's arithmetic never depends on the number of jobs or threads, so
# results are bit-identical for any thread count.
#
# Strided inputs: the [B, NH, T, d] arrays of the linear recurrence may have any strides as
# long as the last axis is contiguous (the caller guarantees it): SSD passes B/C broadcast
# over heads (stride 0) and x, y transposed from [B, T, NH, P], without copies.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.math cimport log, logf, INFINITY

from _gemm cimport gemm
from _math cimport exp_, row_max


cdef struct Rows:
    # one job's view of a [B, NH, T, d] array (or the [B, NH, T] log-decays): step t of job
    # (b, h) at ptr + b*sb + h*sh + t*ld
    Py_ssize_t sb, sh, ld


cdef inline Rows rows_of(object arr):
    cdef Rows r
    isz = arr.itemsize
    r.sb = arr.strides[0] // isz
    r.sh = arr.strides[1] // isz
    r.ld = arr.strides[2] // isz
    # numpy may give a length-1 axis any stride (0 after broadcasting); BLAS wants ld >= d
    if arr.ndim == 4 and arr.shape[2] == 1:
        r.ld = arr.shape[3]
    return r


# ---- linear attention with per-step log-decay g (None: no decay) ---------------------------

cdef void block_decay(const floating* g, Py_ssize_t sg, Py_ssize_t c, floating* G) noexcept nogil:
    """G[s] = g[0] + ... + g[s]: cumulative log-decay within the block."""
    cdef floating acc = 0
    cdef Py_ssize_t s
    for s in range(c):
        acc = acc + g[s * sg]
        G[s] = acc


cdef void apply_mask(floating* A, Py_ssize_t lda, Py_ssize_t c, const floating* G) noexcept nogil:
    """A[s, t] *= exp(G[s] - G[t]) for t <= s (exponent <= 0), 0 above the diagonal."""
    cdef Py_ssize_t s, t
    cdef floating* row
    cdef floating Gs
    for s in range(c):
        row = A + s * lda
        if G != NULL:
            Gs = G[s]
            for t in range(s + 1):
                row[t] = row[t] * exp_(Gs - G[t])
        for t in range(s + 1, c):
            row[t] = 0


cdef const floating* decayed(const floating* X, Py_ssize_t* ldx, Py_ssize_t c, Py_ssize_t d,
                             const floating* G, bint to_end, floating* W) noexcept nogil:
    """X's c rows of d, row s scaled by its decay from the block start, exp(G[s]), or with
    to_end by its decay to the block end, exp(G[c-1] - G[s]); written to W (contiguous,
    *ldx set to d).  X itself when there is no decay (G NULL)."""
    cdef Py_ssize_t s, i, ld = ldx[0]
    cdef floating w
    if G == NULL:
        return X
    for s in range(c):
        w = exp_(G[c - 1] - G[s]) if to_end else exp_(G[s])
        for i in range(d):
            W[s * d + i] = w * X[s * ld + i]
    ldx[0] = d
    return W


cdef void scale(floating* X, Py_ssize_t n, floating w) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        X[i] = w * X[i]


cdef inline void masked_scores(const floating* X, Py_ssize_t ldx, const floating* Y,
                               Py_ssize_t ldy, Py_ssize_t c, Py_ssize_t d, const floating* G,
                               floating* out, Py_ssize_t ldo) noexcept nogil:
    """out [c, c] = (X Y^T) * M, the block's causal (and decayed) scores, M as in apply_mask."""
    gemm(False, True, <int> c, <int> c, <int> d, 1, X, <int> ldx, Y, <int> ldy, 0, out, <int> ldo)
    apply_mask(out, ldo, c, G)


cdef void state_update(const floating* X, Py_ssize_t ldx, const floating* Y, Py_ssize_t ldy,
                       Py_ssize_t c, Py_ssize_t dx, Py_ssize_t dy, const floating* G,
                       bint to_end, floating* S, floating* W) noexcept nogil:
    """S [dx, dy] = exp(G[c-1]) S + decayed(X)^T Y: a state (or its gradient) carried across
    the block."""
    if G != NULL:
        scale(S, dx * dy, exp_(G[c - 1]))
    X = decayed(X, &ldx, c, dx, G, to_end, W)
    gemm(True, False, <int> dx, <int> dy, <int> c, 1, X, <int> ldx, Y, <int> ldy, 1, S, <int> dy)


cdef void linear_forward_job(Py_ssize_t T, Py_ssize_t dk, Py_ssize_t dv, Py_ssize_t C,
                             const floating* q, Py_ssize_t ldq, const floating* k, Py_ssize_t ldk,
                             const floating* v, Py_ssize_t ldv, const floating* g, Py_ssize_t sg,
                             const floating* S0, floating* o, Py_ssize_t ldo, floating* S,
                             floating* A, floating* G, floating* W) noexcept nogil:
    cdef Py_ssize_t t0, c, i, blk, ldx
    cdef const floating* Q
    cdef const floating* K
    cdef const floating* V
    cdef const floating* X
    cdef const floating* Gp = G if g != NULL else NULL
    for i in range(dk * dv):
        S[i] = S0[i]
    for blk in range((T + C - 1) // C):
        t0 = blk * C
        c = min(C, T - t0)
        Q, K, V = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv
        if g != NULL:
            block_decay(g + t0 * sg, sg, c, G)
        # intra-block: ((Q K^T) * M) V
        masked_scores(Q, ldq, K, ldk, c, dk, Gp, A, C)
        gemm(False, False, <int> c, <int> dv, <int> c, 1, A, <int> C, V, <int> ldv, 0,
             o + t0 * ldo, <int> ldo)
        # inter-block: diag(exp(G)) Q S_prev
        ldx = ldq
        X = decayed(Q, &ldx, c, dk, Gp, False, W)
        gemm(False, False, <int> c, <int> dv, <int> dk, 1, X, <int> ldx, S, <int> dv, 1,
             o + t0 * ldo, <int> ldo)
        state_update(K, ldk, V, ldv, c, dk, dv, Gp, True, S, W)


def linear_forward(q, k, v, g, const floating[:, :, :, ::1] S0, floating[:, :, :, :] o,
                   floating[:, :, :, ::1] S_out, Py_ssize_t chunk, int num_threads):
    """o, S_out = chunked linear recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    q, k [B,NH,T,dk], v [B,NH,T,dv] (strided, last axis contiguous), g [B,NH,T] strided or
    None, S0 [B,NH,dk,dv]; outputs o [B,NH,T,dv] (strided), S_out [B,NH,dk,dv].
    Requires every size >= 1."""
    cdef const floating[:, :, :, :] qm = q
    cdef const floating[:, :, :, :] km = k
    cdef const floating[:, :, :, :] vm = v
    cdef const floating[:, :, :] gm
    cdef Py_ssize_t B = o.shape[0], NH = o.shape[1], T = o.shape[2]
    cdef Py_ssize_t dk = qm.shape[3], dv = vm.shape[3]
    cdef Py_ssize_t C = min(chunk, T), job, b, h
    cdef Rows rq = rows_of(qm), rk = rows_of(km), rv = rows_of(vm), ro = rows_of(o)
    cdef Rows rg = Rows(0, 0, 0)
    cdef const floating* gp = NULL
    cdef floating* A
    cdef floating* G
    cdef floating* W
    if g is not None:
        gm = g
        gp = &gm[0, 0, 0]
        rg = rows_of(gm)
    cdef int[1] failed
    failed[0] = 0
    with nogil, parallel(num_threads=num_threads):
        A = <floating*> malloc((C * C + C + C * max(dk, dv)) * sizeof(floating))
        G = A + C * C
        W = G + C
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if A == NULL:
                failed[0] = 1
                continue
            linear_forward_job(T, dk, dv, C,
                               &qm[0, 0, 0, 0] + b * rq.sb + h * rq.sh, rq.ld,
                               &km[0, 0, 0, 0] + b * rk.sb + h * rk.sh, rk.ld,
                               &vm[0, 0, 0, 0] + b * rv.sb + h * rv.sh, rv.ld,
                               (gp + b * rg.sb + h * rg.sh) if gp != NULL else NULL, rg.ld,
                               &S0[b, h, 0, 0], &o[0, 0, 0, 0] + b * ro.sb + h * ro.sh, ro.ld,
                               &S_out[b, h, 0, 0], A, G, W)
        free(A)
    if failed[0]:
        raise MemoryError(f"linear attention: no memory for a {C} x {C} block (chunk)")


cdef void linear_backward_job(Py_ssize_t T, Py_ssize_t dk, Py_ssize_t dv, Py_ssize_t C,
                              const floating* q, Py_ssize_t ldq, const floating* k,
                              Py_ssize_t ldk, const floating* v, Py_ssize_t ldv,
                              const floating* g, Py_ssize_t sg, const floating* S0,
                              const floating* do, Py_ssize_t lddo, const floating* dS,
                              floating* dq, floating* dk_, floating* dv_, floating* dS0,
                              floating* A, floating* P, floating* G, floating* W,
                              floating* S) noexcept nogil:
    # dq, dk_, dv_ are contiguous [T, dk] / [T, dv]; dS0 doubles as the running state gradient H.
    cdef Py_ssize_t t0, c, i, nb = (T + C - 1) // C, blk
    cdef const floating* Q
    cdef const floating* K
    cdef const floating* V
    cdef const floating* dO
    cdef const floating* X
    cdef Py_ssize_t ldx
    cdef const floating* Gp = G if g != NULL else NULL
    cdef floating* H = dS0
    # forward sweep: dQ = (dO V^T * M) K + diag(exp(G)) dO S_prev^T
    for i in range(dk * dv):
        S[i] = S0[i]
    for blk in range((T + C - 1) // C):
        t0 = blk * C
        c = min(C, T - t0)
        Q, K, V, dO = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv, do + t0 * lddo
        if g != NULL:
            block_decay(g + t0 * sg, sg, c, G)
        masked_scores(dO, lddo, V, ldv, c, dv, Gp, P, C)
        gemm(False, False, <int> c, <int> dk, <int> c, 1, P, <int> C, K, <int> ldk, 0,
             dq + t0 * dk, <int> dk)
        ldx = lddo
        X = decayed(dO, &ldx, c, dv, Gp, False, W)
        gemm(False, True, <int> c, <int> dk, <int> dv, 1, X, <int> ldx, S, <int> dv, 1,
             dq + t0 * dk, <int> dk)
        state_update(K, ldk, V, ldv, c, dk, dv, Gp, True, S, W)
    # reverse sweep, H = gradient of the state leaving the block:
    # dK = (P*M)^T Q + diag(w) V H^T,  dV = (A*M)^T dO + diag(w) K H,  w = exp(G[c-1] - G)
    for i in range(dk * dv):
        H[i] = dS[i]
    for blk in range(nb - 1, -1, -1):
        t0 = blk * C
        c = min(C, T - t0)
        Q, K, V, dO = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv, do + t0 * lddo
        if g != NULL:
            block_decay(g + t0 * sg, sg, c, G)
        masked_scores(dO, lddo, V, ldv, c, dv, Gp, P, C)
        masked_scores(Q, ldq, K, ldk, c, dk, Gp, A, C)
        gemm(True, False, <int> c, <int> dk, <int> c, 1, P, <int> C, Q, <int> ldq, 0,
             dk_ + t0 * dk, <int> dk)
        gemm(True, False, <int> c, <int> dv, <int> c, 1, A, <int> C, dO, <int> lddo, 0,
             dv_ + t0 * dv, <int> dv)
        ldx = ldv
        X = decayed(V, &ldx, c, dv, Gp, True, W)
        gemm(False, True, <int> c, <int> dk, <int> dv, 1, X, <int> ldx, H, <int> dv, 1,
             dk_ + t0 * dk, <int> dk)
        ldx = ldk
        X = decayed(K, &ldx, c, dk, Gp, True, W)
        gemm(False, False, <int> c, <int> dv, <int> dk, 1, X, <int> ldx, H, <int> dv, 1,
             dv_ + t0 * dv, <int> dv)
        # H = exp(G[c-1]) H + (diag(exp(G)) Q)^T dO
        state_update(Q, ldq, dO, lddo, c, dk, dv, Gp, False, H, W)


def linear_backward(q, k, v, g, const floating[:, :, :, ::1] S0, do,
                    const floating[:, :, :, ::1] dS, floating[:, :, :, ::1] dq,
                    floating[:, :, :, ::1] dk, floating[:, :, :, ::1] dv,
                    floating[:, :, :, ::1] dS0, Py_ssize_t chunk, int num_threads):
    """Gradients of `linear_forward` for the cotangents do [B,NH,T,dv] (strided) and dS
    [B,NH,dk,dv]: dq, dk [B,NH,T,dk], dv [B,NH,T,dv], dS0 [B,NH,dk,dv] (all contiguous).
    The log-decay gradient follows from these (see _reference.attention.log_decay_grad)."""
    cdef const floating[:, :, :, :] qm = q
    cdef const floating[:, :, :, :] km = k
    cdef const floating[:, :, :, :] vm = v
    cdef const floating[:, :, :, :] dom = do
    cdef const floating[:, :, :] gm
    cdef Py_ssize_t B = dq.shape[0], NH = dq.shape[1], T = dq.shape[2]
    cdef Py_ssize_t dk_ = dq.shape[3], dv_ = dv.shape[3]
    cdef Py_ssize_t C = min(chunk, T), job, b, h
    cdef Rows rq = rows_of(qm), rk = rows_of(km), rv = rows_of(vm), rd = rows_of(dom)
    cdef Rows rg = Rows(0, 0, 0)
    cdef const floating* gp = NULL
    cdef floating* A
    cdef floating* P
    cdef floating* G
    cdef floating* W
    cdef floating* S
    if g is not None:
        gm = g
        gp = &gm[0, 0, 0]
        rg = rows_of(gm)
    cdef int[1] failed
    failed[0] = 0
    with nogil, parallel(num_threads=num_threads):
        A = <floating*> malloc((2 * C * C + C + C * max(dk_, dv_) + dk_ * dv_)
                               * sizeof(floating))
        P = A + C * C
        G = P + C * C
        W = G + C
        S = W + C * max(dk_, dv_)
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if A == NULL:
                failed[0] = 1
                continue
            linear_backward_job(T, dk_, dv_, C,
                                &qm[0, 0, 0, 0] + b * rq.sb + h * rq.sh, rq.ld,
                                &km[0, 0, 0, 0] + b * rk.sb + h * rk.sh, rk.ld,
                                &vm[0, 0, 0, 0] + b * rv.sb + h * rv.sh, rv.ld,
                                (gp + b * rg.sb + h * rg.sh) if gp != NULL else NULL, rg.ld,
                                &S0[b, h, 0, 0], &dom[0, 0, 0, 0] + b * rd.sb + h * rd.sh, rd.ld,
                                &dS[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                                &dv[b, h, 0, 0], &dS0[b, h, 0, 0], A, P, G, W, S)
        free(A)
    if failed[0]:
        raise MemoryError(f"linear attention: no memory for two {C} x {C} blocks (chunk)")


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
            gemm(False, True, <int> nq, <int> bk, <int> d, sc, q + i0 * d, <int> d,
                 k + j0 * d, <int> d, 0, S, <int> BK)
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
            gemm(False, False, <int> nq, <int> dv, <int> bk, 1, S, <int> BK, v + j0 * dv,
                 <int> dv, 1, o + i0 * dv, <int> dv)
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
                  const floating[:, :, :, ::1] v, floating[:, :, :, ::1] o,
                  floating[:, :, ::1] lse, bint causal, double scale_, Py_ssize_t block_q,
                  Py_ssize_t chunk, int num_threads):
    """o = softmax(q k^T * scale) v (causal: key j visible to query i when j <= i + Tk - Tq)
    and lse [B,NH,Tq], the log-sum-exp of each query's scores.  q [B,NH,Tq,d],
    k [B,NH,Tk,d], v [B,NH,Tk,dv], o [B,NH,Tq,dv], contiguous.  Requires every size >= 1."""
    cdef Py_ssize_t B = q.shape[0], NH = q.shape[1], Tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t Tk = k.shape[2], dv = v.shape[3]
    cdef Py_ssize_t BQ = min(block_q, Tq), BK = min(chunk, Tk), job, b, h
    cdef floating sc = <floating> scale_
    cdef floating* S
    cdef floating* m
    cdef floating* l
    cdef int[1] failed
    failed[0] = 0
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> malloc((BQ * BK + 2 * BQ) * sizeof(floating))
        m = S + BQ * BK
        l = m + BQ
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed[0] = 1
                continue
            flash_forward_job(Tq, Tk, d, dv, BQ, BK, causal, sc, &q[b, h, 0, 0], &k[b, h, 0, 0],
                              &v[b, h, 0, 0], &o[b, h, 0, 0], &lse[b, h, 0], S, m, l)
        free(S)
    if failed[0]:
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
            gemm(False, True, <int> nq, <int> bk, <int> d, sc, q + i0 * d, <int> d,
                 k + j0 * d, <int> d, 0, S, <int> BK)
            gemm(False, True, <int> nq, <int> bk, <int> dv, 1, do + i0 * dv, <int> dv,
                 v + j0 * dv, <int> dv, 0, dP, <int> BK)
            for i in range(nq):
                row = S + i * BK
                drow = dP + i * BK
                nv = n_visible(i0 + i, j0, bk, off, causal)
                L = lse[i0 + i]
                Di = D[i0 + i]
                for t in range(nv):
                    row[t] = exp_(row[t] - L)
                    drow[t] = row[t] * (drow[t] - Di) * sc
                for t in range(nv, bk):
                    row[t] = 0
                    drow[t] = 0
            # P^T dO -> dV, dS K -> dQ, dS^T Q -> dK
            gemm(True, False, <int> bk, <int> dv, <int> nq, 1, S, <int> BK, do + i0 * dv,
                 <int> dv, 1, dv_ + j0 * dv, <int> dv)
            gemm(False, False, <int> nq, <int> d, <int> bk, 1, dP, <int> BK, k + j0 * d,
                 <int> d, 1, dq + i0 * d, <int> d)
            gemm(True, False, <int> bk, <int> d, <int> nq, 1, dP, <int> BK, q + i0 * d,
                 <int> d, 1, dk + j0 * d, <int> d)


def flash_backward(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                   const floating[:, :, :, ::1] v, const floating[:, :, ::1] lse,
                   const floating[:, :, ::1] D, const floating[:, :, :, ::1] do,
                   floating[:, :, :, ::1] dq, floating[:, :, :, ::1] dk,
                   floating[:, :, :, ::1] dv, bint causal, double scale_, Py_ssize_t block_q,
                   Py_ssize_t chunk, int num_threads):
    """Gradients of `flash_forward`, recomputing each block's probabilities from lse:
    P = exp(S - lse), dS = P (dO V^T - D), D = rowsum(dO * O).  Requires every size >= 1;
    rows with lse = -inf must see no key (their P is 0 through the mask)."""
    cdef Py_ssize_t B = q.shape[0], NH = q.shape[1], Tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t Tk = k.shape[2], dv_ = v.shape[3]
    cdef Py_ssize_t BQ = min(block_q, Tq), BK = min(chunk, Tk), job, b, h
    cdef floating sc = <floating> scale_
    cdef floating* S
    cdef floating* dP
    cdef int[1] failed
    failed[0] = 0
    with nogil, parallel(num_threads=num_threads):
        S = <floating*> malloc(2 * BQ * BK * sizeof(floating))
        dP = S + BQ * BK
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if S == NULL:
                failed[0] = 1
                continue
            flash_backward_job(Tq, Tk, d, dv_, BQ, BK, causal, sc, &q[b, h, 0, 0],
                               &k[b, h, 0, 0], &v[b, h, 0, 0], &lse[b, h, 0], &D[b, h, 0],
                               &do[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                               &dv[b, h, 0, 0], S, dP)
        free(S)
    if failed[0]:
        raise MemoryError(f"attention: no memory for two {BQ} x {BK} blocks (chunk)")
