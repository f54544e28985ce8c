# Part of ext/rnn.pyx, which includes it: one extension module, compiled as one file.

# ---- parameter gradients: long-K products A^T B ---------------------------------------------
# The backward's weight gradients dW = gx^T x and dR = gr^T h_prev (per head) sum over all
# N = B*T rows: a long inner dimension K with short outputs, which `project` (built for short K)
# runs at a third of the micro-kernel's speed, and numpy's OpenBLAS here with its AVX2 kernels.
# Classic K-blocking with the micro-kernel, roles chosen so only the narrow operand is
# transposed: the result is computed transposed, outT[n, m] = sum_k B[k, n] A[k, m], with the
# rows of B^T as the micro-kernel's broadcast rows (B's chunk transposed into contiguous rows,
# kc * N copies) and A's chunk packed into column panels (plain row copies, kc * M); then
# out[m, n] = outT[n, m] once at the end (M * N, against the K * M * N multiply-adds).
# Over the chunks of k the accumulators pass through outT unrounded (SS_FIRST / SS_MID /
# SS_LAST: the bits of one pass over all of k), and an element's sum runs over k in order
# whatever job computes it: the bits do not depend on the thread count.
cdef enum:
    GRAD_BT_BYTES = 1 << 19     # B's chunk transposed [N, kc]: stays in L2 (1 MB a core)
    GRAD_PACK_ALL_PANELS = 8    # a job's panels of a chunk packed together up to this many
                                # full-size chunks (256 KB with 32 KB chunks)
    GRAD_KC_MIN = 64            # shortest chunk: below, the accumulators' trips through outT
                                # and the call overheads per chunk count


# A panel's chunk [kc, NT] (_set_l1d_bytes sets it when statescan loads the module):
# - 32 KB, to stay in L1 while every row block of B^T uses it, where the L1d holds 48 KB
#   (Intel Xeon, AMD EPYC Zen 5) or where row blocks are 3 rows (AVX2: the panel is re-read
#   every 3 rows);
# - 64 KB with a smaller L1d and 12-row blocks (AVX-512 float32): the chunk does not stay in
#   L1 beside the blocks' rows either way, and a longer chunk halves the accumulators' trips
#   through outT.  AMD EPYC Zen 4 (32 KB L1d, 1 MB L2), float32, 1 thread, best/median
#   GFLOP/s: input_grads 1024 x 4096 x 1024 90-91 -> 97; weight_grads there 100-102 either
#   way (kc is bound by GRAD_BT_BYTES), K = 14832 256 x 64 75 either way.
cdef Py_ssize_t GRAD_PANEL_BYTES = 32768


