# The chunked causal linear recurrence shared by linear attention and SSD, its backward, and
# the one-step decode kernel of linear attention.
#
#   S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t        (S [dk, dv] per job)
#
# One job per (batch row, head) runs its sequence in blocks of `chunk` rows; the block
# matmuls go to BLAS (single-threaded at these sizes), the masks are vectorised loops.  A
# job's arithmetic never depends on the number of jobs or threads: results are bit-identical
# for any thread count.
#
# Strided inputs: q, k [B, G, T, dk] and v [B, NH, T, dv] may have any strides as long as the
# last axis is contiguous; head h reads group h // group of q and k (SSD's B and C are shared
# by the heads of a group, linear attention has group = 1).  A row's sequence may end early
# (lengths: later rows are padding, outputs and gradients 0) and restart (reset[b, t]: the
# state is zeroed before step t, i.e. a zero decay there; blocks are cut at resets).
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdint cimport int64_t, uint8_t

from _uk_gemm cimport gemm
from _linear_blocks cimport (Block, apply_mask, block_decay, block_end, block_start,
                            decayed, masked_scores, state_update)
from _scratch cimport scratch_alloc, scratch_free
from _arrays cimport c_array, data, dim, float_type

cimport numpy as cnp

cnp.import_array()


cdef struct Rows:
    # one job's view of a [B, NH, T, d] array (or the [B, NH, T] log-decays): step t of job
    # (b, h) at ptr + b*sb + h*sh + t*ld
    Py_ssize_t sb, sh, ld


cdef inline Rows rows_of(cnp.ndarray arr) noexcept:
    cdef Rows r
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(arr)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(arr)
    r.sb = strides[0] // isz
    r.sh = strides[1] // isz
    r.ld = strides[2] // isz
    # numpy may give a length-1 axis any stride (0 after broadcasting); BLAS wants ld >= d
    if cnp.PyArray_NDIM(arr) == 4 and cnp.PyArray_DIM(arr, 2) == 1:
        r.ld = cnp.PyArray_DIM(arr, 3)
    return r


cdef struct Options:
    const void* g               # log-decays [B, NH, T] (strided, the call's dtype) or NULL
    Rows rg
    const int64_t* lengths      # [B] or NULL
    const uint8_t* reset        # [B, T] or NULL


cdef Options options_of(object g, object lengths, object reset):
    """Raw pointers to the optional per-step inputs (checked by the caller: g of the call's
    dtype, lengths int64 and reset uint8, both C-contiguous)."""
    cdef Options opt
    opt.g, opt.lengths, opt.reset = NULL, NULL, NULL
    opt.rg = Rows(0, 0, 0)
    if g is not None:
        opt.g = cnp.PyArray_DATA(<cnp.ndarray> g)
        opt.rg = rows_of(g)
    if lengths is not None:
        opt.lengths = <const int64_t*> cnp.PyArray_DATA(<cnp.ndarray> lengths)
    if reset is not None:
        opt.reset = <const uint8_t*> cnp.PyArray_DATA(<cnp.ndarray> reset)
    return opt


cdef void linear_forward_job(Py_ssize_t T, Py_ssize_t Tb, Py_ssize_t dk, Py_ssize_t dv,
                             Py_ssize_t C, const floating* q, Py_ssize_t ldq,
                             const floating* k, Py_ssize_t ldk, const floating* v,
                             Py_ssize_t ldv, const floating* g, Py_ssize_t sg,
                             const uint8_t* rs, const floating* S0, floating* o,
                             Py_ssize_t ldo, floating* S, floating* A, floating* G,
                             floating* W) noexcept nogil:
    # Tb <= T valid rows; rows Tb..T-1 of o are padding (zeros)
    cdef Py_ssize_t t0 = 0, t1, c, i, j, ldx
    cdef Block blk
    cdef const floating* Q
    cdef const floating* K
    cdef const floating* V
    cdef const floating* X
    cdef const floating* Gp = G if g != NULL else NULL
    for i in range(dk * dv):
        S[i] = S0[i]
    while t0 < Tb:
        t1 = block_end(t0, Tb, C, rs)
        c = t1 - t0
        Q, K, V = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv
        blk = block_decay(g, sg, rs, t0, c, G)
        # intra-block: ((Q K^T) * M) V
        masked_scores(Q, ldq, K, ldk, c, dk, Gp, A, C)
        gemm(False, False, c, dv, c, 1, A, C, V, ldv, 0, o + t0 * ldo, ldo)
        # inter-block: diag(exp(G)) Q S_prev (unless the block starts with a reset)
        if blk.m > 0:
            ldx = ldq
            X = decayed(Q, &ldx, c, c, dk, Gp, False, W)
            gemm(False, False, c, dv, dk, 1, X, ldx, S, dv, 1, o + t0 * ldo, ldo)
        state_update(K, ldk, V, ldv, blk, dk, dv, Gp, True, S, W)
        t0 = t1
    for i in range(Tb, T):
        for j in range(dv):
            o[i * ldo + j] = 0


