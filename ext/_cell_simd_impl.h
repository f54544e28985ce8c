/* Body of ext/_cell_simd.h for one element type: included with SS_CV_T (float or double),
 * SS_CV_I (the integer of its size) and SS_CV_SFX (f or d) defined.  No include guard. */

#define SS_CV_CAT2(a, b) a##_##b
#define SS_CV_CAT(a, b) SS_CV_CAT2(a, b)
#define F(name) SS_CV_CAT(ss_cv_##name, SS_CV_SFX)
#define T SS_CV_T
#define V F(vec)
#define VI F(ivec)
#define DOUBLE (sizeof(T) == 8)

#if SS_CV_VECTOR
typedef T V __attribute__((vector_size(SS_CV_BYTES)));
typedef __typeof__((V){0} < (V){0}) VI;     /* what a comparison gives: all ones or zero */
#define VL ((ptrdiff_t)(SS_CV_BYTES / sizeof(T)))
#define K(c) ((V){0} + (T)(c))              /* a constant in every lane */
#define MASK(cond) (cond)
#else
typedef T V;
typedef SS_CV_I VI;
#define VL ((ptrdiff_t)1)
#define K(c) ((T)(c))
#define MASK(cond) (-(VI)(cond))            /* all ones or zero, as a vector comparison */
#endif

/* the bits of v as integers, and back (no conversion of values) */
SS_CV_INLINE VI F(bits)(V v) {
    VI i;
    memcpy(&i, &v, sizeof i);
    return i;
}

SS_CV_INLINE V F(from_bits)(VI i) {
    V v;
    memcpy(&v, &i, sizeof v);
    return v;
}

/* n units from p (n <= VL; the other lanes 0) and back: whole vectors by one unaligned move,
   a part by AVX-512's masked moves (which touch only the lanes of the mask) or by memcpy */
SS_CV_INLINE V F(ld)(const T* p, ptrdiff_t n) {
    V v = {0};
    if (n == VL)
        memcpy(&v, p, sizeof v);
    else
#if defined(SS_CV_MASKED)
        v = SS_CV_MASK_LOAD((SS_CV_MASK)((1u << n) - 1), p);
#else
        memcpy(&v, p, n * sizeof(T));
#endif
    return v;
}

SS_CV_INLINE void F(st)(T* p, V v, ptrdiff_t n) {
    if (n == VL)
        memcpy(p, &v, sizeof v);
    else
#if defined(SS_CV_MASKED)
        SS_CV_MASK_STORE(p, (SS_CV_MASK)((1u << n) - 1), v);
#else
        memcpy(p, &v, n * sizeof(T));
#endif
}

/* four gate gradients of a cell whose gates take W x and R h alike (lstm, slstm): the same
   values to the input side dgx and the recurrent side dgr, gate g at g * sgx / g * sgr */
SS_CV_INLINE void F(st_gates4)(T* dgx, ptrdiff_t sgx, T* dgr, ptrdiff_t sgr, V g0, V g1, V g2,
                               V g3, ptrdiff_t n) {
    F(st)(dgx, g0, n);
    F(st)(dgx + sgx, g1, n);
    F(st)(dgx + 2 * sgx, g2, n);
    F(st)(dgx + 3 * sgx, g3, n);
    F(st)(dgr, g0, n);
    F(st)(dgr + sgr, g1, n);
    F(st)(dgr + 2 * sgr, g2, n);
    F(st)(dgr + 3 * sgr, g3, n);
}

/* m ? a : b lane by lane (m: all ones or zero, as a vector comparison gives) */
SS_CV_INLINE V F(sel)(VI m, V a, V b) {
    return F(from_bits)((F(bits)(a) & m) | (F(bits)(b) & ~m));
}

/* x limited to [-c, c], NaN kept: x86's max and min (they return their second operand when
   either is NaN: AVX-512's range instruction would turn NaN into +-c), or a compare and a
   select per side */
SS_CV_INLINE V F(clamp)(V x, T c) {
#if SS_CV_X86
    return SS_CV_MIN(K(c), SS_CV_MAX(K(-c), x));
#else
    x = F(sel)(MASK(x < K(-c)), K(-c), x);
    return F(sel)(MASK(x > K(c)), K(c), x);
#endif
}

