# The argument check of the small-call fast paths (statescan._validate.match), in C.
#
# A public call on arrays that are already valid -- C-contiguous ndarrays of one float dtype
# with matching shapes -- spends most of its fixed cost checking just that, a few attribute
# reads per array in Python.  This module does the same reads on the C structs of the arrays,
# in one call, and makes the arrays the call lacks (outputs, zero states) without the Python
# calls of np.empty.  It only accepts or declines: a declined call takes the general validation,
# which explains what is wrong.  _validate.py holds the plan format and a Python twin with the
# same answers (tests compare them), used when this module is not built.
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
cimport numpy as cnp

cnp.import_array()

cdef enum:
    OPTIONAL = 1        # plan flag bits of an argument (see _validate.plan)
    WRITEABLE = 2
    EMPTY = 4           # made (np.empty) when None, and returned
    ZEROS = 8           # made (np.zeros) when None, and returned
    ANY = 255           # an axis of any size
    MAX_SLOTS = 32


def match(bytes plan, *arrays):
    """The sizes of the plan's named dimensions (a tuple, in the plan's order) when `arrays`
    match it, followed by the arrays of the entries marked to be made when None (given or
    made), else None.  See statescan._validate.plan for the plan and the rules."""
    cdef const unsigned char* p = <const unsigned char*> (<char*> plan)
    cdef Py_ssize_t size = len(plan), nslots, n, pos = 2, i, d, k, nmade = 0
    cdef Py_ssize_t sizes[MAX_SLOTS]
    cdef Py_ssize_t made[MAX_SLOTS]     # the entries to make when None: argument index,
    cdef Py_ssize_t made_pos[MAX_SLOTS] # and position in the plan
    cdef cnp.npy_intp dims[MAX_SLOTS]
    cdef cnp.npy_intp* shape
    cdef int typenum = -1, flags, ndim
    cdef cnp.ndarray arr
    cdef object a, value        # (objects: the tuple's slots take references to them)
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
        if flags & (EMPTY | ZEROS):
            if nmade == MAX_SLOTS:
                raise ValueError("not a plan of statescan._validate.plan")
            made[nmade], made_pos[nmade] = i, pos - 2
            nmade += 1
        if a is None:
            if not flags & (OPTIONAL | EMPTY | ZEROS):
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
            if shape[d] == 0:
                return None         # size 0: nothing for a compiled loop (the general path)
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
    if nmade and typenum < 0:
        return None                 # no array to take the dtype from
    out = PyTuple_New(nslots + nmade)
    for k in range(nslots):
        value = sizes[k]                                # -1: named only by absent arrays
        Py_INCREF(value)
        PyTuple_SET_ITEM(out, k, value)
    for k in range(nmade):
        a = arrays[made[k]]
        if a is None:
            a = _make(p, made_pos[k], nslots, sizes, dims, typenum)
            if a is None:
                return None
        Py_INCREF(a)
        PyTuple_SET_ITEM(out, nslots + k, a)
    return out


cdef object _make(const unsigned char* p, Py_ssize_t pos, Py_ssize_t nslots, Py_ssize_t* sizes,
                  cnp.npy_intp* dims, int typenum):
    """The array of the entry at `pos` (empty or zeros, C order), None when one of its sizes
    is unknown (named only by absent arrays)."""
    cdef int d, ndim = p[pos + 1]
    cdef Py_ssize_t k
    if ndim > MAX_SLOTS:
        raise ValueError("not a plan of statescan._validate.plan")
    for d in range(ndim):
        k = p[pos + 2 + d]
        if k >= nslots:            # ANY included: plan() names every axis of such an entry
            raise ValueError("not a plan of statescan._validate.plan")
        if sizes[k] < 0:
            return None
        dims[d] = sizes[k]
    if p[pos] & ZEROS:
        return cnp.PyArray_ZEROS(ndim, dims, typenum, 0)
    return cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