cdef Py_ssize_t forward_impl(Py_ssize_t B, Py_ssize_t NH, Py_ssize_t T, Py_ssize_t dk,
                             Py_ssize_t dv, Py_ssize_t C, Py_ssize_t group, const floating* q,
                             Rows rq, const floating* k, Rows rk, const floating* v, Rows rv,
                             Options opt, const floating* S0, floating* o, Rows ro,
                             floating* S_out, int num_threads) noexcept nogil:
    """Every (row, head) job; returns the number of jobs that found no scratch memory."""
    cdef Py_ssize_t job, b, h, Tb, failed = 0
    cdef const floating* gp = <const floating*> opt.g
    cdef Rows rg = opt.rg
    cdef floating* A
    with parallel(num_threads=num_threads):
        A = <floating*> scratch_alloc((C * C + C + C * max(dk, dv)) * sizeof(floating))
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if A == NULL:
                failed += 1
                continue
            Tb = opt.lengths[b] if opt.lengths != NULL else T
            linear_forward_job(T, Tb, dk, dv, C,
                               q + b * rq.sb + (h // group) * rq.sh, rq.ld,
                               k + b * rk.sb + (h // group) * rk.sh, rk.ld,
                               v + b * rv.sb + h * rv.sh, rv.ld,
                               (gp + b * rg.sb + h * rg.sh) if gp != NULL else NULL, rg.ld,
                               (opt.reset + b * T) if opt.reset != NULL else NULL,
                               S0 + job * dk * dv, o + b * ro.sb + h * ro.sh, ro.ld,
                               S_out + job * dk * dv, A, A + C * C, A + C * C + C)
        scratch_free(A)
    return failed


cdef inline bint rows_last_contiguous(object a, int typenum) noexcept:
    """True when `a` is a 4-d ndarray of `typenum` whose last axis is contiguous (any stride
    when it has length 1)."""
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray> a
    return (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_NDIM(arr) == 4
            and (cnp.PyArray_STRIDES(arr)[3] == cnp.PyArray_ITEMSIZE(arr)
                 or cnp.PyArray_DIM(arr, 3) == 1))


def linear_forward(q, k, v, g, S0, Py_ssize_t chunk, Py_ssize_t group, lengths, reset, o,
                   S_out, int num_threads):
    """o, S_out = chunked linear recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    q, k [B,G,T,dk] (head h reads group h // group), v [B,NH,T,dv] (strided, last axis
    contiguous), g [B,NH,T] strided or None (no decay; required with reset), S0 [B,NH,dk,dv],
    lengths int64 [B] or None, reset uint8 [B,T] or None; outputs o [B,NH,T,dv] (strided),
    S_out [B,NH,dk,dv].  One float dtype; S0, S_out C-contiguous.  Requires every size >= 1.
    The arrays are read through their pointers and strides (no typed memoryviews: a small
    call would spend most of its time acquiring them); the dtypes and layouts are checked."""
    if type(S0) is not cnp.ndarray:
        raise TypeError("S0 must be an ndarray")
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray> S0)
    if (typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE
            or not rows_last_contiguous(q, typenum) or not rows_last_contiguous(k, typenum)
            or not rows_last_contiguous(v, typenum) or not rows_last_contiguous(o, typenum)
            or not rows_last_contiguous(S0, typenum) or not rows_last_contiguous(S_out, typenum)
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray> S0)
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray> S_out)
            or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> o)
            or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> S_out)
            or (g is not None and (type(g) is not cnp.ndarray
                                   or cnp.PyArray_TYPE(<cnp.ndarray> g) != typenum
                                   or cnp.PyArray_NDIM(<cnp.ndarray> g) != 3))):
        raise ValueError("linear_forward: q, k, v, o [B, NH, T, d] with a contiguous last "
                         "axis, S0 and S_out C-contiguous, g [B, NH, T] or None, one float "
                         "dtype, o and S_out writeable")
    cdef cnp.npy_intp* shape_o = cnp.PyArray_DIMS(<cnp.ndarray> o)
    cdef Py_ssize_t B = shape_o[0], NH = shape_o[1], T = shape_o[2]
    cdef Py_ssize_t dk = cnp.PyArray_DIM(<cnp.ndarray> q, 3), dv = shape_o[3]
    cdef Py_ssize_t C = min(chunk, T), failed
    cdef Rows rq = rows_of(q), rk = rows_of(k), rv = rows_of(v), ro = rows_of(o)
    cdef Options opt = options_of(g, lengths, reset)
    cdef void* pq = cnp.PyArray_DATA(<cnp.ndarray> q)
    cdef void* pk = cnp.PyArray_DATA(<cnp.ndarray> k)
    cdef void* pv = cnp.PyArray_DATA(<cnp.ndarray> v)
    cdef void* ps0 = cnp.PyArray_DATA(<cnp.ndarray> S0)
    cdef void* po = cnp.PyArray_DATA(<cnp.ndarray> o)
    cdef void* ps = cnp.PyArray_DATA(<cnp.ndarray> S_out)
    if typenum == cnp.NPY_FLOAT:
        with nogil:
            failed = forward_impl[float](B, NH, T, dk, dv, C, group, <float*> pq, rq,
                                         <float*> pk, rk, <float*> pv, rv, opt, <float*> ps0,
                                         <float*> po, ro, <float*> ps, num_threads)
    else:
        with nogil:
            failed = forward_impl[double](B, NH, T, dk, dv, C, group, <double*> pq, rq,
                                          <double*> pk, rk, <double*> pv, rv, opt,
                                          <double*> ps0, <double*> po, ro, <double*> ps,
                                          num_threads)
    if failed:
        raise MemoryError(f"linear attention: no memory for a {C} x {C} block (chunk)")


