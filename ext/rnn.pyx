# Fused RNN sequence kernels: the whole time loop in one call, GIL released.
# Work is split into independent jobs (a block of batch rows x one head) that each run all T
# steps; a job's arithmetic does not depend on how many jobs or threads there are, so results
# are bit-identical for any thread count.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
cimport numpy as cnp
import numpy as np

cnp.import_array()

from _microkernel cimport NT, matmul_acc, pack_panels, prefetch
from _cells cimport cell_forward, cell_backward


cdef inline Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    return (n + m - 1) // m * m


cdef Py_ssize_t rows_per_job(Py_ssize_t B, Py_ssize_t heads, int num_threads) noexcept nogil:
    # Enough jobs to occupy every thread, in blocks of 8 rows (a micro-kernel block) if possible.
    cdef Py_ssize_t chunks = max(1, (num_threads + heads - 1) // heads)
    return min(B, round_up((B + chunks - 1) // chunks, 8))


cdef void forward_job(int cell, Py_ssize_t r0, Py_ssize_t nr, Py_ssize_t k,
                      Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                      Py_ssize_t S, Py_ssize_t S_save,
                      const floating* ax, const floating* mp, const floating* b_r,
                      const floating* state0, floating* seq, floating* ar_seq,
                      floating* state_out, floating* st, floating* gates) noexcept nogil:
    cdef Py_ssize_t GH = G * H, GD = G * D
    cdef Py_ssize_t ntiles = (GD + NT - 1) // NT, GDp = ntiles * NT
    cdef Py_ssize_t ss = nr * D              # stride between state components in `st`
    cdef Py_ssize_t t, r, b, s, g, d
    cdef const floating* axp
    cdef const floating* mp_k = mp + k * ntiles * D * NT
    for s in range(S):
        for r in range(nr):
            for d in range(D):
                st[s * ss + r * D + d] = state0[(s * B + r0 + r) * H + k * D + d]
    for t in range(T):
        for r in range(nr):
            for g in range(G):
                for d in range(D):
                    gates[r * GDp + g * D + d] = b_r[g * H + k * D + d]
                if t + 1 < T:   # rows of different batch entries are far apart: help the prefetcher
                    prefetch(ax + ((r0 + r) * T + t + 1) * GH + g * H + k * D, D)
        matmul_acc(st, D, mp_k, D, ntiles, gates, GDp, nr)
        for r in range(nr):
            b = r0 + r
            axp = ax + (b * T + t) * GH + k * D
            if ar_seq != NULL:
                for g in range(G):
                    for d in range(D):
                        ar_seq[(b * T + t) * GH + g * H + k * D + d] = gates[r * GDp + g * D + d]
            cell_forward(cell, D, axp, H, gates + r * GDp, D, st + r * D, ss)
            for s in range(S_save):
                for d in range(D):
                    seq[((s * B + b) * T + t) * H + k * D + d] = st[s * ss + r * D + d]
    for s in range(S):
        for r in range(nr):
            for d in range(D):
                state_out[(s * B + r0 + r) * H + k * D + d] = st[s * ss + r * D + d]


cdef void pack_recurrent(const floating* R, Py_ssize_t heads, Py_ssize_t GD, Py_ssize_t D,
                         bint transpose, floating* mp) noexcept nogil:
    """Pack each head's R_k [GD, D] into panels: of R_k^T (forward: out[GD] += h[D] @ R_k^T)
    when `transpose`, else of R_k (backward: dh[D] += dg[GD] @ R_k)."""
    cdef Py_ssize_t k
    if transpose:
        for k in range(heads):
            pack_panels(R + k * GD * D, 1, D, D, GD, mp + k * ((GD + NT - 1) // NT) * D * NT)
    else:
        for k in range(heads):
            pack_panels(R + k * GD * D, D, 1, GD, D, mp + k * ((D + NT - 1) // NT) * GD * NT)


cdef int run_forward(int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D,
                     Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save, const floating* ax,
                     const floating* mp, const floating* b_r, const floating* state0,
                     floating* seq, floating* ar_seq, floating* state_out,
                     int num_threads) noexcept nogil:
    """All jobs of a forward pass; -1 when scratch memory could not be allocated."""
    cdef Py_ssize_t RB = rows_per_job(B, heads, num_threads)
    cdef Py_ssize_t njobs = (B + RB - 1) // RB * heads
    cdef Py_ssize_t ntiles = (G * D + NT - 1) // NT
    cdef Py_ssize_t job, k, r0
    cdef int failed = 0
    cdef floating* st
    cdef floating* gates
    if num_threads == 1 or njobs == 1:     # no OpenMP region: matters for T=1 streaming calls
        st = <floating*> malloc(S * RB * D * sizeof(floating))
        gates = <floating*> malloc(RB * ntiles * NT * sizeof(floating))
        if st != NULL and gates != NULL:
            for job in range(njobs):
                r0 = (job // heads) * RB
                forward_job(cell, r0, min(RB, B - r0), job % heads, B, T, heads * D, D, G, S,
                            S_save, ax, mp, b_r, state0, seq, ar_seq, state_out, st, gates)
        else:
            failed = 1
        free(st)
        free(gates)
        return -failed
    with parallel(num_threads=num_threads):
        st = <floating*> malloc(S * RB * D * sizeof(floating))
        gates = <floating*> malloc(RB * ntiles * NT * sizeof(floating))
        for job in prange(njobs, schedule="static"):
            if st == NULL or gates == NULL:
                failed += 1
            else:
                k = job % heads
                r0 = (job // heads) * RB
                forward_job(cell, r0, min(RB, B - r0), k, B, T, heads * D, D, G, S, S_save,
                            ax, mp, b_r, state0, seq, ar_seq, state_out, st, gates)
        free(st)
        free(gates)
    return -1 if failed else 0


def forward(int cell, const floating[:, :, ::1] ax, const floating[:, :, ::1] R,
            const floating[::1] b_r, const floating[:, :, ::1] state0,
            floating[:, :, :, ::1] seq, floating[:, :, ::1] ar_seq,
            floating[:, :, ::1] state_out, int num_threads):
    """Run a cell over the sequence.

    ax [B,T,G*H] input-side pre-activations; R [heads,G*D,D]; b_r [G*H]; state0 [S,B,H].
    Outputs: seq [S_save,B,T,H] (states after each step; S_save=1 keeps only h),
    ar_seq [B,T,G*H] or None (recurrent pre-activations, saved for the backward),
    state_out [S,B,H].  Requires B >= 1 and T >= 1.
    """
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef floating* ar_ptr = NULL
    cdef floating* mp
    cdef int status
    if ar_seq is not None:
        ar_ptr = &ar_seq[0, 0, 0]
    mp = <floating*> malloc(heads * ((GD + NT - 1) // NT) * D * NT * sizeof(floating))
    if mp == NULL:
        raise MemoryError()
    with nogil:
        pack_recurrent(&R[0, 0, 0], heads, GD, D, True, mp)
        status = run_forward(cell, ax.shape[0], ax.shape[1], heads, D, GD // D, state0.shape[0],
                             seq.shape[0], &ax[0, 0, 0], mp, &b_r[0], &state0[0, 0, 0],
                             &seq[0, 0, 0, 0], ar_ptr, &state_out[0, 0, 0], num_threads)
    free(mp)
    if status:
        raise MemoryError()


cdef void backward_job(int cell, Py_ssize_t r0, Py_ssize_t nr, Py_ssize_t k,
                       Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                       Py_ssize_t S, const floating* ax, const floating* ar_seq,
                       const floating* mb, const floating* state0, const floating* seq,
                       const floating* dy, const floating* dstate, floating* dgx, floating* dgr,
                       floating* dstate0, floating* dst, floating* gbuf) noexcept nogil:
    cdef Py_ssize_t GH = G * H, GD = G * D
    cdef Py_ssize_t ntiles = (D + NT - 1) // NT, Dp = ntiles * NT
    cdef Py_ssize_t sds = nr * Dp
    cdef Py_ssize_t t, r, b, s, g, d, row
    cdef const floating* prev
    cdef Py_ssize_t sp
    cdef const floating* mb_k = mb + k * ntiles * GD * NT
    for s in range(S):
        for r in range(nr):
            for d in range(Dp):
                dst[s * sds + r * Dp + d] = dstate[(s * B + r0 + r) * H + k * D + d] if d < D else 0
    for t in range(T - 1, -1, -1):
        for r in range(nr):
            b = r0 + r
            row = (b * T + t) * GH + k * D
            for d in range(D):
                dst[r * Dp + d] += dy[(b * T + t) * H + k * D + d]
            if t > 0:
                prev = seq + (b * T + t - 1) * H + k * D
                sp = B * T * H
            else:
                prev = state0 + b * H + k * D
                sp = B * H
            cell_backward(cell, D, ax + row, H, ar_seq + row, H, prev, sp,
                          dst + r * Dp, sds, dgx + row, H, gbuf + r * GD, D)
            if dgr != dgx:
                for g in range(G):
                    for d in range(D):
                        dgr[row + g * H + d] = gbuf[r * GD + g * D + d]
        matmul_acc(gbuf, GD, mb_k, GD, ntiles, dst, Dp, nr)
    for s in range(S):
        for r in range(nr):
            for d in range(D):
                dstate0[(s * B + r0 + r) * H + k * D + d] = dst[s * sds + r * Dp + d]


def backward(int cell, const floating[:, :, ::1] ax, const floating[:, :, ::1] ar_seq,
             const floating[:, :, ::1] R, const floating[:, :, ::1] state0,
             const floating[:, :, :, ::1] seq, const floating[:, :, ::1] dy,
             const floating[:, :, ::1] dstate, floating[:, :, ::1] dgx,
             floating[:, :, ::1] dgr, floating[:, :, ::1] dstate0, int num_threads):
    """Backpropagate through the sequence run by `forward` (with every state saved).

    seq [S,B,T,H] and ar_seq [B,T,G*H] come from forward; dy [B,T,H]; dstate [S,B,H] is the
    cotangent of the final state.  Outputs: dgx, dgr [B,T,G*H] gradients of the input-side and
    recurrent-side pre-activations (dgr may be the same array as dgx for cells where they are
    equal: every cell but the GRU), dstate0 [S,B,H].  Requires B >= 1 and T >= 1.
    """
    cdef Py_ssize_t B = ax.shape[0], T = ax.shape[1]
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef Py_ssize_t H = heads * D, G = GD // D, S = state0.shape[0]
    cdef Py_ssize_t ntiles = (D + NT - 1) // NT
    cdef Py_ssize_t RB = rows_per_job(B, heads, num_threads)
    cdef Py_ssize_t nblocks = (B + RB - 1) // RB
    cdef Py_ssize_t job, k, r0
    cdef floating* mb
    cdef floating* dst
    cdef floating* gbuf
    cdef floating* dgr_ptr = &dgr[0, 0, 0]
    cdef int failed = 0
    mb = <floating*> malloc(heads * ntiles * GD * NT * sizeof(floating))
    if mb == NULL:
        raise MemoryError()
    with nogil:
        pack_recurrent(&R[0, 0, 0], heads, GD, D, False, mb)
        with parallel(num_threads=num_threads):
            dst = <floating*> malloc(S * RB * ntiles * NT * sizeof(floating))
            gbuf = <floating*> malloc(RB * GD * sizeof(floating))
            for job in prange(nblocks * heads, schedule="static"):
                if dst == NULL or gbuf == NULL:
                    failed += 1
                else:
                    k = job % heads
                    r0 = (job // heads) * RB
                    backward_job(cell, r0, min(RB, B - r0), k, B, T, H, D, G, S,
                                 &ax[0, 0, 0], &ar_seq[0, 0, 0], mb, &state0[0, 0, 0],
                                 &seq[0, 0, 0, 0], &dy[0, 0, 0], &dstate[0, 0, 0],
                                 &dgx[0, 0, 0], dgr_ptr, &dstate0[0, 0, 0], dst, gbuf)
            free(dst)
            free(gbuf)
    free(mb)
    if failed:
        raise MemoryError()


cdef enum:
    PROJECT_ROWS = 64     # rows per job of `project`


cdef int run_project(const floating* x, Py_ssize_t N, Py_ssize_t I, const floating* wp,
                     Py_ssize_t M, const floating* b, floating* out,
                     int num_threads) noexcept nogil:
    """out[N, M] = x[N, I] @ W^T (+ b) with W^T packed in panels; -1 on allocation failure."""
    cdef Py_ssize_t ntiles = (M + NT - 1) // NT, Mp = ntiles * NT
    cdef Py_ssize_t njobs = (N + PROJECT_ROWS - 1) // PROJECT_ROWS
    cdef Py_ssize_t job, r0
    cdef int failed = 0
    cdef floating* buf
    if num_threads == 1 or njobs == 1:
        buf = <floating*> malloc(min(N, PROJECT_ROWS) * Mp * sizeof(floating))
        if buf == NULL:
            return -1
        for job in range(njobs):
            r0 = job * PROJECT_ROWS
            project_job(x + r0 * I, min(PROJECT_ROWS, N - r0), I, wp, M, b, out + r0 * M, buf)
        free(buf)
        return 0
    with parallel(num_threads=num_threads):
        buf = <floating*> malloc(PROJECT_ROWS * Mp * sizeof(floating))
        for job in prange(njobs, schedule="static"):
            if buf == NULL:
                failed += 1
            else:
                r0 = job * PROJECT_ROWS
                project_job(x + r0 * I, min(PROJECT_ROWS, N - r0), I, wp, M, b, out + r0 * M,
                            buf)
        free(buf)
    return -1 if failed else 0


cdef void project_job(const floating* x, Py_ssize_t nr, Py_ssize_t I, const floating* wp,
                      Py_ssize_t M, const floating* b, floating* out,
                      floating* buf) noexcept nogil:
    # The kernel writes whole panels, so rows go through a buffer padded to Mp columns.
    cdef Py_ssize_t ntiles = (M + NT - 1) // NT, Mp = ntiles * NT
    cdef Py_ssize_t r, m
    for r in range(nr):
        for m in range(Mp):
            buf[r * Mp + m] = (b[m] if b != NULL else 0) if m < M else 0
    if I > 0:
        matmul_acc(x, I, wp, I, ntiles, buf, Mp, nr)
    for r in range(nr):
        for m in range(M):
            out[r * M + m] = buf[r * Mp + m]


def project(const floating[:, ::1] x, const floating[:, ::1] W, const floating[::1] b,
            floating[:, ::1] out, int num_threads):
    """out = x @ W.T (+ b): x [N, I], W [M, I], b [M] or None, out [N, M].

    Every row is computed by the same sequence of operations whatever N is, so projecting a
    sequence in chunks gives bit-identical rows (BLAS picks different kernels for different N).
    """
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], M = W.shape[0]
    cdef const floating* bp = NULL
    cdef floating* wp
    cdef int status
    if N == 0 or M == 0:
        return
    if b is not None:
        bp = &b[0]
    wp = <floating*> malloc(((M + NT - 1) // NT) * I * NT * sizeof(floating) + 1)
    if wp == NULL:
        raise MemoryError()
    with nogil:
        pack_panels(&W[0, 0], 1, I, I, M, wp)
        status = run_project(&x[0, 0], N, I, wp, M, bp, &out[0, 0], num_threads)
    free(wp)
    if status:
        raise MemoryError()


cdef int stream_step(int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t heads,
                     Py_ssize_t D, Py_ssize_t G, Py_ssize_t S, const floating* x,
                     const floating* wp, const floating* b, const floating* rp,
                     const floating* b_r, const floating* state0, floating* y,
                     floating* state_out, int num_threads) noexcept nogil:
    cdef Py_ssize_t GH = G * heads * D, n
    cdef floating* ax = NULL
    cdef int status
    if wp != NULL or b != NULL:
        ax = <floating*> malloc(B * T * GH * sizeof(floating))
        if ax == NULL:
            return -1
        if wp != NULL:
            if run_project(x, B * T, I, wp, GH, b, ax, num_threads):
                free(ax)
                return -1
        else:                       # x already holds W x; only the bias to add
            for n in range(B * T * GH):
                ax[n] = x[n] + b[n % GH]
    status = run_forward(cell, B, T, heads, D, G, S, 1, <const floating*> ax if ax != NULL else x, rp, b_r,
                         state0, y, NULL, state_out, num_threads)
    free(ax)
    return status


def _pack_weights(const floating[:, :, ::1] R, const floating[:, ::1] W, floating[::1] rp,
                  floating[::1] wp):
    pack_recurrent(&R[0, 0, 0], R.shape[0], R.shape[1], R.shape[2], True, &rp[0])
    if W is not None and W.shape[0] > 0 and W.shape[1] > 0:
        pack_panels(&W[0, 0], 1, W.shape[1], W.shape[1], W.shape[0], &wp[0])


cdef class CellStream:
    """A cell's weights packed once, for many calls on short sequences (streaming inference).

    The caller validates: W [G*H, I] or None, R [heads, G*D, D], b and b_r [G*H] or None, all
    C-contiguous of one float dtype.  `step` takes C-contiguous arrays of that dtype.
    """
    cdef int cell
    cdef bint is_double
    cdef Py_ssize_t n_in, heads, D, G, S
    cdef object rp, wp, b, b_r

    def __init__(self, int cell, int S, W, R, b, b_r):
        self.cell, self.S = cell, S
        self.heads, self.D = R.shape[0], R.shape[2]
        self.G = R.shape[1] // self.D
        self.n_in = W.shape[1] if W is not None else 0
        self.is_double = R.dtype == np.float64
        GH = self.G * self.heads * self.D
        self.rp = np.empty(self.heads * ((self.G * self.D + NT - 1) // NT) * self.D * NT, R.dtype)
        self.wp = None if W is None else np.empty(((GH + NT - 1) // NT) * self.n_in * NT + 1, R.dtype)
        _pack_weights(R, W, self.rp, self.wp if W is not None else np.empty(1, R.dtype))
        self.b = b
        self.b_r = np.zeros(GH, R.dtype) if b_r is None else b_r

    def step(self, cnp.ndarray x, cnp.ndarray state0, cnp.ndarray y, cnp.ndarray state_out,
             int num_threads):
        """x [B,T,I] (or [B,T,G*H] without W), state0 [S,B,H] -> y [B,T,H], state_out [S,B,H]."""
        cdef Py_ssize_t B = x.shape[0], T = x.shape[1]
        cdef void* wp = NULL if self.wp is None else cnp.PyArray_DATA(self.wp)
        cdef void* b = NULL if self.b is None else cnp.PyArray_DATA(self.b)
        cdef void* rp = cnp.PyArray_DATA(self.rp)
        cdef void* b_r = cnp.PyArray_DATA(self.b_r)
        cdef int status
        with nogil:
            if self.is_double:
                status = stream_step[double](
                    self.cell, B, T, self.n_in, self.heads, self.D, self.G, self.S,
                    <double*> cnp.PyArray_DATA(x), <double*> wp, <double*> b, <double*> rp,
                    <double*> b_r, <double*> cnp.PyArray_DATA(state0),
                    <double*> cnp.PyArray_DATA(y), <double*> cnp.PyArray_DATA(state_out),
                    num_threads)
            else:
                status = stream_step[float](
                    self.cell, B, T, self.n_in, self.heads, self.D, self.G, self.S,
                    <float*> cnp.PyArray_DATA(x), <float*> wp, <float*> b, <float*> rp,
                    <float*> b_r, <float*> cnp.PyArray_DATA(state0),
                    <float*> cnp.PyArray_DATA(y), <float*> cnp.PyArray_DATA(state_out),
                    num_threads)
        if status:
            raise MemoryError()
