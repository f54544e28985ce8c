# Part of ext/rnn.pyx, which includes it: one extension module, compiled as one file.

# ---- grouped small heads: a job's heads in one layout (issue 12, many small heads) ------------
# When D is a multiple of the vector width, a job's nk heads share one layout: a row's gates are
# [g][nk*D] and its state components [s][row][nk*D], so a row's step is the block-diagonal
# micro-kernel of _block_diag.h (each vector of output columns belongs to one head, whose part
# of h it is multiplied by; no zero columns; it stores b_r + R h into the gates) and one cell
# call on nk*D units instead of nk calls on D.  Every unit's arithmetic is forward_job's on
# its head alone, bit for bit (tests/test_rnn_groups.py compares with one-head calls).

cdef extern from "_block_diag.h" nogil:
    int SS_BD_VL_f
    int SS_BD_VL_d
    void ss_bd_matmul_f(const float* h, Py_ssize_t ldh, const float* mp, Py_ssize_t D,
                        Py_ssize_t GD, Py_ssize_t ntiles, Py_ssize_t nt, Py_ssize_t nk,
                        const float* bias, Py_ssize_t ldb, float* out, Py_ssize_t ldo,
                        Py_ssize_t nrows)
    void ss_bd_matmul_d(const double* h, Py_ssize_t ldh, const double* mp, Py_ssize_t D,
                        Py_ssize_t GD, Py_ssize_t ntiles, Py_ssize_t nt, Py_ssize_t nk,
                        const double* bias, Py_ssize_t ldb, double* out, Py_ssize_t ldo,
                        Py_ssize_t nrows)

cdef enum:
    # rows the grouped path steps through the whole sequence together: their gates
    # (16 x G*nk*D) stay in L1 between the micro-kernel and the cells, their state and
    # projected block of x for all of their steps
    GROUP_ROWS = 16
    # Jobs of fewer rows than this whose heads' panels exceed GROUP_L1_BYTES keep the per-head
    # path: their steps wait on L2 for the panels, and the per-head path overlaps that with the
    # previous head's cells (B = 1 sLSTM, 4 heads of D = 64: grouped 1.1x slower)
    GROUP_MIN_ROWS = 4
    GROUP_L1_BYTES = 32 * 1024


cdef inline bint use_groups(Py_ssize_t RB, Py_ssize_t hpj, Py_ssize_t D, Py_ssize_t G,
                            Py_ssize_t itemsize) noexcept nogil:
    """True when jobs of RB rows and hpj heads of D units take the grouped path: several
    heads, D a multiple of the micro-kernel's lanes, and not a few rows on large heads."""
    return (hpj > 1 and D % (SS_BD_VL_f if itemsize == sizeof(float) else SS_BD_VL_d) == 0
            and (RB >= GROUP_MIN_ROWS or hpj * G * D * D * itemsize <= GROUP_L1_BYTES))


cdef inline void block_diag(const floating* h, Py_ssize_t ldh, const floating* mp, Py_ssize_t D,
                            Py_ssize_t GD, Py_ssize_t nk, const floating* bias, Py_ssize_t ldb,
                            floating* out, Py_ssize_t ldo, Py_ssize_t nrows) noexcept nogil:
    """out[r][g*nk*D + kk*D + d] = bias[g*ldb + kk*D + d] + h[r, kk*D:(kk+1)*D] @
    R_kk^T[:, g*D + d]: nk heads whose panels (pack_recurrent) start at mp."""
    cdef Py_ssize_t ntiles = (GD + NT - 1) // NT
    if floating is float:
        ss_bd_matmul_f(h, ldh, mp, D, GD, ntiles, NT, nk, bias, ldb, out, ldo, nrows)
    else:
        ss_bd_matmul_d(h, ldh, mp, D, GD, ntiles, NT, nk, bias, ldb, out, ldo, nrows)