/* expm1(r) for |r| <= ln2/2: Taylor polynomial truncated below half an ulp */
SS_CV_INLINE V F(expm1_poly)(V r) {
    if (DOUBLE)
        return r * (1 + r * ((T)(1 / 2.) + r * ((T)(1 / 6.) + r * ((T)(1 / 24.) + r * ((T)(1 / 120.)
               + r * ((T)(1 / 720.) + r * ((T)(1 / 5040.) + r * ((T)(1 / 40320.)
               + r * ((T)(1 / 362880.) + r * ((T)(1 / 3628800.) + r * ((T)(1 / 39916800.)
               + r * ((T)(1 / 479001600.) + r * (T)(1 / 6227020800.)))))))))))));
    return r * (1 + r * ((T)(1 / 2.) + r * ((T)(1 / 6.) + r * ((T)(1 / 24.) + r * ((T)(1 / 120.)
           + r * ((T)(1 / 720.) + r * (T)(1 / 5040.)))))));
}

/* Cody-Waite reduction of sign * x (sign = 1 or -1, a literal: the negation folds into the
   multiply-adds, with the bits of reducing -x): returns r with sign * x = n ln2 + r,
   |r| <= ln2/2, and n as T (*nf) and as an integer (*n).  Adding 1.5 * 2^mantissa-bits rounds
   to an integer and leaves n in the low bits of the sum. */
SS_CV_INLINE V F(reduce)(V x, int sign, V* nf, VI* n) {
    const T magic = DOUBLE ? (T)6755399441055744.0 : (T)12582912.0;
    const T c1 = DOUBLE ? (T)6.93147180369123816490e-01 : (T)0.693359375;
    const T c2 = DOUBLE ? (T)1.90821492927058770002e-10 : (T)(-2.12194440e-4);
    V t = x * (T)(sign * 1.4426950408889634) + magic;
    *nf = t - magic;
    *n = F(bits)(t) - F(bits)(K(magic));
    if (sign > 0)
        return (x - *nf * c1) - *nf * c2;
    return (-x - *nf * c1) - *nf * c2;
}

/* 2^n for n inside the normal exponent range */
SS_CV_INLINE V F(pow2)(VI n) {
    return F(from_bits)((n + (DOUBLE ? 1023 : 127)) << (DOUBLE ? 52 : 23));
}

/* 2^n (1 + q), q = expm1(r) rounded, rounded once: AVX-512's scalef of 1 + q, or 2^n as the
   product of two powers of two (both normal) -- the same bits, right down to the denormals and
   up to overflow, and for normal results those of _math.pxd's 2^n + 2^n q.  The empty asm
   keeps q rounded: GCC would otherwise fuse 1 + r * p(r) into one multiply-add. */
SS_CV_INLINE V F(exp_reduced)(V r, V nf, VI n) {
    V q = F(expm1_poly)(r);
#if defined(SS_CV_SCALEF)
    (void)n;
    __asm__("" : "+v"(q));
    return SS_CV_SCALEF(1 + q, nf);
#else
    (void)nf;
    VI n1 = n >> 1;
    V s1 = F(pow2)(n1);
    return (s1 + s1 * q) * F(pow2)(n - n1);
#endif
}

/* exp(sign * x): 0 below the denormals, inf above the largest finite result, NaN for NaN
   (which the clamp keeps and the polynomial passes on).  |x| <= 104 (double 746) keeps 2^n
   within reach of the two factors and already gives 0 or inf. */
SS_CV_INLINE V F(exp_signed)(V x, int sign) {
    V nf;
    VI n;
    V r = F(reduce)(F(clamp)(x, DOUBLE ? 746 : 104), sign, &nf, &n);
    return F(exp_reduced)(r, nf, n);
}

SS_CV_INLINE V F(exp)(V x) {
    return F(exp_signed)(x, 1);
}

/* tanh(x) = e / (e + 2) with e = expm1(2x): no cancellation near 0; |2x| <= 40 is enough
   (tanh(20) rounds to 1 in double) */
SS_CV_INLINE V F(tanh)(V x) {
    V nf;
    VI n;
    V q = F(expm1_poly)(F(reduce)(F(clamp)(x + x, 40), 1, &nf, &n));
#if defined(SS_CV_SCALEF)
    V s = SS_CV_SCALEF(K(1), nf);
#else
    V s = F(pow2)(n);
#endif
    V e = s * q + (s - 1);
    return e / (e + 2);
}

SS_CV_INLINE V F(sigmoid)(V x) {
    return 1 / (1 + F(exp_signed)(x, -1));
}

