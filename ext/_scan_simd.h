/* The selective scan's inner step on one block of SS_W channels (and rows of softplus and
 * sigmoid, lengths multiples of SS_W), written with GCC/Clang
 * vector extensions so that the block's lanes, the running output and the constants stay in
 * registers across the N states (the auto-vectorised Cython loop kept them in memory and
 * re-checked pointer aliasing for every state).  The same body instantiates float and double
 * (SS_DEFINE below); other compilers (or -DSTATESCAN_NO_VECTOR_EXT) get the plain loops of
 * scan.pyx (SS_HAVE_VECTOR 0).
 *
 * ss_advance_<f|d>(h, e_out, acc, At, dl, u, Bt, Ct, N), arrays of SS_W lanes per state n:
 *   e = exp(dl * At[n]);  e_out[n] = e (unless e_out is NULL);  h[n] = e*h[n] + u*Bt[n];
 *   acc += Ct[n]*h[n]
 * ss_reverse_<f|d>: one step of the backward over the N states (scan.pyx's reverse_step).
 * exp is the same algorithm as _scan_math.pxd's vexp.
 */
#ifndef STATESCAN_SCAN_SIMD_H
#define STATESCAN_SCAN_SIMD_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SS_W 16

#if defined(__GNUC__) && !defined(__INTEL_COMPILER) && !defined(STATESCAN_NO_VECTOR_EXT)
#define SS_HAVE_VECTOR 1
/* Every function here is static inline, so no vector type crosses an ABI boundary: the
 * "changes the ABI" note for wide vectors in a build without AVX-512 does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"   /* (GCC reports it where the calls are inlined) */

/* VF: SS_W lanes of T (unaligned access allowed); VI/VU: signed/unsigned ints of T's width */
#define SS_DEFINE(SUF, T, IT, UT, LO, HI, SHIFT, MAGIC, BIAS, MBITS, LOG2E, LN2HI, LN2LO, POLY, \
                  LOG1P)                                                                       \
typedef T ss_vf_##SUF __attribute__((vector_size(SS_W * sizeof(T)), aligned(sizeof(T))));      \
typedef IT ss_vi_##SUF __attribute__((vector_size(SS_W * sizeof(T)), aligned(sizeof(T))));     \
typedef UT ss_vu_##SUF __attribute__((vector_size(SS_W * sizeof(T)), aligned(sizeof(T))));     \
                                                                                               \
static inline ss_vf_##SUF ss_select_##SUF(ss_vi_##SUF m, ss_vf_##SUF a, ss_vf_##SUF b) {       \
    return (ss_vf_##SUF)(((ss_vi_##SUF)a & m) | ((ss_vi_##SUF)b & ~m));                        \
}                                                                                              \
                                                                                               \
static inline ss_vf_##SUF ss_vexp_##SUF(ss_vf_##SUF x) {                                       \
    const ss_vf_##SUF lo = (ss_vf_##SUF){0} + (T)(LO), hi = (ss_vf_##SUF){0} + (T)(HI);        \
    const ss_vf_##SUF shift = (ss_vf_##SUF){0} + (T)(SHIFT);                                   \
    x = ss_select_##SUF((ss_vi_##SUF)(x < lo), lo, x);   /* NaN compares false: stays NaN */  \
    x = ss_select_##SUF((ss_vi_##SUF)(x > hi), hi, x);                                         \
    ss_vf_##SUF t = x * (T)(LOG2E) + shift;                                                    \
    ss_vf_##SUF kf = t - shift;                                                                \
    ss_vf_##SUF r = (x - kf * (T)(LN2HI)) - kf * (T)(LN2LO);                                   \
    /* 2^(n-1) from the exponent bits (0 at the bottom of the range), times 2 e^r */         \
    ss_vf_##SUF s = (ss_vf_##SUF)((ss_vu_##SUF)((ss_vi_##SUF)t - (IT)(MAGIC) + (IT)(BIAS))     \
                                  << (MBITS));                                                 \
    return (POLY) * s;                                                                         \
}                                                                                              \
                                                                                               \
