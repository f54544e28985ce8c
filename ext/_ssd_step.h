/* The row update of one SSD decoding step:
 *     h_out[r, :] = a h_in[r, :] + u[r] B;   out[r] = h_out[r, :] . C
 * h_out may be h_in (each entry is read before it is written, rows never overlap).
 *
 * statescan_ssd_rows{f,d}: a block of rows (8 floats / 4 doubles: one 32-byte vector of
 * outputs) for N a multiple of the vector length, in GCC/Clang vector extensions.  B and C
 * are loaded once per block, each row keeps a vector of partial sums, and the block's sums
 * are reduced together by a fixed pairwise shuffle tree (one vector add per level instead of
 * a chain of scalar adds per row: the step is bound by streaming the state, and the per-row
 * horizontal sums were a quarter of its time).  STATESCAN_SSD_BLOCK is 0 where the vector
 * extensions are missing; the caller then uses the row loop below for every row.
 *
 * statescan_ssd_row{f,d}: one row, `omp simd` (vectorised without -ffast-math; without OpenMP
 * the pragma is ignored): rows left over and sizes the block form does not take.
 * Every association is fixed by the build, never by the thread count. */
#ifndef STATESCAN_SSD_STEP_H
#define STATESCAN_SSD_STEP_H
#include <stddef.h>

#define STATESCAN_SSD_ROW(T, NAME)                                                            \
static inline T NAME(const T* h_in, T* h_out, ptrdiff_t N, const T* B, const T* C,           \
                     T a, T u) {                                                             \
    T acc = 0;                                                                               \
    _Pragma("omp simd reduction(+:acc)")                                                     \
    for (ptrdiff_t n = 0; n < N; n++) {                                                      \
        T s = a * h_in[n] + u * B[n];                                                        \
        h_out[n] = s;                                                                        \
        acc += s * C[n];                                                                     \
    }                                                                                        \
    return acc;                                                                              \
}

STATESCAN_SSD_ROW(float, statescan_ssd_rowf)
STATESCAN_SSD_ROW(double, statescan_ssd_rowd)

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define STATESCAN_SSD_BLOCK 1
/* 32-byte vectors that may sit at any element boundary (numpy aligns to 16 bytes) */
typedef float statescan_ssd_vf __attribute__((vector_size(32), aligned(4)));
typedef double statescan_ssd_vd __attribute__((vector_size(32), aligned(8)));
#define SSD_EVEN8(x, y) __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14)
#define SSD_ODD8(x, y) __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15)
#define SSD_EVEN4(x, y) __builtin_shufflevector(x, y, 0, 2, 4, 6)
#define SSD_ODD4(x, y) __builtin_shufflevector(x, y, 1, 3, 5, 7)

/* rows r = 0..R-1 (R = vector length) of the update; acc[r] gets row r's partial sums */
#define STATESCAN_SSD_UPDATE(V, R)                                                            \
    V acc[R], vu[R], va = (V){0} + a;                                                        \
    for (int r = 0; r < R; r++) {                                                            \
        acc[r] = (V){0};                                                                     \
        vu[r] = (V){0} + u[r];                                                               \
    }                                                                                        \
    for (ptrdiff_t n = 0; n < N; n += R) {                                                   \
        V b = *(const V*)(B + n), c = *(const V*)(C + n);                                    \
        for (int r = 0; r < R; r++) {                                                        \
            V s = va * *(const V*)(h_in + r * N + n) + vu[r] * b;                            \
            *(V*)(h_out + r * N + n) = s;                                                    \
            acc[r] += s * c;                                                                 \
        }                                                                                    \
    }

/* 8 rows, N % 8 == 0 */
static inline void statescan_ssd_rowsf(const float* h_in, float* h_out, ptrdiff_t N,
                                       const float* B, const float* C, float a,
                                       const float* u, float* out) {
    STATESCAN_SSD_UPDATE(statescan_ssd_vf, 8)
    /* pairwise lane sums: 8 vectors -> 4 -> 2 -> 1, lane r = row r */
    statescan_ssd_vf p0 = SSD_EVEN8(acc[0], acc[1]) + SSD_ODD8(acc[0], acc[1]);
    statescan_ssd_vf p1 = SSD_EVEN8(acc[2], acc[3]) + SSD_ODD8(acc[2], acc[3]);
    statescan_ssd_vf p2 = SSD_EVEN8(acc[4], acc[5]) + SSD_ODD8(acc[4], acc[5]);
    statescan_ssd_vf p3 = SSD_EVEN8(acc[6], acc[7]) + SSD_ODD8(acc[6], acc[7]);
    statescan_ssd_vf q0 = SSD_EVEN8(p0, p1) + SSD_ODD8(p0, p1);
    statescan_ssd_vf q1 = SSD_EVEN8(p2, p3) + SSD_ODD8(p2, p3);
    *(statescan_ssd_vf*)out = SSD_EVEN8(q0, q1) + SSD_ODD8(q0, q1);
}

/* 4 rows, N % 4 == 0 */
static inline void statescan_ssd_rowsd(const double* h_in, double* h_out, ptrdiff_t N,
                                       const double* B, const double* C, double a,
                                       const double* u, double* out) {
    STATESCAN_SSD_UPDATE(statescan_ssd_vd, 4)
    statescan_ssd_vd p0 = SSD_EVEN4(acc[0], acc[1]) + SSD_ODD4(acc[0], acc[1]);
    statescan_ssd_vd p1 = SSD_EVEN4(acc[2], acc[3]) + SSD_ODD4(acc[2], acc[3]);
    *(statescan_ssd_vd*)out = SSD_EVEN4(p0, p1) + SSD_ODD4(p0, p1);
}
#else
#define STATESCAN_SSD_BLOCK 0
static inline void statescan_ssd_rowsf(const float* h_in, float* h_out, ptrdiff_t N,
                                       const float* B, const float* C, float a,
                                       const float* u, float* out) {}
static inline void statescan_ssd_rowsd(const double* h_in, double* h_out, ptrdiff_t N,
                                       const double* B, const double* C, double a,
                                       const double* u, double* out) {}
#endif

#endif