/* log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) <= 1/3, odd series */
SS_CV_INLINE V F(log1p_unit)(V u) {
    V s = u / (2 + u);
    V s2 = s * s;
    if (DOUBLE)
        return 2 * s * (1 + s2 * ((T)(1 / 3.) + s2 * ((T)(1 / 5.) + s2 * ((T)(1 / 7.) + s2 * ((T)(1 / 9.)
               + s2 * ((T)(1 / 11.) + s2 * ((T)(1 / 13.) + s2 * ((T)(1 / 15.) + s2 * ((T)(1 / 17.)
               + s2 * ((T)(1 / 19.) + s2 * ((T)(1 / 21.) + s2 * ((T)(1 / 23.) + s2 * ((T)(1 / 25.)
               + s2 * ((T)(1 / 27.) + s2 * ((T)(1 / 29.) + s2 * ((T)(1 / 31.) + s2 * ((T)(1 / 33.)
               + s2 * (T)(1 / 35.))))))))))))))))));
    return 2 * s * (1 + s2 * ((T)(1 / 3.) + s2 * ((T)(1 / 5.) + s2 * ((T)(1 / 7.) + s2 * ((T)(1 / 9.)
           + s2 * ((T)(1 / 11.) + s2 * ((T)(1 / 13.) + s2 * (T)(1 / 15.))))))));
}

/* log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): never overflows */
SS_CV_INLINE V F(log_sigmoid)(V x) {
    V ax = F(from_bits)(F(bits)(x) & ~F(bits)(-K(0)));   /* |x|: x without the sign bit of -0 */
#if SS_CV_X86
    V mn = SS_CV_MIN(x, K(0));              /* x < 0 ? x : 0 */
#else
    V mn = F(sel)(MASK(x < K(0)), x, K(0));
#endif
    return mn - F(log1p_unit)(F(exp_signed)(ax, -1));
}

/* ---- forward: units d .. d+n-1 (n <= VL) ---------------------------------------------- */

SS_CV_INLINE void F(elman_fwd)(const T* ax, ptrdiff_t sx, const T* ar, ptrdiff_t sr,
                               T* st, ptrdiff_t ss, ptrdiff_t n) {
    (void)sx; (void)sr; (void)ss;
    F(st)(st, F(tanh)(F(ld)(ax, n) + F(ld)(ar, n)), n);
}

/* lstm and slstm (below) on nv vectors of units (nv = 1 or 2, a literal; n units in the
   last), each stage for every vector before the next: see SS_CV_FORWARD_PAIRS */
SS_CV_INLINE void F(lstm_fwdv)(const T* ax, ptrdiff_t sx, const T* ar, ptrdiff_t sr,
                               T* st, ptrdiff_t ss, const int nv, ptrdiff_t n) {
    V i[2], f[2], g[2], o[2], c[2];
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        i[k] = F(sigmoid)(F(ld)(ax + q, w) + F(ld)(ar + q, w));
    }
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        f[k] = F(sigmoid)(F(ld)(ax + q + sx, w) + F(ld)(ar + q + sr, w));
    }
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        g[k] = F(tanh)(F(ld)(ax + q + 2 * sx, w) + F(ld)(ar + q + 2 * sr, w));
    }
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        o[k] = F(sigmoid)(F(ld)(ax + q + 3 * sx, w) + F(ld)(ar + q + 3 * sr, w));
    }
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        c[k] = f[k] * F(ld)(st + q + ss, w) + i[k] * g[k];
        F(st)(st + q + ss, c[k], w);
    }
    for (int k = 0; k < nv; k++) {
        ptrdiff_t q = k * VL, w = k == nv - 1 ? n : VL;
        F(st)(st + q, o[k] * F(tanh)(c[k]), w);
    }
}

SS_CV_INLINE void F(gru_fwd)(const T* ax, ptrdiff_t sx, const T* ar, ptrdiff_t sr,
                             T* st, ptrdiff_t ss, ptrdiff_t n) {
    (void)ss;
    V r = F(sigmoid)(F(ld)(ax, n) + F(ld)(ar, n));
    V z = F(sigmoid)(F(ld)(ax + sx, n) + F(ld)(ar + sr, n));
    V nn = F(tanh)(F(ld)(ax + 2 * sx, n) + r * F(ld)(ar + 2 * sr, n));
    F(st)(st, (1 - z) * nn + z * F(ld)(st, n), n);
}

