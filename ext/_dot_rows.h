/* out += A x for a row-major m x m matrix A: one dot product per row (parallel.pyx's
 * matvec_acc).  `omp simd` lets the compiler vectorise the reduction: a fixed order for a
 * given build, whatever the thread count. */
#ifndef STATESCAN_DOT_ROWS_H
#define STATESCAN_DOT_ROWS_H
#include <Python.h>

#define STATESCAN_DOT_ROWS(T, NAME)                                              \
static inline void NAME(Py_ssize_t m, const T* A, const T* x, T* out) {          \
    for (Py_ssize_t i = 0; i < m; i++) {                                          \
        T acc = 0;                                                                \
        _Pragma("omp simd reduction(+:acc)")                                      \
        for (Py_ssize_t j = 0; j < m; j++) acc += A[i * m + j] * x[j];            \
        out[i] += acc;                                                            \
    }                                                                             \
}
STATESCAN_DOT_ROWS(float, statescan_dot_rows_f)
STATESCAN_DOT_ROWS(double, statescan_dot_rows_d)

#endif
