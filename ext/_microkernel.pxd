# Register-blocked micro-kernel for out[rows, N] += a[rows, K] @ M (or out = bias + a @ M, the
# store variant), with M packed once per call into column panels of NT entries:
# Mp[tile][k][NT] (zero-padded past N).  Each step of k loads a panel row into registers once
# and applies it to a block of rows (or, for a single row, to several panels), so accumulators
# stay in registers and each panel stays hot in L1/L2.
#
# The kernel is C with GCC/Clang vector extensions (portable: the compiler lowers them to
# whatever SIMD the target has, or to scalars).  Every output element is summed over k in the
# same order whatever block it falls in, so results never depend on how rows are grouped into
# jobs -- the basis of thread-count independence.
from cython cimport floating
from libc.string cimport memset

cdef extern from *:
    """
    #if defined(__AVX512F__)
    #define SS_VBYTES 64
    #define SS_ACC 24            /* accumulator registers to use (of 32) */
    #elif defined(__AVX__)
    #define SS_VBYTES 32
    #define SS_ACC 12            /* of 16 */
    #else
    #define SS_VBYTES 16
    #define SS_ACC 12
    #endif
    #define SS_NT 32             /* panel width in elements; NT in the .pxd */
    /* a recurrent matrix from this size up is read from memory at every step (bigger than a
       core's L2 here): ss_matmul_acc prefetches its next panel */
    #define SS_PREFETCH_BYTES ((Py_ssize_t)2 << 20)
    /* from this size up, for any number of row blocks: a matrix this big is partly read from
       memory even where it would fit the L3 (a shared L3 keeps other data too) */
    #define SS_PREFETCH_ALL_BYTES ((Py_ssize_t)8 << 20)
    /* what a block does with out: SS_ADD out += acc; SS_STORE out = bias + acc (0 + acc
       without a bias); over slices of k, the accumulators pass through out unrounded:
       SS_FIRST out = acc, SS_MID acc starts from out, out = acc, SS_LAST as SS_MID then
       out = bias + acc -- the same operations on every element as one SS_STORE */
    enum { SS_ADD, SS_STORE, SS_FIRST, SS_MID, SS_LAST };

    #if defined(__GNUC__)
    #define SS_INLINE static inline __attribute__((always_inline))
    #define SS_UNROLL _Pragma("GCC unroll 16")
    #define SS_DEFINE_VEC(T, SFX) \
        typedef T ss_v##SFX __attribute__((vector_size(SS_VBYTES), aligned(sizeof(T))));
    #else  /* no vector extensions: one-element "vectors" */
    #define SS_INLINE static inline
    #define SS_UNROLL
    #undef SS_VBYTES
    #define SS_VBYTES 8
    #define SS_DEFINE_VEC(T, SFX) typedef T ss_v##SFX;
    #endif

    /* keep a loaded panel vector in a register: without it GCC folds the load into each row's
       FMA when the accumulators fill the registers, one load per FMA (AMD Zen 4, 4 rows x 3
       panels: 28 loads per 24 FMAs, load-bound) */
    #if defined(__GNUC__) && defined(__x86_64__) && SS_VBYTES >= 32
    #define SS_IN_REGISTER(x) __asm__("" : "+v"(x))
    #else
    #define SS_IN_REGISTER(x) ((void)0)
    #endif

    #if defined(__GNUC__)
    #define ss_prefetch(p) __builtin_prefetch(p)
    #define ss_prefetch_w(p) __builtin_prefetch((p), 1)
    #else
    #define ss_prefetch(p) ((void)(p))
    #define ss_prefetch_w(p) ((void)(p))
    #endif

    /* ss_rest's body: rows < MR rows with a literal row count per case (the block unrolls
       over rows); hints PF, PFL as in ss_block (a literal NULL: no test in the loop over k) */
    #define SS_REST_CASES(SFX, PF, PFL)                                                      \\
        switch (rows < SS_MR_##SFX ? rows : 0) {                                             \\
        case 11: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 11 ? 11 : 1, 1, mode, \\
                          bias, PF, PFL); break;                                             \\
        case 10: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 10 ? 10 : 1, 1, mode, \\
                          bias, PF, PFL); break;                                             \\
        case 9: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 9 ? 9 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 8: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 8 ? 8 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 7: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 7 ? 7 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 6: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 6 ? 6 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 5: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 5 ? 5 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 4: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 4 ? 4 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 3: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 3 ? 3 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 2: ss_block_##SFX(a, lda, mp, K, out, ldo, SS_MR_##SFX > 2 ? 2 : 1, 1, mode,    \\
                          bias, PF, PFL); break;                                             \\
        case 1: ss_block_##SFX(a, lda, mp, K, out, ldo, 1, 1, mode, bias, PF, PFL); break;   \\
        default:                                                                             \\
            for (Py_ssize_t r = 0; r < rows; r++)                                            \\
                ss_block_##SFX(a + r * lda, lda, mp, K, out + r * ldo, ldo, 1, 1, mode, bias,\\
                               NULL, 0);                                                     \\
        }

    /* ss_matmul's small row counts: rows (a literal, clamped to the block) x ntl panels at  \
       a time while ntl whole panels are left; SS_NTL: as many panels (up to 4) as fill the   \
       accumulator registers */
    #define SS_NTL(SFX, R) (SS_ACC / ((R) * SS_NV_##SFX) > 4 ? 4 : SS_ACC / ((R) * SS_NV_##SFX) > 0 \
                            ? SS_ACC / ((R) * SS_NV_##SFX) : 1)
    #define SS_PANELS(SFX, R, NTL)                                                            \
        for (; tile + (NTL) <= ntiles; tile += (NTL))                                        \
            ss_block_##SFX(a, lda, mp + tile * K * SS_NT, K, out + tile * SS_NT, ldo,        \
                           SS_MR_##SFX >= (R) ? (R) : 1, NTL, mode,                          \
                           bias ? bias + tile * SS_NT : NULL, NULL, 0)

    /* rows x (ntl panels): acc[rows][ntl * NV] registers; rows and ntl are literals at each call */
    #define SS_DEFINE_MATMUL(T, SFX)                                                        \\
    SS_DEFINE_VEC(T, SFX)                                                                    \\
    enum { SS_NV_##SFX = SS_NT * (int)sizeof(T) / SS_VBYTES > 0                              \\
                         ? SS_NT * (int)sizeof(T) / SS_VBYTES : 1,                          \\
           SS_MR_##SFX = SS_ACC / SS_NV_##SFX > 0 ? SS_ACC / SS_NV_##SFX : 1,                \\
           SS_VL_##SFX = SS_NT / SS_NV_##SFX };                                              \\
    SS_INLINE void ss_block_##SFX(const T* a, Py_ssize_t lda, const T* mp, Py_ssize_t K,     \\
                                  T* out, Py_ssize_t ldo, const int rows, const int ntl,     \\
                                  const int mode, const T* bias, const char* pf,             \\
                                  Py_ssize_t pfl) {                                          \\
        ss_v##SFX acc[SS_MR_##SFX][4 * SS_NV_##SFX];                                         \\
        Py_ssize_t pfa = 0;                                                                  \\
        ss_v##SFX pv[4 * SS_NV_##SFX];                                                       \\
        SS_UNROLL for (int r = 0; r < rows; r++)                                             \\
            SS_UNROLL for (int p = 0; p < ntl; p++)                                          \\
                SS_UNROLL for (int v = 0; v < SS_NV_##SFX; v++)                              \\
                    acc[r][p * SS_NV_##SFX + v] = mode < SS_MID ? (ss_v##SFX){0}             \\
                        : *(ss_v##SFX*)(out + r * ldo + p * SS_NT + v * SS_VL_##SFX);        \\
        for (Py_ssize_t k = 0; k < K; k++) {                                                 \\
            if (pf) {  /* pfl lines of pf spread evenly over the K steps */                  \\
                for (pfa += pfl; pfa >= K; pfa -= K, pf += 64)                               \\
                    ss_prefetch(pf);                                                         \\
            }                                                                                \\
            SS_UNROLL for (int p = 0; p < ntl; p++)                                          \\
                SS_UNROLL for (int v = 0; v < SS_NV_##SFX; v++)                              \\
                    pv[p * SS_NV_##SFX + v] =                                                \\
                        *(const ss_v##SFX*)(mp + (p * K + k) * SS_NT + v * SS_VL_##SFX);     \\
            if (rows > 1)  /* (one row uses each vector once: a folded load is no cost) */   \\
                SS_UNROLL for (int v = 0; v < ntl * SS_NV_##SFX; v++)                        \\
                    SS_IN_REGISTER(pv[v]);                                                   \\
            SS_UNROLL for (int r = 0; r < rows; r++) {                                       \\
                T ar = a[r * lda + k];                                                       \\
                SS_UNROLL for (int v = 0; v < ntl * SS_NV_##SFX; v++)                        \\
                    acc[r][v] += ar * pv[v];                                                 \\
            }                                                                                \\
        }                                                                                    \\
        /* SS_STORE / SS_LAST: out = bias + acc, or 0 + acc without a bias -- the bits of    \\
           filling out with the bias (or 0) and adding acc, without reading out */           \\
        SS_UNROLL for (int r = 0; r < rows; r++)                                             \\
            SS_UNROLL for (int p = 0; p < ntl; p++)                                          \\
                SS_UNROLL for (int v = 0; v < SS_NV_##SFX; v++) {                            \\
                    ss_v##SFX* o = (ss_v##SFX*)(out + r * ldo + p * SS_NT + v * SS_VL_##SFX); \\
                    ss_v##SFX a_ = acc[r][p * SS_NV_##SFX + v];                              \\
                    if (mode == SS_ADD)                                                      \\
                        *o = *o + a_;                                                        \\
                    else if (mode == SS_STORE || mode == SS_LAST)                            \\
                        *o = (bias ? *(const ss_v##SFX*)(bias + p * SS_NT + v * SS_VL_##SFX)  \\
                                   : (ss_v##SFX){0}) + a_;                                   \\
                    else                                                                     \\
                        *o = a_;                                                             \\
                }                                                                            \\
    }                                                                                        \\
    /* prefetch for writing the lines of min(rows, MR) rows of a panel's columns of out: in \\
       slices of k over an out bigger than the cache (parameter gradients: 1024 x 4096), a   \\
       block's first reads of its accumulators waited on memory, rows ldo apart */           \\
    SS_INLINE void ss_prefetch_rows_##SFX(const T* out, Py_ssize_t ldo, Py_ssize_t rows) {   \\
        if (rows > SS_MR_##SFX)                                                              \\
            rows = SS_MR_##SFX;                                                              \\
        for (Py_ssize_t r = 0; r < rows; r++)                                                \\
            for (Py_ssize_t l = 0; l < SS_NT * (Py_ssize_t)sizeof(T); l += 64)               \\
                ss_prefetch_w((const char*)(out + r * ldo) + l);                             \\
    }                                                                                        \\
    static void ss_rest_##SFX(const T* a, Py_ssize_t lda, const T* mp, Py_ssize_t K,         \\
                              T* out, Py_ssize_t ldo, Py_ssize_t rows, const int mode,       \\
                              const T* bias, const char* pf, Py_ssize_t pfl) {               \\
        if (pf)                                                                              \\
            SS_REST_CASES(SFX, pf, pfl)                                                      \\
        else                                                                                 \\
            SS_REST_CASES(SFX, NULL, 0)                                                      \\
    }                                                                                        \\
    /* mode SS_ADD: out += a @ M; SS_STORE: out = bias + a @ M (bias NULL: 0 + a @ M).       \\
       pf_next: while a panel's row blocks run, prefetch the next panel, each block a share  \\
       in proportion to its rows: for an M read from memory (bigger than L2) the first block \\
       would otherwise wait on the memory and the others leave it idle.  Hints only: the     \\
       same bits. */                                                                         \\
    SS_INLINE void ss_matmul_##SFX(const T* a, Py_ssize_t lda, const T* mp, Py_ssize_t K,    \\
                                   Py_ssize_t ntiles, T* out, Py_ssize_t ldo,                \\
                                   Py_ssize_t nrows, const int mode, const T* bias,          \\
                                   const int pf_next) {                                      \\
        Py_ssize_t tile = 0, r;                                                              \\
        const Py_ssize_t lines = K * SS_NT * (Py_ssize_t)sizeof(T) / 64;                     \\
        /* up to half a block of rows: several panels at once, for more independent FMA    \\
           chains per broadcast of a (AMD Zen 4, 1 MB of R in L2, elman recurrence: 4 rows  \\
           x 1 panel 75 GFLOP/s where 6 rows x 2 panels ran 101) */                          \\
        switch (2 * nrows <= SS_MR_##SFX ? nrows : 0) {                                     \\
        case 1: SS_PANELS(SFX, 1, 4); SS_PANELS(SFX, 1, 2); break;                           \\
        case 2: SS_PANELS(SFX, 2, SS_NTL(SFX, 2)); break;                                    \\
        case 3: SS_PANELS(SFX, 3, SS_NTL(SFX, 3)); break;                                    \\
        case 4: SS_PANELS(SFX, 4, SS_NTL(SFX, 4)); break;                                    \\
        case 5: SS_PANELS(SFX, 5, SS_NTL(SFX, 5)); break;                                    \\
        case 6: SS_PANELS(SFX, 6, SS_NTL(SFX, 6)); break;                                    \\
        }                                                                                    \\
        /* full blocks end at `whole`; a short rest (under half a block) after a full block  \\
           runs with it as two near-equal blocks: a block of a few rows re-reads the whole   \\
           panel from L2 for them (64 rows, AVX-512: 5 x 12 + 4 -> 4 x 12 + 8 + 8) */        \\
        const Py_ssize_t rest = nrows % SS_MR_##SFX;                                         \\
        const Py_ssize_t whole = nrows - rest                                                \\
            - (rest && 2 * rest < SS_MR_##SFX && nrows > SS_MR_##SFX ? SS_MR_##SFX : 0);     \\
        const Py_ssize_t half = (nrows - whole) / 2;                                         \\
        for (; tile < ntiles; tile++) {                                                      \\
            const T* panel = mp + tile * K * SS_NT;                                          \\
            const T* tbias = bias ? bias + tile * SS_NT : NULL;                              \\
            const char* next = pf_next && tile + 1 < ntiles                                  \\
                               ? (const char*)(panel + K * SS_NT) : NULL;                    \\
            for (r = 0; r < whole; r += SS_MR_##SFX) {                                       \\
                if (mode >= SS_FIRST)  /* slices of k: the next block's rows of out */       \\
                    ss_prefetch_rows_##SFX(out + (r + SS_MR_##SFX) * ldo + tile * SS_NT, ldo, \\
                                           nrows - r - SS_MR_##SFX);                         \\
                if (next)  /* two copies: without hints, no test in the loop over k */       \\
                    ss_block_##SFX(a + r * lda, lda, panel, K, out + r * ldo + tile * SS_NT, \\
                                   ldo, SS_MR_##SFX, 1, mode, tbias,                         \\
                                   next + lines * r / nrows * 64,                            \\
                                   lines * (r + SS_MR_##SFX) / nrows - lines * r / nrows);    \\
                else                                                                         \\
                    ss_block_##SFX(a + r * lda, lda, panel, K, out + r * ldo + tile * SS_NT, \\
                                   ldo, SS_MR_##SFX, 1, mode, tbias, NULL, 0);               \\
            }                                                                                \\
            /* the rest (fewer than MR rows, e.g. rows still running in a variable-length   \\
               batch) in one block: a single-row block would re-read the panel per row */    \\
            if (nrows - whole >= SS_MR_##SFX) {                                              \\
                ss_rest_##SFX(a + r * lda, lda, panel, K, out + r * ldo + tile * SS_NT, ldo, \\
                              half, mode, tbias, next ? next + lines * r / nrows * 64 : NULL, \\
                              lines * (r + half) / nrows - lines * r / nrows);               \\
                r += half;                                                                   \\
            }                                                                                \\
            ss_rest_##SFX(a + r * lda, lda, panel, K, out + r * ldo + tile * SS_NT, ldo,     \\
                          nrows - r, mode, tbias, next ? next + lines * r / nrows * 64 : NULL, \\
                          lines - lines * r / nrows);                                        \\
        }                                                                                    \\
    }                                                                                        \\
    static void ss_matmul_acc_##SFX(const T* a, Py_ssize_t lda, const T* mp, Py_ssize_t K,   \\
                                    Py_ssize_t ntiles, T* out, Py_ssize_t ldo,               \\
                                    Py_ssize_t nrows) {                                      \\
        /* hints for two row blocks (float32, K = 512-1024, 16 rows: 1.13-1.15x; 24 rows     \\
           1.01-1.04x; 48 rows 0.95-0.97x, as the memory is a smaller part), and for any     \\
           number from SS_PREFETCH_ALL_BYTES (AMD EPYC Zen 5, 32 MiB L3, H = 1024, float32:  \\
           48 rows 1.12-1.2x, 64 rows 1.15x, 256 rows 1.02x; at H = 512, 4 MB, 64 rows were  \\
           1% slower with them); two copies, the hints a literal 1 or 0: with the hints'     \\
           code beside the loops that do not use them, those ran 5-10% slower (64 rows and   \\
           more) */                                                                          \\
        const Py_ssize_t bytes = ntiles * K * SS_NT * (Py_ssize_t)sizeof(T);                 \\
        if (nrows > SS_MR_##SFX && (bytes >= SS_PREFETCH_ALL_BYTES                           \\
                || (nrows <= 2 * SS_MR_##SFX && bytes > SS_PREFETCH_BYTES)))                 \\
            ss_matmul_##SFX(a, lda, mp, K, ntiles, out, ldo, nrows, SS_ADD, NULL, 1);        \\
        else                                                                                 \\
            ss_matmul_##SFX(a, lda, mp, K, ntiles, out, ldo, nrows, SS_ADD, NULL, 0);        \\
    }                                                                                        \\
    static void ss_matmul_store_##SFX(const T* a, Py_ssize_t lda, const T* mp, Py_ssize_t K, \\
                                      Py_ssize_t ntiles, const T* bias, T* out,              \\
                                      Py_ssize_t ldo, Py_ssize_t nrows) {                    \\
        ss_matmul_##SFX(a, lda, mp, K, ntiles, out, ldo, nrows, SS_STORE, bias, 0);          \\
    }                                                                                        \\
    /* one panel, a slice of k (a and panel point at its first k): mode SS_FIRST, SS_MID or  \\
       SS_LAST (or SS_STORE for the whole of k) */                                           \\
    static void ss_matmul_part_##SFX(const T* a, Py_ssize_t lda, const T* panel,             \\
                                     Py_ssize_t kc, const T* bias, T* out, Py_ssize_t ldo,   \\
                                     Py_ssize_t nrows, const int mode) {                     \\
        ss_matmul_##SFX(a, lda, panel, kc, 1, out, ldo, nrows, mode, bias, 0);               \\
    }

    SS_DEFINE_MATMUL(float, f)
    SS_DEFINE_MATMUL(double, d)

    /* panel[k * SS_NT + n] = m[n * sn + k] for n < width (<= SS_NT), k < K: the transposing
       pack of pack_panels, in 8 x 8 blocks through registers (a scalar copy of a 16 MB matrix
       cost as much as several time steps of a call); edges element by element */
    #if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    #define SS_SHUF __builtin_shufflevector
    #define SS_DEFINE_PACK_T(T, SFX)                                                          \
    typedef T ss_t8##SFX __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T))));      \
    /* d[i * ds + j] = s[j * ss + i] for i, j < 8: an 8 x 8 transpose through registers     \
       (the panels' packing and ss_transpose) */                                             \
    SS_INLINE void ss_transpose8_##SFX(const T* s, Py_ssize_t ss, T* d, Py_ssize_t ds) {      \
        ss_t8##SFX r0 = *(const ss_t8##SFX*)(s), r1 = *(const ss_t8##SFX*)(s + ss),         \
            r2 = *(const ss_t8##SFX*)(s + 2 * ss), r3 = *(const ss_t8##SFX*)(s + 3 * ss),   \
            r4 = *(const ss_t8##SFX*)(s + 4 * ss), r5 = *(const ss_t8##SFX*)(s + 5 * ss),   \
            r6 = *(const ss_t8##SFX*)(s + 6 * ss), r7 = *(const ss_t8##SFX*)(s + 7 * ss);   \
        ss_t8##SFX t0 = SS_SHUF(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);                          \
        ss_t8##SFX t1 = SS_SHUF(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);                        \
        ss_t8##SFX t2 = SS_SHUF(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);                          \
        ss_t8##SFX t3 = SS_SHUF(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);                        \
        ss_t8##SFX t4 = SS_SHUF(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13);                          \
        ss_t8##SFX t5 = SS_SHUF(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);                        \
        ss_t8##SFX t6 = SS_SHUF(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13);                          \
        ss_t8##SFX t7 = SS_SHUF(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);                        \
        ss_t8##SFX u0 = SS_SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);                          \
        ss_t8##SFX u1 = SS_SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);                        \
        ss_t8##SFX u2 = SS_SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);                          \
        ss_t8##SFX u3 = SS_SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);                        \
        ss_t8##SFX u4 = SS_SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);                          \
        ss_t8##SFX u5 = SS_SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);                        \
        ss_t8##SFX u6 = SS_SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);                          \
        ss_t8##SFX u7 = SS_SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);                        \
        *(ss_t8##SFX*)(d) = SS_SHUF(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);                      \
        *(ss_t8##SFX*)(d + ds) = SS_SHUF(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);                  \
        *(ss_t8##SFX*)(d + 2 * ds) = SS_SHUF(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);              \
        *(ss_t8##SFX*)(d + 3 * ds) = SS_SHUF(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);              \
        *(ss_t8##SFX*)(d + 4 * ds) = SS_SHUF(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);            \
        *(ss_t8##SFX*)(d + 5 * ds) = SS_SHUF(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);            \
        *(ss_t8##SFX*)(d + 6 * ds) = SS_SHUF(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);            \
        *(ss_t8##SFX*)(d + 7 * ds) = SS_SHUF(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);            \
    }                                                                                        \
    SS_INLINE void ss_pack_t8_##SFX(const T* m, Py_ssize_t sn, Py_ssize_t n0, Py_ssize_t k0, \
                                    T* panel) {                                              \
        ss_transpose8_##SFX(m + n0 * sn + k0, sn, panel + k0 * SS_NT + n0, SS_NT);           \
    }                                                                                        \
    static void ss_pack_t_##SFX(const T* m, Py_ssize_t sn, Py_ssize_t K, Py_ssize_t width,    \
                                T* panel) {                                                  \
        Py_ssize_t w8 = width / 8 * 8, K8 = K / 8 * 8, n0, k0, k, n;                         \
        if (sizeof(T) == 4)      /* a run of whole panel rows at a time (float32: 1.2-1.5x   \
                                    faster than a column of blocks at a time for 1-16 MB) */ \
            for (k0 = 0; k0 < K8; k0 += 8)                                                   \
                for (n0 = 0; n0 < w8; n0 += 8) ss_pack_t8_##SFX(m, sn, n0, k0, panel);       \
        else                     /* (float64: 0.7x) */                                       \
            for (n0 = 0; n0 < w8; n0 += 8)                                                   \
                for (k0 = 0; k0 < K8; k0 += 8) ss_pack_t8_##SFX(m, sn, n0, k0, panel);       \
        for (k = K8; k < K; k++)                                                             \
            for (n = 0; n < w8; n++) panel[k * SS_NT + n] = m[n * sn + k];                   \
        for (n = w8; n < width; n++)                                                         \
            for (k = 0; k < K; k++) panel[k * SS_NT + n] = m[n * sn + k];                    \
    }                                                                                        \
    static void ss_transpose_##SFX(const T* a, Py_ssize_t lda, Py_ssize_t rows,              \
                                   Py_ssize_t cols, T* b, Py_ssize_t ldb) {                  \
        Py_ssize_t r8 = rows / 8 * 8, c8 = cols / 8 * 8, r16, r0, c0, cb, r, c;              \
        /* float: 16 rows (two register blocks) at a time, so each line of b is written     \
           whole, and 64 columns of a at a time, so the lines of b being filled (64 rows of  \
           b, 256 KB at 1024 floats a row) stay in L2 for every row of a: rnn.weight_grads'  \
           final transpose of a [1024, 4096] float32 product went from 10% of the call to 6% \
           (Intel Xeon, Sapphire Rapids class, 1 thread) */                                  \
        r16 = sizeof(T) == 4 ? rows / 16 * 16 : 0;                                           \
        for (cb = 0; cb < c8; cb += 64)                                                      \
            for (r0 = 0; r0 < r16; r0 += 16)                                                 \
                for (c0 = cb; c0 < c8 && c0 < cb + 64; c0 += 8) {                            \
                    ss_transpose8_##SFX(a + r0 * lda + c0, lda, b + c0 * ldb + r0, ldb);     \
                    ss_transpose8_##SFX(a + (r0 + 8) * lda + c0, lda,                        \
                                        b + c0 * ldb + r0 + 8, ldb);                         \
                }                                                                            \
        for (r0 = r16; r0 < r8; r0 += 8)                                                     \
            for (c0 = 0; c0 < c8; c0 += 8)                                                   \
                ss_transpose8_##SFX(a + r0 * lda + c0, lda, b + c0 * ldb + r0, ldb);         \
        for (r = 0; r < r8; r++)                                                             \
            for (c = c8; c < cols; c++) b[c * ldb + r] = a[r * lda + c];                     \
        for (r = r8; r < rows; r++)                                                          \
            for (c = 0; c < cols; c++) b[c * ldb + r] = a[r * lda + c];                      \
    }
    #else
    #define SS_DEFINE_PACK_T(T, SFX)                                                          \
    static void ss_pack_t_##SFX(const T* m, Py_ssize_t sn, Py_ssize_t K, Py_ssize_t width,    \
                                T* panel) {                                                  \
        Py_ssize_t k, n;                                                                     \
        for (n = 0; n < width; n++)                                                          \
            for (k = 0; k < K; k++) panel[k * SS_NT + n] = m[n * sn + k];                    \
    }                                                                                        \
    static void ss_transpose_##SFX(const T* a, Py_ssize_t lda, Py_ssize_t rows,              \
                                   Py_ssize_t cols, T* b, Py_ssize_t ldb) {                  \
        Py_ssize_t r, c;                                                                     \
        for (r = 0; r < rows; r++)                                                           \
            for (c = 0; c < cols; c++) b[c * ldb + r] = a[r * lda + c];                      \
    }
    #endif
    /* ss_transpose: b[c * ldb + r] = a[r * lda + c] for r < rows, c < cols (8 x 8 register
       blocks where available): the transposed operands of _rnn_grads.pxi, _uk_gemm.pxd and
       attention.pyx */
    SS_DEFINE_PACK_T(float, f)
    SS_DEFINE_PACK_T(double, d)

    /* Blocks for packed weights and large buffers (_page_pool.h: huge pages, kept for the
       next call), freed with ss_huge_free.
       ss_buffer_alloc: a large buffer streamed through once (a call's projected W x): huge
       pages from 2 MiB, so a 16 MB block takes 8 page faults instead of 4096.
       ss_panel_alloc: packed weights, read again every step: huge pages from 256 KiB (a block
       is then physically contiguous and fills the cache sets evenly). */
    #include "_page_pool.h"
    static void* ss_panel_alloc(size_t nbytes) { return ss_huge_alloc(nbytes, (size_t)256 << 10); }
    static void* ss_buffer_alloc(size_t nbytes) { return ss_huge_alloc(nbytes, SS_HUGE_BYTES); }

    """
    void ss_matmul_acc_f(const float* a, Py_ssize_t lda, const float* mp, Py_ssize_t K,
                         Py_ssize_t ntiles, float* out, Py_ssize_t ldo, Py_ssize_t nrows) nogil
    void ss_matmul_acc_d(const double* a, Py_ssize_t lda, const double* mp, Py_ssize_t K,
                         Py_ssize_t ntiles, double* out, Py_ssize_t ldo, Py_ssize_t nrows) nogil
    void ss_matmul_store_f(const float* a, Py_ssize_t lda, const float* mp, Py_ssize_t K,
                           Py_ssize_t ntiles, const float* bias, float* out, Py_ssize_t ldo,
                           Py_ssize_t nrows) nogil
    void ss_matmul_store_d(const double* a, Py_ssize_t lda, const double* mp, Py_ssize_t K,
                           Py_ssize_t ntiles, const double* bias, double* out, Py_ssize_t ldo,
                           Py_ssize_t nrows) nogil
    void ss_matmul_part_f(const float* a, Py_ssize_t lda, const float* panel, Py_ssize_t kc,
                          const float* bias, float* out, Py_ssize_t ldo, Py_ssize_t nrows,
                          int mode) nogil
    void ss_matmul_part_d(const double* a, Py_ssize_t lda, const double* panel, Py_ssize_t kc,
                          const double* bias, double* out, Py_ssize_t ldo, Py_ssize_t nrows,
                          int mode) nogil
    enum:
        SS_STORE
        SS_FIRST
        SS_MID
        SS_LAST
    int SS_NT
    int SS_MR_f     # rows of the micro-kernel's register block (float, double)
    int SS_MR_d
    void ss_prefetch(const void* p) nogil
    void ss_prefetch_w(const void* p) nogil
    void* panel_alloc "ss_panel_alloc"(size_t nbytes) nogil
    void* buffer_alloc "ss_buffer_alloc"(size_t nbytes) nogil
    # frees a block of panel_alloc or buffer_alloc (every such block, never free())
    void huge_free "ss_huge_free"(void* p) nogil
    void pool_state "ss_pool_state"(long long* idle, long long* idle_bytes, long long* used,
                                    long long* bound) nogil
    void ss_pack_t_f(const float* m, Py_ssize_t sn, Py_ssize_t K, Py_ssize_t width,
                     float* panel) nogil
    void ss_pack_t_d(const double* m, Py_ssize_t sn, Py_ssize_t K, Py_ssize_t width,
                     double* panel) nogil
    void ss_transpose_f(const float* a, Py_ssize_t lda, Py_ssize_t rows, Py_ssize_t cols,
                        float* b, Py_ssize_t ldb) nogil
    void ss_transpose_d(const double* a, Py_ssize_t lda, Py_ssize_t rows, Py_ssize_t cols,
                        double* b, Py_ssize_t ldb) nogil