cdef void linear_backward_job(Py_ssize_t T, Py_ssize_t Tb, Py_ssize_t dk, Py_ssize_t dv,
                              Py_ssize_t C, const floating* q, Py_ssize_t ldq,
                              const floating* k, Py_ssize_t ldk, const floating* v,
                              Py_ssize_t ldv, const floating* g, Py_ssize_t sg,
                              const uint8_t* rs, const floating* S0,
                              const floating* do, Py_ssize_t lddo, const floating* dS,
                              floating* dq, floating* dk_, floating* dv_, floating* dS0,
                              floating* A, floating* P, floating* G, floating* W,
                              floating* S) noexcept nogil:
    # dq, dk_, dv_ are contiguous [T, dk] / [T, dv]; dS0 doubles as the running state gradient H.
    cdef Py_ssize_t t0 = 0, t1, c, i, ldx
    cdef Block blk
    cdef const floating* Q
    cdef const floating* K
    cdef const floating* V
    cdef const floating* dO
    cdef const floating* X
    cdef const floating* Gp = G if g != NULL else NULL
    cdef floating* H = dS0
    # forward sweep: dQ = (dO V^T * M) K + diag(exp(G)) dO S_prev^T
    for i in range(dk * dv):
        S[i] = S0[i]
    while t0 < Tb:
        t1 = block_end(t0, Tb, C, rs)
        c = t1 - t0
        Q, K, V, dO = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv, do + t0 * lddo
        blk = block_decay(g, sg, rs, t0, c, G)
        masked_scores(dO, lddo, V, ldv, c, dv, Gp, P, C)
        gemm(False, False, c, dk, c, 1, P, C, K, ldk, 0, dq + t0 * dk, dk)
        if blk.m > 0:
            ldx = lddo
            X = decayed(dO, &ldx, c, c, dv, Gp, False, W)
            gemm(False, True, c, dk, dv, 1, X, ldx, S, dv, 1, dq + t0 * dk, dk)
        state_update(K, ldk, V, ldv, blk, dk, dv, Gp, True, S, W)
        t0 = t1
    # reverse sweep over the same blocks, H = gradient of the state leaving the block:
    # dK = (P*M)^T Q + diag(w) V H^T,  dV = (A*M)^T dO + diag(w) K H,  w = exp(G[c-1] - G)
    for i in range(dk * dv):
        H[i] = dS[i]
    t1 = Tb
    while t1 > 0:
        t0 = block_start(t1, C, rs)
        c = t1 - t0
        Q, K, V, dO = q + t0 * ldq, k + t0 * ldk, v + t0 * ldv, do + t0 * lddo
        blk = block_decay(g, sg, rs, t0, c, G)
        masked_scores(dO, lddo, V, ldv, c, dv, Gp, P, C)
        masked_scores(Q, ldq, K, ldk, c, dk, Gp, A, C)
        gemm(True, False, c, dk, c, 1, P, C, Q, ldq, 0, dk_ + t0 * dk, dk)
        gemm(True, False, c, dv, c, 1, A, C, dO, lddo, 0, dv_ + t0 * dv, dv)
        ldx = ldv
        X = decayed(V, &ldx, c, c, dv, Gp, True, W)
        gemm(False, True, c, dk, dv, 1, X, ldx, H, dv, 1, dk_ + t0 * dk, dk)
        ldx = ldk
        X = decayed(K, &ldx, c, c, dk, Gp, True, W)
        gemm(False, False, c, dv, dk, 1, X, ldx, H, dv, 1, dv_ + t0 * dv, dv)
        # H = exp(G[c-1]) H + (diag(exp(G)) Q)^T dO  (0 + nothing after a reset)
        state_update(Q, ldq, dO, lddo, blk, dk, dv, Gp, False, H, W)
        t1 = t0
    for i in range(Tb * dk, T * dk):
        dq[i] = 0
        dk_[i] = 0
    for i in range(Tb * dv, T * dv):
        dv_[i] = 0