cdef inline Py_ssize_t grads_chunk(Py_ssize_t N, size_t itemsize) noexcept nogil:
    """Rows of k per chunk for N columns of B: the panel's chunk fits GRAD_PANEL_BYTES and
    B's transposed chunk GRAD_BT_BYTES (not below GRAD_KC_MIN), a multiple of 8."""
    cdef Py_ssize_t kc = GRAD_PANEL_BYTES // (NT * <Py_ssize_t> itemsize)
    kc = min(kc, GRAD_BT_BYTES // max(<Py_ssize_t> 1, N * <Py_ssize_t> itemsize))
    return max(<Py_ssize_t> GRAD_KC_MIN, kc // 8 * 8)


cdef inline void grads_pack_row(const floating* a, Py_ssize_t m0, Py_ssize_t width,
                                Py_ssize_t da, Py_ssize_t gstride, floating* dst) noexcept nogil:
    """dst[n] = A[k, m0 + n] for n < width, a: row k of A, whose column m is at
    a[(m // da) * gstride + m % da]: the head's slice of each gate block (da = M and one block
    for a plain matrix).  Runs of a block's contiguous columns."""
    cdef Py_ssize_t n = 0, m, run, i
    cdef const floating* src
    while n < width:
        m = m0 + n
        run = min(width - n, da - m % da)
        src = a + (m // da) * gstride + m % da
        if run == NT:       # a whole panel row: a copy of known size, inlined
            memcpy(dst + n, src, NT * sizeof(floating))
        else:
            for i in range(run):
                dst[n + i] = src[i]
        n += run


cdef void grads_pack(const floating* a, Py_ssize_t lda, Py_ssize_t kc, Py_ssize_t m0,
                     Py_ssize_t width, Py_ssize_t da, Py_ssize_t gstride, Py_ssize_t npanels,
                     floating* panel) noexcept nogil:
    """npanels consecutive panels [kc, NT] from column m0 of A (columns mapped as in
    grads_pack_row): panel[(t * kc + k) * NT + n] = A[k, m0 + t * NT + n] for the `width`
    columns, zeros up to npanels * NT.  Row by row: each row of A is read once, in order, for
    all the panels (packed one panel at a time, rows a gate row apart, A larger than the
    cache waited on memory for each panel)."""
    cdef Py_ssize_t k, t
    if width < npanels * NT:
        memset(panel, 0, npanels * kc * NT * sizeof(floating))
    for k in range(kc):
        for t in range(npanels):
            grads_pack_row(a + k * lda, m0 + t * NT, min(<Py_ssize_t> NT, width - t * NT), da,
                           gstride, panel + (t * kc + k) * NT)


cdef int grads_job(const floating* a, Py_ssize_t lda, const floating* packed,
                   const floating* b, Py_ssize_t ldb, const floating* b2, Py_ssize_t ldb2,
                   Py_ssize_t N1, bint b_rows, Py_ssize_t K, Py_ssize_t da, Py_ssize_t gstride,
                   Py_ssize_t M, Py_ssize_t N, Py_ssize_t p0, Py_ssize_t p1, floating* outT,
                   Py_ssize_t ldt) noexcept nogil:
    """Columns [p0 * NT, p1 * NT) of outT[N, ldt] = B^T @ A for one head (a, b at its first
    columns; A's columns mapped as in grads_pack): every chunk of k, B's chunk transposed once
    for all the job's panels.  B's first N1 columns are b's, the others b2's (b2 [K, N - N1],
    rows ldb2 apart; NULL when N1 = N).  b_rows: b holds B^T as stored rows (row n at
    b + n * ldb, k contiguous), read in place.  packed: NULL, or all of A already packed into
    panels [tile][K][NT] (pack_panels), read in place.  -1 on allocation
    failure."""
    cdef Py_ssize_t kc = grads_chunk(N, sizeof(floating))
    # the job's panels of a chunk packed together when they fit GRAD_PACK_ALL_PANELS full-size
    # chunks, else one at a time (none when A comes packed)
    cdef Py_ssize_t npack = (0 if packed != NULL else
                             p1 - p0 if kc * (p1 - p0) * NT * <Py_ssize_t> sizeof(floating)
                             <= GRAD_PACK_ALL_PANELS * GRAD_PANEL_BYTES else 1)
    cdef Py_ssize_t k0, n, tile, ldbt
    cdef int mode
    cdef floating* bt = <floating*> scratch_alloc(((0 if b_rows else N * kc) + npack * kc * NT)
                                                  * sizeof(floating))
    cdef floating* panel
    cdef floating* pt
    cdef const floating* rows
    if bt == NULL:
        return -1
    panel = bt + (0 if b_rows else N * kc)
    k0 = 0
    while k0 < K:
        n = min(kc, K - k0)
        mode = (SS_STORE if n == K else SS_FIRST) if k0 == 0 else (
            SS_LAST if k0 + n == K else SS_MID)
        if b_rows:
            rows, ldbt = b + k0, ldb
        else:
            transpose(b + k0 * ldb, ldb, n, N1, bt, n)
            if N1 < N:
                transpose(b2 + k0 * ldb2, ldb2, n, N - N1, bt + N1 * n, n)
            rows, ldbt = bt, n
        if npack > 1:
            grads_pack(a + k0 * lda, lda, n, p0 * NT, min(M, p1 * NT) - p0 * NT, da, gstride,
                       npack, panel)
        for tile in range(p0, p1):
            if packed != NULL:
                pt = packed + (tile * K + k0) * NT
            elif npack > 1:
                pt = panel + (tile - p0) * n * NT
            else:
                pt = panel
                grads_pack(a + k0 * lda, lda, n, tile * NT, min(<Py_ssize_t> NT, M - tile * NT),
                           da, gstride, 1, panel)
            if floating is float:
                ss_matmul_part_f(rows, ldbt, pt, n, NULL, outT + tile * NT, ldt, N, mode)
            else:
                ss_matmul_part_d(rows, ldbt, pt, n, NULL, outT + tile * NT, ldt, N, mode)
        k0 += n
    scratch_free(bt)
    return 0


cdef int grads_run(const floating* a, Py_ssize_t lda, const floating* packed, const floating* b,
                   Py_ssize_t ldb, const floating* b2, Py_ssize_t ldb2, Py_ssize_t N1,
                   bint b_rows, Py_ssize_t K, Py_ssize_t heads, Py_ssize_t da, Py_ssize_t groups,
                   Py_ssize_t N, Py_ssize_t row_block, floating* outT, Py_ssize_t ldt,
                   int num_threads) noexcept nogil:
    """outT[h][n, m] = sum_k B_h[k, n] A_h[k, m] for every head (outT[h] at outT + h * N * ldt;
    A_h, B_h as in weight_grads; b_rows: B^T's rows stored, packed: A packed, one head, b2
    and N1: B's columns from N1 on in b2, one head, one row block, as in grads_job) in jobs of
    a head, `row_block` rows of outT and a range of panels -- panels split further while the
    jobs are fewer than the threads.  -1 on allocation failure."""
    cdef Py_ssize_t M = groups * da, ntiles = (groups * da + NT - 1) // NT
    cdef Py_ssize_t nrb = (N + row_block - 1) // row_block
    cdef Py_ssize_t parts = min(ntiles, max(<Py_ssize_t> 1,
                                            (num_threads + heads * nrb - 1) // (heads * nrb)))
    cdef Py_ssize_t njobs = heads * nrb * parts, job, h, rb, part, r0
    cdef int failed = 0
    if num_threads == 1 or njobs == 1:
        for job in range(njobs):
            h = job // (nrb * parts)
            rb = job // parts % nrb
            part = job % parts
            r0 = rb * row_block
            failed += -grads_job(a + h * da, lda, packed, b + (r0 * ldb if b_rows else h * N),
                                 ldb, b2, ldb2, min(N1, row_block), b_rows, K, da, heads * da, M,
                                 min(row_block, N - r0),
                                 part * ntiles // parts, (part + 1) * ntiles // parts,
                                 outT + (h * N + r0) * ldt, ldt)
    else:
        for job in prange(njobs, num_threads=num_threads, schedule="dynamic"):
            h = job // (nrb * parts)
            rb = job // parts % nrb
            part = job % parts
            r0 = rb * row_block
            failed += -grads_job(a + h * da, lda, packed, b + (r0 * ldb if b_rows else h * N),
                                 ldb, b2, ldb2, min(N1, row_block), b_rows, K, da, heads * da, M,
                                 min(row_block, N - r0),
                                 part * ntiles // parts, (part + 1) * ntiles // parts,
                                 outT + (h * N + r0) * ldt, ldt)
    return -1 if failed else 0


def weight_grads(const floating[:, ::1] a, const floating[:, ::1] b, Py_ssize_t groups,
                 floating[:, :, ::1] out, int num_threads, const floating[:, ::1] b2=None,
                 floating[:, :, ::1] out2=None):
    """out[h] = A_h^T @ B_h for every head h < heads = out.shape[0], summed over the K rows:
    a [K, groups * heads * Da], A_h [K, groups * Da] its columns g * heads * Da + h * Da + d
    (g < groups, d < Da: the head's slice of each gate block); b [K, heads * Nb], B_h its
    columns h * Nb + j; out [heads, groups * Da, Nb].  dW = gx^T x is heads = groups = 1;
    dR = gr^T h_prev per head is groups = G.

    With b2 [K, N2] and out2 [1, groups * Da, N2] (one head), also out2[0] = A^T @ b2 in the
    same pass: A's panels packed once for both (dW and dR of a cell whose recurrent and input
    gradients are the same, with one head).

    Each element is summed over k in order, from 0, in the micro-kernel's fused multiply-adds:
    the same bits for any K-chunking, job split, thread count and pairing."""
    cdef Py_ssize_t heads = out.shape[0], M = out.shape[1], N = out.shape[2]
    cdef Py_ssize_t K = a.shape[0], lda = a.shape[1], ldb = b.shape[1]
    cdef Py_ssize_t N2 = 0 if out2 is None else out2.shape[2]
    cdef Py_ssize_t ldb2 = 0 if b2 is None else b2.shape[1]
    cdef Py_ssize_t ldt, h
    cdef const floating* b2p = NULL
    cdef floating* outT
    cdef int status
    if groups < 1 or M % groups or b.shape[0] != K or lda != groups * heads * (M // groups) \
            or ldb != heads * N:
        raise ValueError("weight_grads: a [K, groups*heads*Da], b [K, heads*Nb], "
                         "out [heads, groups*Da, Nb]")
    if (b2 is None) != (out2 is None) or (b2 is not None and (
            heads != 1 or b2.shape[0] != K or out2.shape[0] != 1 or out2.shape[1] != M
            or ldb2 != N2)):
        raise ValueError("weight_grads: b2 [K, N2] and out2 [1, groups*Da, N2] together, "
                         "with one head")
    if M * (heads * N + N2) == 0:
        return
    if K == 0:
        memset(&out[0, 0, 0], 0, heads * M * N * sizeof(floating))
        if N2:
            memset(&out2[0, 0, 0], 0, M * N2 * sizeof(floating))
        return
    if N2:
        b2p = &b2[0, 0]
    # outT's rows padded by a panel: a power-of-two stride (M = 4096) put the rows that
    # the final transpose reads together in one set of the L1
    ldt = round_up(M, NT) + NT
    outT = <floating*> buffer_alloc((heads * N + N2) * ldt * sizeof(floating))
    if outT == NULL:
        raise MemoryError()
    with nogil:
        # one row block: B's chunk is transposed once per job, for all of its rows
        status = grads_run(&a[0, 0], lda, NULL, &b[0, 0] if N else b2p, ldb, b2p, ldb2, N,
                           False, K, heads, M // groups, groups, N + N2, N + N2, outT, ldt,
                           num_threads)
        if status == 0:
            for h in range(heads):      # out[h] = outT[h]^T, in blocks that stay in cache
                if N:
                    transpose(outT + h * N * ldt, ldt, N, M, &out[h, 0, 0], N)
            if N2:
                transpose(outT + N * ldt, ldt, N2, M, &out2[0, 0, 0], N2)
    huge_free(outT)
    if status:
        raise MemoryError()


cdef enum:
    # rows of dx per job of input_grads: their chunk of gx ([rows, kc]: 256 KB in float32)
    # stays in L2 while the chunk's panels of W pass
    GRADS_X_ROWS = 256


def input_grads(const floating[:, ::1] g, const floating[:, ::1] W, floating[:, ::1] out,
                int num_threads):
    """out[N, I] = g[N, M] @ W[M, I]: the parameter gradients' dx = gx W, summed over the long
    M = G*H.

    The rows of g are the micro-kernel's broadcast rows as stored (k contiguous); W is packed
    into panels once, by row copies, each row of W read once, in order (a copy of W^T for
    `project` cost more than the product at M = 4096, I = 1024: 29 ms; packing each job's
    chunks of W as it went read W again per block of rows, 128 bytes of each row at a time:
    9% of the time at N = 1024 there).  The same bits for any thread count (grads_job)."""
    cdef Py_ssize_t N = g.shape[0], M = g.shape[1], I = W.shape[1]
    cdef Py_ssize_t ldt = round_up(I, NT), ntiles = ldt // NT, r, i, part, t0, t1
    cdef Py_ssize_t parts = min(ntiles, <Py_ssize_t> num_threads)
    cdef floating* outT
    cdef floating* packed
    cdef int status
    if W.shape[0] != M or out.shape[0] != N or out.shape[1] != I:
        raise ValueError("input_grads: g [N, M], W [M, I], out [N, I]")
    if N * I == 0:
        return
    if M == 0:
        memset(&out[0, 0], 0, N * I * sizeof(floating))
        return
    # whole panels are written: straight into out when I is a multiple of NT
    if ldt == I:
        outT = &out[0, 0]
    else:
        outT = <floating*> buffer_alloc(N * ldt * sizeof(floating))
        if outT == NULL:
            raise MemoryError()
    packed = <floating*> panel_alloc(M * ldt * sizeof(floating))
    if packed == NULL:
        if ldt != I:
            huge_free(outT)
        raise MemoryError()
    with nogil:
        if parts > 1 and M * I >= PACK_PARALLEL_MIN and not ss_split_paused():
            for part in prange(parts, num_threads=num_threads, schedule="static"):
                t0 = part * ntiles // parts
                t1 = (part + 1) * ntiles // parts
                pack_panels(&W[0, 0] + t0 * NT, I, 1, M, min(I, t1 * NT) - t0 * NT,
                            packed + t0 * M * NT)
        else:
            pack_panels(&W[0, 0], I, 1, M, I, packed)
        status = grads_run(&W[0, 0], I, packed, &g[0, 0], M, NULL, 0, N, True, M, 1, I, 1, N,
                           GRADS_X_ROWS, outT, ldt, num_threads)
        if status == 0 and ldt != I:
            for r in range(N):
                for i in range(I):
                    out[r, i] = outT[r * ldt + i]
    huge_free(packed)
    if ldt != I:
        huge_free(outT)
    if status:
        raise MemoryError()
