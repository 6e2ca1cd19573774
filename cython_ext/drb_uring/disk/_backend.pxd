# The disk's backend contract: what the FUSE loop (_fuseloop) needs from
# whatever stores the bytes. A backend owns a pool of fixed-size slots
# (the loop reads a WRITE's payload straight into slots and answers a READ
# straight from them), takes requests on slots, and hands back completions
# carrying the 64-bit tag each request was given. Every method is called
# without the GIL, from the loop's one thread.
#
# A request larger than a slot never reaches a backend: the loop splits it
# into one request per slot. A backend may refuse a submission with
# -EAGAIN (its queue is full); the loop submits it again after reaping.
from libc.stdint cimport uint32_t, uint64_t, int64_t

cdef enum:
    DISK_READ = 0        # slot <- device[offset, offset+length)
    DISK_WRITE = 1       # device[offset, offset+length) <- slot
    DISK_FSYNC = 2       # no slot; flags: DISK_F_DATASYNC
    DISK_FALLOCATE = 3   # no slot; flags: the fallocate(2) mode
    DISK_NO_SLOT = 0xffffffff

cdef enum:
    DISK_F_DATASYNC = 1

cdef struct disk_cqe:
    uint64_t tag
    int64_t res          # bytes moved, or -errno


cdef class Backend:
    cdef char *base               # slot i is base + i * slot_size
    cdef uint32_t slot_size       # a multiple of the page size
    cdef uint32_t slot_count
    cdef uint64_t size            # bytes of the device the file shows
    cdef uint32_t ops             # 1 << DISK_* for each op it serves
    cdef uint32_t depth           # requests it holds at once (at most)

    cdef int submit(self, uint32_t op, uint32_t slot, uint64_t offset, uint64_t length,
                    uint32_t flags, uint64_t tag) noexcept nogil
    cdef int kick(self) noexcept nogil
    cdef int reap(self, disk_cqe *out, int max_n) noexcept nogil
    cdef int pollfd(self) noexcept nogil
    cdef int arm(self) noexcept nogil
    cdef void disarm(self) noexcept nogil
    cdef int notice_fd(self) noexcept nogil
