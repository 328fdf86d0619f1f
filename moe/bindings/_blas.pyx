"""The thread count of the BLAS behind scipy's cython_blas, for phases that run BLAS calls from
several OpenMP threads at once (one single-threaded call per thread needs no synchronisation;
OpenBLAS's own pool would fight the OpenMP team for the cores).

The setter is found through the library that holds sgemm (dladdr + dlsym of
`openblas_set_num_threads` under its scipy-openblas names). Without it (a BLAS other than
OpenBLAS) `blas_single_enter` returns False and callers run their BLAS calls serially.
"""

from scipy.linalg.cython_blas cimport sgemm


cdef extern from "<dlfcn.h>" nogil:
    ctypedef struct Dl_info:
        const char* dli_fname
    int dladdr(const void* addr, Dl_info* info)
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    int dlclose(void* handle)
    int RTLD_LAZY
    int RTLD_NOLOAD

ctypedef void (*set_threads_fn)(int) noexcept nogil
ctypedef int (*get_threads_fn)() noexcept nogil

cdef set_threads_fn _blas_set = NULL
cdef get_threads_fn _blas_get = NULL
cdef int _blas_depth = 0
cdef int _blas_saved = 1
_blas_symbol = None

_THREAD_SYMBOLS = [
    (b"scipy_openblas_set_num_threads", b"scipy_openblas_get_num_threads"),
    (b"scipy_openblas_set_num_threads64_", b"scipy_openblas_get_num_threads64_"),
    (b"openblas_set_num_threads", b"openblas_get_num_threads"),
    (b"openblas_set_num_threads64_", b"openblas_get_num_threads64_"),
]


cdef void _find_blas_threads():
    """Look up the thread-count setter of the BLAS that scipy's cython_blas calls into."""
    global _blas_set, _blas_get, _blas_symbol
    cdef Dl_info info
    cdef void* handle
    cdef void* s
    cdef void* g
    if dladdr(<const void*>sgemm, &info) == 0 or info.dli_fname == NULL:
        return
    handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)  # already loaded: no new load
    if handle == NULL:
        return
    for set_name, get_name in _THREAD_SYMBOLS:
        s = dlsym(handle, <const char*>set_name)
        g = dlsym(handle, <const char*>get_name)
        if s != NULL and g != NULL:
            _blas_set = <set_threads_fn>s
            _blas_get = <get_threads_fn>g
            _blas_symbol = set_name.decode()
            break
    dlclose(handle)


_find_blas_threads()


cdef bint blas_threads_controllable() noexcept:
    return _blas_set != NULL


cdef bint blas_single_enter():
    """BLAS to one thread for a phase that calls it from several threads. Runs with the GIL
    held, so the depth count is safe across Python threads; the outermost caller restores."""
    global _blas_depth, _blas_saved
    if _blas_set == NULL:
        return False
    if _blas_depth == 0:
        _blas_saved = _blas_get()
        if _blas_saved != 1:
            _blas_set(1)
    _blas_depth += 1
    return True


cdef void blas_single_exit():
    global _blas_depth
    _blas_depth -= 1
    if _blas_depth == 0 and _blas_saved != 1:
        _blas_set(_blas_saved)


def blas_thread_info() -> dict:
    """The setter found (or None) and the BLAS's current thread count: for reports."""
    return {
        "blas_thread_control": _blas_symbol,
        "blas_threads": _blas_get() if _blas_get != NULL else None,
    }