/* The stabilised input and forget gates of sLSTM, for the forward and the backward's
   recomputation alike: l = log_sigmoid(f~) + m_prev, and the stabiliser m is i~ (first step,
   n_prev = 0) or max(i~, l), so one of i = exp(i~ - m), f = exp(l - m) is exp(0) = 1.
   Returns m_is_i (m = i~ in those lanes); i, f and l through the pointers. */
SS_CV_INLINE VI F(slstm_gates)(V it, V ft, V n_prev, V m_prev, V* i, V* f, V* l) {
    *l = F(log_sigmoid)(ft) + m_prev;
    VI m_is_i = ~(MASK(n_prev != K(0)) & MASK(*l > it));
    V e = F(exp)(F(sel)(m_is_i, *l - it, it - *l));
    *i = F(sel)(m_is_i, K(1), e);
    *f = F(sel)(m_is_i, e, K(1));
    return m_is_i;
}

SS_CV_INLINE void F(slstm_fwdv)(const T* ax, ptrdiff_t sx, const T* ar, ptrdiff_t sr,
                                T* st, ptrdiff_t ss, const int nv, ptrdiff_t n) {
    V it[2], ft[2], zt[2], ot[2], n_prev[2], m_prev[2], i[2], f[2], l[2], tz[2], eo[2];
    VI m_is_i[2];
    for (int k = 0; k < nv; k++) {
        ptrdiff_t o = k * VL, w = k == nv - 1 ? n : VL;
        it[k] = F(ld)(ax + o, w) + F(ld)(ar + o, w);
        ft[k] = F(ld)(ax + o + sx, w) + F(ld)(ar + o + sr, w);
        zt[k] = F(ld)(ax + o + 2 * sx, w) + F(ld)(ar + o + 2 * sr, w);
        ot[k] = F(ld)(ax + o + 3 * sx, w) + F(ld)(ar + o + 3 * sr, w);
        n_prev[k] = F(ld)(st + o + 2 * ss, w);
        m_prev[k] = F(ld)(st + o + 3 * ss, w);
    }
    for (int k = 0; k < nv; k++)
        m_is_i[k] = F(slstm_gates)(it[k], ft[k], n_prev[k], m_prev[k], &i[k], &f[k], &l[k]);
    for (int k = 0; k < nv; k++)
        tz[k] = F(tanh)(zt[k]);
    for (int k = 0; k < nv; k++)
        eo[k] = F(exp_signed)(ot[k], -1);
    for (int k = 0; k < nv; k++) {
        ptrdiff_t o = k * VL, w = k == nv - 1 ? n : VL;
        V c = f[k] * F(ld)(st + o + ss, w) + i[k] * tz[k];
        V nn = f[k] * n_prev[k] + i[k];
        nn = F(sel)(MASK(nn < K(1)), K(1), nn);        /* NaN passes */
        F(st)(st + o + ss, c, w);
        F(st)(st + o + 2 * ss, nn, w);
        F(st)(st + o + 3 * ss, F(sel)(m_is_i[k], it[k], l[k]), w);
        F(st)(st + o, c / (nn * (1 + eo[k])), w);   /* sigmoid(o~) c / n with one division */
    }
}

/* ---- backward: gates recomputed from (ax, ar, prev) ------------------------------------ */

#define SS_CV_BWD_ARGS const T* ax, ptrdiff_t sx, const T* ar, ptrdiff_t sr, const T* prev,   \
                       ptrdiff_t sp, T* dst, ptrdiff_t sds, T* dgx, ptrdiff_t sgx, T* dgr,    \
                       ptrdiff_t sgr, ptrdiff_t n

SS_CV_INLINE void F(elman_bwd)(SS_CV_BWD_ARGS) {
    (void)sx; (void)sr; (void)prev; (void)sp; (void)sds; (void)sgx; (void)sgr;
    V h = F(tanh)(F(ld)(ax, n) + F(ld)(ar, n));
    V ga = F(ld)(dst, n) * (1 - h * h);
    F(st)(dgx, ga, n);
    F(st)(dgr, ga, n);
    F(st)(dst, K(0), n);
}

/* lstm and slstm (below) on two vectors of units (n in the first, n2 in the second: 0 .. VL),
   each stage for both vectors before the next, as the forward's: see SS_CV_BACKWARD_PAIRS */
