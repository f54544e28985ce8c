# Linear scans: the diagonal recurrence h_t = a_t*h_{t-1} + b_t and Mamba-1's selective scan.
# Both are sequential in time and independent across (batch row, channel): a job is one batch
# row and a block of channels, runs all T steps, and vectorises over the channels of its block.
# A job's arithmetic does not depend on the number of jobs or threads, so results are
# bit-identical for any thread count; sums over channels or batch rows that the backward
# needs are written per job and added in a fixed order by the caller.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdint cimport int64_t
from libc.math cimport sqrt

from _math cimport exp_clamped, sigmoid, softplus
from _scratch cimport scratch_alloc, scratch_free
from _arrays cimport c_array, data, float_type

cimport numpy as cnp

cnp.import_array()

cdef enum:
    W = 16          # selective scan: channels per block (= SS_W of _scan_simd.h)
    GROUP = 4       # selective scan backward: blocks per job (dB/dC partial sums per group)
    SC = 64         # selective scan decode step: channels per job
    MIN_WORK_PER_THREAD = 32768     # elements (linear scan) or element-states (decode step)


# ---- diagonal linear scan --------------------------------------------------------------------
# (Jobs are handed out dynamically here and in the selective scan: with `lengths` their costs
# differ, and a job's arithmetic does not depend on which thread runs it.)
# The one compiled diagonal scan: linear_scan and matrix_scan's diagonal case.  A job is one
# batch row and a contiguous range of channels: as few ranges per row as keep every thread
# busy, so each step reads and writes long contiguous runs (elementwise work: results do not
# depend on the split).  A row runs its `lengths[r]` valid steps only, in processing order
# (backwards in time when `reverse`: pointer arithmetic, no copy); padded steps get h = 0.
# matrix_scan may also split long sequences into `nseg` time segments of fixed length
# ceil(T / nseg): every segment but the first composes its steps into one affine map
# h_end = p*h_start + v, the segment carries are chained, and every segment but the first is
# re-run from its carry.  nseg comes from the caller (a function of the shape), never from
# the thread count, so results are bit-identical for any number of threads.

# data pointers of the optional arrays (NULL for None)
cdef inline const int64_t* lengths_ptr(const int64_t[::1] v):
    if v is None:
        return NULL
    return &v[0]


cdef inline const unsigned char* reset_ptr(const unsigned char[:, ::1] v):
    if v is None:
        return NULL
    return &v[0, 0]


cdef inline const floating* vec_ptr(const floating[::1] v):
    if v is None:
        return NULL
    return &v[0]


cdef inline const floating* seq_ptr(const floating[:, :, ::1] v):
    if v is None:
        return NULL
    return &v[0, 0, 0]


