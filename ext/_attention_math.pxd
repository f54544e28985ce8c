# Branch-free polynomial exp that GCC vectorises inside loops (libm's exp/expf calls are not
# vectorised without -ffast-math), plus the row-major GEMM wrapper over scipy's BLAS.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    /* exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite split of ln2, so r
       is exact), p the Taylor polynomial, accurate to ~1 ulp for |r| <= ln2/2 (degree 7 for
       float, 13 for double).  The 2^n factor is built in the exponent bits; arguments are
       clamped so n stays a normal exponent: below the clamp the result is 0 (the true value
       is below the smallest normal number), above it +inf.  NaN propagates through p. */
    static inline float statescan_expf(float x) {
        const float lo = -87.0f, hi = 88.0f;
        float xc = x < lo ? lo : (x > hi ? hi : x);
        float n = floorf(xc * 1.44269504088896341f + 0.5f);
        float r = (xc - n * 6.9313812256e-01f) - n * 9.0580006145e-06f;
        float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667163e-01f + r * (4.1666667908e-02f
                  + r * (8.3333337680e-03f + r * (1.3888889225e-03f + r * 1.9841270114e-04f))))));
        uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
        float s;
        memcpy(&s, &bits, sizeof s);
        float y = p * s;
        return x < lo ? 0.0f : (x > hi ? INFINITY : y);
    }
    static inline double statescan_exp(double x) {
        const double lo = -708.0, hi = 709.0;
        double xc = x < lo ? lo : (x > hi ? hi : x);
        double n = floor(xc * 1.44269504088896338700 + 0.5);
        double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
        double p = 1.0 / 6227020800.0;
        p = 1.0 / 479001600.0 + r * p;
        p = 1.0 / 39916800.0 + r * p;
        p = 1.0 / 3628800.0 + r * p;
        p = 1.0 / 362880.0 + r * p;
        p = 1.0 / 40320.0 + r * p;
        p = 1.0 / 5040.0 + r * p;
        p = 1.0 / 720.0 + r * p;
        p = 1.0 / 120.0 + r * p;
        p = 1.0 / 24.0 + r * p;
        p = 1.0 / 6.0 + r * p;
        p = 0.5 + r * p;
        p = 1.0 + r * p;
        p = 1.0 + r * p;
        uint64_t bits = (uint64_t)((int64_t)n + 1023) << 52;
        double s;
        memcpy(&s, &bits, sizeof s);
        double y = p * s;
        return x < lo ? 0.0 : (x > hi ? INFINITY : y);
    }
    /* Row maximum; `omp simd` lets the max reduction vectorise without -ffast-math.  A NaN
       entry may or may not win, either way it reaches the output (through exp). */
    static inline float statescan_maxf(const float* x, ptrdiff_t n, float init) {
        float m = init;
        #pragma omp simd reduction(max:m)
        for (ptrdiff_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
        return m;
    }
    static inline double statescan_max(const double* x, ptrdiff_t n, double init) {
        double m = init;
        #pragma omp simd reduction(max:m)
        for (ptrdiff_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
        return m;
    }
    """
    float statescan_expf(float x) noexcept nogil
    double statescan_exp(double x) noexcept nogil
    float statescan_maxf(const float* x, Py_ssize_t n, float init) noexcept nogil
    double statescan_max(const double* x, Py_ssize_t n, double init) noexcept nogil


cdef inline floating fexp(floating x) noexcept nogil:
    if floating is float:
        return statescan_expf(x)
    else:
        return statescan_exp(x)


cdef enum:
    # OpenBLAS runs a GEMM on its own thread pool when m*n*k exceeds 65536 * 4; called from
    # our worker threads for small blocks that oversubscribes the cores and was measured
    # 20-100x slower.  Blocks at or under this size always run on the calling thread.
    GEMM_SINGLE_THREAD_MNK = 262144


cdef inline floating row_max(const floating* x, Py_ssize_t n, floating init) noexcept nogil:
    if floating is float:
        return statescan_maxf(x, n, init)
    else:
        return statescan_max(x, n, init)


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


cdef inline void gemm(bint ta, bint tb, int M, int N, int K, floating alpha,
                      const floating* A, int lda, const floating* B, int ldb,
                      floating beta, floating* C, int ldc) noexcept nogil:
    """Row-major C[M,N] = alpha op(A) op(B) + beta C (op = transpose when ta/tb), in tiles
    of C small enough that BLAS stays on the calling thread."""
    cdef int i, j, p, mb = M, nb = N, kb = K
    if M <= 0 or N <= 0:
        return
    if K <= 0:
        for i in range(M):
            for j in range(N):
                C[i * ldc + j] = 0 if beta == 0 else beta * C[i * ldc + j]
        return
    # halve the longest side until a tile fits; pieces of K accumulate into C (beta = 1)
    while <long> mb * nb * kb > GEMM_SINGLE_THREAD_MNK:
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
                blas_gemm(ta, tb, min(mb, M - i), min(nb, N - j), min(kb, K - p), alpha,
                          A + (p * lda + i if ta else i * lda + p), lda,
                          B + (j * ldb + p if tb else p * ldb + j), ldb,
                          beta if p == 0 else 1, C + i * ldc + j, ldc)
                p += kb
            j += nb
        i += mb
