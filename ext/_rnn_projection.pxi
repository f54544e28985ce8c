# Part of ext/rnn.pyx, which includes it: one extension module, compiled as one file.

cdef enum:
    # rows per job of `project`: every job streams all of packed W (16 MB at H = I = 1024,
    # larger than the share of the L3 it keeps) past its rows; 256 rather than 64 rows read it
    # a quarter as often (AMD EPYC Zen 5, float32, 4096 rows x 1024 -> 4096: 125-137 -> 180-188
    # GFLOP/s; the same bits, an element's sum does not depend on its job)
    PROJECT_ROWS = 256
    # multiply-adds of a projection below which it stays on the calling thread even when its
    # rows give fewer jobs than threads: ~10 us of work, where a parallel region costs a few
    # (a T = 1 call at H = I = 256 stays on one thread)
    PROJECT_SPLIT_MIN = 1 << 20


# A slice of a panel of W^T that stays in L1 while every row block of a job runs over it, a
# block's stretch of x streaming past beside it (project_job, transposed_job; the same bits
# for any slice; 0: whole panels).  Set by _set_l1d_bytes when statescan loads the module:
# - 32 KB (256 steps of k, float32) where the L1d holds 48 KB: Intel Xeon (Sapphire Rapids
#   class, 48 KB L1d), float32, 1 thread, 256-row jobs, x @ W^T -> 4096 columns: 178-183 ->
#   193-196 GFLOP/s at I = 1024 (16 KB slices before), 166-201 -> 187-220 at I = 256;
# - whole panels with a smaller L1d where a row block is 12 rows (AVX-512 float32): the
#   slice and the x stretch do not both fit, and the panel is read once per 12 rows anyway.
#   AMD EPYC Zen 4 (32 KB L1d, 1 MB L2), 1 thread, 1024 rows, best/median of 15 calls, 3 runs:
#   float32 I = 1024 -> 4096 75-83 / 68-81 GFLOP/s with 16 KB slices, 97-99 / 73-97 whole;
#   I = 512 -> 2048 91-93 -> 106-108; float64 I = 1024 -> 2048 48 -> 55;
# - 16 KB otherwise (vectors of 8 floats or fewer: 3-row blocks re-read the panel every 3
#   rows, a slice in L1 saves those reads).
cdef Py_ssize_t PROJECT_SLICE_BYTES = 16384


def _set_l1d_bytes(Py_ssize_t nbytes):
    """Size the projection's L1 slices and the parameter gradients' panel chunks for an L1
    data cache of `nbytes` (statescan._dispatch passes statescan._caches' reading when it
    loads this module)."""
    global PROJECT_SLICE_BYTES, GRAD_PANEL_BYTES
    GRAD_PANEL_BYTES = 32768
    if nbytes >= 48 * 1024:
        PROJECT_SLICE_BYTES = 32768
    elif SS_MR_f >= 12:
        PROJECT_SLICE_BYTES = 0
        GRAD_PANEL_BYTES = 65536
    else:
        PROJECT_SLICE_BYTES = 16384


cdef inline Py_ssize_t slice_steps(Py_ssize_t I, size_t itemsize) noexcept nogil:
    """Steps of k per slice of a panel for a product over I (PROJECT_SLICE_BYTES; I when the
    panels run whole)."""
    if PROJECT_SLICE_BYTES == 0:
        return max(I, <Py_ssize_t> 1)
    return PROJECT_SLICE_BYTES // (NT * <Py_ssize_t> itemsize)


