"""BLAS for the kernels: inline sgemm/dgemm and sgemv/dgemv calls (scipy's cython_blas) and the
BLAS thread-count control that parallel-over-rows/experts phases need (defined in _blas.pyx)."""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv


cdef bint blas_threads_controllable() noexcept
cdef bint blas_single_enter()
cdef void blas_single_exit()


cdef inline void _gemm_beta(
    char ta, char tb, int m, int n, int k,
    const floating* a, int lda, const floating* b, int ldb, floating beta, floating* c, int ldc,
) noexcept nogil:
    """Column-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta C (row-major callers pass transposes)."""
    cdef floating one = 1
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &one, <float*>a, &lda, <float*>b, &ldb, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &one, <double*>a, &lda, <double*>b, &ldb, &beta, c, &ldc)


cdef inline void _gemm(
    char ta, char tb, int m, int n, int k,
    const floating* a, int lda, const floating* b, int ldb, floating* c, int ldc,
) noexcept nogil:
    """Column-major C[m, n] = op(A)[m, k] op(B)[k, n] (row-major callers pass transposes)."""
    _gemm_beta(ta, tb, m, n, k, a, lda, b, ldb, <floating>0, c, ldc)


cdef inline void _gemv(
    char ta, int m, int n, const floating* a, int lda, const floating* x, floating* y
) noexcept nogil:
    """Column-major y = op(A) x with A [m, n]."""
    cdef floating one = 1, zero = 0
    cdef int inc = 1
    if floating is float:
        sgemv(&ta, &m, &n, &one, <float*>a, &lda, <float*>x, &inc, &zero, y, &inc)
    else:
        dgemv(&ta, &m, &n, &one, <double*>a, &lda, <double*>x, &inc, &zero, y, &inc)
