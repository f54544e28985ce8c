# Scalar math shared by every kernel family; one source for float and double.
from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf, log1p, log1pf, fabs, fabsf


cdef inline floating exp_(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating tanh_(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating sigmoid(floating x) noexcept nogil:
    return 1 / (1 + exp_(-x))


cdef inline floating log_sigmoid(floating x) noexcept nogil:
    # log(sigmoid(x)) = -log1p(exp(-x)) for x >= 0, x - log1p(exp(x)) otherwise: never overflows.
    if floating is float:
        if x >= 0:
            return -log1pf(expf(-x))
        return x - log1pf(expf(x))
    else:
        if x >= 0:
            return -log1p(exp(-x))
        return x - log1p(exp(x))
