# Part of ext/rnn.pyx, which includes it: one extension module, compiled as one file.

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

