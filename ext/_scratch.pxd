# Per-thread scratch memory for the kernels' OpenMP regions: one convention for every .pyx.
#
#     with nogil, parallel(num_threads=n):
#         buf = <floating*> scratch_alloc(nbytes)      # one block per thread, carved by offsets
#         for job in prange(njobs, schedule="static"):
#             if buf == NULL:
#                 failed += 1                           # a reduction: safe from every thread
#             else:
#                 work(..., buf)
#         scratch_free(buf)
#     if failed:
#         raise MemoryError(...)
#
# The same two calls serve the single-threaded path (no parallel region for tiny work).
from libc.stdlib cimport malloc, free

cdef inline void* scratch_alloc(size_t nbytes) noexcept nogil:
    """malloc that never asks for 0 bytes (NULL then means failure, always)."""
    return malloc(nbytes if nbytes > 0 else 1)


cdef inline void scratch_free(void* p) noexcept nogil:
    free(p)