cdef int run_project(const floating* x, Py_ssize_t N, Py_ssize_t I, const floating* wp,
                     Py_ssize_t M, const floating* b, floating* out, const Py_ssize_t* jobs,
                     Py_ssize_t njobs, int num_threads) noexcept nogil:
    """out[N, M] = x[N, I] @ W^T (+ b) with W^T packed in panels; -1 on allocation failure.
    `jobs` NULL: every row, in jobs of PROJECT_ROWS rows; else only rows jobs[2j]:jobs[2j] +
    jobs[2j+1] for j < njobs (each at most PROJECT_ROWS rows).  When the row jobs are few for
    the threads (one sequence or a few: B*T rows; 3 jobs on 2 threads take 2 jobs' time),
    each is also split into `parts` ranges of panels, for at least 4 jobs per thread: an
    element's products and sums are the same in any range, so are its bits.  Not while the
    column split finds the machine busy (pack_forward says why)."""
    cdef Py_ssize_t job, r0, nr, part, p0, p1
    cdef Py_ssize_t ntiles = (M + NT - 1) // NT, parts = 1
    cdef int failed = 0
    cdef floating* buf
    if jobs == NULL:
        njobs = (N + PROJECT_ROWS - 1) // PROJECT_ROWS
    if njobs < 4 * num_threads and N * I * M >= PROJECT_SPLIT_MIN and not ss_split_paused():
        parts = min(ntiles, (4 * num_threads + njobs - 1) // njobs)
    if num_threads == 1 or njobs * parts == 1:
        buf = <floating*> scratch_alloc(min(N, PROJECT_ROWS) * NT * sizeof(floating))
        if buf == NULL:
            return -1
        for job in range(njobs):
            r0 = job * PROJECT_ROWS if jobs == NULL else jobs[2 * job]
            nr = min(PROJECT_ROWS, N - r0) if jobs == NULL else jobs[2 * job + 1]
            project_job(x + r0 * I, nr, I, wp, 0, ntiles, M, b, out + r0 * M, buf)
        scratch_free(buf)
        return 0
    with parallel(num_threads=num_threads):
        buf = <floating*> scratch_alloc(PROJECT_ROWS * NT * sizeof(floating))
        for job in prange(njobs * parts, schedule="dynamic"):
            if buf == NULL:
                failed += 1
            else:
                part = job % parts
                r0 = job // parts * PROJECT_ROWS if jobs == NULL else jobs[2 * (job // parts)]
                nr = (min(PROJECT_ROWS, N - r0) if jobs == NULL
                      else jobs[2 * (job // parts) + 1])
                p0 = part * ntiles // parts
                p1 = (part + 1) * ntiles // parts
                project_job(x + r0 * I, nr, I, wp, p0, p1, M, b, out + r0 * M, buf)
        scratch_free(buf)
    return -1 if failed else 0


cdef void project_job(const floating* x, Py_ssize_t nr, Py_ssize_t I, const floating* wp,
                      Py_ssize_t p0, Py_ssize_t p1, Py_ssize_t M, const floating* b,
                      floating* out, floating* buf) noexcept nogil:
    """Columns [p0 * NT, min(M, p1 * NT)) of out[nr, M] = x[nr, I] @ W^T (+ b) with W^T packed
    in panels (panels p0 <= tile < p1); buf: nr * NT scratch.

    Whole panels are stored straight into out: each element written once and never read (for
    a large B*T the output is far bigger than any cache, and filling it with the bias first
    cost two more passes over it).  The kernel writes whole panels, so a partial last panel
    goes through buf.  A long I runs in slices of the panel that stay in L1 while the job's
    row blocks use them (the same bits)."""
    cdef Py_ssize_t full = min(p1, M // NT), width = min(M, p1 * NT) - full * NT
    cdef Py_ssize_t kc = slice_steps(I, sizeof(floating))
    cdef Py_ssize_t r, m, tile
    cdef floating bpad[NT]
    if I == 0:      # no products: the bias (or 0) alone
        for r in range(nr):
            for m in range(p0 * NT, min(M, p1 * NT)):
                out[r * M + m] = b[m] if b != NULL else 0
        return
    if I <= kc or nr <= 8:      # the panel fits, or one row block: no slice is reused
        kc = I
        if full > p0:
            matmul_store(x, I, wp + p0 * I * NT, I, full - p0,
                         b + p0 * NT if b != NULL else NULL, out + p0 * NT, M, nr)
    else:
        for tile in range(p0, full):
            matmul_store_kblocked(x, I, wp + tile * I * NT, I, kc,
                                  b + tile * NT if b != NULL else NULL, out + tile * NT, M, nr)
    if width <= 0:
        return
    for m in range(NT):
        bpad[m] = (b[full * NT + m] if b != NULL else 0) if m < width else 0
    matmul_store_kblocked(x, I, wp + full * I * NT, I, kc, bpad if b != NULL else NULL, buf,
                          NT, nr)
    for r in range(nr):
        for m in range(width):
            out[r * M + full * NT + m] = buf[r * NT + m]


# ---- projection with x packed instead of W --------------------------------------------------
# A call that projects its whole sequence first (W too big to stay in cache) packed all of W
# (16 MB at H = I = 1024: as long as a few time steps, plus the fresh pages it fills) to use
# it for B*T rows only.  When there are fewer rows than W has, the same micro-kernel runs with
# the roles swapped: W's rows are the broadcast operand, read where they are, and the rows of
# x are packed into panels instead.  An element out[n, m] is still fma(x[n,k], W[m,k], acc) in
# the order of k, from 0, then b[m] + acc: the bits of project_job (fma's two factors commute).
cdef enum:
    TRANSPOSED_ROWS = 48        # rows of W per job (a multiple of both micro-kernel row blocks)
    TRANSPOSED_CHUNK_BYTES = 1 << 20    # packed x per chunk: stays in L2 while W streams past
    TRANSPOSED_W_BYTES = 1 << 20        # W from this size up is worth not packing


cdef inline bint projects_transposed(Py_ssize_t N, Py_ssize_t I, Py_ssize_t M,
                                     size_t itemsize) noexcept nogil:
    """Whether to project N rows with x packed (project_transposed) rather than W: W is big
    (TRANSPOSED_W_BYTES) and has 8 times x's rows or more (H = I = 1024, 1 thread: 1.05-1.3x
    at B*T = 160-256 rows; at 1024 rows, where x's chunks each stream W from memory again,
    an lstm call ran 5% slower)."""
    return I > 0 and 8 * N <= M and M * I * <Py_ssize_t> itemsize >= TRANSPOSED_W_BYTES


cdef void transposed_job(const floating* W, Py_ssize_t I, Py_ssize_t m0, Py_ssize_t m1,
                         Py_ssize_t M, const floating* xp, Py_ssize_t n0, Py_ssize_t nc,
                         const floating* b, floating* out) noexcept nogil:
    """out[n0 + n, m] = x[n0 + n] @ W[m] + b[m] for n < nc, m0 <= m < m1 (at most
    TRANSPOSED_ROWS), the nc rows of x packed at xp as panels of NT rows."""
    cdef floating acc[TRANSPOSED_ROWS * NT]
    cdef Py_ssize_t kc = slice_steps(I, sizeof(floating))
    cdef Py_ssize_t p, i, n, width, k0
    for p in range((nc + NT - 1) // NT):
        k0 = 0
        while k0 < I:   # in slices of the panel that stay in L1 while every row block uses them
            matmul_raw(W + m0 * I + k0, I, xp + (p * I + k0) * NT, min(kc, I - k0), acc, NT,
                       m1 - m0, k0 == 0)
            k0 += kc
        width = min(<Py_ssize_t> NT, nc - p * NT)
        for n in range(width):
            for i in range(m1 - m0):
                out[(n0 + p * NT + n) * M + m0 + i] = (
                    (b[m0 + i] if b != NULL else 0) + acc[i * NT + n])


cdef int project_transposed(const floating* x, Py_ssize_t N, Py_ssize_t I, const floating* W,
                            Py_ssize_t M, const floating* b, floating* out,
                            int num_threads) noexcept nogil:
    """out[N, M] = x[N, I] @ W[M, I]^T (+ b), W as stored; the bits of run_project on W
    packed.  x in chunks whose panels stay in L2, each chunk's jobs the rows of W in groups of
    TRANSPOSED_ROWS (split across threads).  -1 on allocation failure."""
    cdef Py_ssize_t chunk = max(<Py_ssize_t> 1, TRANSPOSED_CHUNK_BYTES // (I * NT * <Py_ssize_t> sizeof(floating))) * NT
    cdef Py_ssize_t njobs = (M + TRANSPOSED_ROWS - 1) // TRANSPOSED_ROWS
    cdef Py_ssize_t n0, nc, job
    cdef floating* xp = <floating*> panel_alloc(min(chunk, (N + NT - 1) // NT * NT) * I
                                                * sizeof(floating))
    if xp == NULL:
        return -1
    n0 = 0
    while n0 < N:
        nc = min(chunk, N - n0)
        pack_panels(x + n0 * I, 1, I, I, nc, xp)
        if num_threads == 1 or njobs == 1 or N * I * M < PROJECT_SPLIT_MIN:
            for job in range(njobs):
                transposed_job(W, I, job * TRANSPOSED_ROWS, min(M, (job + 1) * TRANSPOSED_ROWS),
                               M, xp, n0, nc, b, out)
        else:
            for job in prange(njobs, num_threads=num_threads, schedule="dynamic"):
                transposed_job(W, I, job * TRANSPOSED_ROWS, min(M, (job + 1) * TRANSPOSED_ROWS),
                               M, xp, n0, nc, b, out)
        n0 += chunk
    huge_free(xp)
    return 0


def project(const floating[:, :, ::1] x, const floating[:, ::1] W, const floating[::1] b,
            floating[:, :, ::1] out, int num_threads):
    """out = x @ W.T (+ b) over all N = B*T rows: x [B, T, I], W [M, I], b [M] or None,
    out [B, T, M].

    Every row is computed by the same sequence of operations whatever N is, so projecting a
    sequence in chunks gives bit-identical rows (BLAS picks different kernels for different N).
    """
    cdef Py_ssize_t N = x.shape[0] * x.shape[1], I = x.shape[2], M = W.shape[0]
    cdef const floating* bp = NULL
    cdef floating* wp
    cdef int status
    if N == 0 or M == 0:
        return
    if b is not None:
        bp = &b[0]
    if projects_transposed(N, I, M, sizeof(floating)):
        with nogil:
            status = project_transposed(&x[0, 0, 0], N, I, &W[0, 0], M, bp, &out[0, 0, 0],
                                        num_threads)
        if status:
            raise MemoryError()
        return
    wp = <floating*> panel_alloc(((M + NT - 1) // NT) * I * NT * sizeof(floating))
    if wp == NULL:
        raise MemoryError()
    with nogil:
        pack_forward(&W[0, 0], 1, M, I, wp, num_threads)
        status = run_project(&x[0, 0, 0], N, I, wp, M, bp, &out[0, 0, 0], NULL, 0,
                             num_threads)
    huge_free(wp)
    if status:
        raise MemoryError()


def project_valid(const floating[:, :, ::1] x, const floating[:, ::1] W,
                  const floating[::1] b, const cnp.int64_t[::1] lengths,
                  floating[:, :, ::1] out, int num_threads):
    """`project` of the valid steps t < lengths[b] of each row only; padded rows of out are 0.

    Valid rows get the bits `project` gives them (a row's result does not depend on its job),
    and the work follows sum(lengths), not B*T.
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2], M = W.shape[0]
    cdef Py_ssize_t b_, t
    cdef const floating* bp = NULL
    cdef floating* wp
    cdef cnp.ndarray jobs
    cdef int status
    if B * T == 0 or M == 0:
        return
    lens = np.asarray(lengths)
    starts = [np.arange(0, lens[b_], PROJECT_ROWS) for b_ in range(B)]
    row0 = np.concatenate([b_ * T + s for b_, s in enumerate(starts)])
    count = np.concatenate([np.minimum(PROJECT_ROWS, lens[b_] - s) for b_, s in enumerate(starts)])
    jobs = np.ascontiguousarray(np.stack([row0, count], axis=1), dtype=np.intp)
    if b is not None:
        bp = &b[0]
    wp = <floating*> panel_alloc(((M + NT - 1) // NT) * I * NT * sizeof(floating))
    if wp == NULL:
        raise MemoryError()
    with nogil:
        pack_forward(&W[0, 0], 1, M, I, wp, num_threads)
        status = run_project(&x[0, 0, 0], B * T, I, wp, M, bp, &out[0, 0, 0],
                             <const Py_ssize_t*> cnp.PyArray_DATA(jobs), jobs.shape[0],
                             num_threads)
        for b_ in range(B):            # padded steps: 0, as in the reference
            for t in range(lengths[b_], T):
                memset(&out[b_, t, 0], 0, M * sizeof(floating))
    huge_free(wp)
    if status:
        raise MemoryError()