cdef void forward_group(int cell, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k0,
                        Py_ssize_t nk, Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D,
                        Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save,
                        const floating* ax, const floating* mp, const floating* b_r,
                        const floating* state0, floating* seq, floating* ar_seq,
                        floating* state_out, floating* st, floating* gates,
                        Varlen vl, const Fused* fz) noexcept nogil:
    """forward_job's work (heads k0 .. k0+nk-1 of rows `rows`) in the grouped layout, GROUP_ROWS
    rows at a time: st [S, ss] with row r's units at r*W (W = nk*D), gates [GROUP_ROWS, G, W].
    `fz` as in forward_job, its buffer used by one group at a time."""
    cdef Py_ssize_t GH = G * H, W = nk * D, GW = G * W, off = k0 * D
    cdef Py_ssize_t ss = state_stride(min(nr, <Py_ssize_t> GROUP_ROWS), W)
    cdef Py_ssize_t i, j, r, r0, nrg, nact, steps, b, s, g, u, t, length
    cdef Py_ssize_t ntiles = (G * D + NT - 1) // NT
    cdef const Py_ssize_t* grows
    cdef const floating* mpk = mp + k0 * ntiles * D * NT
    cdef const floating* axr
    cdef floating* str_
    # Rows are independent: a group of rows runs the whole sequence before the next one starts,
    # so its state, gates and projected block stay in L1 / L2 for all of its steps (walking
    # every group at every step evicted them; B = 64: 4 groups)
    for i in range((nr + GROUP_ROWS - 1) // GROUP_ROWS):
        r0 = i * GROUP_ROWS
        grows = rows + r0
        nrg = min(<Py_ssize_t> GROUP_ROWS, nr - r0)
        for s in range(S):
            for r in range(nrg):
                for u in range(W):
                    st[s * ss + r * W + u] = state0[(s * B + grows[r]) * H + off + u]
        nact = nrg
        steps = row_length(vl.lens, grows[0], T)     # grows[0] is the group's longest
        for j in range(steps):
            while row_length(vl.lens, grows[nact - 1], T) <= j:    # rows that ended drop out
                nact -= 1
            if fz != NULL and j % fz.steps == 0:
                project_block(fz, <floating*> fz.ax, grows, nact, T, j, vl)
            for r in range(nact):
                b = grows[r]
                if vl.reset != NULL and vl.reset[b * T + time_index(j, row_length(vl.lens, b, T),
                                                                    vl.reverse)]:
                    for s in range(S):
                        for u in range(W):
                            st[s * ss + r * W + u] = 0
            block_diag(st, W, mpk, D, G * D, nk, b_r + off, H, gates, GW, nact)
            for r in range(nact):
                b = grows[r]
                length = row_length(vl.lens, b, T)
                t = time_index(j, length, vl.reverse)
                str_ = st + r * W
                if ar_seq != NULL:
                    for g in range(G):
                        for u in range(W):
                            ar_seq[(b * T + t) * GH + g * H + off + u] = gates[r * GW + g * W + u]
                if fz == NULL:
                    axr = ax + (b * T + t) * GH + off
                else:
                    axr = <floating*> fz.ax + block_row(fz, r, j, length, vl.reverse) + off
                cell_forward(cell, W, axr, H, gates + r * GW, W, str_, ss)
                for s in range(S_save):
                    for u in range(W):
                        seq[((s * B + b) * T + t) * H + off + u] = str_[s * ss + u]
                # the row's lines of the next step, far from the other rows' (the hardware
                # prefetcher cannot follow): fetched here, between cells, and not all at the
                # start of the step, whose burst of misses stalled on the fill buffers
                if fz != NULL:
                    prefetch_next_block(fz, <const floating*> fz.x, b, j, length, T, vl.reverse)
                if j + 1 < length:
                    t = time_index(j + 1, length, vl.reverse)
                    for g in range(G if fz == NULL else 0):
                        prefetch(ax + (b * T + t) * GH + g * H + off, W)
                    for s in range(S_save):
                        prefetch_w(seq + ((s * B + b) * T + t) * H + off, W)
        for r in range(nrg):
            b = grows[r]
            for s in range(S):
                for u in range(W):
                    state_out[(s * B + b) * H + off + u] = st[s * ss + r * W + u]
            length = row_length(vl.lens, b, T)         # padded steps: outputs are 0
            zero_steps(seq, b * T * H + off, S_save, B * T * H, H, length, T, W)
            if ar_seq != NULL:
                zero_steps(ar_seq, b * T * GH + off, G, H, GH, length, T, W)

