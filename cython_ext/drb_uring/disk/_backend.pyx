# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Disk backends (drb_uring.disk._backend).

:class:`Backend` is the contract the FUSE loop drives (declared in
_backend.pxd); its Python methods ``call`` and ``slot`` exercise any backend
one request at a time, so every backend can be tested the same way.

:class:`LocalFile` serves a local file with io_uring: the pool is registered
as one fixed buffer per slot and the file as fixed file 0, so a request is
one READ_FIXED / WRITE_FIXED with no page pinning per I/O, and every batch
the loop hands over goes in one io_uring_enter. It is the "fuse-local"
baseline: what FUSE costs with nothing but a file behind it.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_WRITE

from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe, IOSQE_FIXED_FILE
from drb_uring.includes.liburing cimport (io_uring, io_uring_queue_exit, io_uring_get_sqe,
                                          io_uring_submit, io_uring_peek_batch_cqe,
                                          io_uring_cq_advance, io_uring_cq_ready, iovec,
                                          io_uring_queue_init, io_uring_register_buffers,
                                          io_uring_register_files, io_uring_prep_read_fixed,
                                          io_uring_prep_write_fixed, io_uring_prep_fsync,
                                          io_uring_prep_fallocate, io_uring_sq_ready,
                                          io_uring_sqe_set_data64, IORING_FSYNC_DATASYNC)
from drb_uring.includes.sys cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_POPULATE,
                                     MAP_FAILED, pollfd, ppoll, timespec, POLLIN)

import os
import warnings

cdef extern from "<sys/mman.h>" nogil:
    int MAP_PRIVATE
    int MAP_ANONYMOUS

cdef extern from "<errno.h>" nogil:
    int ENOSYS
    int EAGAIN
    int EINVAL

OPS = {"read": DISK_READ, "write": DISK_WRITE, "fsync": DISK_FSYNC,
       "fallocate": DISK_FALLOCATE}
NO_SLOT = 0xffffffff      # DISK_NO_SLOT (a C enum would read back as -1)
F_DATASYNC = DISK_F_DATASYNC


def _check(int ret, what):
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


cdef class Backend:
    """The contract; a subclass fills base/slot_size/slot_count/size/ops/depth
    and overrides every cdef method."""

    cdef int submit(self, uint32_t op, uint32_t slot, uint64_t offset, uint64_t length,
                    uint32_t flags, uint64_t tag) noexcept nogil:
        return -ENOSYS

    cdef int kick(self) noexcept nogil:
        """Make every submission so far go (a batch per system call)."""
        return 0

    cdef int reap(self, disk_cqe *out, int max_n) noexcept nogil:
        """Up to max_n completions, without waiting; their count."""
        return 0

    cdef int pollfd(self) noexcept nogil:
        """A descriptor that polls readable when completions may be waiting."""
        return -1

    cdef int arm(self) noexcept nogil:
        """The loop is about to sleep on pollfd(): do what makes the next
        completion wake it (a NEED_WAKEUP flag and its re-check), and return
        1 if a completion is already there (then it does not sleep)."""
        return 0

    cdef void disarm(self) noexcept nogil:
        pass

    cdef int notice_fd(self) noexcept nogil:
        """A descriptor that polls readable when the backend has something
        only Python can handle (the loop then pauses, and run() says
        "notice"), or -1."""
        return -1

    # -- for tests and tools: one request at a time, from Python ----------

    @property
    def slot_size(self):
        return self.slot_size

    @property
    def slot_count(self):
        return self.slot_count

    @property
    def size(self):
        return self.size

    @property
    def ops(self):
        return {name for name, op in OPS.items() if self.ops & (1 << op)}

    def slot(self, uint32_t i):
        """The slot's memory, writable (the backend's own pool)."""
        if i >= self.slot_count:
            raise IndexError(i)
        return PyMemoryView_FromMemory(self.base + <size_t>i * self.slot_size,
                                       self.slot_size, PyBUF_WRITE)

    def call(self, op, uint32_t slot, uint64_t offset, uint64_t length, uint32_t flags=0,
             uint64_t tag=0x5eed):
        """Submit one request, wait for its completion, return its result
        (bytes moved); a -errno result raises OSError."""
        cdef disk_cqe c
        cdef int n, ret
        cdef pollfd p
        cdef timespec ts
        cdef uint32_t code = OPS[op] if isinstance(op, str) else op
        ret = self.submit(code, slot, offset, length, flags, tag)
        _check(ret, f"submit {op}")
        _check(self.kick(), "kick")
        ts.tv_sec = 1
        ts.tv_nsec = 0
        while True:
            n = self.reap(&c, 1)
            _check(n, "reap")
            if n == 1:
                break
            if self.arm() == 0:
                p.fd = self.pollfd()
                p.events = POLLIN
                with nogil:
                    ppoll(&p, 1, &ts, NULL)
            self.disarm()
            _check(self.kick(), "kick")
        if c.tag != tag:
            raise RuntimeError(f"completion for tag {c.tag:#x}, expected {tag:#x}")
        return _check(<int>c.res, op)


cdef unsigned _pow2(unsigned n) noexcept:
    cdef unsigned p = 1
    while p < n:
        p <<= 1
    return p


