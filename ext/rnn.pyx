# Fused RNN sequence kernels: the whole time loop in one call, GIL released.
# Work is split into independent jobs (a block of batch rows x one head) that each run all T
# steps; a job's arithmetic does not depend on how many jobs or threads there are, so results
# are bit-identical for any thread count.
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free

from _microkernel cimport NT, matmul_acc, pack_panels
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
    cdef Py_ssize_t B = ax.shape[0], T = ax.shape[1]
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef Py_ssize_t H = heads * D, G = GD // D
    cdef Py_ssize_t S = state0.shape[0], S_save = seq.shape[0]
    cdef Py_ssize_t ntiles = (GD + NT - 1) // NT
    cdef Py_ssize_t RB = rows_per_job(B, heads, num_threads)
    cdef Py_ssize_t nblocks = (B + RB - 1) // RB
    cdef Py_ssize_t job, k, r0
    cdef floating* ar_ptr = NULL
    cdef floating* mp
    cdef floating* st
    cdef floating* gates
    if ar_seq is not None:
        ar_ptr = &ar_seq[0, 0, 0]
    mp = <floating*> malloc(heads * ntiles * D * NT * sizeof(floating))
    if mp == NULL:
        raise MemoryError()
    with nogil:
        for k in range(heads):
            pack_panels(&R[k, 0, 0], 1, D, D, GD, mp + k * ntiles * D * NT)
        with parallel(num_threads=num_threads):
            st = <floating*> malloc(S * RB * D * sizeof(floating))
            gates = <floating*> malloc(RB * ntiles * NT * sizeof(floating))
            for job in prange(nblocks * heads, schedule="static"):
                k = job % heads
                r0 = (job // heads) * RB
                forward_job(cell, r0, min(RB, B - r0), k, B, T, H, D, G, S, S_save,
                            &ax[0, 0, 0], mp, &b_r[0], &state0[0, 0, 0], &seq[0, 0, 0, 0],
                            ar_ptr, &state_out[0, 0, 0], st, gates)
            free(st)
            free(gates)
    free(mp)


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
    mb = <floating*> malloc(heads * ntiles * GD * NT * sizeof(floating))
    if mb == NULL:
        raise MemoryError()
    with nogil:
        for k in range(heads):
            pack_panels(&R[k, 0, 0], D, 1, GD, D, mb + k * ntiles * GD * NT)
        with parallel(num_threads=num_threads):
            dst = <floating*> malloc(S * RB * ntiles * NT * sizeof(floating))
            gbuf = <floating*> malloc(RB * GD * sizeof(floating))
            for job in prange(nblocks * heads, schedule="static"):
                k = job % heads
                r0 = (job // heads) * RB
                backward_job(cell, r0, min(RB, B - r0), k, B, T, H, D, G, S,
                             &ax[0, 0, 0], &ar_seq[0, 0, 0], mb, &state0[0, 0, 0],
                             &seq[0, 0, 0, 0], &dy[0, 0, 0], &dstate[0, 0, 0],
                             &dgx[0, 0, 0], dgr_ptr, &dstate0[0, 0, 0], dst, gbuf)
            free(dst)
            free(gbuf)
    free(mb)


cdef enum:
    PROJECT_ROWS = 64     # rows per job of `project`


def project(const floating[:, ::1] x, const floating[:, ::1] W, const floating[::1] b,
            floating[:, ::1] out, int num_threads):
    """out = x @ W.T (+ b): x [N, I], W [M, I], b [M] or None, out [N, M].

    Every row is computed by the same sequence of operations whatever N is, so projecting a
    sequence in chunks gives bit-identical rows (BLAS picks different kernels for different N).
    """
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], M = W.shape[0]
    cdef Py_ssize_t ntiles = (M + NT - 1) // NT, Mp = ntiles * NT
    cdef Py_ssize_t njobs = (N + PROJECT_ROWS - 1) // PROJECT_ROWS
    cdef Py_ssize_t job, r0, nr, r, m
    cdef const floating* bp = NULL
    cdef floating* wp
    cdef floating* buf
    if N == 0 or M == 0:
        return
    if b is not None:
        bp = &b[0]
    wp = <floating*> malloc(ntiles * I * NT * sizeof(floating) + 1)
    if wp == NULL:
        raise MemoryError()
    with nogil:
        pack_panels(&W[0, 0], 1, I, I, M, wp)
        with parallel(num_threads=num_threads):
            buf = <floating*> malloc(PROJECT_ROWS * Mp * sizeof(floating))
            for job in prange(njobs, schedule="static"):
                r0 = job * PROJECT_ROWS
                nr = min(PROJECT_ROWS, N - r0)
                for r in range(nr):
                    for m in range(Mp):
                        buf[r * Mp + m] = (bp[m] if bp != NULL else 0) if m < M else 0
                if I > 0:
                    matmul_acc(&x[r0, 0], I, wp, I, ntiles, buf, Mp, nr)
                for r in range(nr):
                    for m in range(M):
                        out[r0 + r, m] = buf[r * Mp + m]
            free(buf)
    free(wp)


cdef extern from *:
    """
    #ifdef _OPENMP
    static int statescan_openmp(void) { return 1; }
    #else
    static int statescan_openmp(void) { return 0; }
    #endif
    """
    int statescan_openmp()


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (else they run on one thread)."""
    return bool(statescan_openmp())
