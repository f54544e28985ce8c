# Fused RNN sequence kernels: the whole time loop in one call, GIL released.
# Work is split into independent jobs (a block of batch rows x one head) that each run all T
# steps; a job's arithmetic does not depend on how many jobs or threads there are, so results
# are bit-identical for any thread count.
from cython cimport floating
from cython.parallel cimport prange, parallel
cimport numpy as cnp
import numpy as np

cnp.import_array()

from _microkernel cimport (NT, SS_MR_d, SS_MR_f, matmul_acc, matmul_raw, matmul_store,
                          matmul_store_kblocked, pack_panels, panel_alloc, buffer_alloc,
                          huge_free, pool_state, prefetch, prefetch_w, ss_matmul_part_f,
                          ss_matmul_part_d,
                          SS_STORE, SS_FIRST, SS_MID, SS_LAST, transpose)
from _cells cimport cell_forward, cell_backward, cell_ids
from _scratch cimport scratch_alloc, scratch_free
from libc.string cimport memcpy, memset

# The Python-visible functions take a cell's name; its kernel id is the enum in _cells.pxd.
CELL_IDS = cell_ids()


cdef inline Py_ssize_t round_up(Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    return (n + m - 1) // m * m


cdef Py_ssize_t rows_per_job(Py_ssize_t B, Py_ssize_t heads, int num_threads) noexcept nogil:
    # Enough jobs to occupy every thread, in blocks of 8 rows (a micro-kernel block) if possible.
    cdef Py_ssize_t chunks = max(1, (num_threads + heads - 1) // heads)
    return min(B, round_up((B + chunks - 1) // chunks, 8))


cdef enum:
    # bytes of packed recurrent weights one job's heads may share: stepping heads together
    # cycles through all of their weights every step, so they must stay in a core's cache
    # (8 heads of D=128 took 1.4x longer per step together than one after another)
    HEAD_GROUP_BYTES = 512 * 1024


cdef Py_ssize_t heads_per_job(Py_ssize_t nblocks, Py_ssize_t heads, int num_threads,
                              Py_ssize_t head_bytes) noexcept nogil:
    # A job steps several heads together (one pass over each row's ax per step); heads are
    # split over jobs as far as needed to give every thread a job, and so that a job's
    # heads' weights (head_bytes each) fit in HEAD_GROUP_BYTES.
    cdef Py_ssize_t groups = min(heads, max(1, (num_threads + nblocks - 1) // nblocks))
    cdef Py_ssize_t hpj = (heads + groups - 1) // groups
    return max(1, min(hpj, HEAD_GROUP_BYTES // max(1, head_bytes)))


# ---- variable lengths (DESIGN.md "Variable lengths, reverse direction, resets") -----------------
# A job owns `nr` batch rows, listed in `rows` in order of decreasing length, so at processing
# step j the rows still running (length > j) are the first `nact`: the micro-kernel gets
# nr = nact and finished rows cost nothing.  Row b's processing step j is time step j, or
# lengths[b] - 1 - j with `reverse` (its valid part read backwards, in place).  Without
# lengths every row runs all T steps and `rows` is a contiguous range (the arithmetic is the
# same as a plain block: a row's results never depend on which rows share its block).

cdef inline Py_ssize_t row_length(const cnp.int64_t* lens, Py_ssize_t b, Py_ssize_t T) noexcept nogil:
    return T if lens == NULL else <Py_ssize_t> lens[b]


cdef inline Py_ssize_t time_index(Py_ssize_t j, Py_ssize_t length, bint reverse) noexcept nogil:
    return length - 1 - j if reverse else j


cdef inline Py_ssize_t state_stride(Py_ssize_t nr, Py_ssize_t D) noexcept nogil:
    return round_up(nr * D, 16)


cdef inline void zero_steps(floating* a, Py_ssize_t start, Py_ssize_t parts,
                            Py_ssize_t part_stride, Py_ssize_t step_stride, Py_ssize_t t0,
                            Py_ssize_t T, Py_ssize_t n) noexcept nogil:
    """a[start + p * part_stride + t * step_stride + d] = 0 for p < parts, t0 <= t < T, d < n:
    one row's padded steps (t0 = its length) in n units of an output laid out [.., B, T, ..]
    (start: the row's first step and the job's first unit)."""
    cdef Py_ssize_t p, t, d
    for t in range(t0, T):
        for p in range(parts):
            for d in range(n):
                a[start + p * part_stride + t * step_stride + d] = 0


cdef struct Varlen:
    const cnp.int64_t* lens      # [B] or NULL (every row T steps)
    const char* reset          # [B, T] bool or NULL
    bint reverse


# ---- the input projection fused into the time loop --------------------------------------------
# A plain call (no lengths, reverse, reset; outputs not saved for a backward) need not write
# W x + b for the whole sequence to memory and read it back: forward_job projects each block of
# `steps` time steps of its rows into a small buffer (ldo = G*H rounded up to whole panels)
# just before stepping through them.  Each output is the same sum as `project` computes (the
# bias, then the products summed over the inputs in one order), so the bits are those of
# project + forward.

cdef struct Fused:
    const void* x            # [B, T, I] (floating)
    const void* wp           # W^T packed in panels; NULL: x already holds W x (n_in = G*H)
    const void* bias         # [ldo] (b, then zeros) or NULL
    void* ax                 # this job's buffer [rows, steps, ldo] (floating)
    Py_ssize_t n_in, ldo, steps    # inputs per row (not `I`: complex.h's macro)


cdef inline Py_ssize_t block_steps(const Fused* fz, Py_ssize_t j, Py_ssize_t length) noexcept nogil:
    """Steps of a row of this length in the projected block that holds processing step j."""
    return min(fz.steps, length - (j - j % fz.steps))


cdef inline Py_ssize_t block_index(const Fused* fz, Py_ssize_t j, Py_ssize_t length,
                                   bint reverse) noexcept nogil:
    """The buffer row of processing step j of a row of this length: a block holds the row's
    x rows in time order, so with `reverse` its processing steps run from the last one down."""
    return block_steps(fz, j, length) - 1 - j % fz.steps if reverse else j % fz.steps


cdef inline Py_ssize_t block_row(const Fused* fz, Py_ssize_t r, Py_ssize_t j,
                                 Py_ssize_t length, bint reverse) noexcept nogil:
    """Offset in fz.ax of the projected row of processing step j of job row r."""
    return (r * fz.steps + block_index(fz, j, length, reverse)) * fz.ldo


cdef inline void prefetch_next_block(const Fused* fz, const floating* x, Py_ssize_t b,
                                     Py_ssize_t j, Py_ssize_t length, Py_ssize_t T,
                                     bint reverse) noexcept nogil:
    """At processing step j of row b (x: fz.x), fetch the first 256 bytes of the row of x that
    the next projected block holds for step j + fz.steps: over a block's steps, the start of
    each time step of the next block.  Rows of different batch entries are far apart in x, so
    the hardware prefetcher does not follow them, and project_block otherwise waits on memory
    for each row; past the first lines it follows the row.  A whole long row at once stalled
    on the fill buffers (AMD Zen 4, sLSTM with W x given, G*H = 1024, B=16: 4 KB a row, 4% of
    the call)."""
    if j + fz.steps < length:
        prefetch(x + (b * T + time_index(j + fz.steps, length, reverse)) * fz.n_in,
                 min(fz.n_in, 256 // <Py_ssize_t> sizeof(floating)))


cdef void project_block(const Fused* fz, floating* ax, const Py_ssize_t* rows, Py_ssize_t nact,
                        Py_ssize_t T, Py_ssize_t j, Varlen vl) noexcept nogil:
    """For the active rows r < nact, the block of processing steps from j (a multiple of
    fz.steps): ax[r, i, :] = x[rows[r], t0 + i] @ W^T + b for i < block_steps, where t0 is the
    first time step of the block (ax: fz.ax).  One panel of W at a time over every row: the
    panel stays in cache while all of the job's rows use it."""
    cdef const floating* x = <const floating*> fz.x
    cdef const floating* wp = <const floating*> fz.wp
    cdef const floating* bias = <const floating*> fz.bias
    cdef Py_ssize_t ldo = fz.ldo, I = fz.n_in, r, i, m, n, t0, tile, length
    if wp == NULL:      # W x given: x + b, as numpy adds them
        for r in range(nact):
            length = row_length(vl.lens, rows[r], T)
            n = block_steps(fz, j, length)
            t0 = length - j - n if vl.reverse else j
            for i in range(n):
                for m in range(I):
                    ax[(r * fz.steps + i) * ldo + m] = x[(rows[r] * T + t0 + i) * I + m] + bias[m]
        return
    for r in range(nact if I == 0 else 0):      # no products: the bias (or 0) alone
        for i in range(block_steps(fz, j, row_length(vl.lens, rows[r], T))):
            for m in range(ldo):
                ax[(r * fz.steps + i) * ldo + m] = bias[m] if bias != NULL else 0
    for tile in range(ldo // NT if I > 0 else 0):
        for r in range(nact):
            length = row_length(vl.lens, rows[r], T)
            n = block_steps(fz, j, length)
            t0 = length - j - n if vl.reverse else j
            matmul_store(x + (rows[r] * T + t0) * I, I, wp + tile * I * NT, I, 1,
                         bias + tile * NT if bias != NULL else NULL,
                         ax + r * fz.steps * ldo + tile * NT, ldo, n)


cdef void fused_init(Fused* fz, const floating* x, Py_ssize_t I, const floating* wp,
                     const floating* b, Py_ssize_t M, floating* bias) noexcept nogil:
    """fz for x [B,T,I], W^T packed at wp (M columns), b [M] or NULL; bias: room for
    round_up(M, NT) entries, where b is copied and zero-padded (the kernel stores whole
    panels, bias included)."""
    cdef Py_ssize_t m
    fz.x, fz.wp, fz.bias, fz.ax = x, wp, NULL, NULL
    fz.n_in, fz.ldo, fz.steps = I, round_up(M, NT), 0
    if b != NULL:
        for m in range(fz.ldo):
            bias[m] = b[m] if m < M else 0
        fz.bias = bias


cdef int project_all(const Fused* fz, Py_ssize_t B, Py_ssize_t T, Py_ssize_t M, Varlen vl,
                     floating* ax, int num_threads) noexcept nogil:
    """ax [B, T, M] = W x + b of fz's x (M = G*H), at every step, or only the valid ones with
    lengths (padded steps are never read): the projection of a call whose jobs do not project
    their own blocks; -1 when out of memory."""
    cdef const floating* x = <const floating*> fz.x
    cdef const floating* bias = <const floating*> fz.bias
    cdef Py_ssize_t b, n, m
    if fz.wp == NULL:           # W x given: x + b, as numpy adds them
        for n in range(B * T):
            for m in range(M):
                ax[n * M + m] = x[n * M + m] + bias[m]
        return 0
    if vl.lens == NULL:
        return run_project(x, B * T, fz.n_in, <const floating*> fz.wp, M, bias, ax, NULL, 0,
                           num_threads)
    for b in range(B):
        if vl.lens[b] > 0 and run_project(x + b * T * fz.n_in, vl.lens[b], fz.n_in,
                                          <const floating*> fz.wp, M, bias, ax + b * T * M,
                                          NULL, 0, num_threads):
            return -1
    return 0


cdef Fused* job_fused(const Fused* fz, Py_ssize_t steps, Py_ssize_t RB,
                      size_t itemsize) noexcept nogil:
    """A copy of fz with blocks of `steps` steps and its own buffer [RB, steps, fz.ldo] in one
    allocation (scratch_free it): what one thread's jobs use.  NULL when fz is NULL or there
    is no memory."""
    cdef Fused* job
    if fz == NULL:
        return NULL
    job = <Fused*> scratch_alloc(64 + RB * steps * fz.ldo * itemsize)
    if job != NULL:
        job[0] = fz[0]
        job.steps = steps
        job.ax = <char*> job + 64       # past the struct, on its own cache line
    return job


cdef void forward_job(int cell, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k0,
                      Py_ssize_t nk, Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                      Py_ssize_t S, Py_ssize_t S_save,
                      const floating* ax, const floating* mp, const floating* b_r,
                      const floating* state0, floating* seq, floating* ar_seq,
                      floating* state_out, floating* st, floating* gates,
                      Varlen vl, const Fused* fz) noexcept nogil:
    cdef Py_ssize_t GH = G * H, GD = G * D
    cdef Py_ssize_t ntiles = (GD + NT - 1) // NT, GDp = ntiles * NT
    # stride between state components in `st`: padded to whole 64-byte lines, so how the
    # compiler vectorises the cell (its run-time overlap checks) never depends on nr --
    # with ss == D (one row) the sLSTM took another path and rounded differently
    cdef Py_ssize_t ss = state_stride(nr, D)
    cdef Py_ssize_t j, r, b, s, g, d, t, n, length, k, kk
    cdef Py_ssize_t nact = nr
    cdef Py_ssize_t steps = row_length(vl.lens, rows[0], T)   # rows[0] is the longest
    cdef const floating* axp
    cdef floating* stk
    # heads k0 .. k0+nk-1 step together, head kk's state at st + kk*S*ss: a row's step reads
    # and writes its nk*D entries of ax and seq as one run (with one head per job, small heads
    # read 64 bytes per 1 KB row of ax and the hardware prefetcher cannot follow)
    for kk in range(nk):
        for s in range(S):
            for r in range(nr):
                for d in range(D):
                    st[(kk * S + s) * ss + r * D + d] = state0[(s * B + rows[r]) * H + (k0 + kk) * D + d]
    for j in range(steps):
        while row_length(vl.lens, rows[nact - 1], T) <= j:    # rows that ended drop out
            nact -= 1
        if fz != NULL and j % fz.steps == 0:
            project_block(fz, <floating*> fz.ax, rows, nact, T, j, vl)
        for r in range(nact):
            b = rows[r]
            length = row_length(vl.lens, b, T)
            if vl.reset != NULL and vl.reset[b * T + time_index(j, length, vl.reverse)]:
                for kk in range(nk):
                    for s in range(S):
                        for d in range(D):
                            st[(kk * S + s) * ss + r * D + d] = 0
        for kk in range(nk):
            k = k0 + kk
            stk = st + kk * S * ss
            for r in range(nact):
                for g in range(G):
                    for d in range(D):
                        gates[r * GDp + g * D + d] = b_r[g * H + k * D + d]
            matmul_acc(stk, D, mp + k * ntiles * D * NT, D, ntiles, gates, GDp, nact)
            for r in range(nact):
                b = rows[r]
                length = row_length(vl.lens, b, T)
                if fz == NULL and kk == 0 and j + 1 < length:
                    # rows of different batch entries are far apart: fetch the row's ax for
                    # step j + 1, between cells (all rows' at once stalled on the fill buffers)
                    for g in range(G):
                        prefetch(ax + (b * T + time_index(j + 1, length, vl.reverse)) * GH
                                 + g * H + k0 * D, nk * D)
                elif fz != NULL and kk == 0:
                    prefetch_next_block(fz, <const floating*> fz.x, b, j, length, T, vl.reverse)
                t = time_index(j, length, vl.reverse)
                if fz == NULL:
                    axp = ax + (b * T + t) * GH + k * D
                else:
                    axp = (<floating*> fz.ax
                           + block_row(fz, r, j, row_length(vl.lens, b, T), vl.reverse) + k * D)
                if ar_seq != NULL:
                    for g in range(G):
                        for d in range(D):
                            ar_seq[(b * T + t) * GH + g * H + k * D + d] = gates[r * GDp + g * D + d]
                cell_forward(cell, D, axp, H, gates + r * GDp, D, stk + r * D, ss)
                for s in range(S_save):
                    for d in range(D):
                        seq[((s * B + b) * T + t) * H + k * D + d] = stk[s * ss + r * D + d]
                if kk == 0 and j + 1 < length:     # the row's output lines of step j + 1
                    t = time_index(j + 1, length, vl.reverse)
                    for s in range(S_save):
                        prefetch_w(seq + ((s * B + b) * T + t) * H + k0 * D, nk * D)
                    for g in range(G if ar_seq != NULL else 0):
                        prefetch_w(ar_seq + (b * T + t) * GH + g * H + k0 * D, nk * D)
    for r in range(nr):
        b = rows[r]
        for s in range(S):
            for kk in range(nk):
                for d in range(D):
                    state_out[(s * B + b) * H + (k0 + kk) * D + d] = st[(kk * S + s) * ss + r * D + d]
        length = row_length(vl.lens, b, T)         # padded steps: outputs are 0
        zero_steps(seq, b * T * H + k0 * D, S_save, B * T * H, H, length, T, nk * D)
        if ar_seq != NULL:
            zero_steps(ar_seq, b * T * GH + k0 * D, G, H, GH, length, T, nk * D)


include "_rnn_columns.pxi"


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


cdef enum:
    # entries of R below which the forward packs on the calling thread (about 1 MB of float32)
    PACK_PARALLEL_MIN = 1 << 18


cdef void pack_forward(const floating* R, Py_ssize_t heads, Py_ssize_t GD, Py_ssize_t D,
                       floating* mp, int num_threads) noexcept nogil:
    """pack_recurrent(transpose=True) with the panels split across threads: a large model's R
    (16 MB for an LSTM with H = 1024) takes as long to pack as several time steps, so a serial
    pack would cap the speed-up of short sequences.  W [M, I] is packed for the projection as
    one head (heads = 1, GD = M, D = I).  Each panel gets the same bytes.  Serial
    too while the column split finds the machine busy: a static split then waits a time slice
    for a thread that lost its core (+8-10 ms per call at H = 1024 under load)."""
    cdef Py_ssize_t ntiles = (GD + NT - 1) // NT, i, k, tile
    if num_threads == 1 or heads * GD * D < PACK_PARALLEL_MIN or ss_split_paused():
        pack_recurrent(R, heads, GD, D, True, mp)
        return
    for i in prange(heads * ntiles, num_threads=num_threads, schedule="static"):
        k = i // ntiles
        tile = i % ntiles
        pack_panels(R + k * GD * D + tile * NT * D, 1, D, D, min(<Py_ssize_t> NT, GD - tile * NT),
                    mp + i * D * NT)


include "_rnn_groups.pxi"


cdef void row_job(bint grouped, int cell, Py_ssize_t job, Py_ssize_t groups, Py_ssize_t hpj,
                  Py_ssize_t B, Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D, Py_ssize_t G,
                  Py_ssize_t S, Py_ssize_t S_save, const floating* ax, const floating* mp,
                  const floating* b_r, const floating* state0, floating* seq,
                  floating* ar_seq, floating* state_out, const Py_ssize_t* rows,
                  const Py_ssize_t* start, floating* st, floating* gates,
                  Varlen vl, const Fused* fz) noexcept nogil:
    """Job `job` of run_rows: row block job // groups, heads from (job % groups) * hpj, in the
    grouped layout (forward_group) or head by head (forward_job)."""
    cdef Py_ssize_t blk = job // groups, k0 = job % groups * hpj
    if grouped:
        forward_group(cell, rows + start[blk], start[blk + 1] - start[blk], k0,
                      min(hpj, heads - k0), B, T, heads * D, D, G, S, S_save, ax, mp, b_r,
                      state0, seq, ar_seq, state_out, st, gates, vl, fz)
    else:
        forward_job(cell, rows + start[blk], start[blk + 1] - start[blk], k0,
                    min(hpj, heads - k0), B, T, heads * D, D, G, S, S_save, ax, mp, b_r,
                    state0, seq, ar_seq, state_out, st, gates, vl, fz)


cdef int run_rows(bint grouped, int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D,
                    Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save, const floating* ax,
                    const floating* mp, const floating* b_r, const floating* state0,
                    floating* seq, floating* ar_seq, floating* state_out,
                    const Py_ssize_t* rows, const Py_ssize_t* start, Py_ssize_t nblocks,
                    Py_ssize_t RB, Py_ssize_t hpj, Varlen vl, int num_threads,
                    const Fused* fz, Py_ssize_t fsteps) noexcept nogil:
    """run_forward's row-split jobs (row blocks x groups of hpj heads), in the grouped layout
    or head by head; -1 when scratch memory could not be allocated.  `fz` (with blocks of
    `fsteps` steps) as in run_forward, whose jobs then own whole rows."""
    cdef Py_ssize_t groups = (heads + hpj - 1) // hpj, njobs = nblocks * groups, job
    # the grouped path holds one group of rows at a time (state, gates, projected block)
    cdef Py_ssize_t GR = min(RB, <Py_ssize_t> GROUP_ROWS) if grouped else RB
    cdef Py_ssize_t st_bytes = S * (state_stride(GR, hpj * D) if grouped
                                    else hpj * state_stride(RB, D)) * sizeof(floating)
    cdef Py_ssize_t gate_bytes = (GR * G * hpj * D if grouped
                                  else RB * ((G * D + NT - 1) // NT) * NT) * sizeof(floating)
    cdef int failed = 0
    cdef floating* st
    cdef floating* gates
    cdef Fused* jfz
    if num_threads == 1 or njobs == 1:     # no OpenMP region: matters for T=1 streaming calls
        st = <floating*> scratch_alloc(st_bytes)
        gates = <floating*> scratch_alloc(gate_bytes)
        jfz = job_fused(fz, fsteps, GR, sizeof(floating))
        if st != NULL and gates != NULL and (fz == NULL or jfz != NULL):
            for job in range(njobs):
                row_job(grouped, cell, job, groups, hpj, B, T, heads, D, G, S, S_save, ax, mp,
                        b_r, state0, seq, ar_seq, state_out, rows, start, st, gates, vl, jfz)
        else:
            failed = 1
        scratch_free(st)
        scratch_free(gates)
        scratch_free(jfz)
        return -failed
    with parallel(num_threads=num_threads):
        st = <floating*> scratch_alloc(st_bytes)
        gates = <floating*> scratch_alloc(gate_bytes)
        jfz = job_fused(fz, fsteps, GR, sizeof(floating))    # each thread its own buffer
        for job in prange(njobs, schedule="static"):
            if st == NULL or gates == NULL or (fz != NULL and jfz == NULL):
                failed += 1
            else:
                row_job(grouped, cell, job, groups, hpj, B, T, heads, D, G, S, S_save, ax, mp,
                        b_r, state0, seq, ar_seq, state_out, rows, start, st, gates, vl, jfz)
        scratch_free(st)
        scratch_free(gates)
        scratch_free(jfz)
    return -1 if failed else 0


cdef class JobRows:
    """The batch rows of every job of a call: job block i owns rows[start[i]:start[i + 1]].

    Without lengths: contiguous blocks of RB rows.  With lengths: the batch sorted by length
    (descending, once per call) and dealt round-robin to the blocks, so every block holds rows
    of decreasing length (its active rows stay at the front) and the blocks get similar work.
    """
    cdef object rows_arr, start_arr
    cdef Py_ssize_t nblocks, RB
    cdef Py_ssize_t* rows
    cdef Py_ssize_t* start

    def __init__(self, Py_ssize_t B, Py_ssize_t RB, lengths):
        cdef Py_ssize_t i, p, pos = 0
        self.RB = RB
        self.nblocks = (B + RB - 1) // RB
        rows = np.arange(B, dtype=np.intp)
        start = np.empty(self.nblocks + 1, dtype=np.intp)
        if lengths is None:
            start[:] = np.minimum(np.arange(self.nblocks + 1) * RB, B)
        else:
            order = np.argsort(-np.asarray(lengths), kind="stable").astype(np.intp)
            for i in range(self.nblocks):
                start[i] = pos
                part = order[i::self.nblocks]
                rows[pos:pos + len(part)] = part
                pos += len(part)
            start[self.nblocks] = B
        self.rows_arr, self.start_arr = rows, start
        self.rows = <Py_ssize_t*> cnp.PyArray_DATA(rows)
        self.start = <Py_ssize_t*> cnp.PyArray_DATA(start)


cdef Py_ssize_t* contiguous_rows(Py_ssize_t B, Py_ssize_t RB) noexcept nogil:
    """rows [B] then start [nblocks + 1] in one block (free it): contiguous blocks of RB rows,
    as without lengths.  NULL when out of memory."""
    cdef Py_ssize_t nblocks = (B + RB - 1) // RB, i
    cdef Py_ssize_t* rows = <Py_ssize_t*> scratch_alloc((B + nblocks + 1) * sizeof(Py_ssize_t))
    if rows != NULL:
        for i in range(B):
            rows[i] = i
        for i in range(nblocks + 1):
            rows[B + i] = min(i * RB, B)
    return rows


cdef inline Varlen no_varlen() noexcept nogil:
    cdef Varlen vl
    vl.lens = NULL
    vl.reset = NULL
    vl.reverse = False
    return vl


cdef Varlen varlen(const cnp.int64_t[::1] lengths, bint reverse, reset, Py_ssize_t B,
                   Py_ssize_t T) except *:
    cdef Varlen vl
    cdef cnp.ndarray reset_arr
    vl.lens = NULL
    vl.reset = NULL
    vl.reverse = reverse
    if lengths is not None:
        arr = np.asarray(lengths)
        if arr.shape[0] != B or (B and (arr.min() < 0 or arr.max() > T)):
            raise ValueError(f"lengths must have shape [B] = [{B}] and values in [0, {T}]")
        vl.lens = &lengths[0]
    if reset is not None:
        reset_arr = reset
        if (reset_arr.dtype != np.bool_ or reset_arr.ndim != 2 or reset_arr.shape[0] != B
                or reset_arr.shape[1] != T or not reset_arr.flags.c_contiguous):
            raise ValueError(f"reset must be a C-contiguous bool array [B, T] = [{B}, {T}]")
        vl.reset = <const char*> cnp.PyArray_DATA(reset_arr)
    return vl


cdef Py_ssize_t forward_rows_per_job(Py_ssize_t B, Py_ssize_t heads, int num_threads,
                                     int block) noexcept nogil:
    """Rows per job of the forward: `block` rows when > 0 (a tuned choice), all rows for the
    column split forced by block = -1, else rows_per_job."""
    if block > 0:
        return min(B, <Py_ssize_t> block)
    return B if block == -1 else rows_per_job(B, heads, num_threads)


cdef enum:
    # rows of x a fused job projects per block at least (rows x steps), so each panel of W
    # read into cache serves 64 rows or more (a fused W stays in cache: FUSED_W_BYTES)
    FUSED_ROWS = 64
    # bytes of a fused job's projection buffer above which blocks shrink towards one
    # micro-kernel row block of steps
    FUSED_BYTES = 1 << 20
    # bytes of packed W above which the jobs do not project their own blocks: W must stay in
    # a core's cache between blocks (H = I = 1024: a 16 MB W re-read every few steps next to
    # R ran 1.25x slower than projecting the whole sequence first)
    FUSED_W_BYTES = 1 << 20
    # bytes of a fused job's smallest projected block (fused_block_fits) above which the job
    # does not project its own blocks
    FUSED_BLOCK_MAX_BYTES = 2 << 20


cdef Py_ssize_t fused_steps(Py_ssize_t RB, Py_ssize_t ldo, Py_ssize_t T,
                            Py_ssize_t itemsize) noexcept nogil:
    """Time steps per projected block of a fused job of RB rows (buffer [RB, steps, ldo]): a
    multiple of the micro-kernel's row block, which each row's block of steps fills (8 steps
    took its slower remainder path on 12-row blocks: AVX-512, float32)."""
    cdef Py_ssize_t mr = SS_MR_f if itemsize == 4 else SS_MR_d
    cdef Py_ssize_t steps = round_up(max(8, (FUSED_ROWS + RB - 1) // RB), mr)
    while steps > mr and RB * steps * ldo * itemsize > FUSED_BYTES:
        steps = round_up(steps // 2, mr)
    return min(T, steps)


cdef inline bint fuses_w(const Fused* fz, size_t itemsize) noexcept nogil:
    """Whether jobs may project their own blocks with this W: it must stay in a core's cache
    between blocks (FUSED_W_BYTES); x + b (no W) always can."""
    return fz.wp == NULL or fz.n_in * fz.ldo * itemsize <= FUSED_W_BYTES


cdef inline bint fused_block_fits(const Fused* fz, Py_ssize_t RB, size_t itemsize) noexcept nogil:
    """Whether a job of RB rows may project its own blocks with W: its smallest block (one
    micro-kernel row block of steps) is at most FUSED_BLOCK_MAX_BYTES.  A larger block and W
    crowd R out of the L2 every few steps (AMD EPYC Zen 4, 1 MB L2, lstm H=256, float32: at
    B=64 on 1 thread, a 3 MB block, projecting the whole sequence first ran 1.07-1.13x faster,
    gru and slstm 1.04-1.06x; at B=32 on 1 thread or B=64 on 2, 1.5 MB blocks, 0.93-1.05x).
    x + b (no W) always can."""
    cdef Py_ssize_t mr = SS_MR_f if itemsize == 4 else SS_MR_d
    return fz.wp == NULL or RB * mr * fz.ldo * <Py_ssize_t> itemsize <= FUSED_BLOCK_MAX_BYTES


cdef int run_forward(int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D,
                     Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save, const floating* ax,
                     const floating* mp, const floating* b_r, const floating* state0,
                     floating* seq, floating* ar_seq, floating* state_out,
                     const Py_ssize_t* rows, const Py_ssize_t* start, Py_ssize_t nblocks,
                     Py_ssize_t RB, Varlen vl, int block, int num_threads,
                     const Fused* fz) noexcept nogil:
    """All jobs of a forward pass; -1 when scratch memory could not be allocated.
    `rows` and `start` as in JobRows; NULL: contiguous blocks of forward_rows_per_job rows (no
    lengths).  `block`: 0 chooses row or column split from the shapes; > 0 row split (with
    that many rows per job when `rows` is NULL); -1 column split.  `fz`: NULL, or x, packed W
    and b of a plain call (`ax` unused): jobs that own whole rows (every head) project their
    own blocks of steps; otherwise W x + b is projected for the whole sequence first."""
    cdef int team, status
    cdef Py_ssize_t hpj, groups
    cdef bint columns, grouped
    cdef floating* own_ax
    cdef Py_ssize_t* own = NULL
    cdef Py_ssize_t fsteps = 0
    if rows == NULL:
        RB = forward_rows_per_job(B, heads, num_threads, block)
        nblocks = (B + RB - 1) // RB
        own = contiguous_rows(B, RB)
        if own == NULL:
            return -1
        status = run_forward(cell, B, T, heads, D, G, S, S_save, ax, mp, b_r, state0, seq,
                             ar_seq, state_out, own, own + B, nblocks, RB, vl, block,
                             num_threads, fz)
        scratch_free(own)
        return status
    team = column_team(nblocks * heads, RB, T, D, G, num_threads, block == -1)
    columns = block == -1 or (block == 0 and team > 1)  # fewer (row block, head) jobs than threads
    hpj = heads_per_job(nblocks, heads, num_threads, G * D * D * sizeof(floating))
    groups = (heads + hpj - 1) // hpj
    # the grouped path reads a projected ax: with a fused call's time-block projection at hand
    # it only pays off for row blocks up to GROUP_ROWS (heads=4, D=16, 1 thread: B=16 grouped
    # after projecting 1.0-1.2x faster than fused per head, B=64 0.74-0.88x but elman 1.5x)
    grouped = not columns and use_groups(RB, hpj, D, G, sizeof(floating))
    if fz != NULL and (columns or groups > 1 or not fuses_w(fz, sizeof(floating))
                       or not fused_block_fits(fz, RB, sizeof(floating))):
        # jobs do not own whole rows, or W or the blocks would not stay in cache: project first
        own_ax = <floating*> buffer_alloc(B * T * G * heads * D * sizeof(floating))
        status = -1 if own_ax == NULL else project_all(fz, B, T, G * heads * D, vl, own_ax,
                                                       num_threads)
        if status == 0:
            status = run_forward(cell, B, T, heads, D, G, S, S_save, own_ax, mp, b_r, state0,
                                 seq, ar_seq, state_out, rows, start, nblocks, RB, vl, block,
                                 num_threads, NULL)
        huge_free(own_ax)
        return status
    if columns:
        return run_columns(cell, B, T, heads, D, G, S, S_save, ax, mp, b_r, state0, seq, ar_seq,
                           state_out, rows, start, nblocks, RB, vl, team, num_threads)
    if fz != NULL:
        fsteps = fused_steps(RB, fz.ldo, T, sizeof(floating))
    return run_rows(grouped, cell, B, T, heads, D, G, S, S_save, ax, mp, b_r, state0, seq,
                    ar_seq, state_out, rows, start, nblocks, RB, hpj, vl, num_threads, fz, fsteps)


def forward(str cell_name, const floating[:, :, ::1] ax, const floating[:, :, ::1] R,
            const floating[::1] b_r, const floating[:, :, ::1] state0, bint save,
            const cnp.int64_t[::1] lengths, bint reverse, reset, int block,
            floating[:, :, :, ::1] seq, floating[:, :, ::1] ar_seq,
            floating[:, :, ::1] state_out, int num_threads):
    """Run a cell over the sequence.

    ax [B,T,G*H] input-side pre-activations; R [heads,G*D,D]; b_r [G*H]; state0 [S,B,H];
    save: fill ar_seq (for the backward).  lengths: int64 [B] or None; reverse: process each
    row's valid part backwards; reset: bool [B,T] or None (zero the row's state before that
    step).  block: 0 splits the work by rows (jobs of rows x heads) or, with fewer jobs than
    threads, also by hidden units (a team of threads per job, one barrier per step), chosen
    from the shapes; > 0 rows per job, row split; -1 column split (tune()'s override; the
    results are the same bits whatever it is).  Outputs: seq [S_save,B,T,H] (states after each step; S_save=1 keeps only h; 0 at
    padded steps), ar_seq [B,T,G*H] (recurrent pre-activations; None when not `save`),
    state_out [S,B,H] (each row's state after its last valid step).  B, T or H = 0 return
    at once.
    """
    cdef Py_ssize_t B = ax.shape[0], T = ax.shape[1], D = R.shape[2]
    cdef int cell = CELL_IDS[cell_name]
    if B == 0 or T == 0 or D == 0:
        if T == 0:
            state_out[...] = state0
        return
    if save and (ar_seq is None or seq.shape[0] != state0.shape[0]):
        raise ValueError("save needs ar_seq and every state component in seq")
    run_call(cell, &ax[0, 0, 0], R, b_r, state0, B, T, lengths, reverse, reset, block, seq,
             &ar_seq[0, 0, 0] if save else NULL, state_out, num_threads, NULL)


cdef run_call(int cell, const floating* ax, const floating[:, :, ::1] R,
              const floating[::1] b_r, const floating[:, :, ::1] state0, Py_ssize_t B,
              Py_ssize_t T, const cnp.int64_t[::1] lengths, bint reverse, reset, int block,
              floating[:, :, :, ::1] seq, floating* ar_ptr, floating[:, :, ::1] state_out,
              int num_threads, const Fused* fz):
    """The part `forward` and `forward_projected` share: R packed, then run_forward on the
    rows of JobRows (with lengths) or contiguous blocks; MemoryError when out of memory."""
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef floating* mp
    cdef int status
    cdef Varlen vl
    cdef JobRows jr = None
    cdef const Py_ssize_t* rows = NULL
    cdef const Py_ssize_t* start = NULL
    cdef Py_ssize_t nblocks = 0, RB = 0
    vl = varlen(lengths, reverse, reset, B, T)
    if lengths is not None:
        jr = JobRows(B, forward_rows_per_job(B, heads, num_threads, block), lengths)
        rows, start, nblocks, RB = jr.rows, jr.start, jr.nblocks, jr.RB
    mp = <floating*> panel_alloc(heads * ((GD + NT - 1) // NT) * D * NT * sizeof(floating))
    if mp == NULL:
        raise MemoryError()
    with nogil:
        pack_forward(&R[0, 0, 0], heads, GD, D, mp, num_threads)
        status = run_forward(cell, B, T, heads, D, GD // D, state0.shape[0], seq.shape[0], ax,
                             mp, &b_r[0], &state0[0, 0, 0], &seq[0, 0, 0, 0], ar_ptr,
                             &state_out[0, 0, 0], rows, start, nblocks, RB, vl, block,
                             num_threads, fz)
    huge_free(mp)
    if status:
        raise MemoryError()


def _pool_state():
    """Test hook: (idle blocks, their bytes, blocks in use, the bound on idle bytes) of the pool
    that keeps the packed weights' and large buffers' huge pages for the next call
    (_page_pool.h; all 0 where there is no pool)."""
    cdef long long idle, idle_bytes, used, bound
    pool_state(&idle, &idle_bytes, &used, &bound)
    return idle, idle_bytes, used, bound


def forward_projected(str cell_name, const floating[:, :, ::1] x, const floating[:, ::1] W,
                      const floating[::1] b, const floating[:, :, ::1] R,
                      const floating[::1] b_r, const floating[:, :, ::1] state0,
                      const cnp.int64_t[::1] lengths, bint reverse, reset, int block,
                      floating[:, :, :, ::1] seq, floating[:, :, ::1] state_out,
                      int num_threads):
    """`project` (or `project_valid`) then `forward` with save=False, in one pass.

    x [B,T,I], W [G*H,I], b [G*H] or None; or W None: x [B,T,G*H] holds W x, and b [G*H]
    is added (x + b, as `forward`'s caller would).  R, b_r, state0, lengths, reverse, reset,
    block, seq [1,B,T,H], state_out as in `forward`.  The same bits as the two calls; but a job
    that owns whole rows (every head) projects them a block of time steps at a time, into a
    buffer that stays in cache, instead of writing W x + b [B,T,G*H] to memory and reading it
    back.
    """
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t M = I if W is None else W.shape[0]
    cdef int cell = CELL_IDS[cell_name]
    cdef Py_ssize_t wsize = 0 if W is None else round_up(M, NT) * max(I, 1)
    cdef floating* wp
    cdef floating* ax = NULL
    cdef const floating* bp
    cdef Fused fz
    cdef Varlen vl
    cdef int status = 0
    if W is None and b is None:
        raise ValueError("forward_projected needs W or b (x alone: call forward)")
    if B == 0 or T == 0 or R.shape[2] == 0:
        if T == 0:
            state_out[...] = state0
        return
    if (wsize > 0 and lengths is None
            and I * round_up(M, NT) * <Py_ssize_t> sizeof(floating) > FUSED_W_BYTES
            and projects_transposed(B * T, I, M, sizeof(floating))):
        # no job would project its own blocks, and W is better read where it is than packed
        bp = NULL if b is None else &b[0]
        ax = <floating*> buffer_alloc(B * T * M * sizeof(floating))
        if ax == NULL:
            raise MemoryError()
        try:
            with nogil:
                status = project_transposed(&x[0, 0, 0], B * T, I, &W[0, 0], M, bp, ax,
                                            num_threads)
            if status:
                raise MemoryError()
            run_call(cell, ax, R, b_r, state0, B, T, lengths, reverse, reset, block, seq, NULL,
                     state_out, num_threads, NULL)
        finally:
            huge_free(ax)
        return
    wp = <floating*> panel_alloc((wsize + round_up(M, NT)) * sizeof(floating))   # + bias
    if wp == NULL:
        raise MemoryError()
    with nogil:
        if wsize > 0 and I > 0:
            pack_forward(&W[0, 0], 1, M, I, wp, num_threads)
        fused_init(&fz, &x[0, 0, 0], I, wp if wsize > 0 else NULL, NULL if b is None else &b[0],
                   M, wp + wsize)
    if not fuses_w(&fz, sizeof(floating)):
        # no job would project its own blocks (run_forward): project the whole sequence now
        # and free W's pack before R's is made, as `project` then `forward` do (the two packs
        # at once cost another 16 MB of fresh pages per call at H = 1024: 1.15x slower)
        vl = varlen(lengths, reverse, reset, B, T)
        ax = <floating*> buffer_alloc(B * T * M * sizeof(floating))
        if ax == NULL:
            status = -1
        else:
            with nogil:
                status = project_all(&fz, B, T, M, vl, ax, num_threads)
        huge_free(wp)
        wp = NULL
    try:
        if status:
            raise MemoryError()
        if ax != NULL:
            run_call(cell, ax, R, b_r, state0, B, T, lengths, reverse, reset, block, seq, NULL,
                     state_out, num_threads, NULL)
        else:
            run_call(cell, &x[0, 0, 0], R, b_r, state0, B, T, lengths, reverse, reset, block,
                     seq, NULL, state_out, num_threads, &fz)
    finally:
        huge_free(wp)
        huge_free(ax)


include "_rnn_backward.pxi"


include "_rnn_grads.pxi"


include "_rnn_projection.pxi"


cdef int stream_step(int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t I, Py_ssize_t heads,
                     Py_ssize_t D, Py_ssize_t G, Py_ssize_t S, const floating* x,
                     const floating* wp, const floating* b, const floating* rp,
                     const floating* b_r, const floating* state0, floating* y,
                     floating* state_out, int num_threads) noexcept nogil:
    cdef Py_ssize_t GH = G * heads * D
    cdef int status
    cdef Fused fz
    cdef floating* bias
    if wp == NULL and b == NULL:    # x holds W x: nothing to project
        return run_forward(cell, B, T, heads, D, G, S, 1, x, rp, b_r, state0, y, NULL,
                           state_out, NULL, NULL, 0, 0, no_varlen(), 0, num_threads, NULL)
    # W x + b (or x + b when x holds W x) projected block by block inside the jobs
    bias = <floating*> scratch_alloc(round_up(GH, NT) * sizeof(floating))
    if bias == NULL:
        return -1
    fused_init(&fz, x, I if wp != NULL else GH, wp, b, GH, bias)
    status = run_forward(cell, B, T, heads, D, G, S, 1, x, rp, b_r, state0, y, NULL,
                         state_out, NULL, NULL, 0, 0, no_varlen(), 0, num_threads, &fz)
    scratch_free(bias)
    return status


cdef int pack_weights(const floating[:, :, ::1] R, const floating[:, ::1] W, void** rp,
                      void** wp) except -1:
    """R's panels (pack_recurrent, forward layout) into a new block at *rp and W's (or NULL
    when W is None) at *wp, both from panel_alloc: huge pages from 2 MiB, as a call's own
    packs, which the per-step stream through a 16 MB R needs (in 4 KB pages a stream ran
    no faster than a call packing its weights every time, B=16 H=1024 T=16)."""
    cdef Py_ssize_t heads = R.shape[0], GD = R.shape[1], D = R.shape[2]
    cdef Py_ssize_t M = 0 if W is None else W.shape[0], I = 0 if W is None else W.shape[1]
    rp[0] = panel_alloc(heads * ((GD + NT - 1) // NT) * D * NT * sizeof(floating))
    if rp[0] == NULL:
        raise MemoryError()
    pack_recurrent(&R[0, 0, 0], heads, GD, D, True, <floating*> rp[0])
    if W is not None:
        wp[0] = panel_alloc(((M + NT - 1) // NT) * I * NT * sizeof(floating))
        if wp[0] == NULL:
            raise MemoryError()
        if M > 0 and I > 0:
            pack_panels(&W[0, 0], 1, I, I, M, <floating*> wp[0])
    return 0


cdef class CellStream:
    """A cell's weights packed once, for many calls on short sequences (streaming inference).

    The caller validates: W [G*H, I] or None, R [heads, G*D, D], b and b_r [G*H] or None, all
    C-contiguous of one float dtype.  `step` takes C-contiguous arrays of that dtype.
    """
    cdef int cell
    cdef bint is_double
    cdef Py_ssize_t n_in, heads, D, G, S
    cdef void* rp           # packed R and W (NULL: no W), owned
    cdef void* wp
    cdef object b, b_r
    cdef tuple args         # the constructor's arguments: a pickle packs anew when loaded

    def __cinit__(self):
        self.rp = self.wp = NULL

    def __dealloc__(self):
        huge_free(self.rp)
        huge_free(self.wp)

    def __init__(self, str cell_name, int S, W, R, b, b_r):
        self.args = (cell_name, S, W, R, b, b_r)
        self.cell, self.S = CELL_IDS[cell_name], S
        self.heads, self.D = R.shape[0], R.shape[2]
        self.G = R.shape[1] // self.D if self.D else 1    # hidden size 0: step does nothing
        self.n_in = W.shape[1] if W is not None else 0
        self.is_double = R.dtype == np.float64
        GH = self.G * self.heads * self.D
        if self.is_double:
            pack_weights[double](R, W, &self.rp, &self.wp)
        else:
            pack_weights[float](R, W, &self.rp, &self.wp)
        self.b = b
        self.b_r = np.zeros(GH, R.dtype) if b_r is None else b_r

    def __reduce__(self):
        return CellStream, self.args

    def step(self, cnp.ndarray x, cnp.ndarray state0, cnp.ndarray y, cnp.ndarray state_out,
             int num_threads):
        """x [B,T,I] (or [B,T,G*H] without W), state0 [S,B,H] -> y [B,T,H], state_out [S,B,H]."""
        cdef Py_ssize_t B = x.shape[0], T = x.shape[1]
        cdef void* wp = self.wp
        cdef void* b = NULL if self.b is None else cnp.PyArray_DATA(self.b)
        cdef void* rp = self.rp
        cdef void* b_r = cnp.PyArray_DATA(self.b_r)
        cdef int status
        if B == 0 or T == 0 or self.D == 0:     # nothing to compute (hidden size 0: no state)
            if T == 0:
                state_out[...] = state0
            return
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
