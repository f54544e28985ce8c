"""What the compiled kernels were built for and what this CPU runs (see _cpu.h).

Built twice like every kernel module: statescan._dispatch asks the portable build about the
CPU before it imports any native module."""

cdef extern from "_cpu.h":
    int statescan_compiled_features(const char **out) nogil
    int statescan_runtime_features(const char **out) nogil
    int statescan_openmp() nogil


cdef tuple _names(const char **names, int n):
    return tuple(names[k].decode("ascii") for k in range(n))


def compiled_features():
    """The ISA extensions this module was compiled for, as a tuple of names."""
    cdef const char *names[64]
    return _names(names, statescan_compiled_features(names))


def runtime_features():
    """The ISA extensions the running CPU supports (x86), or None when it cannot be asked here."""
    cdef const char *names[64]
    cdef int n = statescan_runtime_features(names)
    return None if n < 0 else _names(names, n)


def openmp():
    """The OpenMP version (the _OPENMP date) the module was compiled with, 0 without OpenMP."""
    return statescan_openmp()
