# Declarations of cython_ext/drb_atomic.h (the reasons for each ordering are there).
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "drb_atomic.h" nogil:
    uint32_t drb_load_acquire(const uint32_t *p)
    void drb_store_release(uint32_t *p, uint32_t v)
    uint32_t drb_load_relaxed(const uint32_t *p)
    void drb_store_relaxed(uint32_t *p, uint32_t v)
    uint64_t drb_load_relaxed64(const uint64_t *p)
    void drb_store_relaxed64(uint64_t *p, uint64_t v)
    void drb_fence()
    void drb_fence_release()
    void drb_cpu_relax()
    uint64_t drb_now_ns()
