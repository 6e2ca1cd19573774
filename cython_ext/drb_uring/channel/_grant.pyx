# cython: language_level=3
"""The grant ring's control plane (drb_uring._grant), used by the monitor.

A grant ring is a real io_uring created disabled, given the user's data pool
as fixed buffers (one per slot) and the driver's device as fixed file 0,
restricted to the data opcodes with IOSQE_FIXED_FILE required and no
register operation, then enabled. The process that gets it can only do
bounds-checked fixed-buffer I/O into the pool.

Raw system calls throughout: every failure is the errno the call returned.
"""
import os

from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, free
from posix.uio cimport iovec

from drb_uring.includes.sys cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED, errno
from drb_uring.includes.liburing cimport (io_uring_params, io_uring_restriction, IORING_SETUP_R_DISABLED,
                                IORING_REGISTER_BUFFERS, IORING_REGISTER_FILES,
                                IORING_REGISTER_RESTRICTIONS, IORING_REGISTER_ENABLE_RINGS,
                                IORING_RESTRICTION_SQE_OP, IORING_RESTRICTION_SQE_FLAGS_ALLOWED,
                                IORING_RESTRICTION_SQE_FLAGS_REQUIRED)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_io_uring_setup
    long SYS_io_uring_register

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

# From <linux/io_uring.h>, exported so tests can check them against literals.
SETUP_R_DISABLED = IORING_SETUP_R_DISABLED
REGISTER_BUFFERS = IORING_REGISTER_BUFFERS
REGISTER_FILES = IORING_REGISTER_FILES
REGISTER_RESTRICTIONS = IORING_REGISTER_RESTRICTIONS
REGISTER_ENABLE_RINGS = IORING_REGISTER_ENABLE_RINGS
PARAMS_SIZE = sizeof(io_uring_params)


cdef object _err(str what):
    cdef int e = errno
    return OSError(e, f"{what}: {os.strerror(e)}")


# <linux/io_uring.h> of 6.6+ (Debian 12's headers are older).
SETUP_NO_SQARRAY = 1 << 16


def setup_disabled(uint32_t entries):
    """Create a disabled io_uring; returns (fd, params bytes for
    io_uring_queue_mmap in the process that will use it). It has no SQ
    index array (IORING_SETUP_NO_SQARRAY): the kernel then takes every
    submission it is given, so its own counts of what it took and what it
    completed (the ring's fdinfo) say exactly what is still in flight."""
    cdef io_uring_params p
    memset(&p, 0, sizeof(p))
    p.flags = IORING_SETUP_R_DISABLED | SETUP_NO_SQARRAY
    cdef long fd = syscall(SYS_io_uring_setup, <long>entries, &p)
    if fd < 0:
        raise _err("io_uring_setup")
    return <int>fd, (<char *>&p)[:sizeof(p)]


def register(int ring_fd, unsigned opcode, arg, unsigned nr):
    """Raw io_uring_register with a bytes-like argument (or None). Returns
    0 or more on success, the negative errno on failure (never raises), so
    callers and tests see exactly what the kernel said."""
    cdef Py_buffer view
    cdef long r
    cdef int e = 0
    if arg is None:
        r = syscall(SYS_io_uring_register, ring_fd, <long>opcode, NULL, <long>nr)
        return r if r >= 0 else -errno
    PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE)
    try:
        r = syscall(SYS_io_uring_register, ring_fd, <long>opcode, view.buf, <long>nr)
        if r < 0:
            e = errno
    finally:
        PyBuffer_Release(&view)
    return r if r >= 0 else -e


def register_pool(int ring_fd, int pool_fd, uint32_t slot_size, uint32_t slot_count):
    """Map the pool, register each slot as fixed buffer `slot`, unmap it.
    Returns the base address the registration used: requests must address
    the pool at base + slot * slot_size, and the kernel checks each request
    against its slot's range. Once unmapped here nobody maps the pool but
    its owner; the registration holds the pages."""
    cdef size_t size = <size_t>slot_size * slot_count
    cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, pool_fd, 0)
    if base == MAP_FAILED:
        raise _err("mmap of the data pool")
    cdef iovec *iov = <iovec *>malloc(sizeof(iovec) * slot_count)
    cdef uint32_t i
    cdef long r
    cdef int e = 0
    if iov == NULL:
        munmap(base, size)
        raise MemoryError()
    for i in range(slot_count):
        iov[i].iov_base = <char *>base + <size_t>i * slot_size
        iov[i].iov_len = slot_size
    r = syscall(SYS_io_uring_register, ring_fd, <long>IORING_REGISTER_BUFFERS, iov, <long>slot_count)
    if r < 0:
        e = errno
    free(iov)
    munmap(base, size)
    if r < 0:
        raise OSError(e, f"registering the data pool as fixed buffers: {os.strerror(e)}")
    return <uint64_t>base


def register_device(int ring_fd, int dev_fd):
    cdef int fds[1]
    fds[0] = dev_fd
    cdef long r = syscall(SYS_io_uring_register, ring_fd, <long>IORING_REGISTER_FILES, fds, 1)
    if r < 0:
        raise _err("registering the device as a fixed file")


def restrict(int ring_fd, sqe_ops, uint8_t flags_allowed, uint8_t flags_required):
    """Allow only `sqe_ops`, the given SQE flags, and no register op."""
    cdef list ops = list(sqe_ops)
    cdef uint32_t n = len(ops) + 2
    cdef io_uring_restriction *res = <io_uring_restriction *>malloc(sizeof(io_uring_restriction) * n)
    cdef uint32_t i
    cdef long r
    cdef int e = 0
    if res == NULL:
        raise MemoryError()
    memset(res, 0, sizeof(io_uring_restriction) * n)
    for i in range(len(ops)):
        res[i].opcode = IORING_RESTRICTION_SQE_OP
        res[i].sqe_op = ops[i]
    res[n - 2].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED
    res[n - 2].sqe_flags = flags_allowed
    res[n - 1].opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED
    res[n - 1].sqe_flags = flags_required
    r = syscall(SYS_io_uring_register, ring_fd, <long>IORING_REGISTER_RESTRICTIONS, res, <long>n)
    if r < 0:
        e = errno
    free(res)
    if r < 0:
        raise OSError(e, f"registering restrictions: {os.strerror(e)}")


def enable(int ring_fd):
    cdef long r = syscall(SYS_io_uring_register, ring_fd, <long>IORING_REGISTER_ENABLE_RINGS, NULL, 0)
    if r < 0:
        raise _err("enabling the grant ring")


# <linux/io_uring.h> of 6.13+ (Debian 12's headers are older).
IORING_REGISTER_CLONE_BUFFERS = 30


def clone_buffers(int ring_fd, int src_ring_fd):
    """Give a new (disabled) ring the fixed buffers of another, the same
    pages at the same addresses: how the broker rebuilds a grant ring
    without the pool, which it never keeps."""
    import struct
    r = register(ring_fd, IORING_REGISTER_CLONE_BUFFERS,
                 struct.pack("<8I", src_ring_fd, 0, 0, 0, 0, 0, 0, 0), 1)
    if r < 0:
        raise OSError(-r, f"cloning the pool's fixed buffers: {os.strerror(-r)}")