cdef enum:
    NT = 32     # panel width (columns); must equal SS_NT above


cdef inline void matmul_acc(const floating* a, Py_ssize_t lda, const floating* mp, Py_ssize_t K,
                            Py_ssize_t ntiles, floating* out, Py_ssize_t ldo,
                            Py_ssize_t nrows) noexcept nogil:
    """out[:nrows, :ntiles*NT] += a[:nrows, :K] @ M, M packed by pack_panels."""
    if floating is float:
        ss_matmul_acc_f(a, lda, mp, K, ntiles, out, ldo, nrows)
    else:
        ss_matmul_acc_d(a, lda, mp, K, ntiles, out, ldo, nrows)


cdef inline void matmul_store(const floating* a, Py_ssize_t lda, const floating* mp,
                              Py_ssize_t K, Py_ssize_t ntiles, const floating* bias,
                              floating* out, Py_ssize_t ldo, Py_ssize_t nrows) noexcept nogil:
    """out[:nrows, :ntiles*NT] = bias + a[:nrows, :K] @ M (bias [ntiles*NT], or NULL for 0):
    the bits of filling out with bias (or 0) then matmul_acc, writing out once, never reading
    it (an output far bigger than the cache then costs one memory pass instead of three)."""
    if floating is float:
        ss_matmul_store_f(a, lda, mp, K, ntiles, bias, out, ldo, nrows)
    else:
        ss_matmul_store_d(a, lda, mp, K, ntiles, bias, out, ldo, nrows)