static inline void ss_softplus_row_##SUF(T* out, const T* v, ptrdiff_t n) {                   \
    /* log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p(u) = 2 atanh(u / (2 + u)) */            \
    const ss_vf_##SUF zero = (ss_vf_##SUF){0};                                                 \
    for (ptrdiff_t i = 0; i < n; i += SS_W) {                                                  \
        ss_vf_##SUF x = *(const ss_vf_##SUF*)(v + i);                                          \
        ss_vf_##SUF pos = ss_select_##SUF((ss_vi_##SUF)(x > zero), x, zero);                   \
        ss_vf_##SUF u = ss_vexp_##SUF(x - pos - pos);                                          \
        ss_vf_##SUF s = u / (2 + u), q = s * s;                                                \
        *(ss_vf_##SUF*)(out + i) = pos + 2 * s * (LOG1P);                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline void ss_sigmoid_row_##SUF(T* out, const T* v, ptrdiff_t n) {                    \
    for (ptrdiff_t i = 0; i < n; i += SS_W)                                                    \
        *(ss_vf_##SUF*)(out + i) = 1 / (1 + ss_vexp_##SUF(-*(const ss_vf_##SUF*)(v + i)));     \
}                                                                                              \
                                                                                               \
typedef T ss_v8_##SUF __attribute__((vector_size(SS_W / 2 * sizeof(T)), aligned(sizeof(T))));  \
typedef T ss_v4_##SUF __attribute__((vector_size(SS_W / 4 * sizeof(T)), aligned(sizeof(T))));  \
typedef T ss_v2_##SUF __attribute__((vector_size(SS_W / 8 * sizeof(T)), aligned(sizeof(T))));  \
                                                                                               \
/* sum of the lanes, pairwise: lane j + lane j+8, then +4, +2, +1 (scan.pyx's lane_sum) */     \
static inline T ss_hsum_##SUF(ss_vf_##SUF p) {                                                 \
    ss_v8_##SUF a, b;                                                                          \
    ss_v4_##SUF c, d;                                                                          \
    ss_v2_##SUF e, f;                                                                          \
    memcpy(&a, &p, sizeof a);                                                                  \
    memcpy(&b, (const char*)&p + sizeof a, sizeof b);                                          \
    a += b;                                                                                    \
    memcpy(&c, &a, sizeof c);                                                                  \
    memcpy(&d, (const char*)&a + sizeof c, sizeof d);                                          \
    c += d;                                                                                    \
    memcpy(&e, &c, sizeof e);                                                                  \
    memcpy(&f, (const char*)&c + sizeof e, sizeof f);                                          \
    e += f;                                                                                    \
    return e[0] + e[1];                                                                        \
}                                                                                              \
                                                                                               \
static inline void ss_reverse_##SUF(T* g, T* dAacc, T* gB, T* dde, const T* ht, const T* hp,  \
                                    const T* et, const T* At, const T* dl, const T* u,        \
                                    const T* dy0, const T* Bt, const T* Ct, T* dB_row,        \
                                    T* dC_row, ptrdiff_t N) {                                  \
    const ss_vf_##SUF y = *(const ss_vf_##SUF*)dy0, uu = *(const ss_vf_##SUF*)u;              \
    const ss_vf_##SUF d = *(const ss_vf_##SUF*)dl;                                             \
    ss_vf_##SUF sb = (ss_vf_##SUF){0}, sd = (ss_vf_##SUF){0};                                  \
    for (ptrdiff_t n = 0; n < N; n++) {                                                        \
        const ptrdiff_t o = n * SS_W;                                                          \
        ss_vf_##SUF gn = *(ss_vf_##SUF*)(g + o) + y * Ct[n];                                   \
        ss_vf_##SUF e = *(const ss_vf_##SUF*)(et + o);                                         \
        dC_row[n] += ss_hsum_##SUF(y * *(const ss_vf_##SUF*)(ht + o));                         \
        dB_row[n] += ss_hsum_##SUF(gn * uu);                                                   \
        sb += gn * Bt[n];                                                                      \
        ss_vf_##SUF dec = gn * *(const ss_vf_##SUF*)(hp + o) * e;                              \
        sd += dec * *(const ss_vf_##SUF*)(At + o);                                             \
        *(ss_vf_##SUF*)(dAacc + o) += dec * d;                                                 \
        *(ss_vf_##SUF*)(g + o) = gn * e;                                                       \
    }                                                                                          \
    *(ss_vf_##SUF*)gB = sb;                                                                    \
    *(ss_vf_##SUF*)dde = sd;                                                                   \
}                                                                                              \
                                                                                               \
static inline void ss_advance_##SUF(T* h, T* e_out, T* acc, const T* At, const T* dl,         \
                                    const T* u, const T* Bt, const T* Ct, ptrdiff_t N) {       \
    const ss_vf_##SUF d = *(const ss_vf_##SUF*)dl, uu = *(const ss_vf_##SUF*)u;                \
    ss_vf_##SUF a = *(const ss_vf_##SUF*)acc;                                                  \
    for (ptrdiff_t n = 0; n < N; n++) {                                                        \
        ss_vf_##SUF e = ss_vexp_##SUF(d * *(const ss_vf_##SUF*)(At + n * SS_W));               \
        if (e_out) *(ss_vf_##SUF*)(e_out + n * SS_W) = e;                                      \
        ss_vf_##SUF hn = e * *(ss_vf_##SUF*)(h + n * SS_W) + uu * Bt[n];                       \
        *(ss_vf_##SUF*)(h + n * SS_W) = hn;                                                    \
        a += Ct[n] * hn;                                                                       \
    }                                                                                          \
    *(ss_vf_##SUF*)acc = a;                                                                    \
}

/* 2 e^r, |r| <= ln2/2: Taylor series (the same polynomials as _scan_math.pxd) */
#define SS_POLY_F (2 + r * (2 + r * (1 + r * ((float)(2 / 6.) + r * (                          \
    (float)(2 / 24.) + r * ((float)(2 / 120.) + r * ((float)(2 / 720.)                        \
    + r * (float)(2 / 5040.))))))))
#define SS_POLY_D (2 + r * (2 + r * (1 + r * (2 / 6. + r * (2 / 24. + r * (2 / 120.              \
    + r * (2 / 720. + r * (2 / 5040. + r * (2 / 40320. + r * (2 / 362880.                     \
    + r * (2 / 3628800. + r * (2 / 39916800. + r * (2 / 479001600.                            \
    + r * (2 / 6227020800. + r * (2 / 87178291200.)))))))))))))))

