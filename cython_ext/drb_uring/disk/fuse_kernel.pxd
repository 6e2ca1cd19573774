# The FUSE wire protocol, kernel ABI 7.45 (uapi <linux/fuse.h>), only what a
# single-file export needs. Debian 12's <linux/fuse.h> is 7.38 (no
# FUSE_NOTIFY_RESEND, nothing of FUSE over io_uring), so the structs are
# written out here, once; every field is naturally aligned, so the C
# compiler lays them out exactly as the kernel does. tests/test_fuse_proto.py
# checks every size and offset against the literal values of the header.
from libc.stdint cimport uint8_t, uint16_t, int32_t, uint32_t, int64_t, uint64_t

cdef enum:
    FUSE_KERNEL_VERSION = 7
    FUSE_KERNEL_MINOR_VERSION = 45
    FUSE_ROOT_ID = 1
    FUSE_MIN_READ_BUFFER = 8192

# enum fuse_opcode
cdef enum:
    FUSE_LOOKUP = 1
    FUSE_FORGET = 2
    FUSE_GETATTR = 3
    FUSE_SETATTR = 4
    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_WRITE = 16
    FUSE_STATFS = 17
    FUSE_RELEASE = 18
    FUSE_FSYNC = 20
    FUSE_FLUSH = 25
    FUSE_INIT = 26
    FUSE_ACCESS = 34
    FUSE_INTERRUPT = 36
    FUSE_DESTROY = 38
    FUSE_BATCH_FORGET = 42
    FUSE_FALLOCATE = 43

# enum fuse_notify_code
cdef enum:
    FUSE_NOTIFY_RESEND = 7

# INIT flags (flags; bits 32..63 travel in flags2)
cdef enum:
    FUSE_ASYNC_READ = 1 << 0
    FUSE_ATOMIC_O_TRUNC = 1 << 3
    FUSE_BIG_WRITES = 1 << 5
    FUSE_ASYNC_DIO = 1 << 15
    FUSE_PARALLEL_DIROPS = 1 << 18
    FUSE_ABORT_ERROR = 1 << 21
    FUSE_MAX_PAGES = 1 << 22
    FUSE_INIT_EXT = 1 << 30

cdef extern from *:
    """
    #define DRB_FUSE_HAS_RESEND       (1ULL << 39)
    #define DRB_FUSE_OVER_IO_URING    (1ULL << 41)
    #define DRB_FUSE_UNIQUE_RESEND    (1ULL << 63)
    """
    const uint64_t FUSE_HAS_RESEND "DRB_FUSE_HAS_RESEND"
    const uint64_t FUSE_OVER_IO_URING "DRB_FUSE_OVER_IO_URING"
    # The kernel sets this bit in `unique` of a request it sends again
    # after FUSE_NOTIFY_RESEND; the answer carries `unique` unchanged.
    const uint64_t FUSE_UNIQUE_RESEND "DRB_FUSE_UNIQUE_RESEND"

# OPEN reply flags
cdef enum:
    FOPEN_DIRECT_IO = 1 << 0
    FOPEN_KEEP_CACHE = 1 << 1
    FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# SETATTR valid bits
cdef enum:
    FATTR_MODE = 1 << 0
    FATTR_UID = 1 << 1
    FATTR_GID = 1 << 2
    FATTR_SIZE = 1 << 3
    FATTR_ATIME = 1 << 4
    FATTR_MTIME = 1 << 5
    FATTR_FH = 1 << 6
    FATTR_ATIME_NOW = 1 << 7
    FATTR_MTIME_NOW = 1 << 8
    FATTR_LOCKOWNER = 1 << 9
    FATTR_CTIME = 1 << 10
    FATTR_KILL_SUIDGID = 1 << 11

cdef enum:
    FUSE_FSYNC_FDATASYNC = 1 << 0

# FUSE over io_uring (7.42)
cdef enum:
    FUSE_URING_IN_OUT_HEADER_SZ = 128
    FUSE_URING_OP_IN_OUT_SZ = 128
    FUSE_IO_URING_CMD_REGISTER = 1
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2


cdef struct fuse_attr:
    uint64_t ino
    uint64_t size
    uint64_t blocks
    uint64_t atime
    uint64_t mtime
    uint64_t ctime
    uint32_t atimensec
    uint32_t mtimensec
    uint32_t ctimensec
    uint32_t mode
    uint32_t nlink
    uint32_t uid
    uint32_t gid
    uint32_t rdev
    uint32_t blksize
    uint32_t flags

