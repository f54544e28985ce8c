# Part of ext/rnn.pyx, which includes it: one extension module, compiled as one file.

cdef enum:
    # backward_job prefetches a row's next step while its runs (one gate of the row's heads,
    # nk*D entries) are shorter: the hardware prefetcher follows longer runs, and hints then
    # only cost (1 thread, ext.backward alone: lstm H=256 B=16/64 1.12-1.14x faster without,
    # 1.02-1.03x with them between cells); H=64 B=16/32 ran 1.1-1.25x slower without
    PREFETCH_RUN_BYTES = 1024


cdef void backward_job(int cell, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k0,
                       Py_ssize_t nk, Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D,
                       Py_ssize_t G, Py_ssize_t S, const floating* ax, const floating* ar_seq,
                       const floating* mb, const floating* state0, const floating* seq,
                       const floating* dy, const floating* dstate, floating* dgx, floating* dgr,
                       floating* dstate0, floating* dst, floating* gbuf, floating* zeros,
                       Varlen vl) noexcept nogil:
    # Processing steps in reverse order; row r is active at step j while its length > j, so
    # the active rows (a prefix of `rows`) grow as j decreases.  An inactive row's dst holds
    # the cotangent of its final state until its last valid step is reached.  Heads k0 ..
    # k0+nk-1 step together (as in forward_job), head kk's dst at dst + kk*S*sds.
    cdef Py_ssize_t GH = G * H, GD = G * D
    cdef Py_ssize_t ntiles = (D + NT - 1) // NT, Dp = ntiles * NT
    cdef Py_ssize_t sds = nr * Dp
    cdef Py_ssize_t j, r, b, s, g, d, t, row, length, k, kk
    cdef Py_ssize_t nact = 0
    cdef bint short_runs = nk * D * sizeof(floating) < PREFETCH_RUN_BYTES
    cdef bint in_place = <const floating*> dgx == ax      # dgx written over ax
    cdef const floating* prev
    cdef Py_ssize_t sp
    cdef floating* dsk
    for d in range(D):
        zeros[d] = 0
    for kk in range(nk):
        for s in range(S):
            for r in range(nr):
                for d in range(Dp):
                    dst[(kk * S + s) * sds + r * Dp + d] = (
                        dstate[(s * B + rows[r]) * H + (k0 + kk) * D + d] if d < D else 0)
    for j in range(row_length(vl.lens, rows[0], T) - 1, -1, -1):
        while nact < nr and row_length(vl.lens, rows[nact], T) > j:
            nact += 1
        for kk in range(nk):
            k = k0 + kk
            dsk = dst + kk * S * sds
            for r in range(nact):
                b = rows[r]
                length = row_length(vl.lens, b, T)
                if short_runs and kk == 0 and j > 0:
                    # rows are far apart: fetch what the row reads and writes at step j - 1
                    # (all nk heads), between cells -- all rows' hints at once at the start of
                    # a step stalled on full fill buffers (B=64 H=64: 1.22x slower)
                    t = time_index(j - 1, length, vl.reverse)
                    for g in range(G):
                        row = (b * T + t) * GH + g * H + k0 * D
                        prefetch(ax + row, nk * D)
                        prefetch(ar_seq + row, nk * D)
                        if not in_place:
                            prefetch(dgx + row, nk * D)
                    prefetch(dy + (b * T + t) * H + k0 * D, nk * D)
                    if j > 1:
                        t = time_index(j - 2, length, vl.reverse)
                        for s in range(S):
                            prefetch(seq + ((s * B + b) * T + t) * H + k0 * D, nk * D)
                t = time_index(j, length, vl.reverse)
                row = (b * T + t) * GH + k * D
                for d in range(D):
                    dsk[r * Dp + d] += dy[(b * T + t) * H + k * D + d]
                if vl.reset != NULL and vl.reset[b * T + t]:
                    prev = zeros             # the state was zeroed before this step
                    sp = 0
                elif j > 0:
                    prev = seq + (b * T + time_index(j - 1, length, vl.reverse)) * H + k * D
                    sp = B * T * H
                else:
                    prev = state0 + b * H + k * D
                    sp = B * H
                cell_backward(cell, D, ax + row, H, ar_seq + row, H, prev, sp,
                              dsk + r * Dp, sds, dgx + row, H, gbuf + r * GD, D)
                if dgr != dgx:
                    for g in range(G):
                        for d in range(D):
                            dgr[row + g * H + d] = gbuf[r * GD + g * D + d]
            matmul_acc(gbuf, GD, mb + k * ntiles * GD * NT, GD, ntiles, dsk, Dp, nact)
        if vl.reset != NULL:     # a reset cuts the gradient to the state before it
            for r in range(nact):
                b = rows[r]
                if vl.reset[b * T + time_index(j, row_length(vl.lens, b, T), vl.reverse)]:
                    for kk in range(nk):
                        for s in range(S):
                            for d in range(Dp):
                                dst[(kk * S + s) * sds + r * Dp + d] = 0
    for r in range(nr):
        b = rows[r]
        for kk in range(nk):
            for s in range(S):
                for d in range(D):
                    dstate0[(s * B + b) * H + (k0 + kk) * D + d] = dst[(kk * S + s) * sds + r * Dp + d]
        length = row_length(vl.lens, b, T)         # padded steps: gradients are 0
        zero_steps(dgx, b * T * GH + k0 * D, G, H, GH, length, T, nk * D)
        zero_steps(dgr, b * T * GH + k0 * D, G, H, GH, length, T, nk * D)


