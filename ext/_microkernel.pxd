# Register-blocked micro-kernel for out[rows, N] += a[rows, K] @ M[K, N], with M packed once per
# call into column panels of NT entries: Mp[tile][k][NT] (zero-padded past N).  Streaming one
# panel for several rows at a time keeps the accumulators in registers and each panel hot in L1/L2.
from cython cimport floating

cdef enum:
    NT = 32     # panel width (columns): 2 AVX-512 / 4 AVX2 registers of float
    MR = 4      # rows per register block


cdef inline void tile_rows(const floating* a, Py_ssize_t lda, const floating* mp, Py_ssize_t K,
                           floating* out, Py_ssize_t ldo, const int rows) noexcept nogil:
    # `rows` is a literal at every call site, so the compiler unrolls the row loop and keeps
    # acc in registers.  Each row's sum runs over k in the same order whatever `rows` is, so a
    # row's result never depends on how rows are grouped (thread-count independence).
    cdef floating acc[MR * NT]
    cdef floating ak
    cdef Py_ssize_t k, r, n
    for n in range(rows * NT):
        acc[n] = 0
    for k in range(K):
        for r in range(rows):
            ak = a[r * lda + k]
            for n in range(NT):
                acc[r * NT + n] += ak * mp[k * NT + n]
    for r in range(rows):
        for n in range(NT):
            out[r * ldo + n] += acc[r * NT + n]


cdef inline void matmul_acc(const floating* a, Py_ssize_t lda, const floating* mp, Py_ssize_t K,
                            Py_ssize_t ntiles, floating* out, Py_ssize_t ldo,
                            Py_ssize_t nrows) noexcept nogil:
    """out[:nrows, :ntiles*NT] += a[:nrows, :K] @ M, panel by panel (panel reused across rows)."""
    cdef Py_ssize_t tile, r
    cdef const floating* panel
    for tile in range(ntiles):
        panel = mp + tile * K * NT
        r = 0
        while r + MR <= nrows:
            tile_rows(a + r * lda, lda, panel, K, out + r * ldo + tile * NT, ldo, MR)
            r += MR
        while r < nrows:
            tile_rows(a + r * lda, lda, panel, K, out + r * ldo + tile * NT, ldo, 1)
            r += 1


cdef inline void pack_panels(const floating* m, Py_ssize_t sk, Py_ssize_t sn, Py_ssize_t K,
                             Py_ssize_t N, floating* mp) noexcept nogil:
    """Copy M (element (k, n) at m[k*sk + n*sn]) into panels mp[tile][k][NT], zero-padded."""
    cdef Py_ssize_t ntiles = (N + NT - 1) // NT
    cdef Py_ssize_t tile, k, n, col
    for tile in range(ntiles):
        for k in range(K):
            for n in range(NT):
                col = tile * NT + n
                if col < N:
                    mp[(tile * K + k) * NT + n] = m[k * sk + col * sn]
                else:
                    mp[(tile * K + k) * NT + n] = 0
