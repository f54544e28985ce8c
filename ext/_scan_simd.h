/* The selective scan's inner steps on one block of SS_W channels, written with GCC/Clang
 * vector extensions so that the block's lanes, the running output and the constants stay in
 * registers across the N states (the auto-vectorised Cython loop kept them in memory and
 * re-checked pointer aliasing for every state: about 2x slower).  The same body instantiates
 * float and double (SS_DEFINE below); other compilers (or -DSTATESCAN_NO_VECTOR_EXT) get the
 * plain loops of scan.pyx (SS_HAVE_VECTOR 0).  Arithmetic only: the decays exp(delta*A) come
 * in precomputed (scan.pyx's `decays`, with _math.pxd's exp_clamped).
 *
 * ss_advance_<f|d>(h, e, acc, u, Bt, Ct, N, nw), arrays of SS_W lanes per state n:
 *   h[n] = e[n]*h[n] + u*Bt[n];  acc += Ct[n]*h[n]
 * ss_reverse_<f|d>: one step of the backward over the N states (scan.pyx's reverse_step).
 * nw < SS_W: only the first nw lanes are channels (a block at the end of Dm).  The padded
 * lanes are kept at exactly 0 (h in the forward, g in the backward): their inputs are 0, but
 * 0 * inf from an infinite B_t[n] or C_t[n] would make them NaN, and the backward's sums over
 * lanes (dB_t, dC_t) would carry that NaN into real gradients.
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

/* ss_vf: SS_W lanes of T (unaligned access allowed); v8/v4/v2: its halves for the sums */
#define SS_DEFINE(SUF, T, IT)                                                                 \
typedef IT ss_vi_##SUF __attribute__((vector_size(SS_W * sizeof(T)), aligned(sizeof(T))));     \
typedef T ss_vf_##SUF __attribute__((vector_size(SS_W * sizeof(T)), aligned(sizeof(T))));      \
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
/* all-ones in the first nw lanes, zero in the others */                                     \
static inline ss_vi_##SUF ss_lanes_##SUF(ptrdiff_t nw) {                                       \
    ss_vi_##SUF m;                                                                             \
    for (int j = 0; j < SS_W; j++) m[j] = j < nw ? -1 : 0;                                     \
    return m;                                                                                  \
}                                                                                              \
                                                                                               \
static inline void ss_reverse_##SUF(T* g, T* dAacc, T* gB, T* dde, const T* ht, const T* hp,  \
                                    const T* et, const T* At, const T* dl, const T* u,        \
                                    const T* dy0, const T* Bt, const T* Ct, T* dB_row,        \
                                    T* dC_row, ptrdiff_t N, ptrdiff_t nw) {                    \
    const ss_vf_##SUF y = *(const ss_vf_##SUF*)dy0, uu = *(const ss_vf_##SUF*)u;              \
    const ss_vf_##SUF d = *(const ss_vf_##SUF*)dl;                                             \
    const ss_vi_##SUF keep = ss_lanes_##SUF(nw);                                               \
    const int masked = nw < SS_W;                                                              \
    ss_vf_##SUF sb = (ss_vf_##SUF){0}, sd = (ss_vf_##SUF){0};                                  \
    for (ptrdiff_t n = 0; n < N; n++) {                                                        \
        const ptrdiff_t o = n * SS_W;                                                          \
        ss_vf_##SUF gn = *(ss_vf_##SUF*)(g + o) + y * Ct[n];                                   \
        if (masked) gn = (ss_vf_##SUF)((ss_vi_##SUF)gn & keep);                                \
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
static inline void ss_advance_##SUF(T* h, const T* e, T* acc, const T* u, const T* Bt,      \
                                    const T* Ct, ptrdiff_t N, ptrdiff_t nw) {                  \
    const ss_vf_##SUF uu = *(const ss_vf_##SUF*)u;                                             \
    ss_vf_##SUF a = *(const ss_vf_##SUF*)acc;                                                  \
    if (nw < SS_W) {                                                                           \
        const ss_vi_##SUF keep = ss_lanes_##SUF(nw);                                           \
        for (ptrdiff_t n = 0; n < N; n++) {                                                    \
            ss_vf_##SUF hn = *(const ss_vf_##SUF*)(e + n * SS_W) * *(ss_vf_##SUF*)(h + n * SS_W) \
                             + uu * Bt[n];                                                     \
            hn = (ss_vf_##SUF)((ss_vi_##SUF)hn & keep);                                        \
            *(ss_vf_##SUF*)(h + n * SS_W) = hn;                                                \
            a += Ct[n] * hn;                                                                   \
        }                                                                                      \
    } else {                                                                                   \
        for (ptrdiff_t n = 0; n < N; n++) {                                                    \
            ss_vf_##SUF hn = *(const ss_vf_##SUF*)(e + n * SS_W) * *(ss_vf_##SUF*)(h + n * SS_W) \
                             + uu * Bt[n];                                                     \
            *(ss_vf_##SUF*)(h + n * SS_W) = hn;                                                \
            a += Ct[n] * hn;                                                                   \
        }                                                                                      \
    }                                                                                          \
    *(ss_vf_##SUF*)acc = a;                                                                    \
}

SS_DEFINE(f, float, int32_t)
SS_DEFINE(d, double, int64_t)

#else
#define SS_HAVE_VECTOR 0
static inline void ss_reverse_f(float* g, float* dAacc, float* gB, float* dde, const float* ht,
                                const float* hp, const float* et, const float* At,
                                const float* dl, const float* u, const float* dy0,
                                const float* Bt, const float* Ct, float* dB_row,
                                float* dC_row, ptrdiff_t N, ptrdiff_t nw) {}
static inline void ss_reverse_d(double* g, double* dAacc, double* gB, double* dde,
                                const double* ht, const double* hp, const double* et,
                                const double* At, const double* dl, const double* u,
                                const double* dy0, const double* Bt, const double* Ct,
                                double* dB_row, double* dC_row, ptrdiff_t N,
                                ptrdiff_t nw) {}
static inline void ss_advance_f(float* h, const float* e, float* acc, const float* u,
                                const float* Bt, const float* Ct, ptrdiff_t N,
                                ptrdiff_t nw) {}
static inline void ss_advance_d(double* h, const double* e, double* acc, const double* u,
                                const double* Bt, const double* Ct, ptrdiff_t N,
                                ptrdiff_t nw) {}
#endif
#endif
