# Elementwise math shared by every kernel family; one source for float and double.
# exp/expm1 are written with arithmetic and bit operations only (no libm calls), so loops that
# use them vectorise: Cody-Waite range reduction x = n*ln2 + r, |r| <= ln2/2, a Taylor
# polynomial for expm1(r) truncated below half an ulp, and 2^n built from the exponent bits.
# Accuracy: a few ulp in both precisions.  NaN in -> NaN out.
from cython cimport floating
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline floating _expm1_poly(floating r) noexcept nogil:
    cdef floating one = 1
    if floating is float:
        return r * (one + r * (<float>(1 / 2.) + r * (<float>(1 / 6.) + r * (<float>(1 / 24.)
               + r * (<float>(1 / 120.) + r * (<float>(1 / 720.) + r * <float>(1 / 5040.)))))))
    else:
        return r * (one + r * (1 / 2. + r * (1 / 6. + r * (1 / 24. + r * (1 / 120. + r * (1 / 720.
               + r * (1 / 5040. + r * (1 / 40320. + r * (1 / 362880. + r * (1 / 3628800.
               + r * (1 / 39916800. + r * (1 / 479001600. + r * (1 / 6227020800.)))))))))))))


cdef inline floating _reduce(floating x, floating* scale) noexcept nogil:
    """r with x = n*ln2 + r, |r| <= ln2/2; *scale = 2^n.  Needs n inside the normal range."""
    cdef floating t, n
    # unsigned: the exponent arithmetic wraps (NaN/inf bit patterns) instead of overflowing
    cdef uint32_t bits32
    cdef uint64_t bits64
    if floating is float:
        # Adding 1.5*2^23 rounds to an integer and leaves n in the low mantissa bits of t.
        t = x * <float>1.4426950408889634 + <float>12582912.0
        n = t - <float>12582912.0
        memcpy(&bits32, &t, 4)
        bits32 = (bits32 - 0x4B400000 + 127) << 23
        memcpy(scale, &bits32, 4)
        return (x - n * <float>0.693359375) - n * <float>(-2.12194440e-4)
    else:
        t = x * 1.4426950408889634 + 6755399441055744.0
        n = t - 6755399441055744.0
        memcpy(&bits64, &t, 8)
        bits64 = (bits64 - <uint64_t>0x4338000000000000 + 1023) << 52
        memcpy(scale, &bits64, 8)
        return (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10


cdef inline floating exp_(floating x) noexcept nogil:
    cdef floating lo, hi, xc, s, q, res
    if floating is float:
        lo, hi = -87, 88
    else:
        lo, hi = -708, 709
    xc = lo if x < lo else (hi if x > hi else x)
    q = _expm1_poly(_reduce(xc, &s))
    res = s + s * q
    if x < lo:
        res = 0
    if x > hi:
        res = <floating>1e300 * <floating>1e300   # +inf in either precision
    if x != x:
        res = x
    return res


cdef inline floating tanh_(floating x) noexcept nogil:
    # tanh(x) = e / (e + 2) with e = expm1(2x): no cancellation near 0.
    cdef floating y, s, q, e
    cdef floating one = 1, two = 2, lim = 40
    y = x + x
    y = -lim if y < -lim else (lim if y > lim else y)   # tanh(+-20) rounds to +-1 in double
    q = _expm1_poly(_reduce(y, &s))
    e = s * q + (s - one)
    e = e / (e + two)
    if x != x:
        e = x
    return e


cdef inline floating sigmoid(floating x) noexcept nogil:
    cdef floating one = 1
    return one / (one + exp_(-x))


cdef inline floating _log1p_unit(floating u) noexcept nogil:
    # log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) <= 1/3, odd series.
    cdef floating one = 1, two = 2
    cdef floating s = u / (two + u)
    cdef floating s2 = s * s
    if floating is float:
        return two * s * (one + s2 * (<float>(1 / 3.) + s2 * (<float>(1 / 5.) + s2 * (<float>(1 / 7.)
               + s2 * (<float>(1 / 9.) + s2 * (<float>(1 / 11.) + s2 * (<float>(1 / 13.)
               + s2 * <float>(1 / 15.))))))))
    else:
        return two * s * (one + s2 * (1 / 3. + s2 * (1 / 5. + s2 * (1 / 7. + s2 * (1 / 9.
               + s2 * (1 / 11. + s2 * (1 / 13. + s2 * (1 / 15. + s2 * (1 / 17. + s2 * (1 / 19.
               + s2 * (1 / 21. + s2 * (1 / 23. + s2 * (1 / 25. + s2 * (1 / 27. + s2 * (1 / 29.
               + s2 * (1 / 31. + s2 * (1 / 33. + s2 * (1 / 35.))))))))))))))))))


cdef inline floating log_sigmoid(floating x) noexcept nogil:
    # log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): never overflows.
    cdef floating zero = 0
    cdef floating ax = -x if x < zero else x
    cdef floating res = (x if x < zero else zero) - _log1p_unit(exp_(-ax))
    if x != x:
        res = x
    return res


cdef inline floating exp_clamped(floating x) noexcept nogil:
    # exp with no special-case selects (about a third fewer vector instructions than exp_:
    # for the scans' innermost loops), accurate up to where exp really overflows: x is only
    # clamped, to [-87.5, 88.8] (double [-708.6, 710]), and the result is 2 (1 + expm1(r))
    # times 2^(n-1), which is inf above 88.72 (double 709.78) and 0 for results below about
    # 2^-125 (double 2^-1021).  Same reduction and polynomial as exp_.  NaN in -> NaN out.
    cdef floating lo, hi, s, r, t
    cdef floating two = 2
    cdef uint32_t b32
    cdef uint64_t b64
    if floating is float:
        lo, hi = <float>-87.5, <float>88.8
    else:
        lo, hi = -708.6, 710
    x = lo if x < lo else x                 # NaN compares false: stays NaN
    x = hi if x > hi else x
    r = _reduce(x, &s)
    # _reduce's 2^n is inf at the top of the range: build 2^(n-1) instead, from its rounding
    # step t repeated here (the compiler computes it once)
    if floating is float:
        t = x * <float>1.4426950408889634 + <float>12582912.0
        memcpy(&b32, &t, 4)
        b32 = (b32 - 0x4B400000 + 126) << 23
        memcpy(&s, &b32, 4)
    else:
        t = x * 1.4426950408889634 + 6755399441055744.0
        memcpy(&b64, &t, 8)
        b64 = (b64 - <uint64_t>0x4338000000000000 + 1022) << 52
        memcpy(&s, &b64, 8)
    return (two + two * _expm1_poly(r)) * s


cdef inline floating softplus(floating x) noexcept nogil:
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows.  NaN propagates via exp.
    cdef floating zero = 0
    cdef floating ax = -x if x < zero else x
    return (x if x > zero else zero) + _log1p_unit(exp_clamped(-ax))


cdef extern from *:
    """
    #include <stddef.h>
    /* `omp simd` lets the max reduction vectorise without -ffast-math.  A NaN entry may or
       may not win; callers pass the row through exp_ anyway, where it reaches the output. */
    static inline float statescan_row_maxf(const float* x, ptrdiff_t n, float init) {
        float m = init;
        #pragma omp simd reduction(max:m)
        for (ptrdiff_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
        return m;
    }
    static inline double statescan_row_max(const double* x, ptrdiff_t n, double init) {
        double m = init;
        #pragma omp simd reduction(max:m)
        for (ptrdiff_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
        return m;
    }
    """
    float statescan_row_maxf(const float* x, Py_ssize_t n, float init) noexcept nogil
    double statescan_row_max(const double* x, Py_ssize_t n, double init) noexcept nogil


cdef inline floating row_max(const floating* x, Py_ssize_t n, floating init) noexcept nogil:
    """max(init, x[0], ..., x[n-1])."""
    if floating is float:
        return statescan_row_maxf(x, n, init)
    else:
        return statescan_row_max(x, n, init)