def linear_backward(q, k, v, g, const floating[:, :, :, ::1] S0, Py_ssize_t chunk,
                    Py_ssize_t group, lengths, reset, do, const floating[:, :, :, ::1] dS,
                    floating[:, :, :, ::1] dq, floating[:, :, :, ::1] dk,
                    floating[:, :, :, ::1] dv, floating[:, :, :, ::1] dS0, int num_threads):
    """Gradients of `linear_forward` for the cotangents do [B,NH,T,dv] (strided) and dS
    [B,NH,dk,dv]: dq, dk [B,NH,T,dk] (per head: the caller sums a group's heads),
    dv [B,NH,T,dv], dS0 [B,NH,dk,dv] (all contiguous).  The log-decay gradient follows from
    these (see _reference.linear_attention.log_decay_grad)."""
    cdef const floating[:, :, :, :] qm = q
    cdef const floating[:, :, :, :] km = k
    cdef const floating[:, :, :, :] vm = v
    cdef const floating[:, :, :, :] dom = do
    cdef Py_ssize_t B = dq.shape[0], NH = dq.shape[1], T = dq.shape[2]
    cdef Py_ssize_t dk_ = dq.shape[3], dv_ = dv.shape[3]
    cdef Py_ssize_t C = min(chunk, T), job, b, h, Tb, failed = 0
    cdef Py_ssize_t w = C * max(dk_, dv_)
    cdef Rows rq = rows_of(q), rk = rows_of(k), rv = rows_of(v), rd = rows_of(do)
    cdef Options opt = options_of(g, lengths, reset)
    cdef Rows rg = opt.rg
    cdef const floating* gp = <const floating*> opt.g
    cdef const int64_t* lp = opt.lengths
    cdef const uint8_t* rp = opt.reset
    cdef floating* A
    with nogil, parallel(num_threads=num_threads):
        A = <floating*> scratch_alloc((2 * C * C + C + w + dk_ * dv_) * sizeof(floating))
        for job in prange(B * NH, schedule="static"):
            b = job // NH
            h = job % NH
            if A == NULL:
                failed += 1
                continue
            Tb = lp[b] if lp != NULL else T
            linear_backward_job(T, Tb, dk_, dv_, C,
                                &qm[0, 0, 0, 0] + b * rq.sb + (h // group) * rq.sh, rq.ld,
                                &km[0, 0, 0, 0] + b * rk.sb + (h // group) * rk.sh, rk.ld,
                                &vm[0, 0, 0, 0] + b * rv.sb + h * rv.sh, rv.ld,
                                (gp + b * rg.sb + h * rg.sh) if gp != NULL else NULL, rg.ld,
                                (rp + b * T) if rp != NULL else NULL,
                                &S0[b, h, 0, 0], &dom[0, 0, 0, 0] + b * rd.sb + h * rd.sh, rd.ld,
                                &dS[b, h, 0, 0], &dq[b, h, 0, 0], &dk[b, h, 0, 0],
                                &dv[b, h, 0, 0], &dS0[b, h, 0, 0], A, A + C * C,
                                A + 2 * C * C, A + 2 * C * C + C, A + 2 * C * C + C + w)
        scratch_free(A)
    if failed:
        raise MemoryError(f"linear attention: no memory for two {C} x {C} blocks (chunk)")


# ---- one decoding step on the state in its public layout ---------------------------------------

cdef void linear_step_job(Py_ssize_t dk, Py_ssize_t dv, floating lam, const floating* q,
                          const floating* k, const floating* v, const floating* S_in,
                          floating* S_out, floating* o) noexcept nogil:
    """S_out = lam S_in + k v^T; o = S_out^T q (S_out may be S_in: each entry is read before
    it is written)."""
    cdef Py_ssize_t i, j
    cdef floating s, ki, qi
    for j in range(dv):
        o[j] = 0
    for i in range(dk):
        ki = k[i]
        qi = q[i]
        for j in range(dv):
            s = lam * S_in[i * dv + j] + ki * v[j]
            S_out[i * dv + j] = s
            o[j] = o[j] + qi * s


cdef void linear_step_impl(Py_ssize_t B, Py_ssize_t NH, Py_ssize_t dk, Py_ssize_t dv,
                           const floating* q, const floating* k, const floating* v,
                           const floating* decay, const floating* S_in, floating* o,
                           floating* S_out, int num_threads) noexcept nogil:
    cdef Py_ssize_t job, h
    cdef floating lam
    if num_threads <= 1 or B * NH * dk * dv < 65536:     # a parallel region costs more
        for job in range(B * NH):
            h = job % NH
            lam = decay[h] if decay != NULL else 1
            linear_step_job(dk, dv, lam, q + job * dk, k + job * dk, v + job * dv,
                            S_in + job * dk * dv, S_out + job * dk * dv, o + job * dv)
        return
    for job in prange(B * NH, schedule="static", num_threads=num_threads):
        h = job % NH
        lam = decay[h] if decay != NULL else 1
        linear_step_job(dk, dv, lam, q + job * dk, k + job * dk, v + job * dv,
                        S_in + job * dk * dv, S_out + job * dk * dv, o + job * dv)


def linear_step(q, k, v, decay, state, o, out_state, int num_threads):
    """One step (T = 1) of linear attention on the state in its public layout.

    q, k [B,NH,1,dk], v [B,NH,1,dv], decay [NH] (the factor, not its log) or None,
    state [B,NH,dk,dv]; outputs o [B,NH,1,dv] and out_state [B,NH,dk,dv], which may be
    `state` itself.  Every array C-contiguous, one dtype, the sizes checked by the caller;
    dtypes, ranks and layouts are checked here (pointer reads: see _arrays.pxd)."""
    cdef int t = float_type(q)
    if not (t >= 0 and c_array(q, t, 4) and c_array(k, t, 4) and c_array(v, t, 4)
            and (decay is None or c_array(decay, t, 1)) and c_array(state, t, 4)
            and c_array(o, t, 4, True) and c_array(out_state, t, 4, True)):
        raise ValueError("linear_step: C-contiguous 4-d arrays of one float dtype (decay 1-d), "
                         "o and out_state writeable")
    cdef Py_ssize_t B = dim(q, 0), NH = dim(q, 1), dk = dim(q, 3), dv = dim(v, 3)
    cdef char* pq = data(q)
    cdef char* pk = data(k)
    cdef char* pv = data(v)
    cdef char* pd = data(decay)
    cdef char* ps = data(state)
    cdef char* po = data(o)
    cdef char* pso = data(out_state)
    if t == cnp.NPY_FLOAT:
        with nogil:
            linear_step_impl[float](B, NH, dk, dv, <float*> pq, <float*> pk, <float*> pv,
                                    <float*> pd, <float*> ps, <float*> po, <float*> pso,
                                    num_threads)
    else:
        with nogil:
            linear_step_impl[double](B, NH, dk, dv, <double*> pq, <double*> pk, <double*> pv,
                                     <double*> pd, <double*> ps, <double*> po, <double*> pso,
                                     num_threads)
