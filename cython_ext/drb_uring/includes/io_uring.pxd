# The kernel's io_uring ABI (uapi <linux/io_uring.h>), only the fields we use.
# The double ring stores these structs unchanged, so they are declared from
# the kernel header itself rather than re-described here.
from libc.stdint cimport uint8_t, uint16_t, int32_t, uint32_t, uint64_t

cdef extern from "<linux/io_uring.h>" nogil:
    struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t rw_flags
        uint32_t fsync_flags
        uint64_t user_data
        uint16_t buf_index
        uint16_t personality
        int32_t splice_fd_in
        uint32_t file_index
        uint64_t addr3

    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    enum:
        IORING_OP_NOP
        IORING_OP_READV
        IORING_OP_WRITEV
        IORING_OP_FSYNC
        IORING_OP_READ_FIXED
        IORING_OP_WRITE_FIXED
        IORING_OP_READ
        IORING_OP_WRITE
        IOSQE_FIXED_FILE
        IOSQE_IO_DRAIN
        IOSQE_IO_LINK
        IOSQE_ASYNC