cdef inline void matmul_store_kblocked(const floating* a, Py_ssize_t lda, const floating* panel,
                                       Py_ssize_t K, Py_ssize_t kc, const floating* bias,
                                       floating* out, Py_ssize_t ldo,
                                       Py_ssize_t nrows) noexcept nogil:
    """matmul_store of one panel (bias [NT] or NULL) in slices of kc rows of the panel, so that
    a slice stays in L1 while every row block uses it (a whole panel of a long K does not fit).
    The accumulators pass between slices through out unrounded: the same bits as one call."""
    cdef Py_ssize_t k0 = 0, n
    cdef int mode
    while k0 < K:
        n = min(kc, K - k0)
        mode = (SS_STORE if n == K else SS_FIRST) if k0 == 0 else (
            SS_LAST if k0 + n == K else SS_MID)
        if floating is float:
            ss_matmul_part_f(a + k0, lda, panel + k0 * NT, n, bias, out, ldo, nrows, mode)
        else:
            ss_matmul_part_d(a + k0, lda, panel + k0 * NT, n, bias, out, ldo, nrows, mode)
        k0 += n


cdef inline void matmul_raw(const floating* a, Py_ssize_t lda, const floating* panel,
                            Py_ssize_t K, floating* out, Py_ssize_t ldo, Py_ssize_t nrows,
                            bint first) noexcept nogil:
    """out[:nrows, :NT] = a[:nrows, :K] @ panel (first) or += it, as the accumulators of one
    sum over k continued (not first): unrounded and without the bias, which matmul_store adds
    in bias + acc (the caller adds its bias as acc + bias, or 0 + acc: the same bits)."""
    if floating is float:
        ss_matmul_part_f(a, lda, panel, K, NULL, out, ldo, nrows, SS_FIRST if first else SS_MID)
    else:
        ss_matmul_part_d(a, lda, panel, K, NULL, out, ldo, nrows, SS_FIRST if first else SS_MID)