SS_CV_INLINE void F(lstm_bwdv)(SS_CV_BWD_ARGS, ptrdiff_t n2) {
    V i[2], f[2], g[2], o[2], tc[2];
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        i[k] = F(sigmoid)(F(ld)(ax + q, w) + F(ld)(ar + q, w));
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        f[k] = F(sigmoid)(F(ld)(ax + q + sx, w) + F(ld)(ar + q + sr, w));
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        g[k] = F(tanh)(F(ld)(ax + q + 2 * sx, w) + F(ld)(ar + q + 2 * sr, w));
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        o[k] = F(sigmoid)(F(ld)(ax + q + 3 * sx, w) + F(ld)(ar + q + 3 * sr, w));
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        tc[k] = F(tanh)(f[k] * F(ld)(prev + q + sp, w) + i[k] * g[k]);
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        V c_prev = F(ld)(prev + q + sp, w);
        V dh = F(ld)(dst + q, w);
        V dc = F(ld)(dst + q + sds, w) + dh * o[k] * (1 - tc[k] * tc[k]);
        V gi = dc * g[k] * i[k] * (1 - i[k]);
        V gf = dc * c_prev * f[k] * (1 - f[k]);
        V gg = dc * i[k] * (1 - g[k] * g[k]);
        V go = dh * tc[k] * o[k] * (1 - o[k]);
        F(st_gates4)(dgx + q, sgx, dgr + q, sgr, gi, gf, gg, go, w);
        F(st)(dst + q + sds, dc * f[k], w);
        F(st)(dst + q, K(0), w);
    }
}

SS_CV_INLINE void F(gru_bwd)(SS_CV_BWD_ARGS) {
    (void)sds;
    V r = F(sigmoid)(F(ld)(ax, n) + F(ld)(ar, n));
    V z = F(sigmoid)(F(ld)(ax + sx, n) + F(ld)(ar + sr, n));
    V arn = F(ld)(ar + 2 * sr, n);
    V nn = F(tanh)(F(ld)(ax + 2 * sx, n) + r * arn);
    V h_prev = F(ld)(prev, n);
    V dh = F(ld)(dst, n);
    V gn = dh * (1 - z) * (1 - nn * nn);
    V gr = gn * arn * r * (1 - r);
    V gz = dh * (h_prev - nn) * z * (1 - z);
    F(st)(dgx, gr, n);
    F(st)(dgx + sgx, gz, n);
    F(st)(dgx + 2 * sgx, gn, n);
    F(st)(dgr, gr, n);
    F(st)(dgr + sgr, gz, n);
    F(st)(dgr + 2 * sgr, gn * r, n);
    F(st)(dst, dh * z, n);
}

SS_CV_INLINE void F(slstm_bwdv)(SS_CV_BWD_ARGS, ptrdiff_t n2) {
    V it[2], ft[2], zt[2], ot[2], n_prev[2], i[2], f[2], l[2], tz[2], o[2];
    VI m_is_i[2];
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        it[k] = F(ld)(ax + q, w) + F(ld)(ar + q, w);
        ft[k] = F(ld)(ax + q + sx, w) + F(ld)(ar + q + sr, w);
        zt[k] = F(ld)(ax + q + 2 * sx, w) + F(ld)(ar + q + 2 * sr, w);
        ot[k] = F(ld)(ax + q + 3 * sx, w) + F(ld)(ar + q + 3 * sr, w);
        n_prev[k] = F(ld)(prev + q + 2 * sp, w);
    }
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        m_is_i[k] = F(slstm_gates)(it[k], ft[k], n_prev[k], F(ld)(prev + q + 3 * sp, w), &i[k],
                                   &f[k], &l[k]);
    }
    for (int k = 0; k < 2; k++)
        tz[k] = F(tanh)(zt[k]);
    for (int k = 0; k < 2; k++)
        o[k] = F(sigmoid)(ot[k]);
    for (int k = 0; k < 2; k++) {
        ptrdiff_t q = k * VL, w = k == 0 ? n : n2;
        V c_prev = F(ld)(prev + q + sp, w);
        V c = f[k] * c_prev + i[k] * tz[k];
        V nn = f[k] * n_prev[k] + i[k];
        VI clipped = MASK(nn < K(1));
        V nc = F(sel)(clipped, K(1), nn);
        V dh = F(ld)(dst + q, w);
        V dc = F(ld)(dst + q + sds, w) + dh * o[k] / nc;
        V dn = F(ld)(dst + q + 2 * sds, w) - dh * o[k] * c / (nc * nc);
        V dm = F(ld)(dst + q + 3 * sds, w);
        dn = F(sel)(clipped, K(0), dn);
        V go = dh * c / nc * o[k] * (1 - o[k]);
        V di = dc * tz[k] + dn;
        V df = dc * c_prev + dn * n_prev[k];
        V gz = dc * i[k] * (1 - tz[k] * tz[k]);
        V dit = di * i[k];
        V dl = df * f[k];
        dm = dm - dit - dl;                 /* i and f both divide by exp(m) */
        dit = F(sel)(m_is_i[k], dit + dm, dit);
        dl = F(sel)(m_is_i[k], dl, dl + dm);
        V gf = dl * (1 - F(sigmoid)(ft[k]));    /* d log_sigmoid(x)/dx = 1 - sigmoid(x) */
        F(st_gates4)(dgx + q, sgx, dgr + q, sgr, dit, gf, gz, go, w);
        F(st)(dst + q + sds, dc * f[k], w);
        F(st)(dst + q + 2 * sds, dn * f[k], w);
        F(st)(dst + q + 3 * sds, dl, w);
        F(st)(dst + q, K(0), w);
    }
}

