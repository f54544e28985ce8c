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
                          huge_free, pool_state, prefetch)
from _cells cimport cell_forward, cell_backward, cell_ids
from _scratch cimport scratch_alloc, scratch_free
from libc.string cimport memset

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


# ---- column split: one job on a team of threads (few rows, few heads) -------------------------
# When rows x heads give fewer jobs than threads, the threads of a team share one job: member i
# owns hidden units [d0, d1) of the head (all G gates of them, so the cell stays local), d0 a
# multiple of the panel width NT.  Each step it computes its gate columns with the same
# micro-kernel (every output column is still summed over the same k in the same order, and a
# column's arithmetic does not depend on its panel neighbours), runs the cell on its units and
# writes its part of h into the team's double-buffered h (read buffer j % 2, write the other),
# then publishes its step and waits for its partners' (_barrier.h, ss_team_step).  The results
# are therefore those of forward_job, bit for bit (the cell's vector loop also splits each
# member's units at the same multiples of the vector width as one thread's:
# tests/test_rnn_columns.py checks the bits across thread counts and splits).
# A member whose partner is not running (a busy machine) asks, at a step's wait, to take the
# job over (ss_team_step): it then runs every member's part in turn -- the same arithmetic on
# the same buffers, so the same bits -- and the automatic rule keeps the next calls on one
# thread for a while (column_team).

cdef extern from "_barrier.h" nogil:
    ctypedef struct ss_barrier:
        long solo
        long slow
    ctypedef struct ss_step_flag:
        pass
    ctypedef struct ss_member_clock:
        long long last
        long long worked
        long long waited
        long long waits
    void ss_barrier_wait(ss_barrier* b, long team)
    long ss_team_step(ss_barrier* b, ss_step_flag* flags, long team, long member, long arrival,
                      long ask, ss_member_clock* c, double alone)
    long long ss_now_ns()
    void ss_barrier_fail(ss_barrier* b)
    int ss_barrier_failed(ss_barrier* b)
    int ss_split_paused()
    void ss_split_outcome(int busy)
    void ss_split_forget()
    int ss_region_threads()
    int ss_region_thread()

cdef enum:
    # multiply-adds per thread and step below which a barrier per step (about 0.2-1 us, far more
    # on a busy machine) costs more than the work it spreads
    MIN_COLUMN_WORK = 1 << 14
    # a call also pays a parallel region and two barriers before its first step: calls of
    # fewer steps than this (streaming, T = 1) need proportionally more work per step
    MIN_COLUMN_STEPS = 4

# Test hook (_force_handover): every team hands its job to member handover_member % team (or,
# when it is -1, to the last member to arrive, as under load) at the barrier after step
# handover_step (-1: the one before the first step; -2: never), as a busy machine would when
# handover_busy; handovers counts the jobs handed over (forced or not) since the hook's last call.
cdef Py_ssize_t handover_step = -2
cdef long handover_member = 0
cdef bint handover_busy = False
cdef long handovers = 0


def _force_handover(Py_ssize_t step=-2, long member=0, bint busy=False):
    """Test hook: make every column-split team hand its job over to member `member % team`
    (member=-1: to the last member to arrive, as a busy machine does) at the barrier after
    processing step `step` (-1: before the first step); busy: the call counts as one that
    found the machine busy (the automatic rule then keeps the next calls on one thread).
    step=-2 (the default) turns the hook off and forgets any busy call, forced or not.  The
    results must not change.  Returns the number of jobs handed over since the previous call."""
    global handover_step, handover_member, handover_busy, handovers
    handover_step = step
    handover_member = member
    handover_busy = busy
    if step == -2:
        ss_split_forget()
    done, handovers = handovers, 0
    return done


