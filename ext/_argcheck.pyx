# The argument check of the small-call fast paths (statescan._validate.match), in C.
#
# A public call on arrays that are already valid -- C-contiguous ndarrays of one float dtype
# with matching shapes -- spends most of its fixed cost checking just that, a few attribute
# reads per array in Python.  This module does the same reads on the C structs of the arrays,
# in one call.  It only accepts or declines: a declined call takes the general validation,
# which explains what is wrong.  _validate.py holds the plan format and a Python twin with the
# same answers (tests compare them), used when this module is not built.
cimport numpy as cnp

cnp.import_array()

cdef enum:
    OPTIONAL = 1        # plan flag bits of an argument (see _validate.plan)
    WRITEABLE = 2
    ANY = 255           # an axis of any size
    MAX_SLOTS = 32


def match(bytes plan, *arrays):
    """The sizes of the plan's named dimensions (a tuple, in the plan's order) when `arrays`
    match it, else None.  See statescan._validate.plan for the plan and the rules."""
    cdef const unsigned char* p = <const unsigned char*> (<char*> plan)
    cdef Py_ssize_t size = len(plan), nslots, n, pos = 2, i, d, k
    cdef Py_ssize_t sizes[MAX_SLOTS]
    cdef cnp.npy_intp* shape
    cdef int typenum = -1, flags, ndim
    cdef cnp.ndarray arr
    if size < 2 or p[0] > MAX_SLOTS:
        raise ValueError("not a plan of statescan._validate.plan")
    nslots, n = p[0], p[1]
    if n != len(arrays):
        raise ValueError(f"the plan takes {n} arrays, got {len(arrays)}")
    for k in range(nslots):
        sizes[k] = -1
    for i in range(n):
        if pos + 2 > size or pos + 2 + p[pos + 1] > size:
            raise ValueError("not a plan of statescan._validate.plan")
        flags = p[pos]
        ndim = p[pos + 1]
        pos += 2
        a = arrays[i]
        if a is None:
            if not flags & OPTIONAL:
                return None
            pos += ndim
            continue
        if type(a) is not cnp.ndarray:
            return None
        arr = <cnp.ndarray> a
        if typenum < 0:
            typenum = cnp.PyArray_TYPE(arr)
            if typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE:
                return None
        elif cnp.PyArray_TYPE(arr) != typenum:
            return None
        if (not cnp.PyArray_ISNOTSWAPPED(arr) or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
                or cnp.PyArray_NDIM(arr) != ndim
                or (flags & WRITEABLE and not cnp.PyArray_ISWRITEABLE(arr))):
            return None
        shape = cnp.PyArray_DIMS(arr)
        for d in range(ndim):
            k = p[pos + d]
            if k == ANY:
                continue
            if k >= nslots:
                raise ValueError("not a plan of statescan._validate.plan")
            if sizes[k] < 0:
                sizes[k] = shape[d]
            elif sizes[k] != shape[d]:
                return None
        pos += ndim
    return tuple([sizes[k] for k in range(nslots)])      # -1: named only by absent arrays
