# Vectorisable elementwise math for the scan kernels: arithmetic and bit operations only (no
# libm calls), and every constant typed as `floating`, so that float loops stay in float and
# GCC vectorises them.  NaN in -> NaN out.  _scan_simd.h has the same functions in vector types.
#   vexp:     exp(x) = 2^n e^r with n = round(x/ln2), |r| <= ln2/2 (two-part ln2, exact
#             product n*ln2_hi); 2 e^r by its Taylor series truncated below 3e-8 (float) /
#             1e-17 (double) relative, times 2^(n-1) built in the exponent bits.  x is first
#             clamped to [-87.5, 88.8] (double: [-708.6, 710]): results below 2^-125 (double
#             2^-1021) come out as 0, above the largest float as inf.
#   vlog1p_unit: log(1+u) for u in [0, 1] as 2 atanh(u/(2+u)), odd series.
from cython cimport floating
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline floating _taylor_exp2(floating r) noexcept nogil:
    # 2 e^r
    cdef floating two = 2, one = 1
    if floating is float:
        return two + r * (two + r * (one + r * (<float>(2 / 6.) + r * (<float>(2 / 24.)
            + r * (<float>(2 / 120.) + r * (<float>(2 / 720.) + r * <float>(2 / 5040.)))))))
    else:
        return two + r * (two + r * (one + r * (2 / 6. + r * (2 / 24. + r * (2 / 120.
            + r * (2 / 720. + r * (2 / 5040. + r * (2 / 40320. + r * (2 / 362880.
            + r * (2 / 3628800. + r * (2 / 39916800. + r * (2 / 479001600.
            + r * (2 / 6227020800. + r * (2 / 87178291200.))))))))))))))


cdef inline floating vexp(floating x) noexcept nogil:
    cdef floating lo, hi, shift, t, kf, r, s
    cdef int32_t n32
    cdef int64_t n64
    cdef uint32_t b32
    cdef uint64_t b64
    if floating is float:
        lo, hi, shift = -87.5, 88.8, 12582912            # shift = 1.5 * 2^23
    else:
        lo, hi, shift = -708.6, 710, 6755399441055744    # shift = 1.5 * 2^52
    x = lo if x < lo else x                               # NaN compares false: stays NaN
    x = hi if x > hi else x
    # t = shift + round(x / ln2): n sits in the low mantissa bits of t
    if floating is float:
        t = x * <float>1.4426950408889634 + shift
        kf = t - shift
        r = (x - kf * <float>0.693359375) - kf * <float>-2.12194440e-4
        memcpy(&n32, &t, 4)
        b32 = <uint32_t> (n32 - 0x4B400000 + 126) << 23   # 2^(n-1); unsigned: NaN's garbage
        memcpy(&s, &b32, 4)                                # n shifts safely
    else:
        t = x * 1.4426950408889634 + shift
        kf = t - shift
        r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10
        memcpy(&n64, &t, 8)
        b64 = <uint64_t> (n64 - <int64_t> 0x4338000000000000 + 1022) << 52
        memcpy(&s, &b64, 8)
    return _taylor_exp2(r) * s


cdef inline floating vsigmoid(floating x) noexcept nogil:
    cdef floating one = 1
    return one / (one + vexp(-x))


cdef inline floating vlog1p_unit(floating u) noexcept nogil:
    cdef floating one = 1, two = 2
    cdef floating s = u / (two + u)
    cdef floating q = s * s
    if floating is float:
        return two * s * (one + q * (<float>(1 / 3.) + q * (<float>(1 / 5.) + q * (
            <float>(1 / 7.) + q * (<float>(1 / 9.) + q * (<float>(1 / 11.)
            + q * (<float>(1 / 13.) + q * <float>(1 / 15.))))))))
    else:
        return two * s * (one + q * (1 / 3. + q * (1 / 5. + q * (1 / 7. + q * (1 / 9.
            + q * (1 / 11. + q * (1 / 13. + q * (1 / 15. + q * (1 / 17. + q * (1 / 19.
            + q * (1 / 21. + q * (1 / 23. + q * (1 / 25. + q * (1 / 27. + q * (1 / 29.
            + q * (1 / 31. + q * (1 / 33.)))))))))))))))))


cdef inline floating vsoftplus(floating x) noexcept nogil:
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, no cancellation
    cdef floating zero = 0
    cdef floating pos = x if x > zero else zero
    return pos + vlog1p_unit(vexp(x - pos - pos))