cdef inline long forced_request(Py_ssize_t j, long member, long team,
                                ss_barrier* bar) noexcept nogil:
    """ss_team_step's `ask` for member `member` at the barrier after step j (the test hook)."""
    if handover_step != j or (handover_member >= 0 and member != handover_member % team):
        return 0
    if handover_busy:
        bar.slow = 1            # read after the parallel region only
    return -1 if handover_member < 0 else member + 1


cdef int column_team(Py_ssize_t njobs, Py_ssize_t RB, Py_ssize_t T, Py_ssize_t D, Py_ssize_t G,
                     int num_threads, bint forced) noexcept nogil:
    """Threads per job for the column split (1: the row split is better, or a recent call
    found the machine busy)."""
    cdef Py_ssize_t team = num_threads // njobs
    team = min(team, (D + NT - 1) // NT)        # at least one panel of units per member
    if not forced:
        if ss_split_paused():
            return 1
        team = min(team, RB * G * D * D * min(T, <Py_ssize_t> MIN_COLUMN_STEPS)
                   // (MIN_COLUMN_WORK * MIN_COLUMN_STEPS))
    return <int> max(1, team)


cdef struct ColumnPart:
    # one member's hidden units [d0, d1) of the job's head and its buffers (st [S, ss], gates
    # [nr, G, np], panels: floating*, void* here as a struct cannot hold a fused type), where
    # every member can reach them: after a hand-over one member runs all parts
    Py_ssize_t d0, d1
    void* st
    void* gates
    void* panels


cdef void column_setup(ColumnPart* part, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k,
                       Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                       Py_ssize_t S, const floating* mp_k, const floating* state0,
                       floating* hbuf, Varlen vl) noexcept nogil:
    """A part's state from state0, its h in hbuf's first buffer, and its columns of R_k^T
    gathered into part.panels when they are not whole packed panels (D % NT != 0)."""
    cdef Py_ssize_t d0 = part.d0, n = part.d1 - part.d0
    cdef Py_ssize_t ntg = (n + NT - 1) // NT
    cdef Py_ssize_t ss = state_stride(nr, n)
    cdef Py_ssize_t r, b, s, g, d, c, kk, length
    cdef floating* st = <floating*> part.st
    cdef floating* panels = <floating*> part.panels
    cdef const floating* src
    if D % NT != 0:                     # column c of R_k^T is in panel c // NT
        memset(panels, 0, G * ntg * D * NT * sizeof(floating))
        for g in range(G):
            for d in range(n):
                c = g * D + d0 + d
                src = mp_k + (c // NT) * D * NT + c % NT
                for kk in range(D):
                    panels[(g * ntg + d // NT) * D * NT + kk * NT + d % NT] = src[kk * NT]
    for r in range(nr):
        b = rows[r]
        for s in range(S):
            for d in range(n):
                st[s * ss + r * n + d] = state0[(s * B + b) * H + k * D + d0 + d]
        length = row_length(vl.lens, b, T)
        for d in range(n):      # a reset before step 0 zeroes the h the first matmul reads
            hbuf[r * D + d0 + d] = (0 if vl.reset != NULL and length > 0
                                    and vl.reset[b * T + time_index(0, length, vl.reverse)]
                                    else st[r * n + d])


cdef void column_step(int cell, ColumnPart* part, const Py_ssize_t* rows, Py_ssize_t nr,
                      Py_ssize_t nact, Py_ssize_t j, Py_ssize_t k, Py_ssize_t B, Py_ssize_t T,
                      Py_ssize_t H, Py_ssize_t D, Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save,
                      const floating* ax, const floating* mp_k, const floating* b_r,
                      floating* seq, floating* ar_seq, const floating* hr, floating* hw,
                      Varlen vl) noexcept nogil:
    """Processing step j of a part for its first nact rows: gate columns from h in hr, the
    cell on the part's units, the new h into hw."""
    cdef Py_ssize_t GH = G * H, d0 = part.d0, n = part.d1 - part.d0
    cdef Py_ssize_t ntg = (n + NT - 1) // NT, np_ = ntg * NT, Gnp = G * np_
    cdef Py_ssize_t ss = state_stride(nr, n)
    cdef Py_ssize_t r, b, s, g, d, t, length
    cdef floating* st = <floating*> part.st
    cdef floating* gates = <floating*> part.gates
    cdef const floating* pan
    cdef const floating* axp
    for r in range(nact):
        b = rows[r]
        length = row_length(vl.lens, b, T)
        if vl.reset != NULL and vl.reset[b * T + time_index(j, length, vl.reverse)]:
            for s in range(S):
                for d in range(n):
                    st[s * ss + r * n + d] = 0
        for g in range(G):
            for d in range(n):
                gates[r * Gnp + g * np_ + d] = b_r[g * H + k * D + d0 + d]
            for d in range(n, np_):
                gates[r * Gnp + g * np_ + d] = 0
            if j + 1 < length:
                prefetch(ax + (b * T + time_index(j + 1, length, vl.reverse)) * GH
                         + g * H + k * D + d0, n)
    for g in range(G):
        pan = (mp_k + ((g * D + d0) // NT) * D * NT if D % NT == 0     # whole packed panels
               else <floating*> part.panels + g * ntg * D * NT)
        matmul_acc(hr, D, pan, D, ntg, gates + g * np_, Gnp, nact)
    for r in range(nact):
        b = rows[r]
        length = row_length(vl.lens, b, T)
        t = time_index(j, length, vl.reverse)
        axp = ax + (b * T + t) * GH + k * D + d0
        if ar_seq != NULL:
            for g in range(G):
                for d in range(n):
                    ar_seq[(b * T + t) * GH + g * H + k * D + d0 + d] = gates[r * Gnp + g * np_ + d]
        cell_forward(cell, n, axp, H, gates + r * Gnp, np_, st + r * n, ss)
        for s in range(S_save):
            for d in range(n):
                seq[((s * B + b) * T + t) * H + k * D + d0 + d] = st[s * ss + r * n + d]
        if (vl.reset != NULL and j + 1 < length
                and vl.reset[b * T + time_index(j + 1, length, vl.reverse)]):
            for d in range(n):
                hw[r * D + d0 + d] = 0
        else:
            for d in range(n):
                hw[r * D + d0 + d] = st[r * n + d]


cdef void column_finish(ColumnPart* part, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k,
                        Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                        Py_ssize_t S, Py_ssize_t S_save, floating* seq, floating* ar_seq,
                        floating* state_out, Varlen vl) noexcept nogil:
    """A part's final state into state_out and zeros at its rows' padded steps."""
    cdef Py_ssize_t d0 = part.d0, n = part.d1 - part.d0
    cdef Py_ssize_t ss = state_stride(nr, n)
    cdef Py_ssize_t r, b, s, d, length
    cdef floating* st = <floating*> part.st
    for r in range(nr):
        b = rows[r]
        for s in range(S):
            for d in range(n):
                state_out[(s * B + b) * H + k * D + d0 + d] = st[s * ss + r * n + d]
        length = row_length(vl.lens, b, T)         # padded steps: outputs are 0
        zero_steps(seq, b * T * H + k * D + d0, S_save, B * T * H, H, length, T, n)
        if ar_seq != NULL:
            zero_steps(ar_seq, b * T * G * H + k * D + d0, G, H, G * H, length, T, n)


cdef long forward_columns(int cell, const Py_ssize_t* rows, Py_ssize_t nr, Py_ssize_t k,
                          Py_ssize_t B, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t G,
                          Py_ssize_t S, Py_ssize_t S_save,
                          const floating* ax, const floating* mp, const floating* b_r,
                          const floating* state0, floating* seq, floating* ar_seq,
                          floating* state_out, floating* hbuf, ss_barrier* bar,
                          ss_step_flag* flags, ColumnPart* parts, long member, long team,
                          Varlen vl) noexcept nogil:
    """forward_job's work on head k as member `member` of a team of `team` threads sharing
    hbuf [2, nr, D] (h read from buffer j % 2, written to the other), `bar`, the step flags
    and the team's parts (this member's: parts[member]).  Returns -1, or the member that took
    the job over at a step's wait: it ran every part's remaining steps (this one's too)."""
    cdef Py_ssize_t j, nact = nr, ntiles = (G * D + NT - 1) // NT
    cdef Py_ssize_t steps = row_length(vl.lens, rows[0], T)
    cdef const floating* mp_k = mp + k * ntiles * D * NT
    cdef long owner, m
    cdef floating* hr
    cdef floating* hw
    cdef ss_member_clock clock
    cdef double alone = <double> D / (parts[member].d1 - parts[member].d0)
    clock.last = ss_now_ns()
    clock.worked = clock.waited = clock.waits = 0
    column_setup(parts + member, rows, nr, k, B, T, H, D, G, S, mp_k, state0, hbuf, vl)
    owner = ss_team_step(bar, flags, team, member, 1, forced_request(-1, member, team, bar),
                         &clock, alone)
    if owner >= 0 and owner != member:
        return owner
    for j in range(steps):
        hr = hbuf + (j % 2) * nr * D
        hw = hbuf + ((j + 1) % 2) * nr * D
        while row_length(vl.lens, rows[nact - 1], T) <= j:    # rows that ended drop out
            nact -= 1
        # the other members' h was just written on their cores: ask for all of its lines at
        # once, so the transfers overlap (the matmul would meet them one by one)
        prefetch(hr, nact * D)
        if owner >= 0:          # alone: every part in turn, each with its own arithmetic
            for m in range(team):
                column_step(cell, parts + m, rows, nr, nact, j, k, B, T, H, D, G, S, S_save,
                            ax, mp_k, b_r, seq, ar_seq, hr, hw, vl)
            continue
        column_step(cell, parts + member, rows, nr, nact, j, k, B, T, H, D, G, S, S_save, ax,
                    mp_k, b_r, seq, ar_seq, hr, hw, vl)
        owner = ss_team_step(bar, flags, team, member, j + 2, forced_request(j, member, team, bar),
                             &clock, alone)
        if owner >= 0 and owner != member:
            return owner
    for m in range(team):
        if owner >= 0 or m == member:
            column_finish(parts + m, rows, nr, k, B, T, H, D, G, S, S_save, seq, ar_seq,
                          state_out, vl)
    return owner


cdef void free_part(ColumnPart* part) noexcept nogil:
    scratch_free(part.st)
    scratch_free(part.gates)
    scratch_free(part.panels)


cdef int column_member(int cell, Py_ssize_t job, long member, long team, Py_ssize_t B,
                       Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D, Py_ssize_t G, Py_ssize_t S,
                       Py_ssize_t S_save, const floating* ax, const floating* mp,
                       const floating* b_r, const floating* state0, floating* seq,
                       floating* ar_seq, floating* state_out, const Py_ssize_t* rows,
                       const Py_ssize_t* start, Py_ssize_t hstride, floating* hbufs,
                       ss_barrier* bars, ss_step_flag* flags, ColumnPart* parts,
                       long pstride, Varlen vl) noexcept nogil:
    """One member's part of job `job` (row block job // heads, head job % heads): its units
    are panels [member * P / team, (member + 1) * P / team) of the head's P unit panels.
    -1 when any member of the team lacked scratch memory (all of them return it).  A part's
    buffers are freed by whoever ran it to the end (the owner after a hand-over)."""
    cdef Py_ssize_t blk = job // heads
    cdef Py_ssize_t nr = start[blk + 1] - start[blk]
    cdef Py_ssize_t P = (D + NT - 1) // NT
    cdef ColumnPart* team_parts = parts + job * pstride
    cdef ColumnPart* part = team_parts + member
    cdef Py_ssize_t np_
    cdef ss_barrier* bar = bars + job
    cdef long owner, m
    part.d0 = member * P // team * NT
    part.d1 = min(D, (member + 1) * P // team * NT)
    np_ = round_up(part.d1 - part.d0, NT)
    part.st = scratch_alloc(S * state_stride(nr, part.d1 - part.d0) * sizeof(floating))
    part.gates = scratch_alloc(nr * G * np_ * sizeof(floating))
    part.panels = NULL
    if D % NT != 0:
        part.panels = scratch_alloc(G * np_ * D * sizeof(floating))
    if part.st == NULL or part.gates == NULL or (D % NT != 0 and part.panels == NULL):
        ss_barrier_fail(bar)
    ss_barrier_wait(bar, team)          # also publishes every member's part to the others
    if ss_barrier_failed(bar):
        free_part(part)
        return -1
    owner = forward_columns(cell, rows + start[blk], nr, job % heads, B, T, heads * D, D, G,
                            S, S_save, ax, mp, b_r, state0, seq, ar_seq, state_out,
                            hbufs + job * hstride, bar, flags + job * pstride, team_parts,
                            member, team, vl)
    if owner < 0:
        free_part(part)
    elif owner == member:
        for m in range(team):
            free_part(team_parts + m)
    return 0


cdef void column_thread(int cell, Py_ssize_t njobs, int team, Py_ssize_t B, Py_ssize_t T,
                        Py_ssize_t heads, Py_ssize_t D, Py_ssize_t G, Py_ssize_t S,
                        Py_ssize_t S_save, const floating* ax, const floating* mp,
                        const floating* b_r, const floating* state0, floating* seq,
                        floating* ar_seq, floating* state_out, const Py_ssize_t* rows,
                        const Py_ssize_t* start, Py_ssize_t hstride, floating* hbufs,
                        ss_barrier* bars, ss_step_flag* flags, ColumnPart* parts,
                        Varlen vl, int* status) noexcept nogil:
    """The work of the calling thread of run_columns' parallel region (status[thread] = -1
    on failure).  Teams are formed from the threads OpenMP actually gave: job j gets threads
    ceil(j nt / njobs) ... (at most `team` of them); with fewer threads than jobs each thread
    runs whole jobs alone (a team of one)."""
    cdef int nt = ss_region_threads(), tid = ss_region_thread()
    cdef Py_ssize_t job
    cdef long first, size
    if nt >= njobs:
        job = tid * njobs // nt
        first = (job * nt + njobs - 1) // njobs
        size = min(<long> team, ((job + 1) * nt + njobs - 1) // njobs - first)
        if tid - first < size:
            status[tid] = column_member(cell, job, tid - first, size, B, T, heads, D, G, S,
                                        S_save, ax, mp, b_r, state0, seq, ar_seq, state_out,
                                        rows, start, hstride, hbufs, bars, flags, parts,
                                        team, vl)
        return
    job = tid
    while job < njobs:
        if column_member(cell, job, 0, 1, B, T, heads, D, G, S, S_save, ax, mp, b_r, state0,
                         seq, ar_seq, state_out, rows, start, hstride, hbufs, bars, flags,
                         parts, team, vl):
            status[tid] = -1
        job += nt


cdef int run_columns(int cell, Py_ssize_t B, Py_ssize_t T, Py_ssize_t heads, Py_ssize_t D,
                     Py_ssize_t G, Py_ssize_t S, Py_ssize_t S_save, const floating* ax,
                     const floating* mp, const floating* b_r, const floating* state0,
                     floating* seq, floating* ar_seq, floating* state_out,
                     const Py_ssize_t* rows, const Py_ssize_t* start, Py_ssize_t nblocks,
                     Py_ssize_t RB, Varlen vl, int team, int num_threads) noexcept nogil:
    """run_forward's jobs on teams of up to `team` threads each (the column split)."""
    cdef Py_ssize_t njobs = nblocks * heads, job
    # each job's barrier, each member's step flag and each job's h buffers start on their own
    # 64-byte lines: two teams' barriers or two members' flags share no line, nor (when D is a
    # multiple of 16) do the members' slices of h
    cdef Py_ssize_t hstride = round_up(2 * RB * D, 16)
    cdef char* shared = <char*> scratch_alloc(
        64 + njobs * (sizeof(ss_barrier) + team * sizeof(ss_step_flag)
                      + hstride * sizeof(floating) + team * sizeof(ColumnPart)))
    cdef ss_barrier* bars = <ss_barrier*> ((<size_t> shared + 63) & ~(<size_t> 63))
    cdef ss_step_flag* flags = <ss_step_flag*> (bars + njobs)
    cdef floating* hbufs = <floating*> (flags + njobs * team)
    cdef ColumnPart* parts = <ColumnPart*> (hbufs + njobs * hstride)
    cdef int nreq = <int> min(njobs * team, <Py_ssize_t> num_threads)
    cdef int* status = <int*> scratch_alloc(nreq * sizeof(int))
    cdef int failed = 0, busy = 0, i
    global handovers
    if shared == NULL or status == NULL:
        failed = 1
    else:
        memset(bars, 0, njobs * (sizeof(ss_barrier) + team * sizeof(ss_step_flag)))
        memset(status, 0, nreq * sizeof(int))
        with parallel(num_threads=nreq):
            column_thread(cell, njobs, team, B, T, heads, D, G, S, S_save, ax, mp, b_r, state0,
                          seq, ar_seq, state_out, rows, start, hstride, hbufs, bars, flags,
                          parts, vl, status)
        for i in range(nreq):
            if status[i]:
                failed = 1
        for job in range(njobs):
            if bars[job].slow:
                busy = 1
            if bars[job].solo:
                handovers += 1
        ss_split_outcome(busy)
    scratch_free(shared)
    scratch_free(status)
    return -failed


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
    void ss_bd_prefetch_w(const void* p)

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


cdef inline void prefetch_w(floating* p, Py_ssize_t n) noexcept nogil:
    """Fetch p[0:n] for writing (64-byte lines)."""
    cdef Py_ssize_t i = 0
    while i < n:
        ss_bd_prefetch_w(p + i)
        i += 64 // sizeof(floating)


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
    # read into cache serves as many rows as one job of `project` (PROJECT_ROWS)
    FUSED_ROWS = 64
    # bytes of a fused job's projection buffer above which blocks shrink towards one
    # micro-kernel row block of steps
    FUSED_BYTES = 1 << 20
    # bytes of packed W above which the jobs do not project their own blocks: W must stay in
    # a core's cache between blocks (H = I = 1024: a 16 MB W re-read every few steps next to
    # R ran 1.25x slower than projecting the whole sequence first)
    FUSED_W_BYTES = 1 << 20


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
    if fz != NULL and (columns or groups > 1 or not fuses_w(fz, sizeof(floating))):
        # jobs do not own whole rows, or W would not stay in cache: project first
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


cdef enum:
    PROJECT_ROWS = 64     # rows per job of `project`
    PROJECT_SLICE_BYTES = 16384     # a slice of a panel of W^T that stays in L1 (project_job)
    # multiply-adds of a projection below which it stays on the calling thread even when its
    # rows give fewer jobs than threads: ~10 us of work, where a parallel region costs a few
    # (a T = 1 call at H = I = 256 stays on one thread)
    PROJECT_SPLIT_MIN = 1 << 20


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
    cdef Py_ssize_t kc = PROJECT_SLICE_BYTES // (NT * sizeof(floating))
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
    cdef Py_ssize_t kc = PROJECT_SLICE_BYTES // (NT * sizeof(floating))
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
