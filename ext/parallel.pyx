# Compiled block scan h_t = A_t h_{t-1} + b_t (dense m x m blocks), the inner solve of the
# parallel-in-time solvers and matrix_scan's dense case (the diagonal case is scan.pyx's
# linear_scan).  Work is split into jobs over (batch row, block) and, when the caller asks for
# it, into `nseg` time segments of fixed length ceil(T / nseg).  A segmented scan runs in
# three phases: every segment but the first composes
# its pairs (A, b) into one affine map; the segment carries are chained sequentially; every
# segment but the first is re-run from its carry.  The segmentation comes from the caller (it
# depends on the shape only), never from the thread count, so results are bit-identical for any
# number of threads.
from cython cimport floating
from cython.parallel cimport prange

from _scratch cimport scratch_alloc, scratch_free


cdef extern from "_dot_rows.h":
    void statescan_dot_rows_f(Py_ssize_t m, const float* A, const float* x, float* out) nogil
    void statescan_dot_rows_d(Py_ssize_t m, const double* A, const double* x, double* out) nogil


cdef inline void matvec_acc(bint rows, Py_ssize_t m, const floating* A, const floating* x,
                            floating* out) noexcept nogil:
    # out += A x.  rows: A row-major (dot products); else A stored transposed (A[j, i] holds
    # the coefficient of row i, column j), where the inner loop is an axpy over contiguous
    # memory that vectorises without a reduction.  Callers pick the layout they already have.
    cdef Py_ssize_t i, j
    cdef floating xj
    if rows:
        if floating is float:
            statescan_dot_rows_f(m, A, x, out)
        else:
            statescan_dot_rows_d(m, A, x, out)
        return
    for j in range(m):
        xj = x[j]
        for i in range(m):
            out[i] += A[j * m + i] * xj


cdef inline void run_blocks(bint rows, Py_ssize_t m, Py_ssize_t t0, Py_ssize_t t1,
                            Py_ssize_t step, const floating* At, const floating* b, const floating* start,
                            floating* h) noexcept nogil:
    # Sequential scan over [t0, t1) from `start`; rows of b and h are `step` apart, of A step*m.
    cdef Py_ssize_t t, i
    cdef const floating* prev = start
    for t in range(t0, t1):
        for i in range(m):
            h[t * step + i] = b[t * step + i]
        matvec_acc(rows, m, At + t * step * m, prev, h + t * step)
        prev = h + t * step


cdef inline void compose_blocks(bint rows, Py_ssize_t m, Py_ssize_t t0, Py_ssize_t t1,
                                Py_ssize_t step, const floating* At, const floating* b, floating* Pt,
                                floating* v, floating* tmp) noexcept nogil:
    # The affine map of steps [t0, t1): h_end = P h_start + v, with P stored transposed in Pt.
    # Row c of Pt is column c of P, so P <- A P is one matvec per row.
    cdef Py_ssize_t t, c, i
    for c in range(m * m):
        Pt[c] = 0
    for c in range(m):
        Pt[c * m + c] = 1
        v[c] = 0
    for t in range(t0, t1):
        for c in range(m):
            for i in range(m):
                tmp[i] = 0
            matvec_acc(rows, m, At + t * step * m, Pt + c * m, tmp)
            for i in range(m):
                Pt[c * m + i] = tmp[i]
        for i in range(m):
            tmp[i] = b[t * step + i]
        matvec_acc(rows, m, At + t * step * m, v, tmp)
        for i in range(m):
            v[i] = tmp[i]


def block_scan(const floating[:, :, :, :, ::1] At, bint transposed,
               const floating[:, :, :, ::1] b, const floating[:, :, ::1] h0,
               floating[:, :, :, ::1] h, Py_ssize_t nseg, int num_threads):
    """h[:, t, k] = A[:, t, k] @ h[:, t-1, k] + b[:, t, k] for K independent m x m blocks.

    At [B,T,K,m,m] holds each A_t, transposed (At[..., j, i] = A[..., i, j]) when
    `transposed`, else as is; b [B,T,K,m]; h0 [B,K,m]; output h [B,T,K,m].
    nseg >= 1 time segments (see the module comment).  Requires B, T, K, m >= 1.
    """
    cdef bint rows = not transposed
    cdef Py_ssize_t B = b.shape[0], T = b.shape[1], K = b.shape[2], m = b.shape[3]
    cdef Py_ssize_t L = (T + nseg - 1) // nseg
    cdef Py_ssize_t jobs = B * K, step = K * m
    cdef Py_ssize_t job, seg, t0, t1, bb, k, i
    cdef floating* Pt = NULL
    cdef floating* v = NULL
    cdef floating* carry = NULL
    cdef floating* tmp = NULL           # per-job scratch of compose_blocks
    cdef const floating* Aj
    cdef const floating* bj
    cdef floating* hj
    nseg = (T + L - 1) // L
    if nseg > 1:
        Pt = <floating*> scratch_alloc(jobs * nseg * m * m * sizeof(floating))
        v = <floating*> scratch_alloc(jobs * nseg * m * sizeof(floating))
        carry = <floating*> scratch_alloc(jobs * nseg * m * sizeof(floating))
        tmp = <floating*> scratch_alloc(jobs * nseg * m * sizeof(floating))
        if Pt == NULL or v == NULL or carry == NULL or tmp == NULL:
            scratch_free(Pt); scratch_free(v); scratch_free(carry); scratch_free(tmp)
            raise MemoryError(f"block_scan: no memory for {nseg} time segments of "
                              f"{jobs} [{m}, {m}] maps")
    with nogil:
        for job in prange(jobs * nseg, schedule="dynamic", num_threads=num_threads):
            seg = job % nseg
            bb = job // nseg // K
            k = job // nseg % K
            t0 = seg * L
            t1 = min(T, t0 + L)
            Aj = &At[bb, 0, k, 0, 0]
            bj = &b[bb, 0, k, 0]
            if seg == 0:
                run_blocks(rows, m, t0, t1, step, Aj, bj, &h0[bb, k, 0], &h[bb, 0, k, 0])
            else:
                compose_blocks(rows, m, t0, t1, step, Aj, bj, Pt + job * m * m, v + job * m,
                               tmp + job * m)
    if nseg == 1:
        return
    with nogil:
        for job in prange(jobs, schedule="static", num_threads=num_threads):
            bb = job // K
            k = job % K
            # carry[seg] = state entering segment seg (seg >= 1)
            hj = &h[bb, 0, k, 0]
            for i in range(m):
                carry[(job * nseg + 1) * m + i] = hj[(L - 1) * step + i]
            for seg in range(2, nseg):
                for i in range(m):
                    carry[(job * nseg + seg) * m + i] = v[(job * nseg + seg - 1) * m + i]
                matvec_acc(False, m, Pt + (job * nseg + seg - 1) * m * m,
                           carry + (job * nseg + seg - 1) * m, carry + (job * nseg + seg) * m)
        for job in prange(jobs * nseg, schedule="dynamic", num_threads=num_threads):
            seg = job % nseg
            if seg == 0:
                continue
            bb = job // nseg // K
            k = job // nseg % K
            t0 = seg * L
            run_blocks(rows, m, t0, min(T, t0 + L), step, &At[bb, 0, k, 0, 0],
                       &b[bb, 0, k, 0], carry + job * m, &h[bb, 0, k, 0])
    scratch_free(Pt)
    scratch_free(v)
    scratch_free(carry)
    scratch_free(tmp)
