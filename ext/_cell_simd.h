/* The pointwise part of the RNN cells (ext/_cells.pxd dispatches to these), written with GCC /
 * Clang vector extensions so that every unit is computed by the same vector instructions:
 *
 * - whole vectors of units in the loop, and the last D % lanes units by the same code on a
 *   zero-padded vector (only the valid lanes are read and written): a unit's bits never depend
 *   on how many units a call has or where it starts (grouped vs per-head calls, the column
 *   split's parts, fused vs projected paths), and no loop is left to the auto-vectoriser;
 * - vectors of the widest registers the target has (64 bytes with AVX-512: GCC's tuning for
 *   this CPU makes its auto-vectoriser stop at 32), with no run-time alias checks.
 *
 * Layout (one batch row, one head or several adjacent heads, D units):
 *   ax[g*sx + d]  input-side pre-activation of gate g (W x + b)
 *   ar[g*sr + d]  recurrent-side pre-activation of gate g (R h + b_r)
 *   st[s*ss + d]  state component s (0 = h; lstm: c; slstm: c, n, m), updated in place
 * Backward: `dst` [s*sds + d] holds the gradient w.r.t. the state after the step and is
 * overwritten with the gradient w.r.t. the state before it (for h only the direct pointwise
 * part; the caller adds R^T dgr); dgx / dgr receive the gradients of the input-side and the
 * recurrent-side pre-activations; prev [s*sp + d] is the state before the step.
 *
 * The math (ss_cv_exp_*, tanh, sigmoid, log_sigmoid) is _math.pxd's, lane by lane: the same
 * Cody-Waite reduction, Taylor polynomials and one division per sigmoid / tanh, with the same
 * bits wherever _math.pxd's result is a normal number.  exp scales by 2^n with AVX-512's
 * scalef or as the product of two powers of two, so it is right down to the denormals (where
 * _math.pxd's exp_ returns 0 below -87) and up to the overflow threshold (where exp_ returns
 * inf above 88); NaN in -> NaN out through the arithmetic, without selects.
 *
 * One source for float and double: _cell_simd_impl.h included once per type.  Compilers
 * without vector extensions get the same code on one-lane "vectors" (plain scalars). */
#ifndef STATESCAN_CELL_SIMD_H
#define STATESCAN_CELL_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* the cells' kernel ids (ext/_cells.pxd names them for rnn.pyx) */
enum { SS_CELL_ELMAN = 0, SS_CELL_LSTM = 1, SS_CELL_GRU = 2, SS_CELL_SLSTM = 3 };

/* SS_CV_VECTOR: GCC / Clang vector extensions; otherwise (or with STATESCAN_NO_VECTOR_EXT, as
   _scan_simd.h) one-lane "vectors": plain scalars, the same code and math */
#if defined(__GNUC__) && !defined(STATESCAN_NO_VECTOR_EXT)
#define SS_CV_VECTOR 1
#define SS_CV_INLINE static inline __attribute__((always_inline))
#else
#define SS_CV_VECTOR 0
#define SS_CV_INLINE static inline
#endif

/* SS_CV_SCHED: GCC's instruction scheduling before register allocation (off by default on
   x86; register-pressure aware), for the cells whose vectors' stages are written side by
   side (SS_CV_FORWARD_PAIRS): without it GCC emits one vector's dependent chain after the
   other and the pairs gain nothing.  Scheduling moves instructions, never changes an
   operation: the same bits. */
#if defined(__GNUC__) && !defined(__clang__)
#define SS_CV_SCHED __attribute__((optimize("schedule-insns", "sched-pressure")))
#else
#define SS_CV_SCHED
#endif

#if defined(__AVX512F__)
#define SS_CV_BYTES 64
#elif defined(__AVX__)
#define SS_CV_BYTES 32
#else
#define SS_CV_BYTES 16
#endif

/* x86 max / min of a whole vector (F(clamp)): SSE2 is the x86-64 baseline */
#if SS_CV_VECTOR && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define SS_CV_X86 1
#if SS_CV_BYTES == 64
#define SS_CV_SCALEF_f _mm512_scalef_ps
#define SS_CV_SCALEF_d _mm512_scalef_pd
#define SS_CV_MASKED 1
#define SS_CV_MASK_f __mmask16
#define SS_CV_MASK_d __mmask8
#define SS_CV_MASK_LOAD_f _mm512_maskz_loadu_ps
#define SS_CV_MASK_LOAD_d _mm512_maskz_loadu_pd
#define SS_CV_MASK_STORE_f _mm512_mask_storeu_ps
#define SS_CV_MASK_STORE_d _mm512_mask_storeu_pd
#define SS_CV_MAX_f _mm512_max_ps
#define SS_CV_MIN_f _mm512_min_ps
#define SS_CV_MAX_d _mm512_max_pd
#define SS_CV_MIN_d _mm512_min_pd
#elif SS_CV_BYTES == 32
#define SS_CV_MAX_f _mm256_max_ps
#define SS_CV_MIN_f _mm256_min_ps
#define SS_CV_MAX_d _mm256_max_pd
#define SS_CV_MIN_d _mm256_min_pd
#else
#define SS_CV_MAX_f _mm_max_ps
#define SS_CV_MIN_f _mm_min_ps
#define SS_CV_MAX_d _mm_max_pd
#define SS_CV_MIN_d _mm_min_pd
#endif
#else
#define SS_CV_X86 0
#endif

#define SS_CV_T float
#define SS_CV_I int32_t
#define SS_CV_SFX f
#define SS_CV_MAX SS_CV_MAX_f
#define SS_CV_MIN SS_CV_MIN_f
#if defined(SS_CV_SCALEF_f)
#define SS_CV_SCALEF SS_CV_SCALEF_f
#define SS_CV_MASK SS_CV_MASK_f
#define SS_CV_MASK_LOAD SS_CV_MASK_LOAD_f
#define SS_CV_MASK_STORE SS_CV_MASK_STORE_f
#endif
#include "_cell_simd_impl.h"     /* which #undefs its parameters */

#define SS_CV_T double
#define SS_CV_I int64_t
#define SS_CV_SFX d
#define SS_CV_MAX SS_CV_MAX_d
#define SS_CV_MIN SS_CV_MIN_d
#if defined(SS_CV_SCALEF_d)
#define SS_CV_SCALEF SS_CV_SCALEF_d
#define SS_CV_MASK SS_CV_MASK_d
#define SS_CV_MASK_LOAD SS_CV_MASK_LOAD_d
#define SS_CV_MASK_STORE SS_CV_MASK_STORE_d
#endif
#include "_cell_simd_impl.h"     /* which #undefs its parameters */

#endif
