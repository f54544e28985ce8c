/* Block-diagonal micro-kernel for several small heads stepped together (rnn.pyx's grouped
 * forward):  out[r][g][kk*D + d] = bias[g][kk*D + d] + sum_k h[r][kk*D + k] * R_kk[g*D + d][k]
 * for the job's nk heads kk, each R_kk^T packed by pack_panels into panels of `nt` columns
 * (rnn.pyx's `mp`).
 *
 * A vector of VL lanes (VL divides D) of one head's output columns is a contiguous piece of a
 * packed panel, so the kernel reads the panels as they are and skips their zero padding.  A
 * block is `rows` rows x `nb` vectors of ONE head (they share that head's h broadcasts) and
 * writes each vector to its place in the gates' [row][g][nk*D] layout, so one cell call per
 * row covers all nk heads.  Each output column is summed over its head's k in order into an
 * accumulator that starts at 0, and out = bias + accumulator -- the operations (and so the
 * bits) of ss_matmul_acc on the head alone adding to gates filled with the bias, whatever the
 * blocking or the number of heads.
 *
 * One source for float and double (SS_BD_DEFINE); GCC/Clang vector extensions, lowered to the
 * target's SIMD, or one-element "vectors" for other compilers. */
#ifndef STATESCAN_BLOCK_DIAG_H
#define STATESCAN_BLOCK_DIAG_H

#include <stddef.h>

#if defined(__AVX512F__)
#define SS_BD_VBYTES 64
#define SS_BD_ACC 16        /* accumulator registers to use (of 32) */
#elif defined(__AVX__)
#define SS_BD_VBYTES 32
#define SS_BD_ACC 12        /* of 16 */
#else
#define SS_BD_VBYTES 16
#define SS_BD_ACC 12
#endif

#if defined(__GNUC__)
#define SS_BD_INLINE static inline __attribute__((always_inline))
#define SS_BD_UNROLL _Pragma("GCC unroll 16")
#define SS_BD_VEC(T, SFX) \
    typedef T ss_bdv_##SFX __attribute__((vector_size(SS_BD_VBYTES), aligned(sizeof(T))));
#else
#define SS_BD_INLINE static inline
#define SS_BD_UNROLL
#undef SS_BD_VBYTES
#define SS_BD_VBYTES 8
#define SS_BD_VEC(T, SFX) typedef T ss_bdv_##SFX;
#endif

/* Lanes per vector, by element size; the grouped forward needs D % lanes == 0. */
#define SS_BD_LANES(size) (SS_BD_VBYTES / (size) > 0 ? SS_BD_VBYTES / (size) : 1)

