# A small cache of large, page-aligned memory blocks for statescan's arrays.
#
# Every call of a kernel allocates its outputs and intermediates (states saved for the
# backward, gradients of pre-activations, ...).  glibc returns large freed blocks to the OS, so
# the next call touches fresh pages and pays a page fault per 4 KiB -- expensive in a virtual
# machine, and at small batch sizes as costly as the arithmetic itself.  Blocks whose array has
# died come back here instead and are handed out again, already mapped.
cimport numpy as cnp
from cpython.ref cimport Py_INCREF
from libc.stdlib cimport free

cnp.import_array()

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef size_t GRANULE = 1 << 16          # block sizes are rounded up to 64 KiB
cdef size_t MIN_POOLED = 1 << 17       # smaller arrays use numpy's own allocator
cdef size_t max_cached = 256 << 20     # free bytes kept for reuse; beyond that, freed
cdef size_t cached = 0
cdef dict free_blocks = {}             # size -> list of addresses (as ints) of free blocks


cdef class _Block:
    """Owns one block; its death returns the block to the cache."""
    cdef void* ptr
    cdef size_t size

    def __dealloc__(self):
        global cached
        if cached + self.size <= max_cached:
            free_blocks.setdefault(self.size, []).append(<size_t> self.ptr)
            cached += self.size
        else:
            free(self.ptr)


cdef _Block take(size_t nbytes):
    global cached
    cdef size_t size = (nbytes + GRANULE - 1) // GRANULE * GRANULE
    cdef void* ptr = NULL
    cdef _Block block = _Block.__new__(_Block)
    stack = free_blocks.get(size)
    if stack:
        ptr = <void*> <size_t> stack.pop()
        cached -= size
    elif posix_memalign(&ptr, 4096, size) != 0:
        raise MemoryError(f"cannot allocate {nbytes} bytes")
    block.ptr, block.size = ptr, size
    return block


def empty(shape, dtype):
    """An uninitialised C-contiguous array, like numpy.empty, from the block cache."""
    cdef cnp.dtype descr = cnp.dtype(dtype)
    cdef cnp.npy_intp dims[8]
    cdef int nd = len(shape), i
    cdef size_t nbytes = descr.itemsize
    if nd > 8:
        raise ValueError("at most 8 dimensions")
    for i in range(nd):
        dims[i] = shape[i]
        nbytes *= <size_t> shape[i]
    if nbytes < MIN_POOLED:
        return cnp.PyArray_EMPTY(nd, dims, descr.type_num, 0)
    block = take(nbytes)
    arr = cnp.PyArray_SimpleNewFromData(nd, dims, descr.type_num, block.ptr)
    Py_INCREF(block)                    # PyArray_SetBaseObject steals a reference
    cnp.PyArray_SetBaseObject(arr, block)
    return arr


def zeros(shape, dtype):
    """Like numpy.zeros, from the block cache."""
    arr = empty(shape, dtype)
    arr.fill(0)
    return arr


def set_limit(size_t nbytes):
    """Keep at most `nbytes` of free blocks for reuse (0 disables the cache); returns the old limit."""
    global max_cached, cached
    old = max_cached
    max_cached = nbytes
    for size in list(free_blocks):
        stack = free_blocks[size]
        while stack and cached > max_cached:
            free(<void*> <size_t> stack.pop())
            cached -= size
    return old


def cached_bytes():
    """Bytes currently held in free blocks."""
    return cached