cdef inline void transpose(const floating* a, Py_ssize_t lda, Py_ssize_t rows, Py_ssize_t cols,
                           floating* b, Py_ssize_t ldb) noexcept nogil:
    """b[c * ldb + r] = a[r * lda + c] for r < rows, c < cols."""
    if floating is float:
        ss_transpose_f(a, lda, rows, cols, b, ldb)
    else:
        ss_transpose_d(a, lda, rows, cols, b, ldb)


cdef inline void prefetch(const floating* p, Py_ssize_t n) noexcept nogil:
    """Hint the cache to fetch p[0:n] (64-byte lines): rows read on the next time step."""
    cdef Py_ssize_t i = 0
    while i < n:
        ss_prefetch(p + i)
        i += 64 // sizeof(floating)


cdef inline void prefetch_w(floating* p, Py_ssize_t n) noexcept nogil:
    """Hint the cache to fetch p[0:n] for writing (64-byte lines, fetched for ownership): rows
    written on the next time step."""
    cdef Py_ssize_t i = 0
    while i < n:
        ss_prefetch_w(p + i)
        i += 64 // sizeof(floating)


cdef inline void pack_panels(const floating* m, Py_ssize_t sk, Py_ssize_t sn, Py_ssize_t K,
                             Py_ssize_t N, floating* mp) noexcept nogil:
    """Copy M (element (k, n) at m[k*sk + n*sn]) into panels mp[tile][k][NT], zero-padded."""
    cdef Py_ssize_t ntiles = (N + NT - 1) // NT
    cdef Py_ssize_t tile, k, k0, n, width
    cdef floating* panel
    cdef const floating* src
    if sn == 1:
        # rows of M are contiguous: plain row copies, each row read once, in order, for all the
        # panels (panel by panel, a matrix bigger than the cache was read 128 bytes of each row
        # at a time, rows far apart: input_grads' W at 4096 x 1024, 9% of its time)
        if N % NT:
            memset(mp + (ntiles - 1) * K * NT, 0, K * NT * sizeof(floating))
        for k in range(K):
            for tile in range(ntiles):
                panel = mp + tile * K * NT + k * NT
                src = m + k * sk + tile * NT
                for n in range(min(NT, N - tile * NT)):
                    panel[n] = src[n]
        return
    for tile in range(ntiles):
        panel = mp + tile * K * NT
        width = min(NT, N - tile * NT)
        if width < NT:
            memset(panel, 0, K * NT * sizeof(floating))
        if sk == 1:         # a transpose of contiguous rows (W or R as stored): 8 x 8 blocks
            if floating is float:
                ss_pack_t_f(m + tile * NT * sn, sn, K, width, panel)
            else:
                ss_pack_t_d(m + tile * NT * sn, sn, K, width, panel)
        else:               # a transpose: blocks of 16 k keep the reads and writes in cache
            for k0 in range(0, K, 16):
                for n in range(width):
                    src = m + (tile * NT + n) * sn
                    for k in range(k0, min(K, k0 + 16)):
                        panel[k * NT + n] = src[k * sk]
