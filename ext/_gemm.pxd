# Row-major GEMM over scipy's BLAS, in tiles small enough that BLAS stays on the calling
# thread (our kernels already run one job per core).
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef enum:
    # OpenBLAS runs a GEMM on its own thread pool when m*n*k exceeds 65536 * 4; called from
    # our worker threads for small blocks that oversubscribes the cores and was measured
    # 20-100x slower.  Blocks at or under this size always run on the calling thread.
    GEMM_SINGLE_THREAD_MNK = 262144


cdef inline void blas_gemm(bint ta, bint tb, int M, int N, int K, floating alpha,
                           const floating* A, int lda, const floating* B, int ldb,
                           floating beta, floating* C, int ldc) noexcept nogil:
    # BLAS is column-major, where a row-major matrix is its transpose: compute
    # C^T = op(B)^T op(A)^T by swapping the operands.
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    if floating is float:
        sgemm(&cb, &ca, &N, &M, &K, &alpha, <float*> B, &ldb, <float*> A, &lda, &beta, C, &ldc)
    else:
        dgemm(&cb, &ca, &N, &M, &K, &alpha, <double*> B, &ldb, <double*> A, &lda, &beta, C, &ldc)


cdef inline void gemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      floating alpha, const floating* A, Py_ssize_t lda, const floating* B,
                      Py_ssize_t ldb, floating beta, floating* C, Py_ssize_t ldc) noexcept nogil:
    """Row-major C[M,N] = alpha op(A) op(B) + beta C (op = transpose when ta/tb), in tiles
    of C small enough that BLAS stays on the calling thread.  Offsets are 64-bit; a tile's
    sizes fit BLAS's int (at most GEMM_SINGLE_THREAD_MNK elements of work); leading
    dimensions must fit an int (BLAS's limit)."""
    cdef Py_ssize_t i, j, p, mb = M, nb = N, kb = K
    if M <= 0 or N <= 0:
        return
    if K <= 0:
        for i in range(M):
            for j in range(N):
                C[i * ldc + j] = 0 if beta == 0 else beta * C[i * ldc + j]
        return
    # halve the longest side until a tile fits; pieces of K accumulate into C (beta = 1)
    while mb * nb * kb > GEMM_SINGLE_THREAD_MNK:
        if kb >= mb and kb >= nb:
            kb = (kb + 1) // 2
        elif mb >= nb:
            mb = (mb + 1) // 2
        else:
            nb = (nb + 1) // 2
    i = 0
    while i < M:
        j = 0
        while j < N:
            p = 0
            while p < K:
                blas_gemm(ta, tb, <int> min(mb, M - i), <int> min(nb, N - j),
                          <int> min(kb, K - p), alpha,
                          A + (p * lda + i if ta else i * lda + p), <int> lda,
                          B + (j * ldb + p if tb else p * ldb + j), <int> ldb,
                          beta if p == 0 else 1, C + i * ldc + j, <int> ldc)
                p += kb
            j += nb
        i += mb