/* atanh(s)/s = 1 + q/3 + q^2/5 + ..., q = s^2 <= 1/9 (the series of _scan_math.pxd) */
#define SS_LOG1P_F (1 + q * ((float)(1 / 3.) + q * ((float)(1 / 5.) + q * ((float)(1 / 7.)      \
    + q * ((float)(1 / 9.) + q * ((float)(1 / 11.) + q * ((float)(1 / 13.)                     \
    + q * (float)(1 / 15.))))))))
#define SS_LOG1P_D (1 + q * (1 / 3. + q * (1 / 5. + q * (1 / 7. + q * (1 / 9. + q * (1 / 11.     \
    + q * (1 / 13. + q * (1 / 15. + q * (1 / 17. + q * (1 / 19. + q * (1 / 21. + q * (1 / 23. \
    + q * (1 / 25. + q * (1 / 27. + q * (1 / 29. + q * (1 / 31. + q * (1 / 33.)))))))))))))))))

SS_DEFINE(f, float, int32_t, uint32_t, -87.5f, 88.8f, 12582912.0f, 0x4B400000, 126, 23,
          1.4426950408889634f, 0.693359375f, -2.12194440e-4f, SS_POLY_F, SS_LOG1P_F)
SS_DEFINE(d, double, int64_t, uint64_t, -708.6, 710.0, 6755399441055744.0,
          INT64_C(0x4338000000000000), 1022, 52, 1.4426950408889634,
          6.93147180369123816490e-01, 1.90821492927058770002e-10, SS_POLY_D, SS_LOG1P_D)

#else
#define SS_HAVE_VECTOR 0
static inline void ss_softplus_row_f(float* out, const float* v, ptrdiff_t n) {}
static inline void ss_softplus_row_d(double* out, const double* v, ptrdiff_t n) {}
static inline void ss_sigmoid_row_f(float* out, const float* v, ptrdiff_t n) {}
static inline void ss_sigmoid_row_d(double* out, const double* v, ptrdiff_t n) {}
static inline void ss_reverse_f(float* g, float* dAacc, float* gB, float* dde, const float* ht,
                                const float* hp, const float* et, const float* At,
                                const float* dl, const float* u, const float* dy0,
                                const float* Bt, const float* Ct, float* dB_row,
                                float* dC_row, ptrdiff_t N) {}
static inline void ss_reverse_d(double* g, double* dAacc, double* gB, double* dde,
                                const double* ht, const double* hp, const double* et,
                                const double* At, const double* dl, const double* u,
                                const double* dy0, const double* Bt, const double* Ct,
                                double* dB_row, double* dC_row, ptrdiff_t N) {}
static inline void ss_advance_f(float* h, float* e_out, float* acc, const float* At,
                                const float* dl, const float* u, const float* Bt,
                                const float* Ct, ptrdiff_t N) {}
static inline void ss_advance_d(double* h, double* e_out, double* acc, const double* At,
                                const double* dl, const double* u, const double* Bt,
                                const double* Ct, ptrdiff_t N) {}
#endif
#endif