cdef struct fuse_kstatfs:
    uint64_t blocks
    uint64_t bfree
    uint64_t bavail
    uint64_t files
    uint64_t ffree
    uint32_t bsize
    uint32_t namelen
    uint32_t frsize
    uint32_t padding
    uint32_t spare[6]

cdef struct fuse_in_header:
    uint32_t len
    uint32_t opcode
    uint64_t unique
    uint64_t nodeid
    uint32_t uid
    uint32_t gid
    uint32_t pid
    uint16_t total_extlen
    uint16_t padding

cdef struct fuse_out_header:
    uint32_t len
    int32_t error
    uint64_t unique

cdef struct fuse_init_in:
    uint32_t major
    uint32_t minor
    uint32_t max_readahead
    uint32_t flags
    uint32_t flags2
    uint32_t unused[11]

cdef struct fuse_init_out:
    uint32_t major
    uint32_t minor
    uint32_t max_readahead
    uint32_t flags
    uint16_t max_background
    uint16_t congestion_threshold
    uint32_t max_write
    uint32_t time_gran
    uint16_t max_pages
    uint16_t map_alignment
    uint32_t flags2
    uint32_t max_stack_depth
    uint16_t request_timeout
    uint16_t unused[11]

cdef struct fuse_getattr_in:
    uint32_t getattr_flags
    uint32_t dummy
    uint64_t fh

cdef struct fuse_attr_out:
    uint64_t attr_valid
    uint32_t attr_valid_nsec
    uint32_t dummy
    fuse_attr attr

cdef struct fuse_entry_out:
    uint64_t nodeid
    uint64_t generation
    uint64_t entry_valid
    uint64_t attr_valid
    uint32_t entry_valid_nsec
    uint32_t attr_valid_nsec
    fuse_attr attr

cdef struct fuse_setattr_in:
    uint32_t valid
    uint32_t padding
    uint64_t fh
    uint64_t size
    uint64_t lock_owner
    uint64_t atime
    uint64_t mtime
    uint64_t ctime
    uint32_t atimensec
    uint32_t mtimensec
    uint32_t ctimensec
    uint32_t mode
    uint32_t unused4
    uint32_t uid
    uint32_t gid
    uint32_t unused5

cdef struct fuse_open_in:
    uint32_t flags
    uint32_t open_flags

cdef struct fuse_open_out:
    uint64_t fh
    uint32_t open_flags
    int32_t backing_id

cdef struct fuse_release_in:
    uint64_t fh
    uint32_t flags
    uint32_t release_flags
    uint64_t lock_owner

cdef struct fuse_flush_in:
    uint64_t fh
    uint32_t unused
    uint32_t padding
    uint64_t lock_owner

cdef struct fuse_read_in:
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t read_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct fuse_write_in:
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t write_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct fuse_write_out:
    uint32_t size
    uint32_t padding

cdef struct fuse_statfs_out:
    fuse_kstatfs st

cdef struct fuse_fsync_in:
    uint64_t fh
    uint32_t fsync_flags
    uint32_t padding

cdef struct fuse_access_in:
    uint32_t mask
    uint32_t padding

cdef struct fuse_interrupt_in:
    uint64_t unique

cdef struct fuse_forget_in:
    uint64_t nlookup

cdef struct fuse_batch_forget_in:
    uint32_t count
    uint32_t dummy

cdef struct fuse_fallocate_in:
    uint64_t fh
    uint64_t offset
    uint64_t length
    uint32_t mode
    uint32_t padding

cdef struct fuse_uring_ent_in_out:
    uint64_t flags
    uint64_t commit_id
    uint32_t payload_sz
    uint32_t padding
    uint64_t reserved

cdef struct fuse_uring_req_header:
    char in_out[FUSE_URING_IN_OUT_HEADER_SZ]
    char op_in[FUSE_URING_OP_IN_OUT_SZ]
    fuse_uring_ent_in_out ring_ent_in_out

# In the command area of a 128-byte SQE (sqe->cmd, byte 48).
cdef struct fuse_uring_cmd_req:
    uint64_t flags
    uint64_t commit_id
    uint16_t qid
    uint8_t padding[6]
