# Causal depthwise convolution along time: y_t[c] = act(bias[c] + sum_j w[c, j] x_{t-K+1+j}[c]).
# x is [B, T, C], so the channels of one step are contiguous: a job is one batch row and a
# block of channels, runs over time, and vectorises over the channels of its block.  Every
# output element is one fixed sum (bias first, then the taps j = 0..K-1, the reference's
# order), whatever the blocking, so results are bit-identical for any thread count; the
# backward's sums over batch rows (dweight, dbias) are written per row and added in row order.
# The one-token decode step does the same sum per channel on the state in its public layout
# [B, C, K-1], so decoding token by token gives the bits of one prefill call.
#
# Inputs are validated ndarrays (statescan.conv): C-contiguous, one float dtype; bias, lengths
# and reset may be None; reset is uint8 [B, T].
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdint cimport int64_t
from libc.string cimport memmove, memset

from _math cimport sigmoid
from _scratch cimport scratch_alloc, scratch_free

cnp.import_array()

cdef extern from "_conv.h":     # no fused multiply-adds in this module: see the header
    pass

cdef enum:
    MAX_BLOCK = 512                 # channels per job: a step's rows of the block stay in L1
    MIN_WORK_PER_THREAD = 65536     # multiply-adds before a second thread pays


cdef inline void* data(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline Py_ssize_t block_size(Py_ssize_t B, Py_ssize_t C, int num_threads) noexcept nogil:
    # Channels per job (a multiple of 16, at most MAX_BLOCK): as few blocks per row as keep
    # every thread busy, their number a multiple of that so the threads get equal shares.
    cdef Py_ssize_t parts = max(1, (num_threads + B - 1) // B)
    cdef Py_ssize_t need = (C + MAX_BLOCK - 1) // MAX_BLOCK
    parts *= (need + parts - 1) // parts
    return max(1, (((C + parts - 1) // parts + 15) // 16) * 16)


cdef inline int useful_threads(int num_threads, Py_ssize_t jobs, Py_ssize_t work) noexcept nogil:
    # waking a thread team costs microseconds: only with several jobs and enough work
    return <int> max(1, min(<Py_ssize_t> num_threads, min(jobs, work // MIN_WORK_PER_THREAD)))


cdef inline Py_ssize_t window_start(const unsigned char* rs, Py_ssize_t t,
                                    Py_ssize_t K) noexcept nogil:
    # The inputs at times s < start are zero for step t (a reset in (s, t] zeroed them): the
    # latest reset among the K-1 steps that the window of step t spans; -(K-1) when none.
    cdef Py_ssize_t r
    if rs != NULL:
        r = t
        while r >= 0 and r > t - K + 1:
            if rs[r]:
                return r
            r -= 1
    return -(K - 1)


cdef inline floating* source(floating* x, floating* hist, floating* zero, Py_ssize_t s,
                             Py_ssize_t start, Py_ssize_t C, Py_ssize_t nc,
                             Py_ssize_t K) noexcept nogil:
    # Where the input at time s lives for a job: a row of x (x points at [row, 0, c0], rows
    # C apart), the initial window (hist: K-1 rows of nc), or zeros after a reset.
    if s < start:
        return zero
    if s >= 0:
        return x + s * C
    return hist + (s + K - 1) * nc


cdef inline void silu_row(floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n):
        y[c] = y[c] * sigmoid(y[c])


cdef inline void out_row4(floating* out, floating** src, const floating* wT, Py_ssize_t ldw,
                          const floating* bias, bint silu, Py_ssize_t n) noexcept nogil:
    # out_row for K = 4 (Mamba's kernel) in one pass: the same additions in the same order
    cdef Py_ssize_t c
    cdef floating v, zero = 0
    cdef const floating* s0 = src[0]
    cdef const floating* s1 = src[1]
    cdef const floating* s2 = src[2]
    cdef const floating* s3 = src[3]
    cdef const floating* w0 = wT
    cdef const floating* w1 = wT + ldw
    cdef const floating* w2 = wT + 2 * ldw
    cdef const floating* w3 = wT + 3 * ldw
    if bias != NULL and silu:
        for c in range(n):
            v = bias[c] + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c] + w3[c] * s3[c]
            out[c] = v * sigmoid(v)
    elif bias != NULL:
        for c in range(n):
            out[c] = bias[c] + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c] + w3[c] * s3[c]
    elif silu:
        for c in range(n):
            v = zero + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c] + w3[c] * s3[c]
            out[c] = v * sigmoid(v)
    else:
        for c in range(n):
            out[c] = zero + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c] + w3[c] * s3[c]


cdef inline void out_row(floating* out, floating** src, const floating* wT, Py_ssize_t ldw,
                         const floating* bias, bint silu, Py_ssize_t K,
                         Py_ssize_t n) noexcept nogil:
    # out = act(bias (or 0) + sum_j wT[j] * src[j]), the taps added in order j = 0..K-1
    cdef Py_ssize_t c, j
    cdef const floating* w
    cdef const floating* s
    if K == 4:
        out_row4(out, src, wT, ldw, bias, silu, n)
        return
    if bias != NULL:
        for c in range(n):
            out[c] = bias[c]
    else:
        for c in range(n):
            out[c] = 0
    for j in range(K):
        w = wT + j * ldw
        s = src[j]
        for c in range(n):
            out[c] += w[c] * s[c]
    if silu:
        silu_row(out, n)


cdef void transpose_weight(const floating* w, floating* wT, Py_ssize_t C,
                           Py_ssize_t K) noexcept nogil:
    # [C, K] -> [K, C]: a tap's weights contiguous over channels
    cdef Py_ssize_t c, j
    for j in range(K):
        for c in range(C):
            wT[j * C + c] = w[c * K + j]


cdef inline Py_ssize_t job_scratch(Py_ssize_t K, Py_ssize_t nb) noexcept nogil:
    # elements of a forward job's scratch: hist (K-1 rows of nb), a zero row, K pointers
    # (nb is a multiple of 16, so the pointers are aligned)
    return K * nb + 2 * K + 2


# ---- forward ------------------------------------------------------------------------------------

cdef void forward_job(Py_ssize_t b, Py_ssize_t c0, Py_ssize_t nc, Py_ssize_t nb, Py_ssize_t T,
                      Py_ssize_t C, Py_ssize_t K, const floating* x, const floating* wT,
                      const floating* bias, bint silu, const floating* state,
                      const int64_t* lengths, const unsigned char* reset, floating* y,
                      floating* state_out, floating* buf) noexcept nogil:
    # buf: hist (K-1 rows of nb), a zero row, K source pointers (job_scratch)
    cdef Py_ssize_t Km = K - 1
    cdef floating* hist = buf
    cdef floating* zero = buf + Km * nb
    cdef floating** src = <floating**> (buf + K * nb)
    cdef floating* xr = <floating*> x + b * T * C + c0
    cdef floating* yt
    cdef floating* v
    cdef const unsigned char* rs = NULL
    cdef const floating* bc = NULL
    cdef Py_ssize_t L = T if lengths == NULL else lengths[b]
    cdef Py_ssize_t t, j, c, i, start
    cdef const floating* st = state + (b * C + c0) * Km
    cdef floating* so = state_out + (b * C + c0) * Km
    if reset != NULL:
        rs = reset + b * T
    if bias != NULL:
        bc = bias + c0
    for c in range(nc):                      # read the whole initial window first: state_out
        for i in range(Km):                  # may be the state array itself
            hist[i * nb + c] = st[c * Km + i]
    memset(zero, 0, nb * sizeof(floating))
    for t in range(L):
        start = window_start(rs, t, K)
        for j in range(K):
            src[j] = source(xr, hist, zero, t - Km + j, start, C, nb, K)
        yt = y + (b * T + t) * C + c0
        out_row(yt, src, wT + c0, C, bc, silu, K, nc)
    for t in range(L, T):
        memset(y + (b * T + t) * C + c0, 0, nc * sizeof(floating))
    start = window_start(rs, L - 1, K)
    for i in range(Km):
        v = source(xr, hist, zero, L - Km + i, start, C, nb, K)
        for c in range(nc):
            so[c * Km + i] = v[c]


cdef int forward_impl(Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t K,
                      const floating* x, const floating* w, const floating* bias, bint silu,
                      const floating* state, const int64_t* lengths,
                      const unsigned char* reset, floating* y, floating* state_out,
                      int num_threads) noexcept nogil:
    """0, or -1 when scratch memory could not be had."""
    cdef Py_ssize_t nb = block_size(B, C, num_threads)
    cdef int failed
    cdef floating* wT = <floating*> scratch_alloc(K * C * sizeof(floating))
    if wT == NULL:
        return -1
    transpose_weight(w, wT, C, K)
    failed = run_jobs(False, B, T, C, K, nb, num_threads, x, wT, bias, silu, state, lengths,
                      reset, NULL, NULL, y, state_out, NULL, NULL)
    scratch_free(wT)
    return failed


def causal_conv1d_forward(cnp.ndarray x, cnp.ndarray weight, object bias, bint silu,
                          cnp.ndarray state, object lengths, object reset, cnp.ndarray y,
                          cnp.ndarray state_out, int num_threads):
    """Fill y [B, T, C] and state_out [B, C, K-1] (may be `state` itself)."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], C = x.shape[2], K = weight.shape[1]
    cdef void* px = data(x)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef void* ps = data(state)
    cdef const int64_t* pl = <const int64_t*> data(lengths)
    cdef const unsigned char* pr = <const unsigned char*> data(reset)
    cdef void* py = data(y)
    cdef void* pso = data(state_out)
    cdef int status
    if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
        with nogil:
            status = forward_impl(B, T, C, K, <double*> px, <double*> pw, <double*> pb, silu,
                                  <double*> ps, pl, pr, <double*> py, <double*> pso,
                                  num_threads)
    else:
        with nogil:
            status = forward_impl(B, T, C, K, <float*> px, <float*> pw, <float*> pb, silu,
                                  <float*> ps, pl, pr, <float*> py, <float*> pso,
                                  num_threads)
    if status:
        raise MemoryError("causal_conv1d: could not allocate the kernel's scratch memory")


# ---- backward ----------------------------------------------------------------------------------

cdef inline Py_ssize_t backward_scratch(Py_ssize_t K, Py_ssize_t nb) noexcept nogil:
    # elements of a backward job's scratch: hist and dhist (K-1 rows of nb each), zero, sink
    # and dpre rows, 2K pointers
    return (2 * K + 1) * nb + 4 * K + 4


cdef inline void grad_row4(floating** dst, floating** src, const floating* wT, Py_ssize_t ldw,
                           const floating* g, floating* dw, floating* db,
                           Py_ssize_t n) noexcept nogil:
    # One step's backward for K = 4 in one pass: dst[j] += w[j] * g (the inputs' gradients),
    # dw[j] += g * src[j], db += g (dw rows ldw apart); the general loop's sums, in its order
    cdef Py_ssize_t c
    cdef floating gc
    cdef floating* d0 = dst[0]
    cdef floating* d1 = dst[1]
    cdef floating* d2 = dst[2]
    cdef floating* d3 = dst[3]
    cdef const floating* s0 = src[0]
    cdef const floating* s1 = src[1]
    cdef const floating* s2 = src[2]
    cdef const floating* s3 = src[3]
    cdef const floating* w0 = wT
    cdef const floating* w1 = wT + ldw
    cdef const floating* w2 = wT + 2 * ldw
    cdef const floating* w3 = wT + 3 * ldw
    cdef floating* dw0 = dw
    cdef floating* dw1 = dw + ldw
    cdef floating* dw2 = dw + 2 * ldw
    cdef floating* dw3 = dw + 3 * ldw
    for c in range(n):
        gc = g[c]
        d0[c] += w0[c] * gc
        d1[c] += w1[c] * gc
        d2[c] += w2[c] * gc
        d3[c] += w3[c] * gc
    for c in range(n):
        gc = g[c]
        dw0[c] += gc * s0[c]
        dw1[c] += gc * s1[c]
        dw2[c] += gc * s2[c]
        dw3[c] += gc * s3[c]
        db[c] += gc


cdef void backward_job(Py_ssize_t b, Py_ssize_t c0, Py_ssize_t nc, Py_ssize_t nb,
                       Py_ssize_t T, Py_ssize_t C, Py_ssize_t K, const floating* x,
                       const floating* wT, const floating* bias, bint silu,
                       const floating* state, const int64_t* lengths,
                       const unsigned char* reset, const floating* dy, const floating* dstate,
                       floating* dx, floating* dwp, floating* dbp, floating* dstate0,
                       floating* buf) noexcept nogil:
    # Reverse time over one row and channel block.  Every input (a row of x, of the initial
    # window, or a zero after a reset) has a gradient row in the same place (dx, dhist, sink);
    # dwp [B, K, C] and dbp [B, C] get this row's sums over time.
    cdef Py_ssize_t Km = K - 1
    cdef floating* hist = buf
    cdef floating* zero = buf + Km * nb
    cdef floating* dhist = zero + nb
    cdef floating* sink = dhist + Km * nb
    cdef floating* dpre = sink + nb
    cdef floating** src = <floating**> (dpre + nb)
    cdef floating** dst = src + K
    cdef floating* xr = <floating*> x + b * T * C + c0
    cdef floating* dxr = dx + b * T * C + c0
    cdef floating* dwr = dwp + b * K * C + c0
    cdef floating* dbr = dbp + b * C + c0
    cdef const floating* dyt
    cdef const floating* w
    cdef floating* d
    cdef floating* v
    cdef floating sg
    cdef const unsigned char* rs = NULL
    cdef const floating* bc = NULL
    cdef Py_ssize_t L = T if lengths == NULL else lengths[b]
    cdef Py_ssize_t t, j, c, i, start
    cdef const floating* st = state + (b * C + c0) * Km
    cdef const floating* dso = dstate + (b * C + c0) * Km
    cdef floating* ds0 = dstate0 + (b * C + c0) * Km
    if reset != NULL:
        rs = reset + b * T
    if bias != NULL:
        bc = bias + c0
    for c in range(nc):
        for i in range(Km):
            hist[i * nb + c] = st[c * Km + i]
    memset(zero, 0, nb * sizeof(floating))
    memset(dhist, 0, Km * nb * sizeof(floating))
    for t in range(T):
        memset(dxr + t * C, 0, nc * sizeof(floating))
    for j in range(K):
        memset(dwr + j * C, 0, nc * sizeof(floating))
    memset(dbr, 0, nc * sizeof(floating))
    start = window_start(rs, L - 1, K)            # the returned window's cotangent
    for i in range(Km):
        d = source(dxr, dhist, sink, L - Km + i, start, C, nb, K)
        for c in range(nc):
            d[c] += dso[c * Km + i]
    for t in range(L - 1, -1, -1):
        start = window_start(rs, t, K)
        for j in range(K):
            src[j] = source(xr, hist, zero, t - Km + j, start, C, nb, K)
            dst[j] = source(dxr, dhist, sink, t - Km + j, start, C, nb, K)
        dyt = dy + (b * T + t) * C + c0
        if silu:
            out_row(dpre, src, wT + c0, C, bc, False, K, nc)     # the pre-activation
            for c in range(nc):
                sg = sigmoid(dpre[c])
                dpre[c] = dyt[c] * (sg * (1 + dpre[c] * (1 - sg)))
        else:
            for c in range(nc):
                dpre[c] = dyt[c]
        if K == 4:
            grad_row4(dst, src, wT + c0, C, dpre, dwr, dbr, nc)
            continue
        for j in range(K):
            w = wT + j * C + c0
            d = dst[j]
            v = src[j]
            for c in range(nc):
                d[c] += w[c] * dpre[c]
            d = dwr + j * C
            for c in range(nc):
                d[c] += dpre[c] * v[c]
        for c in range(nc):
            dbr[c] += dpre[c]
    for c in range(nc):
        for i in range(Km):
            ds0[c * Km + i] = dhist[i * nb + c]


# ---- the jobs of a forward or backward call ------------------------------------------------------

cdef int run_jobs(bint backward, Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t K,
                  Py_ssize_t nb, int num_threads, const floating* x, const floating* wT,
                  const floating* bias, bint silu, const floating* state,
                  const int64_t* lengths, const unsigned char* reset, const floating* dy,
                  const floating* dstate, floating* out, floating* out_state, floating* dwp,
                  floating* dbp) noexcept nogil:
    # Every (row, channel block) job of the forward (out = y, out_state = state_out) or of
    # the backward (out = dx, out_state = dstate0), each thread with its own scratch block;
    # a call worth one thread runs on the calling thread, without a parallel region (small
    # calls are latency-bound).  0, or -1 when scratch memory could not be had.
    cdef Py_ssize_t nblk = (C + nb - 1) // nb
    cdef Py_ssize_t nbuf = backward_scratch(K, nb) if backward else job_scratch(K, nb)
    cdef Py_ssize_t job
    cdef int failed = 0
    cdef int threads = useful_threads(num_threads, B * nblk,
                                      (2 if backward else 1) * B * T * C * K)
    cdef floating* buf = NULL
    if threads == 1:
        buf = <floating*> scratch_alloc(nbuf * sizeof(floating))
        if buf == NULL:
            return -1
        for job in range(B * nblk):
            one_job(backward, job, nblk, nb, T, C, K, x, wT, bias, silu, state, lengths,
                    reset, dy, dstate, out, out_state, dwp, dbp, buf)
        scratch_free(buf)
        return 0
    with parallel(num_threads=threads):
        buf = <floating*> scratch_alloc(nbuf * sizeof(floating))
        for job in prange(B * nblk, schedule="static"):
            if buf == NULL:
                failed += 1
            else:
                one_job(backward, job, nblk, nb, T, C, K, x, wT, bias, silu, state, lengths,
                        reset, dy, dstate, out, out_state, dwp, dbp, buf)
        scratch_free(buf)
    return -1 if failed else 0


cdef inline void one_job(bint backward, Py_ssize_t job, Py_ssize_t nblk, Py_ssize_t nb,
                         Py_ssize_t T, Py_ssize_t C, Py_ssize_t K, const floating* x,
                         const floating* wT, const floating* bias, bint silu,
                         const floating* state, const int64_t* lengths,
                         const unsigned char* reset, const floating* dy,
                         const floating* dstate, floating* out, floating* out_state,
                         floating* dwp, floating* dbp, floating* buf) noexcept nogil:
    cdef Py_ssize_t b = job // nblk, c0 = (job % nblk) * nb
    if backward:
        backward_job(b, c0, min(nb, C - c0), nb, T, C, K, x, wT, bias, silu, state, lengths,
                     reset, dy, dstate, out, dwp, dbp, out_state, buf)
    else:
        forward_job(b, c0, min(nb, C - c0), nb, T, C, K, x, wT, bias, silu, state, lengths,
                    reset, out, out_state, buf)


cdef int backward_impl(Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t K,
                       const floating* x, const floating* w, const floating* bias, bint silu,
                       const floating* state, const int64_t* lengths,
                       const unsigned char* reset, const floating* dy, const floating* dstate,
                       floating* dx, floating* dw, floating* db, floating* dstate0,
                       int num_threads) noexcept nogil:
    """0, or -1 when scratch memory could not be had."""
    cdef Py_ssize_t nb = block_size(B, C, num_threads)
    cdef Py_ssize_t b, c, j
    cdef int failed
    cdef floating acc
    # one block: the transposed weight [K, C], per-row sums dwp [B, K, C] and dbp [B, C]
    cdef floating* wT = <floating*> scratch_alloc((K * C + B * K * C + B * C) * sizeof(floating))
    cdef floating* dwp = wT + K * C
    cdef floating* dbp = dwp + B * K * C
    if wT == NULL:
        return -1
    transpose_weight(w, wT, C, K)
    failed = run_jobs(True, B, T, C, K, nb, num_threads, x, wT, bias, silu, state, lengths,
                      reset, dy, dstate, dx, dstate0, dwp, dbp)
    if not failed:                      # sums over rows, in row order
        for c in range(C):
            for j in range(K):
                acc = 0
                for b in range(B):
                    acc += dwp[(b * K + j) * C + c]
                dw[c * K + j] = acc
            acc = 0
            for b in range(B):
                acc += dbp[b * C + c]
            db[c] = acc
    scratch_free(wT)
    return failed


def causal_conv1d_backward(cnp.ndarray x, cnp.ndarray weight, object bias, bint silu,
                           cnp.ndarray state, object lengths, object reset, cnp.ndarray dy,
                           cnp.ndarray dstate, cnp.ndarray dx, cnp.ndarray dweight,
                           cnp.ndarray dbias, cnp.ndarray dstate0, int num_threads):
    """Fill dx [B, T, C], dweight [C, K], dbias [C] and dstate0 [B, C, K-1] from the
    cotangents dy [B, T, C] and dstate [B, C, K-1] of the forward's outputs."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], C = x.shape[2], K = weight.shape[1]
    cdef void* px = data(x)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef void* ps = data(state)
    cdef const int64_t* pl = <const int64_t*> data(lengths)
    cdef const unsigned char* pr = <const unsigned char*> data(reset)
    cdef void* pdy = data(dy)
    cdef void* pds = data(dstate)
    cdef void* pdx = data(dx)
    cdef void* pdw = data(dweight)
    cdef void* pdb = data(dbias)
    cdef void* pds0 = data(dstate0)
    cdef int status
    if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
        with nogil:
            status = backward_impl(B, T, C, K, <double*> px, <double*> pw, <double*> pb, silu,
                                   <double*> ps, pl, pr, <double*> pdy, <double*> pds,
                                   <double*> pdx, <double*> pdw, <double*> pdb, <double*> pds0,
                                   num_threads)
    else:
        with nogil:
            status = backward_impl(B, T, C, K, <float*> px, <float*> pw, <float*> pb, silu,
                                   <float*> ps, pl, pr, <float*> pdy, <float*> pds,
                                   <float*> pdx, <float*> pdw, <float*> pdb, <float*> pds0,
                                   num_threads)
    if status:
        raise MemoryError("causal_conv1d: could not allocate the kernel's scratch memory")


# ---- one-token decode step ----------------------------------------------------------------------

cdef inline void step_row(Py_ssize_t C, Py_ssize_t K, const floating* x, const floating* w,
                          const floating* bias, bint silu, const floating* state, floating* y,
                          floating* state_out) noexcept nogil:
    # One row: the forward's sum per channel (bias, then the taps j = 0..K-1), accumulated in
    # y a tap at a time so the loops run over channels; then the window shifts by one.  The
    # sums read the whole window before the shift writes it, so state_out may be state.
    cdef Py_ssize_t Km = K - 1, c, j
    if bias != NULL:
        for c in range(C):
            y[c] = bias[c]
    else:
        for c in range(C):
            y[c] = 0
    for j in range(Km):
        for c in range(C):
            y[c] += w[c * K + j] * state[c * Km + j]
    for c in range(C):
        y[c] += w[c * K + Km] * x[c]
    if Km > 0:
        # every value moves one place left; the newest slot of channel c receives from
        # channel c+1's oldest, then x[c] overwrites it
        memmove(state_out, state + 1, (C * Km - 1) * sizeof(floating))
        for c in range(C):
            state_out[c * Km + Km - 1] = x[c]
    if silu:
        silu_row(y, C)


cdef void step_rows(Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t C, Py_ssize_t K,
                    const floating* x, const floating* w, const floating* bias, bint silu,
                    const floating* state, floating* y, floating* state_out) noexcept nogil:
    # Mamba's kernel sizes get constant K, so the strided tap loops vectorise
    cdef Py_ssize_t b, off
    for b in range(b0, b1):
        off = b * C * (K - 1)
        if K == 4:
            step_row(C, 4, x + b * C, w, bias, silu, state + off, y + b * C, state_out + off)
        elif K == 3:
            step_row(C, 3, x + b * C, w, bias, silu, state + off, y + b * C, state_out + off)
        elif K == 2:
            step_row(C, 2, x + b * C, w, bias, silu, state + off, y + b * C, state_out + off)
        else:
            step_row(C, K, x + b * C, w, bias, silu, state + off, y + b * C, state_out + off)


cdef void step_impl(Py_ssize_t B, Py_ssize_t C, Py_ssize_t K, const floating* x,
                    const floating* w, const floating* bias, bint silu, const floating* state,
                    floating* y, floating* state_out, int num_threads) noexcept nogil:
    cdef int threads = useful_threads(num_threads, B, B * C * K)
    cdef Py_ssize_t b
    if threads == 1:
        step_rows(0, B, C, K, x, w, bias, silu, state, y, state_out)
    else:
        for b in prange(B, schedule="static", num_threads=threads):
            step_rows(b, b + 1, C, K, x, w, bias, silu, state, y, state_out)


def causal_conv1d_step(cnp.ndarray x, cnp.ndarray weight, object bias, bint silu,
                       cnp.ndarray state, cnp.ndarray y, cnp.ndarray state_out,
                       int num_threads):
    """One step (x [B, 1, C]): fill y [B, 1, C] and state_out [B, C, K-1] (may be state)."""
    cdef Py_ssize_t B = x.shape[0], C = x.shape[2], K = weight.shape[1]
    cdef void* px = data(x)
    cdef void* pw = data(weight)
    cdef void* pb = data(bias)
    cdef void* ps = data(state)
    cdef void* py = data(y)
    cdef void* pso = data(state_out)
    if cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE:
        with nogil:
            step_impl(B, C, K, <double*> px, <double*> pw, <double*> pb, silu, <double*> ps,
                      <double*> py, <double*> pso, num_threads)
    else:
        with nogil:
            step_impl(B, C, K, <float*> px, <float*> pw, <float*> pb, silu, <float*> ps,
                      <float*> py, <float*> pso, num_threads)