def backward(str cell_name, const floating[:, :, ::1] ax, const floating[:, :, ::1] ar_seq,
             const floating[:, :, ::1] R, const floating[:, :, ::1] state0,
             const floating[:, :, :, ::1] seq, const floating[:, :, ::1] dy,
             const floating[:, :, ::1] dstate, const cnp.int64_t[::1] lengths, bint reverse,
             reset, floating[:, :, ::1] dgx, floating[:, :, ::1] dgr,
             floating[:, :, ::1] dstate0, int num_threads):
    """Backpropagate through the sequence run by `forward` (with every state saved).

    seq [S,B,T,H] and ar_seq [B,T,G*H] come from forward (same lengths, reverse, reset);
    dy [B,T,H]; dstate [S,B,H] is the cotangent of the final state.  Outputs: dgx, dgr
    [B,T,G*H] gradients of the input-side and recurrent-side pre-activations, 0 at padded
    steps (dgr may be the same array as dgx for cells where they are equal: every cell but
    the GRU), dstate0 [S,B,H].  dgx may also be ax itself: a step's cell reads its entries of
    ax before it writes the same entries of dgx.  B, T or H = 0 return at once.
    """
    cdef int cell = CELL_IDS[cell_name]
    cdef Py_ssize_t B = ax.shape[0], T = ax.shape[1]
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef Py_ssize_t H = heads * D, S = state0.shape[0]
    cdef Py_ssize_t G, ntiles = (D + NT - 1) // NT
    cdef Py_ssize_t job, blk, k0, hpj, groups
    cdef floating* mb
    cdef floating* dst
    cdef floating* gbuf
    cdef floating* dgr_ptr
    cdef int failed = 0
    cdef Varlen vl
    cdef JobRows jr
    if B == 0 or T == 0 or D == 0:
        if T == 0:
            dstate0[...] = dstate
        return
    G = GD // D
    dgr_ptr = &dgr[0, 0, 0]
    vl = varlen(lengths, reverse, reset, B, T)
    # contiguous blocks without lengths (JobRows with lengths=None): the same rows as forward
    jr = JobRows(B, rows_per_job(B, heads, num_threads), lengths)
    hpj = heads_per_job(jr.nblocks, heads, num_threads, G * D * D * sizeof(floating))
    groups = (heads + hpj - 1) // hpj
    mb = <floating*> panel_alloc(heads * ntiles * GD * NT * sizeof(floating))
    if mb == NULL:
        raise MemoryError()
    with nogil:
        pack_recurrent(&R[0, 0, 0], heads, GD, D, False, mb)
        with parallel(num_threads=num_threads):
            dst = <floating*> scratch_alloc(hpj * S * jr.RB * ntiles * NT * sizeof(floating))
            gbuf = <floating*> scratch_alloc((jr.RB * GD + D) * sizeof(floating))
            for job in prange(jr.nblocks * groups, schedule="static"):
                if dst == NULL or gbuf == NULL:
                    failed += 1
                else:
                    blk = job // groups
                    k0 = job % groups * hpj
                    backward_job(cell, jr.rows + jr.start[blk], jr.start[blk + 1] - jr.start[blk],
                                 k0, min(hpj, heads - k0), B, T, H, D, G, S,
                                 &ax[0, 0, 0], &ar_seq[0, 0, 0], mb, &state0[0, 0, 0],
                                 &seq[0, 0, 0, 0], &dy[0, 0, 0], &dstate[0, 0, 0],
                                 &dgx[0, 0, 0], dgr_ptr, &dstate0[0, 0, 0], dst, gbuf,
                                 gbuf + jr.RB * GD, vl)
            scratch_free(dst)
            scratch_free(gbuf)
    huge_free(mb)
    if failed:
        raise MemoryError()

