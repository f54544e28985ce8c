# Vectorisable elementwise math for the scan kernels: arithmetic and bit operations only (no
# libm calls), and every constant typed as `floating`, so that float loops stay in float and
# GCC vectorises them.  NaN in -> NaN out.
#   vexp:     exp(x) = 2^n e^r with n = round(x/ln2), |r| <= ln2/2 (two-part ln2, exact
#             product n*ln2_hi); e^r by its Taylor series truncated below 3e-8 (float) /
#             1e-17 (double) relative; 2^n as two exponent-bit factors 2^(n//2) * 2^(n-n//2),
#             so overflow to inf and gradual underflow to 0 come out of the final products.
#   vlog1p_unit: log(1+u) for u in [0, 1] as 2 atanh(u/(2+u)), odd series.
from cython cimport floating
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline floating _taylor_exp(floating r) noexcept nogil:
    cdef floating one = 1
    if floating is float:
        return one + r * (one + r * (<float>(1 / 2.) + r * (<float>(1 / 6.) + r * (
            <float>(1 / 24.) + r * (<float>(1 / 120.) + r * (<float>(1 / 720.)
            + r * <float>(1 / 5040.)))))))
    else:
        return one + r * (one + r * (1 / 2. + r * (1 / 6. + r * (1 / 24. + r * (1 / 120.
            + r * (1 / 720. + r * (1 / 5040. + r * (1 / 40320. + r * (1 / 362880.
            + r * (1 / 3628800. + r * (1 / 39916800. + r * (1 / 479001600.
            + r * (1 / 6227020800. + r * (1 / 87178291200.))))))))))))))


cdef inline floating vexp(floating x) noexcept nogil:
    cdef floating lo, hi, shift, t, kf, r, s1, s2
    cdef int32_t n32, h32
    cdef int64_t n64, h64
    cdef uint32_t b1_32, b2_32
    cdef uint64_t b1_64, b2_64
    if floating is float:
        lo, hi, shift = -110, 90, 12582912            # shift = 1.5 * 2^23
    else:
        lo, hi, shift = -760, 720, 6755399441055744   # shift = 1.5 * 2^52
    x = lo if x < lo else x                            # NaN compares false: stays NaN
    x = hi if x > hi else x
    # t = shift + round(x / ln2): n sits in the low mantissa bits of t
    if floating is float:
        t = x * <float>1.4426950408889634 + shift
        kf = t - shift
        r = (x - kf * <float>0.693359375) - kf * <float>-2.12194440e-4
        memcpy(&n32, &t, 4)
        n32 = n32 - 0x4B400000
        h32 = n32 >> 1
        b1_32 = <uint32_t> (h32 + 127) << 23          # unsigned: NaN's garbage n shifts safely
        b2_32 = <uint32_t> (n32 - h32 + 127) << 23
        memcpy(&s1, &b1_32, 4)
        memcpy(&s2, &b2_32, 4)
    else:
        t = x * 1.4426950408889634 + shift
        kf = t - shift
        r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10
        memcpy(&n64, &t, 8)
        n64 = n64 - <int64_t> 0x4338000000000000
        h64 = n64 >> 1
        b1_64 = <uint64_t> (h64 + 1023) << 52
        b2_64 = <uint64_t> (n64 - h64 + 1023) << 52
        memcpy(&s1, &b1_64, 8)
        memcpy(&s2, &b2_64, 8)
    return _taylor_exp(r) * s1 * s2


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
