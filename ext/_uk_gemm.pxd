# The row-major gemm contract of _gemm.pxd on statescan's micro-kernel (_microkernel.pxd)
# where it is compiled for AVX-512: there the micro-kernel runs at about twice the speed of
# scipy's OpenBLAS when OpenBLAS runs AVX2 kernels (its Haswell kernels on the AMD EPYC Zen 5
# this was measured on, in the small single-thread tiles of _gemm.pxd).  Where OpenBLAS runs
# AVX-512 kernels of its own, its small-matrix kernels (no packing) beat it on ssd's forward
# tiles, and statescan turns the micro-kernel off for ssd when it loads (uk_gemm_use, one
# setting per module; statescan._dispatch._configure_for_machine).  Elsewhere, and for an
# alpha other than 1 or a beta other than 0 or 1, it is _gemm.pxd's BLAS gemm, bits included.
#
# op(B) is packed into panels of NT columns (zero-padded), op(A) used in place (copied into
# rows when transposed); full panels write C directly, the last partial one goes through a
# small buffer.  Scratch is one grow-only block per thread (blocks up to SS_UK_GEMM_KEEP bytes
# stay for the thread's next call, bigger ones are freed after it); a thread that finds no
# memory falls back to BLAS.  Every element of C is summed over k in one order whatever the
# thread, so results do not depend on the thread count.
from cython cimport floating

from _gemm cimport gemm as blas_tiled_gemm
from _microkernel cimport (NT, matmul_acc, matmul_raw, matmul_store, pack_panels,
                          transpose)


cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(__AVX512F__)
    #define SS_UK_GEMM 1
    #else
    #define SS_UK_GEMM 0
    #endif
    #define SS_UK_GEMM_KEEP ((size_t)4 << 20)
    /* whether gemm takes the micro-kernel: one setting per extension module that includes
       this, chosen from Python when the module loads (ss_uk_gemm_use) */
    static int ss_uk_gemm_on = SS_UK_GEMM;
    static int ss_uk_gemm_use(int on) { ss_uk_gemm_on = SS_UK_GEMM && on; return ss_uk_gemm_on; }
    static __thread void* ss_uk_gemm_buf = NULL;
    static __thread size_t ss_uk_gemm_cap = 0;
    /* the calling thread's scratch block of at least nbytes (NULL: no memory) */
    static void* ss_uk_gemm_scratch(size_t nbytes) {
        if (nbytes > ss_uk_gemm_cap) {
            free(ss_uk_gemm_buf);
            ss_uk_gemm_buf = aligned_alloc(64, (nbytes + 63) / 64 * 64);
            ss_uk_gemm_cap = ss_uk_gemm_buf ? nbytes : 0;
        }
        return ss_uk_gemm_buf;
    }
    /* after a call: a block above SS_UK_GEMM_KEEP is not kept */
    static void ss_uk_gemm_trim(void) {
        if (ss_uk_gemm_cap > SS_UK_GEMM_KEEP) {
            free(ss_uk_gemm_buf);
            ss_uk_gemm_buf = NULL;
            ss_uk_gemm_cap = 0;
        }
    }
    """
    bint SS_UK_GEMM
    bint uk_gemm_on "ss_uk_gemm_on"
    bint uk_gemm_use "ss_uk_gemm_use"(bint on) nogil
    void* uk_gemm_scratch "ss_uk_gemm_scratch"(size_t nbytes) nogil
    void uk_gemm_trim "ss_uk_gemm_trim"() nogil


cdef inline bint uk_gemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                         const floating* A, Py_ssize_t lda, const floating* B, Py_ssize_t ldb,
                         bint accumulate, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C[M,N] = op(A) op(B) (+ C when accumulate) on the micro-kernel, M, N, K > 0.
    False when no scratch memory was found (C untouched)."""
    cdef Py_ssize_t nfull = N // NT, rest = N - nfull * NT, ntiles = (N + NT - 1) // NT
    cdef Py_ssize_t i, j, n0 = nfull * NT
    cdef Py_ssize_t nb_p = K * ntiles * NT, nb_a = M * K if ta else 0
    cdef Py_ssize_t nb_t = M * NT if rest else 0
    cdef floating* Bp = <floating*> uk_gemm_scratch((nb_p + nb_a + nb_t) * sizeof(floating))
    cdef floating* At
    cdef floating* tmp
    cdef const floating* a = A
    cdef Py_ssize_t la = lda
    if Bp == NULL:
        return False
    At = Bp + nb_p
    tmp = At + nb_a
    # op(B) (k, n) at B[k*ldb + n], or B[n*ldb + k] when transposed
    if tb:
        pack_panels(B, 1, ldb, K, N, Bp)
    else:
        pack_panels(B, ldb, 1, K, N, Bp)
    if ta:      # op(A) (i, k) = A[k*lda + i] into rows At[i*K + k], in register blocks (a
        # scalar copy, strided writes, was a quarter of ssd's own loops next to the products)
        transpose(A, lda, K, M, At, K)
        a = At
        la = K
    if nfull > 0:
        if accumulate:
            matmul_acc(a, la, Bp, K, nfull, C, ldc, M)
        else:
            matmul_store(a, la, Bp, K, nfull, NULL, C, ldc, M)
    if rest:
        # tmp = the sums unrounded by any add (SS_FIRST), then C = 0 + sum or C + sum: the
        # operations matmul_store / matmul_acc apply to a full panel's elements
        matmul_raw(a, la, Bp + nfull * K * NT, K, tmp, NT, M, True)
        if accumulate:
            for i in range(M):
                for j in range(rest):
                    C[i * ldc + n0 + j] = C[i * ldc + n0 + j] + tmp[i * NT + j]
        else:
            for i in range(M):
                for j in range(rest):
                    C[i * ldc + n0 + j] = 0 + tmp[i * NT + j]
    uk_gemm_trim()
    return True


cdef inline void gemm(bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                      floating alpha, const floating* A, Py_ssize_t lda, const floating* B,
                      Py_ssize_t ldb, floating beta, floating* C, Py_ssize_t ldc) noexcept nogil:
    """_gemm.pxd's gemm (row-major C[M,N] = alpha op(A) op(B) + beta C): on the micro-kernel in
    AVX-512 builds for alpha = 1 and beta = 0 (C not read) or 1 unless uk_gemm_use(False)
    turned it off, else through BLAS."""
    if (uk_gemm_on and M > 0 and N > 0 and K > 0 and alpha == 1 and (beta == 0 or beta == 1)
            and uk_gemm(ta, tb, M, N, K, A, lda, B, ldb, beta == 1, C, ldc)):
        return
    blas_tiled_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