/* ---- entry points: every unit of a call through the vector code ------------------------- */

#define SS_CV_FORWARD(cell)                                                                    \
static void F(cell##_forward)(ptrdiff_t D, const T* ax, ptrdiff_t sx, const T* ar,             \
                              ptrdiff_t sr, T* st, ptrdiff_t ss) {                             \
    ptrdiff_t d = 0;                                                                           \
    for (; d + VL <= D; d += VL)                                                               \
        F(cell##_fwd)(ax + d, sx, ar + d, sr, st + d, ss, VL);                                 \
    if (d < D)                                                                                 \
        F(cell##_fwd)(ax + d, sx, ar + d, sr, st + d, ss, D - d);                              \
}

#define SS_CV_BACKWARD(cell)                                                                   \
static void F(cell##_backward)(ptrdiff_t D, const T* ax, ptrdiff_t sx, const T* ar,            \
                               ptrdiff_t sr, const T* prev, ptrdiff_t sp, T* dst,              \
                               ptrdiff_t sds, T* dgx, ptrdiff_t sgx, T* dgr, ptrdiff_t sgr) {  \
    ptrdiff_t d = 0;                                                                           \
    for (; d + VL <= D; d += VL)                                                               \
        F(cell##_bwd)(ax + d, sx, ar + d, sr, prev + d, sp, dst + d, sds, dgx + d, sgx,        \
                      dgr + d, sgr, VL);                                                       \
    if (d < D)                                                                                 \
        F(cell##_bwd)(ax + d, sx, ar + d, sr, prev + d, sp, dst + d, sds, dgx + d, sgx,        \
                      dgr + d, sgr, D - d);                                                    \
}

SS_CV_FORWARD(elman)
SS_CV_FORWARD(gru)
/* Pairs of vectors (F(cell##_fwdv)); the last 1 .. 2 VL - 1 units as a pair whose second
   vector is partial, or as one (partial) vector.  One vector of a cell is a dependent chain of
   exp / tanh evaluations and divisions (sLSTM's ~200 cycles) whose instructions fill Zen 1's
   reorder window, so the core mostly waited on latency; two vectors' stages side by side,
   interleaved by SS_CV_SCHED's scheduling, overlap their chains.  Every unit still takes the
   same operations, whichever nv its call has.  Cell alone, 16 rows x 64 units in L1, cycles
   per vector: slstm 205 -> 127 (the pairs without the scheduling: 203), lstm 162 -> 119.
   Left as they were: elman (one tanh, short enough for the window: 29 -> 30) and gru (92 ->
   78, but GCC then contracted (1 - z) nn + z h into the other multiply-add: other bits). */
#define SS_CV_FORWARD_PAIRS(cell)                                                              \
SS_CV_SCHED static void F(cell##_forward)(ptrdiff_t D, const T* ax, ptrdiff_t sx, const T* ar, \
                                         ptrdiff_t sr, T* st, ptrdiff_t ss) {                  \
    ptrdiff_t d = 0;                                                                           \
    for (; d + 2 * VL <= D; d += 2 * VL)                                                       \
        F(cell##_fwdv)(ax + d, sx, ar + d, sr, st + d, ss, 2, VL);                             \
    if (D - d > VL)                                                                            \
        F(cell##_fwdv)(ax + d, sx, ar + d, sr, st + d, ss, 2, D - d - VL);                     \
    else if (d < D)                                                                            \
        F(cell##_fwdv)(ax + d, sx, ar + d, sr, st + d, ss, 1, D - d);                          \
}
SS_CV_FORWARD_PAIRS(lstm)
SS_CV_FORWARD_PAIRS(slstm)
/* The backward's pairs, as the forward's (recomputing the gates is the same chains); the last
   units as a pair whose second vector is partial or empty: LSTM's lone vector (nv = 1, as the
   forward's) got other multiply-adds from GCC's contraction than the old single-vector cell,
   other bits in the tail.  Cell alone, 16 rows x 64 units float32, ns per 8 units (harness,
   noisy): lstm ~128 -> ~87, slstm ~167 -> ~122. */
#define SS_CV_BACKWARD_PAIRS(cell)                                                             \
SS_CV_SCHED static void F(cell##_backward)(ptrdiff_t D, const T* ax, ptrdiff_t sx,             \
                                          const T* ar, ptrdiff_t sr, const T* prev,            \
                                          ptrdiff_t sp, T* dst, ptrdiff_t sds, T* dgx,         \
                                          ptrdiff_t sgx, T* dgr, ptrdiff_t sgr) {              \
    ptrdiff_t d = 0;                                                                           \
    for (; d + 2 * VL <= D; d += 2 * VL)                                                       \
        F(cell##_bwdv)(ax + d, sx, ar + d, sr, prev + d, sp, dst + d, sds, dgx + d, sgx,       \
                       dgr + d, sgr, VL, VL);                                                  \
    if (d < D)                                                                                 \
        F(cell##_bwdv)(ax + d, sx, ar + d, sr, prev + d, sp, dst + d, sds, dgx + d, sgx,       \
                       dgr + d, sgr, D - d > VL ? VL : D - d, D - d > VL ? D - d - VL : 0);    \
}

SS_CV_BACKWARD(elman)
SS_CV_BACKWARD_PAIRS(lstm)
SS_CV_BACKWARD(gru)
SS_CV_BACKWARD_PAIRS(slstm)

/* by kernel id (SS_CELL_*): the entry points ext/_cells.pxd calls */
static void F(forward)(int cell, ptrdiff_t D, const T* ax, ptrdiff_t sx, const T* ar,
                       ptrdiff_t sr, T* st, ptrdiff_t ss) {
    switch (cell) {
    case SS_CELL_ELMAN: F(elman_forward)(D, ax, sx, ar, sr, st, ss); break;
    case SS_CELL_LSTM: F(lstm_forward)(D, ax, sx, ar, sr, st, ss); break;
    case SS_CELL_GRU: F(gru_forward)(D, ax, sx, ar, sr, st, ss); break;
    default: F(slstm_forward)(D, ax, sx, ar, sr, st, ss);
    }
}

static void F(backward)(int cell, ptrdiff_t D, const T* ax, ptrdiff_t sx, const T* ar,
                        ptrdiff_t sr, const T* prev, ptrdiff_t sp, T* dst, ptrdiff_t sds,
                        T* dgx, ptrdiff_t sgx, T* dgr, ptrdiff_t sgr) {
    switch (cell) {
    case SS_CELL_ELMAN:
        F(elman_backward)(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr); break;
    case SS_CELL_LSTM:
        F(lstm_backward)(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr); break;
    case SS_CELL_GRU:
        F(gru_backward)(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr); break;
    default: F(slstm_backward)(D, ax, sx, ar, sr, prev, sp, dst, sds, dgx, sgx, dgr, sgr);
    }
}

#undef SS_CV_FORWARD
#undef SS_CV_FORWARD_PAIRS
#undef SS_CV_BACKWARD
#undef SS_CV_BACKWARD_PAIRS
#undef SS_CV_BWD_ARGS
#undef DOUBLE
#undef K
#undef VL
#undef MASK
#undef VI
#undef V
#undef T
#undef F
#undef SS_CV_CAT
#undef SS_CV_CAT2
/* this file's parameters, set by _cell_simd.h before each inclusion */
#undef SS_CV_T
#undef SS_CV_I
#undef SS_CV_SFX
#undef SS_CV_MAX
#undef SS_CV_MIN
#undef SS_CV_SCALEF
#undef SS_CV_MASK
#undef SS_CV_MASK_LOAD
#undef SS_CV_MASK_STORE
