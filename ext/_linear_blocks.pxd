# The blocks of the chunked causal linear recurrence (S_t = exp(g_t) S_{t-1} + k_t v_t^T,
# o_t = S_t^T q_t), shared by linear_attention.pyx and ssd.pyx: block boundaries (chunk
# multiples and resets), cumulative log-decays within a block, the causal decay mask, decayed
# rows, and the carried-state update.  Inline, so each kernel compiles its own copy.
from cython cimport floating
from libc.stdint cimport uint8_t

from _uk_gemm cimport gemm
from _math cimport exp_


cdef struct Block:
    Py_ssize_t c       # rows in the block
    Py_ssize_t m       # rows that see the state entering the block: c, or 0 after a reset


# Blocks end at multiples of the chunk and before every reset, so a reset is always a block's
# first row: the state entering that block is dropped (never multiplied by a zero decay, so
# nothing non-finite from before the reset reaches later steps).

cdef inline Py_ssize_t block_end(Py_ssize_t t0, Py_ssize_t Tb, Py_ssize_t C,
                                 const uint8_t* rs) noexcept nogil:
    cdef Py_ssize_t t, t1 = min(Tb, (t0 // C + 1) * C)
    if rs != NULL:
        for t in range(t0 + 1, t1):
            if rs[t]:
                return t
    return t1


cdef inline Py_ssize_t block_start(Py_ssize_t t1, Py_ssize_t C, const uint8_t* rs) noexcept nogil:
    cdef Py_ssize_t t, t0 = ((t1 - 1) // C) * C
    if rs != NULL:
        for t in range(t1 - 1, t0, -1):
            if rs[t]:
                return t
    return t0


cdef inline Block block_decay(const floating* g, Py_ssize_t sg, const uint8_t* rs,
                              Py_ssize_t t0, Py_ssize_t c, floating* G) noexcept nogil:
    """G[s] = cumulative log-decay from the block start to row s (NULL g: no decay; a reset
    at the first row drops that row's own decay, which would multiply a zeroed state)."""
    cdef floating acc = 0
    cdef Py_ssize_t s
    cdef Block blk
    cdef bint fresh = rs != NULL and rs[t0]
    blk.c = c
    blk.m = 0 if fresh else c
    if g != NULL:
        g = g + t0 * sg
        for s in range(c):
            if s > 0 or not fresh:
                acc = acc + g[s * sg]
            G[s] = acc
    return blk


cdef inline void apply_mask(floating* A, Py_ssize_t lda, Py_ssize_t c,
                            const floating* G) noexcept nogil:
    """A[s, t] *= exp(G[s] - G[t]) for t <= s (exponent <= 0), 0 above the diagonal."""
    cdef Py_ssize_t s, t
    cdef floating* row
    cdef floating Gs
    for s in range(c):
        row = A + s * lda
        if G != NULL:
            Gs = G[s]
            for t in range(s + 1):
                row[t] = row[t] * exp_(Gs - G[t])
        for t in range(s + 1, c):
            row[t] = 0


cdef inline const floating* decayed(const floating* X, Py_ssize_t* ldx, Py_ssize_t n,
                                    Py_ssize_t c, Py_ssize_t d, const floating* G,
                                    bint to_end, floating* W) noexcept nogil:
    """The first n of X's c rows of d, row s scaled by its decay from the block start,
    exp(G[s]), or with to_end by its decay to the block end, exp(G[c-1] - G[s]); written to
    W (contiguous, *ldx set to d).  X itself when there is no decay (G NULL)."""
    cdef Py_ssize_t s, i, ld = ldx[0]
    cdef floating w
    if G == NULL:
        return X
    for s in range(n):
        w = exp_(G[c - 1] - G[s]) if to_end else exp_(G[s])
        for i in range(d):
            W[s * d + i] = w * X[s * ld + i]
    ldx[0] = d
    return W


cdef inline void scale(floating* X, Py_ssize_t n, floating w) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        X[i] = w * X[i]


cdef inline void masked_scores(const floating* X, Py_ssize_t ldx, const floating* Y,
                               Py_ssize_t ldy, Py_ssize_t c, Py_ssize_t d, const floating* G,
                               floating* out, Py_ssize_t ldo) noexcept nogil:
    """out [c, c] = (X Y^T) * M, the block's causal (and decayed) scores, M as in apply_mask."""
    gemm(False, True, c, c, d, 1, X, ldx, Y, ldy, 0, out, ldo)
    apply_mask(out, ldo, c, G)


cdef inline void state_update(const floating* X, Py_ssize_t ldx, const floating* Y,
                              Py_ssize_t ldy, Block blk, Py_ssize_t dx, Py_ssize_t dy,
                              const floating* G, bint to_end, floating* S,
                              floating* W) noexcept nogil:
    """S [dx, dy] = exp(G[c-1]) S + decayed(X)^T Y: a state carried forward across the block
    (to_end), or a state gradient carried backward (the rows that saw the entering state).
    A reset at the block start replaces the carried part by exact zeros."""
    cdef Py_ssize_t i, n = blk.c if to_end else blk.m
    if blk.m < blk.c:
        for i in range(dx * dy):
            S[i] = 0
    elif G != NULL:
        scale(S, dx * dy, exp_(G[blk.c - 1]))
    if n > 0:
        X = decayed(X, &ldx, n, blk.c, dx, G, to_end, W)
        gemm(True, False, dx, dy, n, 1, X, ldx, Y, ldy, 1, S, dy)
