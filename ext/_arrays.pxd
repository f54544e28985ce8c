# Raw access to the ndarrays a kernel's `def` entry point receives, for entry points that
# take arrays as objects: acquiring a typed memoryview costs a few hundred nanoseconds per
# argument (and a fused `def` a signature match per call), more than a small call's work.
# Such an entry point checks each array's dtype, rank and layout with c_array (what the
# typed memoryview checked) and reads it through data().  Every module that cimports this
# calls cnp.import_array() at import.
cimport numpy as cnp


cdef inline char* data(object a) noexcept:
    """The data pointer of an ndarray, NULL for None."""
    return <char*> cnp.PyArray_DATA(<cnp.ndarray> a) if a is not None else NULL


cdef inline bint c_array(object a, int typenum, int ndim, bint writeable=False) noexcept:
    """True when `a` is a C-contiguous ndarray of `typenum` and rank `ndim` (writeable when
    asked)."""
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray> a
    return (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_NDIM(arr) == ndim
            and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef inline int float_type(object a) noexcept:
    """NPY_FLOAT or NPY_DOUBLE: the type of ndarray `a`, -1 for anything else."""
    if type(a) is not cnp.ndarray:
        return -1
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray> a)
    return typenum if typenum == cnp.NPY_FLOAT or typenum == cnp.NPY_DOUBLE else -1


cdef inline Py_ssize_t dim(object a, int axis) noexcept:
    """Size of `axis` (>= 0) of ndarray `a` (its shape attribute, without Python objects)."""
    return cnp.PyArray_DIM(<cnp.ndarray> a, axis)


cdef inline int ndim(object a) noexcept:
    return cnp.PyArray_NDIM(<cnp.ndarray> a)
