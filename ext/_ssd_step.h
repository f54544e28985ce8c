/* The row update of one SSD decoding step, four state rows at a time:
 *     h_out[r, :] = a h_in[r, :] + u[r] B;   out[r] = h_out[r, :] . C      (r = 0..3)
 * B and C are loaded once for the four rows, and the four dot products are independent
 * chains.  `omp simd` vectorises the reductions without -ffast-math (the association is fixed
 * by the build, never by the thread count); h_out may be h_in (each entry is read before it
 * is written, and the rows never overlap).  Without OpenMP the pragma is ignored (scalar). */
#ifndef STATESCAN_SSD_STEP_H
#define STATESCAN_SSD_STEP_H
#include <stddef.h>

#define STATESCAN_SSD_ROWS(T, NAME4, NAME1)                                                   \
static inline void NAME4(const T* h_in, T* h_out, ptrdiff_t N, const T* B, const T* C,       \
                         T a, const T* u, T* out) {                                          \
    const T *i0 = h_in, *i1 = h_in + N, *i2 = h_in + 2 * N, *i3 = h_in + 3 * N;              \
    T *o0 = h_out, *o1 = h_out + N, *o2 = h_out + 2 * N, *o3 = h_out + 3 * N;                \
    T u0 = u[0], u1 = u[1], u2 = u[2], u3 = u[3];                                            \
    T acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;                                                \
    _Pragma("omp simd reduction(+:acc0, acc1, acc2, acc3)")                                  \
    for (ptrdiff_t n = 0; n < N; n++) {                                                      \
        T b = B[n], c = C[n];                                                                \
        T s0 = a * i0[n] + u0 * b, s1 = a * i1[n] + u1 * b;                                  \
        T s2 = a * i2[n] + u2 * b, s3 = a * i3[n] + u3 * b;                                  \
        o0[n] = s0; o1[n] = s1; o2[n] = s2; o3[n] = s3;                                      \
        acc0 += s0 * c; acc1 += s1 * c; acc2 += s2 * c; acc3 += s3 * c;                      \
    }                                                                                        \
    out[0] = acc0; out[1] = acc1; out[2] = acc2; out[3] = acc3;                              \
}                                                                                            \
static inline T NAME1(const T* h_in, T* h_out, ptrdiff_t N, const T* B, const T* C,          \
                      T a, T u) {                                                            \
    T acc = 0;                                                                               \
    _Pragma("omp simd reduction(+:acc)")                                                     \
    for (ptrdiff_t n = 0; n < N; n++) {                                                      \
        T s = a * h_in[n] + u * B[n];                                                        \
        h_out[n] = s;                                                                        \
        acc += s * C[n];                                                                     \
    }                                                                                        \
    return acc;                                                                              \
}

STATESCAN_SSD_ROWS(float, statescan_ssd_rows4f, statescan_ssd_row1f)
STATESCAN_SSD_ROWS(double, statescan_ssd_rows4, statescan_ssd_row1)

#endif
