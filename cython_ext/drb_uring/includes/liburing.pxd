# liburing (Debian liburing-dev 2.3): the hot-path subset the backend worker
# uses on its grant ring. Control-plane registration goes through raw
# io_uring_register (see _grant.pyx): 2.3 does not export those helpers.
from libc.stdint cimport uint32_t, uint64_t
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe

cdef extern from "<linux/io_uring.h>" nogil:
    struct io_uring_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t features

    enum:
        IORING_SETUP_R_DISABLED
        IORING_REGISTER_BUFFERS
        IORING_REGISTER_FILES
        IORING_REGISTER_RESTRICTIONS
        IORING_REGISTER_ENABLE_RINGS
        IORING_RESTRICTION_REGISTER_OP
        IORING_RESTRICTION_SQE_OP
        IORING_RESTRICTION_SQE_FLAGS_ALLOWED
        IORING_RESTRICTION_SQE_FLAGS_REQUIRED

    struct io_uring_restriction:
        unsigned short opcode
        unsigned char register_op
        unsigned char sqe_op
        unsigned char sqe_flags

cdef extern from "<liburing.h>" nogil:
    struct io_uring_sq:
        unsigned *khead
        unsigned *ktail
        unsigned *array
        unsigned *kring_entries
        unsigned sqe_head
        unsigned sqe_tail

    struct io_uring_cq:
        unsigned *khead
        unsigned *ktail

    struct io_uring:
        io_uring_sq sq
        io_uring_cq cq
        int ring_fd
        unsigned features

    int io_uring_queue_mmap(int fd, io_uring_params *p, io_uring *ring)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    unsigned io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes, unsigned count)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)
    unsigned io_uring_cq_ready(const io_uring *ring)
    unsigned io_uring_sq_space_left(const io_uring *ring)

# IORING_SETUP_NO_SQARRAY, from <linux/io_uring.h> of 6.6+ (Debian 12's
# headers are older): the ring has no SQ index array.
cdef enum:
    DRB_SETUP_NO_SQARRAY = 1 << 16


cdef inline void sq_array_identity(io_uring *ring, uint32_t setup_flags) noexcept nogil:
    """io_uring_queue_mmap (unlike queue_init) leaves the SQ index array as
    the kernel made it, all zeros: map slot i to SQE i, or every submission
    would name SQE 0. A ring without the array (NO_SQARRAY) is left alone:
    liburing 2.3 then points `array` at the ring's start, not to be written."""
    cdef unsigned i
    if setup_flags & DRB_SETUP_NO_SQARRAY:
        return
    for i in range(ring.sq.kring_entries[0]):
        ring.sq.array[i] = i


# Waiting with a timeout, for the `direct` baseline (the user side driving
# an io_uring on the device itself).
cdef extern from "<liburing.h>" nogil:
    struct __kernel_timespec:
        long long tv_sec
        long long tv_nsec
    struct iovec:
        void *iov_base
        size_t iov_len
    int io_uring_submit_and_wait(io_uring *ring, unsigned wait_nr)
    int io_uring_wait_cqe_timeout(io_uring *ring, io_uring_cqe **cqe_ptr, __kernel_timespec *ts)


# The disk's local backend and FUSE-over-io_uring loop (drb_uring.disk):
# a ring of their own, fixed buffers and files, and 128-byte SQEs.
cdef extern from "<linux/io_uring.h>" nogil:
    enum:
        IORING_SETUP_SQE128
        IORING_SETUP_CQSIZE
        IORING_FSYNC_DATASYNC
        IORING_OP_URING_CMD

cdef extern from "<liburing.h>" nogil:
    int io_uring_queue_init(unsigned entries, io_uring *ring, unsigned flags)
    int io_uring_queue_init_params(unsigned entries, io_uring *ring, io_uring_params *p)
    int io_uring_register_buffers(io_uring *ring, const iovec *iovecs, unsigned nr_iovecs)
    int io_uring_register_files(io_uring *ring, const int *files, unsigned nr_files)
    unsigned io_uring_sq_ready(const io_uring *ring)
    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    void io_uring_prep_read_fixed(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                                  uint64_t offset, int buf_index)
    void io_uring_prep_write_fixed(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                                   uint64_t offset, int buf_index)
    void io_uring_prep_fsync(io_uring_sqe *sqe, int fd, unsigned fsync_flags)
    void io_uring_prep_fallocate(io_uring_sqe *sqe, int fd, int mode, uint64_t offset,
                                 uint64_t len)