#define SS_BD_DEFINE(T, SFX)                                                                  \
SS_BD_VEC(T, SFX)                                                                              \
enum { SS_BD_VL_##SFX = SS_BD_LANES((int)sizeof(T)) };                                         \
/* rows x nb vectors (literals at each call); p[v]: vector v's panel column, o[v]: its out     \
   column, bias + b[v] its bias; element k of vector v is at p[v] + k * nt */                  \
SS_BD_INLINE void ss_bd_block_##SFX(const T* a, ptrdiff_t lda, const T* const* p,              \
                                    ptrdiff_t nt, ptrdiff_t K, T* out, ptrdiff_t ldo,          \
                                    const ptrdiff_t* o, const T* bias, const ptrdiff_t* b,     \
                                    const int rows, const int nb) {                            \
    ss_bdv_##SFX acc[SS_BD_ACC][4];                                                            \
    ss_bdv_##SFX pv[4];                                                                        \
    SS_BD_UNROLL for (int r = 0; r < rows; r++)                                                \
        SS_BD_UNROLL for (int v = 0; v < nb; v++) acc[r][v] = (ss_bdv_##SFX){0};               \
    for (ptrdiff_t k = 0; k < K; k++) {                                                        \
        SS_BD_UNROLL for (int v = 0; v < nb; v++)                                              \
            pv[v] = *(const ss_bdv_##SFX*)(p[v] + k * nt);                                     \
        SS_BD_UNROLL for (int r = 0; r < rows; r++) {                                          \
            T ar = a[r * lda + k];                                                             \
            SS_BD_UNROLL for (int v = 0; v < nb; v++) acc[r][v] += ar * pv[v];                 \
        }                                                                                      \
    }                                                                                          \
    SS_BD_UNROLL for (int r = 0; r < rows; r++)                                                \
        SS_BD_UNROLL for (int v = 0; v < nb; v++)                                              \
            *(ss_bdv_##SFX*)(out + r * ldo + o[v]) =                                           \
                *(const ss_bdv_##SFX*)(bias + b[v]) + acc[r][v];                               \
}                                                                                              \
/* every row of nrows for nb vectors: blocks of SS_BD_ACC / nb rows, the rest in one block     \
   with a literal row count (a block per row would re-read the panels per row) */              \
SS_BD_INLINE void ss_bd_rows_##SFX(const T* a, ptrdiff_t lda, const T* const* p, ptrdiff_t nt, \
                                   ptrdiff_t K, T* out, ptrdiff_t ldo, const ptrdiff_t* o,     \
                                   const T* bias, const ptrdiff_t* b, ptrdiff_t nrows,         \
                                   const int nb) {                                             \
    const int mr = SS_BD_ACC / nb;                                                             \
    ptrdiff_t r = 0;                                                                           \
    for (; r + mr <= nrows; r += mr)                                                           \
        ss_bd_block_##SFX(a + r * lda, lda, p, nt, K, out + r * ldo, ldo, o, bias, b, mr, nb); \
    a += r * lda;                                                                              \
    out += r * ldo;                                                                            \
    switch (nrows - r < 8 ? nrows - r : 8) {                                                   \
    case 7: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 7 ? 7 : 1, nb); break; \
    case 6: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 6 ? 6 : 1, nb); break; \
    case 5: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 5 ? 5 : 1, nb); break; \
    case 4: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 4 ? 4 : 1, nb); break; \
    case 3: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 3 ? 3 : 1, nb); break; \
    case 2: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, mr > 2 ? 2 : 1, nb); break; \
    case 1: ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, 1, nb); break;           \
    case 0: break;                                                                             \
    default:                                                                                   \
        for (; r < nrows; r++, a += lda, out += ldo)                                           \
            ss_bd_block_##SFX(a, lda, p, nt, K, out, ldo, o, bias, b, 1, nb);                  \
    }                                                                                          \
}                                                                                              \
/* out[r][g*W + kk*D + d] = bias[g*ldb + kk*D + d] + sum_{k<D} h[r*ldh + kk*D + k] *           \
   R_kk^T[k][g*D + d] for r < nrows, kk < nk, g*D + d < GD; head kk's panels at                \
   mp + kk * ntiles * D * nt; W = nk*D.  The kernel stores the bias plus the sum instead of    \
   adding the sum to gates the caller filled with the bias: the same bits, one pass over       \
   the gates less.  Blocks of up to 4 vectors: with 8, the 8 panel pointers of a one-row       \
   block no longer fit in registers (reloaded every k: B = 1 took 1.2x longer). */             \
static void ss_bd_matmul_##SFX(const T* h, ptrdiff_t ldh, const T* mp, ptrdiff_t D,            \
                               ptrdiff_t GD, ptrdiff_t ntiles, ptrdiff_t nt, ptrdiff_t nk,     \
                               const T* bias, ptrdiff_t ldb, T* out, ptrdiff_t ldo,            \
                               ptrdiff_t nrows) {                                              \
    const ptrdiff_t VL = SS_BD_VL_##SFX, nvec = GD / VL, W = nk * D;                           \
    const T* p[4];                                                                             \
    ptrdiff_t o[4], b[4];                                                                      \
    for (ptrdiff_t kk = 0; kk < nk; kk++) {                                                    \
        const T* mk = mp + kk * ntiles * D * nt;                                               \
        const T* hk = h + kk * D;               /* head kk's part of each row of h */          \
        for (ptrdiff_t j = 0; j < nvec;) {                                                     \
            int nb = nvec - j < 4 ? (int)(nvec - j) : 4;                                       \
            for (int v = 0; v < nb; v++) {                                                     \
                ptrdiff_t c = (j + v) * VL;          /* column of R_kk^T */                    \
                p[v] = mk + (c / nt) * D * nt + c % nt;                                        \
                o[v] = (c / D) * W + kk * D + c % D;                                           \
                b[v] = (c / D) * ldb + kk * D + c % D;                                         \
            }                                                                                  \
            switch (nb) {                                                                      \
            case 4: ss_bd_rows_##SFX(hk, ldh, p, nt, D, out, ldo, o, bias, b, nrows, 4); break;\
            case 3: ss_bd_rows_##SFX(hk, ldh, p, nt, D, out, ldo, o, bias, b, nrows, 3); break;\
            case 2: ss_bd_rows_##SFX(hk, ldh, p, nt, D, out, ldo, o, bias, b, nrows, 2); break;\
            default: ss_bd_rows_##SFX(hk, ldh, p, nt, D, out, ldo, o, bias, b, nrows, 1);      \
            }                                                                                  \
            j += nb;                                                                           \
        }                                                                                      \
    }                                                                                          \
}

SS_BD_DEFINE(float, f)
SS_BD_DEFINE(double, d)

#endif