cdef inline Py_ssize_t channels_per_job(Py_ssize_t B, Py_ssize_t D,
                                        int num_threads) noexcept nogil:
    cdef Py_ssize_t parts = max(1, (num_threads + B - 1) // B)
    return max(1, (((D + parts - 1) // parts + 15) // 16) * 16)


cdef inline int useful_threads(int num_threads, Py_ssize_t jobs, Py_ssize_t work) noexcept nogil:
    # waking a thread team costs microseconds: only with several jobs and enough work
    return <int> max(1, min(<Py_ssize_t> num_threads, min(jobs, work // MIN_WORK_PER_THREAD)))


cdef inline Py_ssize_t step_time(Py_ssize_t p, Py_ssize_t L, bint reverse) noexcept nogil:
    # time index of a row's p-th processed step (L valid steps)
    return L - 1 - p if reverse else p


cdef void diag_run(Py_ssize_t nc, Py_ssize_t p0, Py_ssize_t p1, Py_ssize_t L, bint reverse,
                   Py_ssize_t D, const floating* a, const floating* b, const unsigned char* rs,
                   const floating* start, floating* h) noexcept nogil:
    # Processed steps p0..p1-1 of one row (a, b, h point at [row, t=0, first channel]; rs at
    # reset[row, 0] or NULL) from the state `start`: h_t = a_t*h_prev + b_t, h_prev = 0 at a
    # reset (a_t*0 + b_t, so a non-finite a_t propagates as in the reference).
    cdef Py_ssize_t p, t, i
    cdef const floating* prev = start
    cdef const floating* ap
    cdef const floating* bp
    cdef floating* hp
    cdef floating zero = 0
    for p in range(p0, p1):
        t = step_time(p, L, reverse)
        ap = a + t * D
        bp = b + t * D
        hp = h + t * D
        if rs != NULL and rs[t]:
            for i in range(nc):
                hp[i] = ap[i] * zero + bp[i]
        else:
            for i in range(nc):
                hp[i] = ap[i] * prev[i] + bp[i]
        prev = hp


cdef void diag_compose(Py_ssize_t nc, Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t D,
                       const floating* a, const floating* b, floating* p,
                       floating* v) noexcept nogil:
    # the affine map of steps [t0, t1): h_end = p*h_start + v
    cdef Py_ssize_t t, i
    for i in range(nc):
        p[i] = 1
        v[i] = 0
    for t in range(t0, t1):
        for i in range(nc):
            v[i] = a[t * D + i] * v[i] + b[t * D + i]
            p[i] = a[t * D + i] * p[i]


cdef inline void zero_rows(floating* h, Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t D,
                           Py_ssize_t nc) noexcept nogil:
    cdef Py_ssize_t t, i
    for t in range(t0, t1):
        for i in range(nc):
            h[t * D + i] = 0


def linear_scan(const floating[:, :, ::1] a, const floating[:, :, ::1] b,
                const floating[:, ::1] state, const int64_t[::1] lengths,
                const unsigned char[:, ::1] reset, bint reverse, Py_ssize_t nseg,
                floating[:, :, ::1] h, int num_threads):
    """h [B,T,D] = the scan h_t = a_t*h_{t-1} + b_t of a, b [B,T,D] from state [B,D].

    lengths int64 [B] or None (T for every row), reset uint8 [B,T] or None, reverse: see
    statescan.linear_scan.  nseg >= 1 time segments (only without lengths, reset, reverse).
    Requires B, T, D >= 1.
    """
    cdef Py_ssize_t B = b.shape[0], T = b.shape[1], D = b.shape[2]
    cdef Py_ssize_t L = (T + nseg - 1) // nseg
    cdef int threads = useful_threads(num_threads, B * nseg * ((D + 15) // 16), B * T * D)
    cdef Py_ssize_t LB = channels_per_job(B, D, threads)
    cdef Py_ssize_t nblk = (D + LB - 1) // LB
    cdef Py_ssize_t jobs = B * nblk
    cdef Py_ssize_t job, seg, r, d0, nc, Lr, t0, i, base
    cdef const int64_t* lp = lengths_ptr(lengths)
    cdef const unsigned char* rp = reset_ptr(reset)
    cdef const unsigned char* rs
    cdef floating* p = NULL
    cdef floating* v = NULL
    cdef floating* carry = NULL
    nseg = (T + L - 1) // L
    if nseg > 1 and (lp != NULL or rp != NULL or reverse):
        raise ValueError("time segments need every row forward, without lengths or reset")
    if nseg > 1:
        p = <floating*> scratch_alloc(B * nseg * D * sizeof(floating))
        v = <floating*> scratch_alloc(B * nseg * D * sizeof(floating))
        carry = <floating*> scratch_alloc(B * nseg * D * sizeof(floating))
        if p == NULL or v == NULL or carry == NULL:
            scratch_free(p); scratch_free(v); scratch_free(carry)
            raise MemoryError(f"linear_scan: no memory for {nseg} time segments of "
                              f"[{B}, {D}] carries")
    with nogil:
        for job in prange(jobs * nseg, schedule="dynamic", num_threads=threads):
            seg = job % nseg
            r = job // nseg // nblk
            d0 = job // nseg % nblk * LB
            nc = min(LB, D - d0)
            Lr = lp[r] if lp != NULL else T
            rs = rp + r * T if rp != NULL else NULL
            if nseg == 1:
                diag_run(nc, 0, Lr, Lr, reverse, D, &a[r, 0, d0], &b[r, 0, d0], rs,
                         &state[r, d0], &h[r, 0, d0])
                zero_rows(&h[r, 0, d0], Lr, T, D, nc)
            elif seg == 0:
                diag_run(nc, 0, L, T, False, D, &a[r, 0, d0], &b[r, 0, d0], NULL,
                         &state[r, d0], &h[r, 0, d0])
            else:
                base = (r * nseg + seg) * D + d0
                diag_compose(nc, seg * L, min(T, seg * L + L), D, &a[r, 0, d0],
                             &b[r, 0, d0], p + base, v + base)
        if nseg > 1:
            for job in prange(jobs, schedule="static", num_threads=threads):
                r = job // nblk
                d0 = job % nblk * LB
                nc = min(LB, D - d0)
                base = r * nseg * D + d0
                for i in range(nc):
                    carry[base + D + i] = h[r, L - 1, d0 + i]
                for seg in range(2, nseg):
                    for i in range(nc):
                        carry[base + seg * D + i] = (p[base + (seg - 1) * D + i]
                                                     * carry[base + (seg - 1) * D + i]
                                                     + v[base + (seg - 1) * D + i])
            for job in prange(jobs * nseg, schedule="static", num_threads=threads):
                seg = job % nseg
                if seg == 0:
                    continue
                r = job // nseg // nblk
                d0 = job // nseg % nblk * LB
                t0 = seg * L
                diag_run(min(LB, D - d0), t0, min(T, t0 + L), T, False, D, &a[r, 0, d0],
                         &b[r, 0, d0], NULL, carry + (r * nseg + seg) * D + d0, &h[r, 0, d0])
    scratch_free(p)
    scratch_free(v)
    scratch_free(carry)


def linear_scan_backward(const floating[:, :, ::1] a, const floating[:, ::1] state,
                         const int64_t[::1] lengths, const unsigned char[:, ::1] reset,
                         bint reverse, const floating[:, :, ::1] h,
                         const floating[:, :, ::1] dh, floating[:, :, ::1] da,
                         floating[:, :, ::1] db, floating[:, ::1] dstate, int num_threads):
    """Gradients of sum(dh*h) for h = linear_scan(a, b, state, lengths, reset, reverse):
    da, db [B,T,D], dstate [B,D].

    In processing order, db_t = dh_t + a_next*db_next (the gradient reaching h_t from the
    step processed after it, none across a reset there); da_t = db_t*h_prev.  Padded steps
    get 0.  Requires B, T, D >= 1.
    """
    cdef Py_ssize_t B = h.shape[0], T = h.shape[1], D = h.shape[2]
    cdef int threads = useful_threads(num_threads, B * ((D + 15) // 16), B * T * D)
    cdef Py_ssize_t LB = channels_per_job(B, D, threads)
    cdef Py_ssize_t nblk = (D + LB - 1) // LB
    cdef Py_ssize_t job, r, d0, nd, q, t, tn, d, Lr
    cdef const int64_t* lp = lengths_ptr(lengths)
    cdef const unsigned char* rp = reset_ptr(reset)
    cdef const unsigned char* rs
    cdef bint carried, at_reset
    cdef floating zero = 0
    cdef const floating* an
    cdef const floating* hprev
    cdef const floating* dhp
    cdef floating* g
    cdef floating* gn
    cdef floating* dap
    with nogil:
        for job in prange(B * nblk, schedule="dynamic", num_threads=threads):
            r = job // nblk
            d0 = (job % nblk) * LB
            nd = min(LB, D - d0)
            Lr = lp[r] if lp != NULL else T
            rs = rp + r * T if rp != NULL else NULL
            zero_rows(&da[r, 0, d0], Lr, T, D, nd)
            zero_rows(&db[r, 0, d0], Lr, T, D, nd)
            carried = False
            tn = 0
            for q in range(Lr - 1, -1, -1):
                t = step_time(q, Lr, reverse)
                dhp = &dh[r, t, d0]
                g = &db[r, t, d0]
                dap = &da[r, t, d0]
                if carried:
                    an = &a[r, tn, d0]
                    gn = &db[r, tn, d0]
                    for d in range(nd):
                        g[d] = dhp[d] + an[d] * gn[d]
                else:
                    for d in range(nd):
                        g[d] = dhp[d]
                at_reset = rs != NULL and rs[t]
                if at_reset:
                    for d in range(nd):
                        dap[d] = g[d] * zero
                else:
                    hprev = &h[r, step_time(q - 1, Lr, reverse), d0] if q > 0 else &state[r, d0]
                    for d in range(nd):
                        dap[d] = g[d] * hprev[d]
                carried = not at_reset
                tn = t
            if carried:
                an = &a[r, tn, d0]
                g = &db[r, tn, d0]
                for d in range(nd):
                    dstate[r, d0 + d] = an[d] * g[d]
            else:
                for d in range(nd):
                    dstate[r, d0 + d] = 0


# ---- selective scan: one block of W channels of one batch row ---------------------------------
# Per-block layout: state h[n*W + j] (state n of channel d0+j), A likewise; vectors of W lanes
# are zero-padded past the last channel (delta = 0 there, so padded lanes stay 0).

cdef inline void load_row(floating* dst, const floating* src, Py_ssize_t nw) noexcept nogil:
    cdef Py_ssize_t j
    if nw == W:
        for j in range(W):
            dst[j] = src[j]
    else:
        for j in range(W):
            dst[j] = src[j] if j < nw else 0


cdef inline void store_row(floating* dst, const floating* src, Py_ssize_t nw) noexcept nogil:
    cdef Py_ssize_t j
    if nw == W:
        for j in range(W):
            dst[j] = src[j]
    else:
        for j in range(nw):
            dst[j] = src[j]


cdef inline void load_block(floating* dst, const floating* src, Py_ssize_t N,
                            Py_ssize_t nw) noexcept nogil:
    # src [nw, N] row-major (channels x states) -> dst [N, W]
    cdef Py_ssize_t j, n
    for n in range(N):
        for j in range(W):
            dst[n * W + j] = src[j * N + n] if j < nw else 0


cdef inline void store_block(floating* dst, const floating* src, Py_ssize_t N,
                             Py_ssize_t nw) noexcept nogil:
    cdef Py_ssize_t j, n
    for j in range(nw):
        for n in range(N):
            dst[j * N + n] = src[n * W + j]


cdef extern from "_scan_simd.h":
    int SS_HAVE_VECTOR
    void ss_reverse_f(float* g, float* dAacc, float* gB, float* dde, const float* ht,
                      const float* hp, const float* et, const float* At, const float* dl,
                      const float* u, const float* dy0, const float* Bt, const float* Ct,
                      float* dB_row, float* dC_row, Py_ssize_t N, Py_ssize_t nw) noexcept nogil
    void ss_reverse_d(double* g, double* dAacc, double* gB, double* dde, const double* ht,
                      const double* hp, const double* et, const double* At, const double* dl,
                      const double* u, const double* dy0, const double* Bt, const double* Ct,
                      double* dB_row, double* dC_row, Py_ssize_t N,
                      Py_ssize_t nw) noexcept nogil
    void ss_advance_f(float* h, const float* e, float* acc, const float* u, const float* Bt,
                      const float* Ct, Py_ssize_t N, Py_ssize_t nw) noexcept nogil
    void ss_advance_d(double* h, const double* e, double* acc, const double* u,
                      const double* Bt, const double* Ct, Py_ssize_t N,
                      Py_ssize_t nw) noexcept nogil


# Rows of n values through _math's functions: n is a run-time count (whole rows of the
# forward, whole chunks of the backward), so the loop vectoriser if-converts the functions'
# selects; a constant 16-lane loop would be unrolled first and stay scalar.
cdef void softplus_row(floating* out, const floating* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = softplus(v[j])


cdef void sigmoid_row(floating* out, const floating* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = sigmoid(v[j])


cdef void decays(floating* e, const floating* At, const floating* dl,
                 Py_ssize_t N) noexcept nogil:
    # e[n, j] = exp(delta_j * A[n, j]) for every state n, through local arrays, which the
    # compiler knows alias nothing: each state's 16 lanes vectorise without run-time checks.
    # (GCC 12 keeps this 16-lane loop a loop and vectorises it; with other bodies it has
    # unrolled such loops first and left them scalar, see softplus_row: after changing
    # exp_clamped, check with -fopt-info-vec.)
    cdef floating d[W]
    cdef floating tmp[W]
    cdef Py_ssize_t n, j
    for j in range(W):
        d[j] = dl[j]
    for n in range(N):
        for j in range(W):
            tmp[j] = exp_clamped(d[j] * At[n * W + j])
        for j in range(W):
            e[n * W + j] = tmp[j]


cdef inline void advance(floating* h, const floating* e, floating* acc, const floating* u,
                         const floating* Bt, const floating* Ct, Py_ssize_t N,
                         Py_ssize_t nw) noexcept nogil:
    # One step for every state n, given its decays e[n] (from `decays`):
    # h[n] = e[n]*h[n] + u*B_t[n], acc += C_t[n]*h[n]; lanes >= nw (padding) kept at 0.
    # _scan_simd.h has the same loop in vector types (registers across n); this is the
    # portable version of it.
    cdef Py_ssize_t n, j
    cdef floating bn, cn
    if SS_HAVE_VECTOR:
        if floating is float:
            ss_advance_f(h, e, acc, u, Bt, Ct, N, nw)
        else:
            ss_advance_d(h, e, acc, u, Bt, Ct, N, nw)
        return
    for n in range(N):
        bn = Bt[n]
        cn = Ct[n]
        for j in range(W):
            h[n * W + j] = e[n * W + j] * h[n * W + j] + u[j] * bn
            if j >= nw:
                h[n * W + j] = 0
            acc[j] += cn * h[n * W + j]


# A step's per-channel work before and after the states, shared by the blocked forward and the
# decode step (so both give the same bits).  Channels 0..nc-1 are read; the arithmetic runs
# over n >= nc lanes (the forward's zero-padded block rows: their v, xv stay as they are).

cdef inline void step_inputs(Py_ssize_t nc, Py_ssize_t n, const floating* dt,
                             const floating* x, const floating* bias, const floating* Dv,
                             bint softplus, floating* v, floating* xv, floating* dl,
                             floating* u, floating* acc) noexcept nogil:
    # delta = dt + bias (through softplus), u = delta * x, acc = D * x (bias, Dv may be NULL)
    cdef Py_ssize_t j
    cdef floating zero = 0
    for j in range(nc):
        v[j] = dt[j] + (bias[j] if bias != NULL else zero)
        xv[j] = x[j]
    if softplus:
        softplus_row(dl, v, n)
    else:
        for j in range(n):
            dl[j] = v[j]
    for j in range(n):
        u[j] = dl[j] * xv[j]
        acc[j] = Dv[j] * xv[j] if Dv != NULL else zero      # (no 0*x: x may be inf)


cdef inline void gate_store(Py_ssize_t nc, Py_ssize_t n, const floating* z, floating* zv,
                            floating* s, floating* acc, floating* y) noexcept nogil:
    # y = acc * silu(z) (z may be NULL: y = acc); zv, s: n lanes of scratch
    cdef Py_ssize_t j
    if z != NULL:
        for j in range(nc):
            zv[j] = z[j]
        sigmoid_row(s, zv, n)
        for j in range(nc):
            acc[j] = acc[j] * zv[j] * s[j]
    for j in range(nc):
        y[j] = acc[j]


cdef inline Py_ssize_t blocks(Py_ssize_t Dm) noexcept nogil:
    return (Dm + W - 1) // W


cdef inline Py_ssize_t checkpoint_interval(Py_ssize_t T) noexcept nogil:
    # steps per recomputed chunk of the backward: about sqrt(T), so the checkpoints and the
    # chunk's recomputed states both take O(sqrt(T)) memory per block
    return max(16, <Py_ssize_t> sqrt(<double> T))


def checkpoint_shape(Py_ssize_t Bt, Py_ssize_t T, Py_ssize_t Dm, Py_ssize_t N):
    """Shape of selective_forward's ckpt array."""
    K = checkpoint_interval(T)
    return (Bt, blocks(Dm), (T + K - 1) // K, N, W)


cdef void sel_forward_group(Py_ssize_t r, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t T,
                            Py_ssize_t Lr, bint reverse, const unsigned char* rs,
                            Py_ssize_t Dm, Py_ssize_t N, const floating* x, const floating* dt,
                            const floating* A, const floating* Bm, const floating* C,
                            const floating* Dp, const floating* z, const floating* bias_p,
                            bint softplus, const floating* state0, floating* y,
                            floating* state_out, floating* ckpt, Py_ssize_t K,
                            floating* scratch) noexcept nogil:
    # Blocks k0..k1-1 of batch row r, which has Lr valid steps (processed backwards in time
    # when `reverse`; rs = the row's resets or NULL).  Each step first prepares the step's
    # rows for all the group's channels (contiguous reads of x, dt, z; one vectorised
    # softplus), then advances the blocks one by one (a block per job would read memory with
    # stride Dm).  With ckpt (not NULL), the state before every K-th processed step p is
    # saved for the backward: ckpt[r, k, p // K] (the layout of selective_scan).
    cdef Py_ssize_t NW = N * W, nb = k1 - k0, L = nb * W
    cdef Py_ssize_t c0 = k0 * W, nc = min(L, Dm - c0)
    cdef floating* h = scratch                # [nb, N, W] states
    cdef floating* At = h + nb * NW           # [nb, N, W]
    cdef floating* Dv = At + nb * NW          # [L] rows of the group's channels, zero-padded
    cdef floating* bias = Dv + L
    cdef floating* v = bias + L
    cdef floating* dl = v + L
    cdef floating* xv = dl + L
    cdef floating* u = xv + L
    cdef floating* acc = u + L
    cdef floating* e = acc + L                # [N, W] one block's decays
    cdef floating dl_k[W]
    cdef floating u_k[W]
    cdef floating acc_k[W]
    cdef Py_ssize_t t, p, j, k, row, d0
    for k in range(nb):
        d0 = c0 + k * W
        load_block(At + k * NW, A + d0 * N, N, min(<Py_ssize_t> W, Dm - d0))
        load_block(h + k * NW, state0 + (r * Dm + d0) * N, N, min(<Py_ssize_t> W, Dm - d0))
    for j in range(L):
        Dv[j] = Dp[c0 + j] if (Dp != NULL and j < nc) else 0
        bias[j] = bias_p[c0 + j] if (bias_p != NULL and j < nc) else 0
        v[j] = 0
        xv[j] = 0
    cdef Py_ssize_t nblk = blocks(Dm), nchunks = (T + K - 1) // K
    for p in range(Lr):
        t = step_time(p, Lr, reverse)
        if ckpt != NULL and p % K == 0:
            for k in range(nb):
                for j in range(NW):
                    ckpt[((r * nblk + k0 + k) * nchunks + p // K) * NW + j] = h[k * NW + j]
        if rs != NULL and rs[t]:
            for j in range(nb * NW):
                h[j] = 0
        row = (r * T + t) * Dm + c0
        step_inputs(nc, L, dt + row, x + row, bias, Dv if Dp != NULL else NULL, softplus, v,
                    xv, dl, u, acc)
        for k in range(nb):
            # local copies: the compiler then knows they alias nothing and keeps them in
            # registers through the N states
            for j in range(W):
                dl_k[j] = dl[k * W + j]
                u_k[j] = u[k * W + j]
                acc_k[j] = acc[k * W + j]
            decays(e, At + k * NW, dl_k, N)
            advance(h + k * NW, e, acc_k, u_k, Bm + (r * T + t) * N, C + (r * T + t) * N, N,
                    min(<Py_ssize_t> W, Dm - c0 - k * W))
            for j in range(W):
                acc[k * W + j] = acc_k[j]
        gate_store(nc, L, z + row if z != NULL else NULL, xv, u, acc, y + row)
    for t in range(Lr, T):
        for j in range(nc):
            y[(r * T + t) * Dm + c0 + j] = 0
    for k in range(nb):
        d0 = c0 + k * W
        store_block(state_out + (r * Dm + d0) * N, h + k * NW, N, min(<Py_ssize_t> W, Dm - d0))


def selective_scan(const floating[:, :, ::1] x, const floating[:, :, ::1] dt,
                   const floating[:, ::1] A, const floating[:, :, ::1] Bm,
                   const floating[:, :, ::1] C, const floating[::1] D,
                   const floating[:, :, ::1] z, const floating[::1] dt_bias, bint softplus,
                   const floating[:, :, ::1] state0, const int64_t[::1] lengths,
                   const unsigned char[:, ::1] reset, bint reverse, bint save,
                   floating[:, :, ::1] y, floating[:, :, ::1] state_out,
                   floating[:, :, :, :, ::1] ckpt, int num_threads):
    """Selective scan over x, dt, z [Bt,T,Dm]; A [Dm,N]; Bm, C [Bt,T,N]; D, dt_bias [Dm] or
    None; z None or [Bt,T,Dm]; state0 [Bt,Dm,N]; lengths int64 [Bt], reset uint8 [Bt,T] or
    None.  Writes y [Bt,T,Dm] and state_out [Bt,Dm,N], and when `save` the checkpoints
    selective_scan_backward needs: ckpt [Bt, blocks, ceil(T/K), N, W] (K =
    checkpoint_interval(T), blocks = ceil(Dm/W)); else ckpt is None.
    Requires Bt, T, Dm, N >= 1."""
    cdef Py_ssize_t Bt = x.shape[0], T = x.shape[1], Dm = x.shape[2], N = A.shape[1]
    cdef Py_ssize_t nblk = blocks(Dm)
    # groups of blocks per batch row: as few as keep every thread busy (fewer, longer rows
    # stream better); results do not depend on the grouping
    cdef Py_ssize_t groups = min(nblk, max(1, (num_threads + Bt - 1) // Bt))
    cdef Py_ssize_t gb = (nblk + groups - 1) // groups
    cdef Py_ssize_t job, r, k0, Lr
    cdef int failed = 0
    cdef const floating* Dp = vec_ptr(D)
    cdef const floating* bp = vec_ptr(dt_bias)
    cdef const floating* zp = seq_ptr(z)
    cdef const int64_t* lp = lengths_ptr(lengths)
    cdef const unsigned char* rp = reset_ptr(reset)
    cdef const unsigned char* rs
    cdef floating* scratch = NULL
    cdef floating* cp = NULL
    if save:
        cp = &ckpt[0, 0, 0, 0, 0]
    with nogil, parallel(num_threads=num_threads):
        scratch = <floating*> scratch_alloc(((2 * gb + 1) * N * W + 7 * gb * W)
                                            * sizeof(floating))
        for job in prange(Bt * groups, schedule="dynamic"):
            r = job // groups
            k0 = (job % groups) * gb
            if scratch == NULL:
                failed += 1
            elif k0 < nblk:
                # (assigned here, not through a pointer: prange makes a variable private
                # only when the loop body assigns it -- Lr and rs were shared, a race)
                Lr = lp[r] if lp != NULL else T
                rs = rp + r * T if rp != NULL else NULL
                sel_forward_group(r, k0, min(nblk, k0 + gb), T, Lr, reverse, rs, Dm, N,
                                  &x[0, 0, 0], &dt[0, 0, 0], &A[0, 0], &Bm[0, 0, 0],
                                  &C[0, 0, 0], Dp, zp, bp, softplus, &state0[0, 0, 0],
                                  &y[0, 0, 0], &state_out[0, 0, 0], cp,
                                  checkpoint_interval(T), scratch)
        scratch_free(scratch)
    if failed:
        raise MemoryError(f"selective_scan: no memory for the per-thread scratch "
                          f"({gb} blocks of [N, W] = [{N}, {W}] states)")


# ---- selective scan: one decode step ---------------------------------------------------------
# T = 1 with a state: the state is read and written in its public layout [Bt, Dm, N] (each
# channel's N states contiguous), without the blocked kernel's per-call transposes of A and
# the state.  The arithmetic is the blocked kernel's, operation for operation (decays with
# exp_clamped, h = e*h + u*B, y = D*x + sum_n C[n]*h[n] in order n = 0..N-1, then the gate),
# so a step gives the same bits as selective_scan on that one step: chunked calls and decoding
# equal one call.  state_out may be the state array itself (an in-place update).

cdef void step_channels(Py_ssize_t r, Py_ssize_t c0, Py_ssize_t nc, Py_ssize_t Dm,
                        Py_ssize_t N, const floating* x, const floating* dt,
                        const floating* A, const floating* Bm, const floating* C,
                        const floating* Dp, const floating* z, const floating* bias_p,
                        bint softplus, const floating* state, floating* y,
                        floating* state_out) noexcept nogil:
    # channels c0..c0+nc-1 (nc <= SC) of batch row r
    cdef floating v[SC]
    cdef floating dl[SC]
    cdef floating u[SC]
    cdef floating acc[SC]
    cdef floating xv[SC]
    cdef floating e[SC]
    cdef Py_ssize_t j, n, n0, m, row = r * Dm + c0
    cdef const floating* Bt = Bm + r * N
    cdef const floating* Ct = C + r * N
    cdef const floating* hin
    cdef const floating* arow
    cdef floating* hout
    cdef floating dlj, uj
    step_inputs(nc, nc, dt + row, x + row, bias_p + c0 if bias_p != NULL else NULL,
                Dp + c0 if Dp != NULL else NULL, softplus, v, xv, dl, u, acc)
    for j in range(nc):
        hin = state + (row + j) * N
        hout = state_out + (row + j) * N
        arow = A + (c0 + j) * N
        dlj = dl[j]
        uj = u[j]
        for n0 in range(0, N, 64):         # SC states at a time through e
            m = min(<Py_ssize_t> SC, N - n0)
            for n in range(m):
                e[n] = exp_clamped(dlj * arow[n0 + n])
            for n in range(m):
                hout[n0 + n] = e[n] * hin[n0 + n] + uj * Bt[n0 + n]
    # the output sums, one independent chain per channel
    for n in range(N):
        for j in range(nc):
            acc[j] += Ct[n] * state_out[(row + j) * N + n]
    gate_store(nc, nc, z + row if z != NULL else NULL, xv, u, acc, y + row)


cdef void step_impl(Py_ssize_t Bt, Py_ssize_t Dm, Py_ssize_t N, const floating* x,
                    const floating* dt, const floating* A, const floating* Bm,
                    const floating* C, const floating* Dp, const floating* zp,
                    const floating* bp, bint softplus, const floating* state, floating* y,
                    floating* state_out, int num_threads) noexcept nogil:
    cdef Py_ssize_t nchunk = (Dm + SC - 1) // SC
    cdef int threads = useful_threads(num_threads, Bt * nchunk, Bt * Dm * N)
    cdef Py_ssize_t job, r, c0
    if threads == 1:                     # no parallel region: decoding is latency-bound
        for job in range(Bt * nchunk):
            r = job // nchunk
            c0 = (job % nchunk) * SC
            step_channels(r, c0, min(<Py_ssize_t> SC, Dm - c0), Dm, N, x, dt, A, Bm, C, Dp,
                          zp, bp, softplus, state, y, state_out)
    else:
        for job in prange(Bt * nchunk, schedule="static", num_threads=threads):
            r = job // nchunk
            c0 = (job % nchunk) * SC
            step_channels(r, c0, min(<Py_ssize_t> SC, Dm - c0), Dm, N, x, dt, A, Bm, C, Dp,
                          zp, bp, softplus, state, y, state_out)


def selective_step(x, dt, A, Bm, C, D, z, dt_bias, bint softplus, state, y, state_out,
                   int num_threads):
    """One step of the selective scan: x, dt, z [Bt,1,Dm]; A [Dm,N]; Bm, C [Bt,1,N]; D,
    dt_bias [Dm] or None; state [Bt,Dm,N].  Writes y [Bt,1,Dm] and state_out [Bt,Dm,N]
    (which may be `state` itself).  Every array C-contiguous, one float dtype (checked here);
    the caller checks the sizes.  Requires Bt, Dm, N >= 1.  The arrays are read through their
    pointers (see _arrays.pxd: this kernel is a decoding loop's, where typed memoryviews would
    cost more than the step)."""
    cdef int t = float_type(x)
    if not (t >= 0 and c_array(x, t, 3) and c_array(dt, t, 3) and c_array(A, t, 2)
            and c_array(Bm, t, 3) and c_array(C, t, 3) and (D is None or c_array(D, t, 1))
            and (z is None or c_array(z, t, 3)) and (dt_bias is None or c_array(dt_bias, t, 1))
            and c_array(state, t, 3) and c_array(y, t, 3, True)
            and c_array(state_out, t, 3, True)):
        raise ValueError("selective_step: C-contiguous arrays of one float dtype, x, dt, Bm, "
                         "C, z, state, y, state_out 3-d, A 2-d, D, dt_bias 1-d, y and "
                         "state_out writeable")
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(<cnp.ndarray> x)
    cdef Py_ssize_t Bt = shape[0], Dm = shape[2], N = cnp.PyArray_DIM(<cnp.ndarray> A, 1)
    if shape[1] != 1:
        raise ValueError("selective_step takes one time step")
    cdef char* px = data(x)
    cdef char* pdt = data(dt)
    cdef char* pA = data(A)
    cdef char* pB = data(Bm)
    cdef char* pC = data(C)
    cdef char* pD = data(D)
    cdef char* pz = data(z)
    cdef char* pb = data(dt_bias)
    cdef char* ps = data(state)
    cdef char* py = data(y)
    cdef char* pso = data(state_out)
    if t == cnp.NPY_FLOAT:
        with nogil:
            step_impl[float](Bt, Dm, N, <float*> px, <float*> pdt, <float*> pA, <float*> pB,
                             <float*> pC, <float*> pD, <float*> pz, <float*> pb, softplus,
                             <float*> ps, <float*> py, <float*> pso, num_threads)
    else:
        with nogil:
            step_impl[double](Bt, Dm, N, <double*> px, <double*> pdt, <double*> pA,
                              <double*> pB, <double*> pC, <double*> pD, <double*> pz,
                              <double*> pb, softplus, <double*> ps, <double*> py,
                              <double*> pso, num_threads)


# ---- selective scan backward ---------------------------------------------------------------
# Reverse-time loop per block.  The forward saved the state before every K-th step
# (checkpoints, K ~ sqrt(T)); chunk by chunk from the end, the chunk's states and decays are
# recomputed from its checkpoint (the same bits as the forward) and walked backwards.
# Memory: O(T/K N) per channel for the checkpoints, O(K N W) per thread for a chunk.

cdef inline floating lane_sum(floating* p) noexcept nogil:
    # sum of W lanes in a fixed pairwise order (vectorises; a serial sum would not)
    cdef Py_ssize_t j
    for j in range(W // 2):
        p[j] += p[j + W // 2]
    for j in range(W // 4):
        p[j] += p[j + W // 4]
    for j in range(W // 8):
        p[j] += p[j + W // 8]
    return p[0] + p[1]


cdef inline void reverse_step(floating* g, floating* dAacc, floating* gB, floating* dde,
                              const floating* ht, const floating* hp, const floating* et,
                              const floating* At, const floating* dl, const floating* u,
                              const floating* dy0, const floating* Bt, const floating* Ct,
                              floating* dB_row, floating* dC_row, Py_ssize_t N,
                              Py_ssize_t nw) noexcept nogil:
    # One step back for every state n, g = the gradient reaching h_t (in: from later steps,
    # out: what reaches h_{t-1}):  g += dy0*C_t[n];  dC_t[n] += sum_j dy0*h_t[n];
    # dB_t[n] += sum_j g*u;  gB = sum_n g*B_t[n];  with dec = g*h_{t-1}[n]*e[n]:
    # dde = sum_n dec*A[n] (d/d delta of the decays), dA[n] += dec*delta;  g *= e[n].
    # Lanes >= nw (padding) of g are kept at 0 (see _scan_simd.h).
    cdef Py_ssize_t n, j
    cdef floating bn, cn, dec
    cdef floating p1[W]
    cdef floating p2[W]
    if SS_HAVE_VECTOR:
        if floating is float:
            ss_reverse_f(g, dAacc, gB, dde, ht, hp, et, At, dl, u, dy0, Bt, Ct, dB_row,
                         dC_row, N, nw)
        else:
            ss_reverse_d(g, dAacc, gB, dde, ht, hp, et, At, dl, u, dy0, Bt, Ct, dB_row,
                         dC_row, N, nw)
        return
    for j in range(W):
        gB[j] = 0
        dde[j] = 0
    for n in range(N):
        bn = Bt[n]
        cn = Ct[n]
        for j in range(W):
            g[n * W + j] += dy0[j] * cn
            if j >= nw:
                g[n * W + j] = 0
            p1[j] = dy0[j] * ht[n * W + j]
            p2[j] = g[n * W + j] * u[j]
        dC_row[n] += lane_sum(p1)
        dB_row[n] += lane_sum(p2)
        for j in range(W):
            gB[j] += g[n * W + j] * bn
            dec = g[n * W + j] * hp[n * W + j] * et[n * W + j]
            dde[j] += dec * At[n * W + j]
            dAacc[n * W + j] += dec * dl[j]
            g[n * W + j] = g[n * W + j] * et[n * W + j]


cdef void sel_backward_block(Py_ssize_t r, Py_ssize_t d0, Py_ssize_t nw, Py_ssize_t T,
                             Py_ssize_t Lr, bint reverse, const unsigned char* rs,
                             Py_ssize_t Dm, Py_ssize_t N, Py_ssize_t K,
                             const floating* x, const floating* dt, const floating* A,
                             const floating* Bm, const floating* C, const floating* Dp,
                             const floating* z, const floating* bias_p, bint softplus,
                             const floating* state0, const floating* dy,
                             const floating* dstate, floating* dx, floating* ddt,
                             floating* dA_p, floating* dB_p, floating* dC_p, floating* dD_p,
                             floating* dz, floating* dbias_p, floating* dstate0,
                             const floating* ckpt, floating* scratch) noexcept nogil:
    # ckpt [nchunks, N, W]: this block's states before every K-th processed step (from the
    # forward); the row has Lr valid steps, processed backwards in time when `reverse`.
    # Only the first ceil(Lr / K) slots are written by the forward (a slot before a reset
    # too) and only those are read here, so the checkpoints need no initialisation.
    cdef Py_ssize_t NW = N * W, nchunks = (Lr + K - 1) // K
    cdef floating* At = scratch
    cdef floating* g = At + NW
    cdef floating* dAacc = g + NW
    cdef floating* hs = dAacc + NW           # [K+1, N, W]: checkpoint, then the chunk's states
    cdef floating* es = hs + (K + 1) * NW    # [K, N, W]: the chunk's decays
    cdef floating* dls = es + K * NW         # [K, W]: the chunk's deltas
    cdef floating* ys = dls + K * W          # [K, W]: the chunk's outputs before the gate
    cdef floating* vs = ys + K * W           # [K, W]: the chunk's softplus arguments dt + bias
    cdef floating* dsp = vs + K * W          # [K, W]: d softplus(v) / dv = sigmoid(v)
    cdef floating* zs = dsp + K * W          # [K, W]: the chunk's gates z (when z is given)
    cdef floating* szs = zs + K * W          # [K, W]: sigmoid(z)
    cdef floating* zero = szs + K * W        # [N, W] zeros: the state before a reset
    cdef floating dl[W]
    cdef floating xv[W]
    cdef floating u[W]
    cdef floating Dv[W]
    cdef floating bias[W]
    cdef floating dyv[W]
    cdef floating dy0[W]
    cdef floating gB[W]
    cdef floating dde[W]
    cdef floating dDacc[W]
    cdef floating dbacc[W]
    cdef floating p1[W]
    cdef floating p2[W]
    cdef floating s, zj
    cdef Py_ssize_t t, tt, c, t0, t1, nt, n, j, row, bt_row
    cdef bint at_reset
    cdef floating* hp
    cdef floating* ht
    cdef floating* et

    load_block(At, A + d0 * N, N, nw)
    load_block(g, dstate + (r * Dm + d0) * N, N, nw)
    for j in range(W):
        Dv[j] = Dp[d0 + j] if (Dp != NULL and j < nw) else 0
        bias[j] = bias_p[d0 + j] if (bias_p != NULL and j < nw) else 0
        dDacc[j] = 0
        dbacc[j] = 0
    for j in range(NW):
        dAacc[j] = 0
        zero[j] = 0
    for t in range(Lr, T):                   # padded steps: no gradient
        row = (r * T + t) * Dm + d0
        store_row(dx + row, zero, nw)
        store_row(ddt + row, zero, nw)
        if z != NULL:
            store_row(dz + row, zero, nw)

    # chunks of K processed steps p (time step_time(p)), from the last
    for c in range(nchunks - 1, -1, -1):
        t0 = c * K
        t1 = min(Lr, t0 + K)
        nt = t1 - t0
        # the chunk's deltas and gates, each function over the whole chunk at once
        for tt in range(nt):
            row = (r * T + step_time(t0 + tt, Lr, reverse)) * Dm + d0
            load_row(vs + tt * W, dt + row, nw)
            for j in range(W):
                vs[tt * W + j] = vs[tt * W + j] + bias[j]
            if z != NULL:
                load_row(zs + tt * W, z + row, nw)
        if softplus:
            softplus_row(dls, vs, nt * W)
            sigmoid_row(dsp, vs, nt * W)
        else:
            for j in range(nt * W):
                dls[j] = vs[j]
        if z != NULL:
            sigmoid_row(szs, zs, nt * W)
        # recompute the chunk: hs[tt+1] = state after step t0+tt, es[tt] its decays
        for j in range(NW):
            hs[j] = ckpt[c * NW + j]
        for tt in range(nt):
            t = step_time(t0 + tt, Lr, reverse)
            row = (r * T + t) * Dm + d0
            load_row(xv, x + row, nw)
            for j in range(W):
                u[j] = dls[tt * W + j] * xv[j]
                ys[tt * W + j] = Dv[j] * xv[j] if Dp != NULL else 0
            at_reset = rs != NULL and rs[t]
            for j in range(NW):
                hs[(tt + 1) * NW + j] = 0 if at_reset else hs[tt * NW + j]
            decays(es + tt * NW, At, dls + tt * W, N)
            advance(hs + (tt + 1) * NW, es + tt * NW, ys + tt * W, u,
                    Bm + (r * T + t) * N, C + (r * T + t) * N, N, nw)
        # walk the chunk backwards
        for tt in range(nt - 1, -1, -1):
            t = step_time(t0 + tt, Lr, reverse)
            at_reset = rs != NULL and rs[t]
            row = (r * T + t) * Dm + d0
            bt_row = (r * T + t) * N
            hp = zero if at_reset else hs + tt * NW
            ht = hs + (tt + 1) * NW
            et = es + tt * NW
            load_row(xv, x + row, nw)
            load_row(dyv, dy + row, nw)
            for j in range(W):
                dl[j] = dls[tt * W + j]
                u[j] = dl[j] * xv[j]
            if z != NULL:
                for j in range(W):
                    s = szs[tt * W + j]
                    zj = zs[tt * W + j]
                    p2[j] = dyv[j] * ys[tt * W + j] * s * (1 + zj * (1 - s))
                    dy0[j] = dyv[j] * zj * s
                store_row(dz + row, p2, nw)
            else:
                for j in range(W):
                    dy0[j] = dyv[j]
            reverse_step(g, dAacc, gB, dde, ht, hp, et, At, dl, u, dy0, Bm + bt_row,
                         C + bt_row, dB_p + bt_row, dC_p + bt_row, N, nw)
            if at_reset:                     # the state before a reset does not matter
                for j in range(NW):
                    g[j] = 0
            for j in range(W):
                p1[j] = gB[j] * dl[j] + dy0[j] * Dv[j] if Dp != NULL else gB[j] * dl[j]
                p2[j] = dde[j] + gB[j] * xv[j]
                if softplus:
                    p2[j] = p2[j] * dsp[tt * W + j]
                dDacc[j] += dy0[j] * xv[j]
                dbacc[j] += p2[j]
            store_row(dx + row, p1, nw)
            store_row(ddt + row, p2, nw)

    store_block(dstate0 + (r * Dm + d0) * N, g, N, nw)
    store_block(dA_p + (r * Dm + d0) * N, dAacc, N, nw)
    for j in range(nw):
        dD_p[r * Dm + d0 + j] = dDacc[j]
        dbias_p[r * Dm + d0 + j] = dbacc[j]




def selective_scan_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] dt,
                            const floating[:, ::1] A, const floating[:, :, ::1] Bm,
                            const floating[:, :, ::1] C, const floating[::1] D,
                            const floating[:, :, ::1] z, const floating[::1] dt_bias,
                            bint softplus, const floating[:, :, ::1] state0,
                            const int64_t[::1] lengths, const unsigned char[:, ::1] reset,
                            bint reverse, const floating[:, :, :, :, ::1] ckpt,
                            const floating[:, :, ::1] dy, const floating[:, :, ::1] dstate,
                            floating[:, :, ::1] dx, floating[:, :, ::1] ddt,
                            floating[:, :, ::1] dA_p, floating[:, :, :, ::1] dB_p,
                            floating[:, :, :, ::1] dC_p, floating[:, ::1] dD_p,
                            floating[:, :, ::1] dz, floating[:, ::1] dbias_p,
                            floating[:, :, ::1] dstate0, int num_threads):
    """Gradients of sum(dy*y) + sum(dstate*state) for selective_scan's outputs, given
    the checkpoints ckpt that selective_scan saved (same arrays and options).

    Writes dx, ddt [Bt,T,Dm], dz [Bt,T,Dm] (when z is given; else pass None), dstate0
    [Bt,Dm,N], and partial sums the caller adds up: dA_p [Bt,Dm,N], dD_p and dbias_p [Bt,Dm]
    (over batch rows), dB_p and dC_p [G,Bt,T,N] (over channel groups of GROUP*W, zero on
    entry).  Requires Bt, T, Dm, N >= 1.
    """
    cdef Py_ssize_t Bt = x.shape[0], T = x.shape[1], Dm = x.shape[2], N = A.shape[1]
    cdef Py_ssize_t nblk = blocks(Dm), ngroups = dB_p.shape[0]
    cdef Py_ssize_t K = checkpoint_interval(T), NW = N * W, nchunks = (T + K - 1) // K
    cdef Py_ssize_t job, r, grp, k, d0, Lr
    cdef int failed = 0
    cdef const floating* Dp = vec_ptr(D)
    cdef const floating* bp = vec_ptr(dt_bias)
    cdef const floating* zp = seq_ptr(z)
    cdef const int64_t* lp = lengths_ptr(lengths)
    cdef const unsigned char* rp = reset_ptr(reset)
    cdef const unsigned char* rs
    cdef floating* dzp = NULL
    cdef floating* scratch = NULL
    if ngroups != (nblk + GROUP - 1) // GROUP:
        raise ValueError("dB_p/dC_p must have one entry per group of channels")
    if (ckpt.shape[0] != Bt or ckpt.shape[1] != nblk or ckpt.shape[2] != nchunks
            or ckpt.shape[3] != N or ckpt.shape[4] != W):
        raise ValueError("ckpt must come from selective_scan on the same arrays")
    if z is not None:
        dzp = &dz[0, 0, 0]
    with nogil, parallel(num_threads=num_threads):
        scratch = <floating*> scratch_alloc(((5 + 2 * K) * NW + 6 * K * W)
                                            * sizeof(floating))
        for job in prange(Bt * ngroups, schedule="dynamic"):
            r = job // ngroups
            grp = job % ngroups
            if scratch == NULL:
                failed += 1
                continue
            Lr = lp[r] if lp != NULL else T          # (assigned: private to the thread)
            rs = rp + r * T if rp != NULL else NULL
            for k in range(grp * GROUP, min(nblk, (grp + 1) * GROUP)):
                d0 = k * W
                sel_backward_block(r, d0, min(<Py_ssize_t> W, Dm - d0), T, Lr, reverse, rs,
                                   Dm, N, K, &x[0, 0, 0], &dt[0, 0, 0], &A[0, 0],
                                   &Bm[0, 0, 0], &C[0, 0, 0], Dp, zp, bp, softplus,
                                   &state0[0, 0, 0], &dy[0, 0, 0], &dstate[0, 0, 0],
                                   &dx[0, 0, 0], &ddt[0, 0, 0], &dA_p[0, 0, 0],
                                   &dB_p[grp, 0, 0, 0], &dC_p[grp, 0, 0, 0], &dD_p[0, 0], dzp,
                                   &dbias_p[0, 0], &dstate0[0, 0, 0], &ckpt[r, k, 0, 0, 0],
                                   scratch)
        scratch_free(scratch)
    if failed:
        raise MemoryError(f"selective_scan vjp: no memory for the per-thread scratch "
                          f"(checkpoint chunks of {K} steps of [N, W] = [{N}, {W}] states)")


def backward_groups(Py_ssize_t Dm):
    """Number of channel groups of selective_backward's dB_p/dC_p partial sums."""
    return (blocks(Dm) + GROUP - 1) // GROUP