cdef class LocalFile(Backend):
    """A local file (or block device) through io_uring, with a pool of
    `slot_count` slots of `slot_size` bytes registered as fixed buffers.

    `direct` opens the file with O_DIRECT: then every request must keep the
    file's alignment (the FUSE file shows st_blksize 4096, which ext4 and
    tmpfs callers follow; one that does not gets EINVAL)."""
    cdef io_uring ring
    cdef int fd
    cdef bint ring_up
    cdef size_t pool_bytes
    cdef readonly str path
    cdef readonly bint direct

    def __cinit__(self):
        self.fd = -1
        self.base = NULL

    def __init__(self, path, *, size=None, uint32_t slot_size=128 * 1024,
                 uint32_t slot_count=256, bint direct=False):
        cdef iovec *iov = NULL
        cdef int ret, fd
        cdef uint32_t i
        if slot_size == 0 or slot_size % 4096:
            raise ValueError(f"slot_size {slot_size} is not a multiple of 4096")
        if not 1 <= slot_count <= 16384:
            raise ValueError(f"slot_count {slot_count} is not in 1..16384")
        self.path = os.fspath(path)
        self.direct = direct
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        st = os.fstat(self.fd)
        real = st.st_size
        if not real:
            import fcntl
            import struct
            try:     # a block device: BLKGETSIZE64
                real = struct.unpack("Q", fcntl.ioctl(self.fd, 0x80081272, b"\0" * 8))[0]
            except OSError:
                pass
        if size is None:
            size = real
        if size > real:
            self.close()
            raise ValueError(f"{self.path} has {real} bytes, fewer than {size}")
        self.size = size
        self.slot_size = slot_size
        self.slot_count = slot_count
        self.ops = (1 << DISK_READ) | (1 << DISK_WRITE) | (1 << DISK_FSYNC) | \
            (1 << DISK_FALLOCATE)
        # Requests in flight never exceed the ring: one per slot, plus the
        # flushes the loop allows beside them.
        self.depth = _pow2(slot_count + 64)
        self.pool_bytes = <size_t>slot_size * slot_count
        # Populated now so that no request ever faults on its slot: a fault
        # while the kernel copies a FUSE request in is where a dying server
        # would turn a request into EIO for the application.
        self.base = <char *>mmap(NULL, self.pool_bytes, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        if <void *>self.base == MAP_FAILED:
            self.base = NULL
            self.close()
            raise MemoryError(f"mmap of a {self.pool_bytes}-byte pool")
        ret = io_uring_queue_init(self.depth, &self.ring, 0)
        if ret < 0:
            self.close()
            _check(ret, "io_uring_queue_init")
        self.ring_up = True
        iov = <iovec *>calloc(slot_count, sizeof(iovec))
        if iov == NULL:
            self.close()
            raise MemoryError()
        try:
            for i in range(slot_count):
                iov[i].iov_base = self.base + <size_t>i * slot_size
                iov[i].iov_len = slot_size
            ret = io_uring_register_buffers(&self.ring, iov, slot_count)
        finally:
            free(iov)
        if ret < 0:
            self.close()
            _check(ret, "io_uring_register_buffers")
        fd = self.fd
        ret = io_uring_register_files(&self.ring, &fd, 1)
        if ret < 0:
            self.close()
            _check(ret, "io_uring_register_files")

    cdef int submit(self, uint32_t op, uint32_t slot, uint64_t offset, uint64_t length,
                    uint32_t flags, uint64_t tag) noexcept nogil:
        cdef io_uring_sqe *sqe
        if op > DISK_FALLOCATE:
            return -EINVAL
        if op <= DISK_WRITE and (slot >= self.slot_count or length > self.slot_size):
            return -EINVAL
        sqe = io_uring_get_sqe(&self.ring)
        if sqe == NULL:
            return -EAGAIN
        if op == DISK_READ:
            io_uring_prep_read_fixed(sqe, 0, self.base + <size_t>slot * self.slot_size,
                                     <unsigned>length, offset, <int>slot)
        elif op == DISK_WRITE:
            io_uring_prep_write_fixed(sqe, 0, self.base + <size_t>slot * self.slot_size,
                                      <unsigned>length, offset, <int>slot)
        elif op == DISK_FSYNC:
            io_uring_prep_fsync(sqe, 0, IORING_FSYNC_DATASYNC if flags & DISK_F_DATASYNC else 0)
        else:
            io_uring_prep_fallocate(sqe, 0, <int>flags, offset, length)
        sqe.flags |= IOSQE_FIXED_FILE
        io_uring_sqe_set_data64(sqe, tag)
        return 0

    cdef int kick(self) noexcept nogil:
        if io_uring_sq_ready(&self.ring) == 0:
            return 0
        return io_uring_submit(&self.ring)

    cdef int reap(self, disk_cqe *out, int max_n) noexcept nogil:
        cdef io_uring_cqe *cqes[64]
        cdef unsigned n, i
        if max_n > 64:
            max_n = 64
        n = io_uring_peek_batch_cqe(&self.ring, cqes, <unsigned>max_n)
        for i in range(n):
            out[i].tag = cqes[i].user_data
            out[i].res = cqes[i].res
        io_uring_cq_advance(&self.ring, n)
        return <int>n

    cdef int pollfd(self) noexcept nogil:
        return self.ring.ring_fd

    cdef int arm(self) noexcept nogil:
        # The ring's fd polls readable while its CQ holds entries, so there
        # is no flag to set: only what is already there matters.
        return 1 if io_uring_cq_ready(&self.ring) else 0

    def close(self):
        if self.ring_up:
            io_uring_queue_exit(&self.ring)
            self.ring_up = False
        if self.base != NULL:
            munmap(self.base, self.pool_bytes)
            self.base = NULL
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self.fd >= 0 or self.ring_up or self.base != NULL:
            warnings.warn(f"LocalFile({self.path!r}) was not closed", ResourceWarning)
            if self.ring_up:
                io_uring_queue_exit(&self.ring)
            if self.base != NULL:
                munmap(self.base, self.pool_bytes)
            if self.fd >= 0:
                os.close(self.fd)
