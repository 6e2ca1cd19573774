# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The FUSE server's loop for a single-file export (drb_uring.disk._fuseloop).

One thread, without the GIL. It reads requests from the /dev/fuse
descriptor until none is left (the descriptor is non-blocking), hands
READ, WRITE, FSYNC and FALLOCATE to a :class:`Backend` with many in flight,
and answers each by its ``unique`` as its completions come, in whatever
order. Everything else (INIT, GETATTR, OPEN, ...) is answered at once.

No copy where the kernel allows none: each request is read with readv into
a small header area followed by backend slots, so a WRITE's payload lands in
the slots it is written from, and a READ is answered with writev straight
from the slots it was read into. A request larger than a slot is split into
one backend request per slot.

Whom it distrusts: the kernel's requests are checked for length against
what their opcode needs before any field is used; the backend's completions
are matched against the tag, generation and part they were given, and one
that matches nothing is dropped.

FUSE over io_uring (``uring=True``) takes requests from 128-byte
IORING_OP_URING_CMD entries on the same descriptor instead: each ring entry
owns one slot as its payload buffer (so a slot must hold a whole request:
max_write is the slot size), and answers go back as COMMIT_AND_FETCH.
INIT, FORGET and INTERRUPT still come through read().
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free

from drb_uring.disk.fuse_kernel cimport *
from drb_uring.disk._backend cimport (Backend, disk_cqe, DISK_READ, DISK_WRITE, DISK_FSYNC,
                                      DISK_FALLOCATE, DISK_NO_SLOT, DISK_F_DATASYNC)
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe
from drb_uring.includes.liburing cimport (io_uring, io_uring_params, io_uring_queue_exit,
                                          io_uring_get_sqe, io_uring_submit,
                                          io_uring_peek_batch_cqe, io_uring_cq_advance,
                                          io_uring_cq_ready, io_uring_queue_init_params,
                                          io_uring_sqe_set_data64, io_uring_sq_ready,
                                          iovec, IORING_SETUP_SQE128, IORING_SETUP_CQSIZE,
                                          IORING_OP_URING_CMD, IORING_SETUP_R_DISABLED,
                                          io_uring_queue_mmap, sq_array_identity)
from drb_uring.includes.sys cimport (pollfd, ppoll, timespec, POLLIN, read, write, errno,
                                     EINTR, EAGAIN)
from drb_uring.includes.atomic cimport drb_now_ns

import os

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_io_uring_setup

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t readv(int fd, const iovec *iov, int iovcnt)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<errno.h>" nogil:
    int ENOENT
    int EBUSY
    int ENOSYS
    int ENODEV
    int ECONNABORTED
    int EPERM
    int EACCES
    int EINVAL
    int EIO
    int EROFS
    int ENOSPC
    int EPROTO
    int EOPNOTSUPP
    int ENOTCONN

cdef extern from "<fcntl.h>" nogil:
    int O_ACCMODE
    int O_RDONLY

cdef extern from "<sys/stat.h>" nogil:
    int S_IFREG

cdef enum:
    HDR = sizeof(fuse_in_header) + sizeof(fuse_write_in)   # 80: a WRITE's payload starts after it
    HDR_WORDS = 10
    SCRATCH = 8192          # a control request, gathered in one piece
    MAX_SLOTLESS = 64       # FSYNC/FALLOCATE in flight beside the slotted requests
    MAX_PARTS = 4096
    REAP_BATCH = 64

# Why the loop returned.
cdef enum:
    END_NONE = 0
    END_STOPPED = 1         # the stop descriptor became readable
    END_UNMOUNTED = 2       # ENODEV: the mount is gone
    END_ABORTED = 3         # ECONNABORTED: the connection was aborted (fusectl)
    END_DESTROY = 4         # the kernel sent FUSE_DESTROY
    END_ERROR = 5           # a system call failed in a way it must not
    END_NOTICE = 6          # the backend's notice descriptor is readable: a pause, not
                            # an end (run() again carries on where it was)

END_NAMES = {END_STOPPED: "stopped", END_UNMOUNTED: "unmounted", END_ABORTED: "aborted",
             END_DESTROY: "destroy", END_ERROR: "error", END_NOTICE: "notice"}

# A request the loop holds. Its slots are rec_slots[i * k, i * k + nparts).
cdef struct rec_t:
    uint64_t unique
    uint64_t offset
    uint64_t length        # FALLOCATE's length
    uint32_t opcode
    uint32_t size          # bytes of the READ/WRITE after clamping to the device
    uint32_t gen
    uint32_t flags         # FSYNC flags or FALLOCATE mode
    uint32_t nparts        # backend requests it was split into (0: slotless)
    uint32_t queued        # parts handed to the backend so far
    uint32_t pending       # parts not yet completed
    uint32_t next_free
    uint32_t entry         # uring mode: the ring entry it came on
    uint8_t live
    uint8_t via_ring       # came on a ring entry (its slot is that entry's)
    uint64_t hdr[HDR_WORDS]  # the request's header and op args, 8-byte aligned


cdef struct stats_t:
    uint64_t requests
    uint64_t reads
    uint64_t writes
    uint64_t flushes
    uint64_t control
    uint64_t dev_reads       # read/readv calls on /dev/fuse
    uint64_t dev_writes      # write/writev calls on /dev/fuse
    uint64_t sleeps
    uint64_t eagain          # backend submissions refused for a full queue
    uint64_t resent          # requests that came with FUSE_UNIQUE_RESEND
    uint64_t uring_enters
    uint64_t max_inflight    # most requests held at once
    uint64_t kicks           # backend kicks that handed over a batch


def _check(int ret, what):
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


cdef size_t _off(void *base, void *field) noexcept:
    return <size_t>field - <size_t>base


def struct_layout():
    """{name: (sizeof, {field: offset})} of every wire struct, for the tests
    that hold them to the kernel header's literal values."""
    cdef fuse_in_header ih
    cdef fuse_out_header oh
    cdef fuse_init_in ii
    cdef fuse_init_out io
    cdef fuse_attr a
    cdef fuse_attr_out ao
    cdef fuse_entry_out eo
    cdef fuse_setattr_in si
    cdef fuse_read_in ri
    cdef fuse_write_in wi
    cdef fuse_fallocate_in fi
    cdef fuse_uring_req_header uh
    cdef fuse_uring_cmd_req cr
    cdef fuse_uring_ent_in_out ue
    cdef fuse_kstatfs ks
    return {
        "fuse_in_header": (sizeof(fuse_in_header), {
            "len": _off(&ih, &ih.len), "opcode": _off(&ih, &ih.opcode),
            "unique": _off(&ih, &ih.unique), "nodeid": _off(&ih, &ih.nodeid),
            "uid": _off(&ih, &ih.uid), "gid": _off(&ih, &ih.gid), "pid": _off(&ih, &ih.pid),
            "total_extlen": _off(&ih, &ih.total_extlen)}),
        "fuse_out_header": (sizeof(fuse_out_header), {
            "len": _off(&oh, &oh.len), "error": _off(&oh, &oh.error),
            "unique": _off(&oh, &oh.unique)}),
        "fuse_init_in": (sizeof(fuse_init_in), {
            "max_readahead": _off(&ii, &ii.max_readahead), "flags": _off(&ii, &ii.flags),
            "flags2": _off(&ii, &ii.flags2)}),
        "fuse_init_out": (sizeof(fuse_init_out), {
            "flags": _off(&io, &io.flags), "max_background": _off(&io, &io.max_background),
            "congestion_threshold": _off(&io, &io.congestion_threshold),
            "max_write": _off(&io, &io.max_write), "time_gran": _off(&io, &io.time_gran),
            "max_pages": _off(&io, &io.max_pages), "flags2": _off(&io, &io.flags2),
            "max_stack_depth": _off(&io, &io.max_stack_depth),
            "request_timeout": _off(&io, &io.request_timeout)}),
        "fuse_attr": (sizeof(fuse_attr), {
            "size": _off(&a, &a.size), "atimensec": _off(&a, &a.atimensec),
            "mode": _off(&a, &a.mode), "uid": _off(&a, &a.uid), "blksize": _off(&a, &a.blksize),
            "flags": _off(&a, &a.flags)}),
        "fuse_attr_out": (sizeof(fuse_attr_out), {"attr": _off(&ao, &ao.attr)}),
        "fuse_entry_out": (sizeof(fuse_entry_out), {"attr": _off(&eo, &eo.attr)}),
        "fuse_setattr_in": (sizeof(fuse_setattr_in), {
            "size": _off(&si, &si.size), "mode": _off(&si, &si.mode), "uid": _off(&si, &si.uid),
            "gid": _off(&si, &si.gid)}),
        "fuse_getattr_in": (sizeof(fuse_getattr_in), {}),
        "fuse_open_in": (sizeof(fuse_open_in), {}),
        "fuse_open_out": (sizeof(fuse_open_out), {}),
        "fuse_release_in": (sizeof(fuse_release_in), {}),
        "fuse_flush_in": (sizeof(fuse_flush_in), {}),
        "fuse_read_in": (sizeof(fuse_read_in), {
            "offset": _off(&ri, &ri.offset), "size": _off(&ri, &ri.size),
            "flags": _off(&ri, &ri.flags)}),
        "fuse_write_in": (sizeof(fuse_write_in), {
            "offset": _off(&wi, &wi.offset), "size": _off(&wi, &wi.size),
            "write_flags": _off(&wi, &wi.write_flags), "flags": _off(&wi, &wi.flags)}),
        "fuse_write_out": (sizeof(fuse_write_out), {}),
        "fuse_kstatfs": (sizeof(fuse_kstatfs), {"bsize": _off(&ks, &ks.bsize)}),
        "fuse_statfs_out": (sizeof(fuse_statfs_out), {}),
        "fuse_fsync_in": (sizeof(fuse_fsync_in), {}),
        "fuse_access_in": (sizeof(fuse_access_in), {}),
        "fuse_interrupt_in": (sizeof(fuse_interrupt_in), {}),
        "fuse_forget_in": (sizeof(fuse_forget_in), {}),
        "fuse_batch_forget_in": (sizeof(fuse_batch_forget_in), {}),
        "fuse_fallocate_in": (sizeof(fuse_fallocate_in), {"mode": _off(&fi, &fi.mode)}),
        "fuse_uring_ent_in_out": (sizeof(fuse_uring_ent_in_out), {
            "commit_id": _off(&ue, &ue.commit_id), "payload_sz": _off(&ue, &ue.payload_sz)}),
        "fuse_uring_req_header": (sizeof(fuse_uring_req_header), {
            "op_in": _off(&uh, &uh.op_in), "ring_ent_in_out": _off(&uh, &uh.ring_ent_in_out)}),
        "fuse_uring_cmd_req": (sizeof(fuse_uring_cmd_req), {
            "commit_id": _off(&cr, &cr.commit_id), "qid": _off(&cr, &cr.qid)}),
    }


CONSTANTS = {
    "FUSE_KERNEL_VERSION": FUSE_KERNEL_VERSION,
    "FUSE_KERNEL_MINOR_VERSION": FUSE_KERNEL_MINOR_VERSION,
    "FUSE_LOOKUP": FUSE_LOOKUP, "FUSE_FORGET": FUSE_FORGET, "FUSE_GETATTR": FUSE_GETATTR,
    "FUSE_SETATTR": FUSE_SETATTR, "FUSE_OPEN": FUSE_OPEN, "FUSE_READ": FUSE_READ,
    "FUSE_WRITE": FUSE_WRITE, "FUSE_STATFS": FUSE_STATFS, "FUSE_RELEASE": FUSE_RELEASE,
    "FUSE_FSYNC": FUSE_FSYNC, "FUSE_FLUSH": FUSE_FLUSH, "FUSE_INIT": FUSE_INIT,
    "FUSE_ACCESS": FUSE_ACCESS, "FUSE_INTERRUPT": FUSE_INTERRUPT,
    "FUSE_DESTROY": FUSE_DESTROY, "FUSE_BATCH_FORGET": FUSE_BATCH_FORGET,
    "FUSE_FALLOCATE": FUSE_FALLOCATE, "FUSE_NOTIFY_RESEND": FUSE_NOTIFY_RESEND,
    "FUSE_ASYNC_READ": FUSE_ASYNC_READ, "FUSE_ATOMIC_O_TRUNC": FUSE_ATOMIC_O_TRUNC,
    "FUSE_BIG_WRITES": FUSE_BIG_WRITES, "FUSE_ASYNC_DIO": FUSE_ASYNC_DIO,
    "FUSE_PARALLEL_DIROPS": FUSE_PARALLEL_DIROPS, "FUSE_ABORT_ERROR": FUSE_ABORT_ERROR,
    "FUSE_MAX_PAGES": FUSE_MAX_PAGES, "FUSE_INIT_EXT": FUSE_INIT_EXT,
    "FUSE_HAS_RESEND": FUSE_HAS_RESEND, "FUSE_OVER_IO_URING": FUSE_OVER_IO_URING,
    "FUSE_UNIQUE_RESEND": FUSE_UNIQUE_RESEND,
    "FOPEN_DIRECT_IO": FOPEN_DIRECT_IO, "FOPEN_KEEP_CACHE": FOPEN_KEEP_CACHE,
    "FOPEN_PARALLEL_DIRECT_WRITES": FOPEN_PARALLEL_DIRECT_WRITES,
    "FATTR_SIZE": FATTR_SIZE, "FATTR_FH": FATTR_FH,
    "FUSE_IO_URING_CMD_REGISTER": FUSE_IO_URING_CMD_REGISTER,
    "FUSE_IO_URING_CMD_COMMIT_AND_FETCH": FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
    "HDR": HDR,
    "HDR_WORDS": HDR_WORDS,
    "IORING_OP_URING_CMD": IORING_OP_URING_CMD,
}


def setup_ring(uint32_t entries):
    """The trusted side's half of FUSE over io_uring, for a server that may
    not call io_uring_setup: a ring of 128-byte SQEs (the command area holds
    struct fuse_uring_cmd_req), created disabled so that it can be
    restricted before it is enabled. Returns (fd, params): the server maps
    it with io_uring_queue_mmap; the fd passes by inheritance only."""
    cdef io_uring_params p
    memset(&p, 0, sizeof(p))
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE | IORING_SETUP_R_DISABLED
    p.cq_entries = 2 * entries
    cdef long fd = syscall(SYS_io_uring_setup, <long>entries, &p)
    if fd < 0:
        raise OSError(errno, f"io_uring_setup (SQE128): {os.strerror(errno)}")
    return <int>fd, (<char *>&p)[:sizeof(p)]


cdef inline uint32_t ceil_div(uint64_t a, uint64_t b) noexcept nogil:
    return <uint32_t>((a + b - 1) // b)


cdef class FuseServer:
    """Serves one FUSE connection (`fd`, a /dev/fuse descriptor that is
    mounted already) from `backend`.

    `initialized` says the connection's INIT was answered by an earlier
    server (a restart): this one then starts by asking the kernel to send
    again every request the dead one held (FUSE_NOTIFY_RESEND). Every
    server of a connection must be made with the same limits, since the
    kernel keeps what the first INIT answer said.
    """
    cdef Backend be
    cdef int fd
    cdef readonly uint64_t size
    cdef readonly uint32_t max_write
    cdef readonly uint32_t k                 # slots reserved for each read()
    cdef uint32_t mode, uid, gid
    cdef uint64_t mtime
    cdef uint32_t attr_valid
    cdef uint16_t max_background
    cdef readonly bint page_cache
    cdef readonly bint read_only
    cdef readonly bint uring
    cdef readonly bint initialized
    cdef readonly uint32_t minor
    cdef readonly uint64_t init_flags        # what the INIT answer granted

    cdef rec_t *recs
    cdef uint32_t nrec, free_rec, nfree_rec
    cdef uint32_t *rec_slots
    cdef int64_t *part_res
    cdef uint32_t *slot_stack
    cdef uint32_t nfree_slots
    cdef uint32_t *subq                      # records with parts not yet submitted
    cdef uint32_t subq_head, subq_tail
    cdef iovec *iov
    cdef char *scratch
    cdef disk_cqe cqes[REAP_BATCH]
    cdef stats_t st
    cdef int end
    cdef int st_errno
    cdef bint destroying
    cdef int paused_end             # what end was when a notice paused the loop
    cdef bint paused_destroying
    # Whether /dev/fuse may have a request: cleared by EAGAIN, set again
    # only by poll (or a spin), so that waiting for the backend does not
    # cost a read() that fails every turn.
    cdef bint dev_ready
    cdef uint32_t gen

    # uring mode
    cdef io_uring ring
    cdef bint ring_up
    cdef fuse_uring_req_header *uhdr
    cdef iovec *uiov
    cdef uint32_t nqueues, qdepth, nent
    cdef uint32_t *ent_cmd                   # last command sent on each entry
    cdef bint registered
    cdef char *devbuf                        # what still comes through read()

    def __cinit__(self):
        self.fd = -1

    def __init__(self, int fd, Backend backend not None, *, uint32_t max_write=1 << 20,
                 uint32_t mode=0o600, uint32_t uid=0, uint32_t gid=0, uint64_t mtime=0,
                 uint32_t attr_valid=60, uint16_t max_background=64, bint page_cache=False,
                 bint read_only=False, bint initialized=False, uint32_t minor=0,
                 bint uring=False, uint32_t uring_queues=0, int uring_fd=-1,
                 bytes uring_params=None):
        cdef uint32_t i
        if backend.base == NULL or backend.slot_count == 0:
            raise ValueError("the backend has no slots")
        if not (1 << DISK_READ) & backend.ops or not (1 << DISK_WRITE) & backend.ops:
            raise ValueError("the backend serves neither reads nor writes")
        if uring:
            # The kernel copies a whole request into one payload buffer per
            # ring entry; a slot is that buffer.
            max_write = backend.slot_size
        if max_write < 4096 or max_write % 4096 or max_write > (1 << 20):
            raise ValueError(f"max_write {max_write} is not a multiple of 4096 in 4K..1M")
        self.k = ceil_div(max_write, backend.slot_size)
        if self.k > MAX_PARTS or self.k > backend.slot_count:
            raise ValueError(f"max_write {max_write} needs {self.k} slots of "
                             f"{backend.slot_size}; the backend has {backend.slot_count}")
        if FUSE_MIN_READ_BUFFER > HDR + <uint64_t>self.k * backend.slot_size:
            raise ValueError("the read buffer would be under FUSE_MIN_READ_BUFFER")
        self.be = backend
        self.fd = fd
        self.size = backend.size
        self.max_write = max_write
        self.mode = S_IFREG | (mode & 0o7777)
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.attr_valid = attr_valid
        self.max_background = max_background
        self.page_cache = page_cache
        self.read_only = read_only
        self.initialized = initialized
        self.minor = minor if minor else FUSE_KERNEL_MINOR_VERSION
        self.uring = uring
        self.gen = 1
        self.nrec = backend.slot_count + MAX_SLOTLESS
        self.recs = <rec_t *>calloc(self.nrec, sizeof(rec_t))
        self.rec_slots = <uint32_t *>calloc(<size_t>self.nrec * self.k, sizeof(uint32_t))
        self.part_res = <int64_t *>calloc(<size_t>self.nrec * self.k, sizeof(int64_t))
        self.slot_stack = <uint32_t *>calloc(backend.slot_count, sizeof(uint32_t))
        self.subq = <uint32_t *>calloc(self.nrec, sizeof(uint32_t))
        self.iov = <iovec *>calloc(self.k + 1, sizeof(iovec))
        self.scratch = <char *>calloc(1, SCRATCH)
        if (self.recs == NULL or self.rec_slots == NULL or self.part_res == NULL or
                self.slot_stack == NULL or self.subq == NULL or self.iov == NULL or
                self.scratch == NULL):
            raise MemoryError()
        for i in range(self.nrec):
            self.recs[i].next_free = i + 1
        self.free_rec = 0
        self.nfree_rec = self.nrec
        for i in range(backend.slot_count):
            self.slot_stack[i] = backend.slot_count - 1 - i
        self.nfree_slots = backend.slot_count
        if uring:
            self._uring_setup(uring_queues, uring_fd, uring_params)

    def __dealloc__(self):
        if self.ring_up:
            io_uring_queue_exit(&self.ring)
        free(self.recs)
        free(self.rec_slots)
        free(self.part_res)
        free(self.slot_stack)
        free(self.subq)
        free(self.iov)
        free(self.scratch)
        free(self.uhdr)
        free(self.uiov)
        free(self.ent_cmd)
        free(self.devbuf)

    @property
    def stats(self):
        return {"requests": self.st.requests, "reads": self.st.reads,
                "writes": self.st.writes, "flushes": self.st.flushes,
                "control": self.st.control, "dev_reads": self.st.dev_reads,
                "dev_writes": self.st.dev_writes, "sleeps": self.st.sleeps,
                "eagain": self.st.eagain, "resent": self.st.resent,
                "uring_enters": self.st.uring_enters,
                "max_inflight": self.st.max_inflight, "kicks": self.st.kicks}

    @property
    def in_flight(self):
        return self.nrec - self.nfree_rec

    def notify_resend(self):
        """Ask the kernel to queue again every request a dead server of this
        connection had read and not answered (FUSE_NOTIFY_RESEND, 7.40)."""
        cdef fuse_out_header oh
        cdef ssize_t n
        oh.len = sizeof(fuse_out_header)
        oh.error = FUSE_NOTIFY_RESEND
        oh.unique = 0
        with nogil:
            n = write(self.fd, &oh, sizeof(oh))
        if n < 0:
            raise OSError(errno, f"FUSE_NOTIFY_RESEND: {os.strerror(errno)}")

    def run(self, int stop_fd=-1, uint64_t spin_ns=0):
        """Serve until the mount goes (ENODEV), the connection is aborted,
        the kernel sends DESTROY, or `stop_fd` polls readable; requests in
        flight are answered first. Returns why it ended; "notice" is a
        pause (the backend's notice_fd is readable): hear it, then run()
        again, which carries on where it was."""
        with nogil:
            self._loop(stop_fd, spin_ns)
        if self.end == END_ERROR:
            raise OSError(self.st_errno, f"FUSE loop: {os.strerror(self.st_errno)}")
        return END_NAMES[self.end]

    # -- slots and records ---------------------------------------------------

    cdef inline uint32_t rec_alloc(self) noexcept nogil:
        cdef uint32_t i = self.free_rec
        self.free_rec = self.recs[i].next_free
        self.nfree_rec -= 1
        if self.nrec - self.nfree_rec > self.st.max_inflight:
            self.st.max_inflight = self.nrec - self.nfree_rec
        self.gen = (self.gen + 1) & 0xffffff
        if self.gen == 0:
            self.gen = 1
        self.recs[i].gen = self.gen
        self.recs[i].live = 1
        self.recs[i].via_ring = 0
        self.recs[i].nparts = 0
        self.recs[i].queued = 0
        self.recs[i].pending = 0
        return i

    cdef inline void give_back(self, uint32_t i, uint32_t first) noexcept nogil:
        """Return the record's slots from `first` on to the pool; a ring
        entry's slot stays that entry's."""
        cdef uint32_t j
        cdef rec_t *r = &self.recs[i]
        if not r.via_ring:
            for j in range(first, r.nparts):
                self.slot_stack[self.nfree_slots] = self.rec_slots[<size_t>i * self.k + j]
                self.nfree_slots += 1
        if first < r.nparts:
            r.nparts = first

    cdef inline void rec_free(self, uint32_t i) noexcept nogil:
        cdef rec_t *r = &self.recs[i]
        self.give_back(i, 0)
        r.live = 0
        r.next_free = self.free_rec
        self.free_rec = i
        self.nfree_rec += 1

    cdef inline void keep_slots(self, uint32_t i, uint32_t keep) noexcept nogil:
        """Of the slots a read reserved, keep the first `keep` for the request."""
        self.give_back(i, keep)

    cdef inline char *slot_ptr(self, uint32_t slot) noexcept nogil:
        return self.be.base + <size_t>slot * self.be.slot_size

    # -- answers -------------------------------------------------------------

    cdef int send(self, iovec *v, int n) noexcept nogil:
        cdef ssize_t r
        self.st.dev_writes += 1
        while True:
            r = writev(self.fd, v, n)
            if r >= 0:
                return 0
            if errno == EINTR:
                continue
            # ENOENT: the request is gone (interrupted, or the connection
            # aborted under it); nobody waits for this answer.
            if errno == ENOENT:
                return 0
            if errno == ENODEV:
                self.finish(END_UNMOUNTED)
                return 0
            if errno == ECONNABORTED:
                self.finish(END_ABORTED)
                return 0
            self.st_errno = errno
            self.finish(END_ERROR)
            return -1

    cdef inline void finish(self, int why) noexcept nogil:
        if self.end == END_NONE or why == END_ERROR:
            self.end = why

    cdef void reply(self, uint32_t ri, int err, const void *data, uint32_t n) noexcept nogil:
        """Answer a request at once: an error, or `n` bytes of `data`."""
        cdef fuse_out_header oh
        cdef iovec v[2]
        cdef rec_t *r = &self.recs[ri]
        if r.via_ring:
            self.uring_reply(ri, err, data, n)
            return
        oh.unique = r.unique
        oh.error = -err if err > 0 else err
        if err:
            n = 0
        oh.len = sizeof(oh) + n
        v[0].iov_base = &oh
        v[0].iov_len = sizeof(oh)
        v[1].iov_base = <void *>data
        v[1].iov_len = n
        self.send(v, 2 if n else 1)

    cdef void reply_unique(self, uint64_t unique, int err) noexcept nogil:
        cdef fuse_out_header oh
        cdef iovec v[1]
        oh.unique = unique
        oh.error = -err
        oh.len = sizeof(oh)
        v[0].iov_base = &oh
        v[0].iov_len = sizeof(oh)
        self.send(v, 1)

    # -- the loop ------------------------------------------------------------

    cdef void _loop(self, int stop_fd, uint64_t spin_ns) noexcept nogil:
        cdef pollfd p[5]
        cdef int np, n, busy, nfd
        cdef uint64_t spin_until = 0
        cdef timespec ts
        cdef uint8_t drain[64]
        # Back from a pause for the backend's notice: where it was.
        self.end = self.paused_end
        self.destroying = self.paused_destroying
        self.paused_end = END_NONE
        self.paused_destroying = False
        self.dev_ready = True
        if self.uring and self.initialized and not self.registered:
            if self.uring_register() < 0:
                return
        while True:
            busy = 0
            n = self.reap()
            if n < 0:
                self.st_errno = -n
                self.finish(END_ERROR)
                return
            busy += n
            if self.end == END_NONE and not self.destroying and self.dev_ready:
                n = self.take_requests()
                if n < 0:
                    return
                busy += n
            if self.uring:
                n = self.uring_take()
                if n < 0:
                    return
                busy += n
            self.submit_queued()
            n = self.be.kick()
            if n > 0:
                self.st.kicks += 1
            if n < 0 and n != -EAGAIN and n != -EINTR and n != -EBUSY:
                # EAGAIN/EBUSY: the backend cannot take the batch now; it
                # stays queued there and goes with the next kick.
                self.st_errno = -n
                self.finish(END_ERROR)
                return
            if self.uring and io_uring_sq_ready(&self.ring):
                self.st.uring_enters += 1
                io_uring_submit(&self.ring)
            if self.end != END_NONE or self.destroying:
                if self.nfree_rec == self.nrec:
                    if self.end == END_NONE:
                        self.end = END_DESTROY
                    return
                if self.end == END_ERROR:
                    return
            if busy:
                spin_until = 0
                continue
            if spin_ns:
                if spin_until == 0:
                    spin_until = drb_now_ns() + spin_ns
                if drb_now_ns() < spin_until:
                    # With the ring, /dev/fuse brings only FORGET and
                    # INTERRUPT: poll finds those.
                    if not self.uring:
                        self.dev_ready = True
                    continue
            # Idle: sleep on /dev/fuse (when a request could be taken), the
            # backend and the stop descriptor.
            if self.be.arm():
                self.be.disarm()
                continue
            np = 0
            if self.end == END_NONE and not self.destroying and self.can_take():
                p[np].fd = self.fd
                p[np].events = POLLIN
                np += 1
            p[np].fd = self.be.pollfd()
            p[np].events = POLLIN
            np += 1
            if self.uring:
                p[np].fd = self.ring.ring_fd
                p[np].events = POLLIN
                np += 1
            nfd = self.be.notice_fd()
            if nfd >= 0:
                p[np].fd = nfd
                p[np].events = POLLIN
                np += 1
            if stop_fd >= 0 and self.end == END_NONE:
                p[np].fd = stop_fd
                p[np].events = POLLIN
                np += 1
            ts.tv_sec = 1
            ts.tv_nsec = 0
            self.st.sleeps += 1
            n = ppoll(p, np, &ts, NULL)
            self.be.disarm()
            if n > 0 and nfd >= 0 and self.notice_ready(p, np, nfd):
                # The backend has something for Python to hear (a worker
                # taking over, a failure): pause, with everything in place.
                self.paused_end = self.end
                self.paused_destroying = self.destroying
                self.end = END_NOTICE
                return
            if n > 0 and p[0].fd == self.fd and p[0].revents:
                self.dev_ready = True
            if n > 0 and stop_fd >= 0 and p[np - 1].fd == stop_fd and p[np - 1].revents:
                read(stop_fd, drain, sizeof(drain))
                self.finish(END_STOPPED)
            spin_until = 0

    cdef inline bint notice_ready(self, pollfd *p, int np, int nfd) noexcept nogil:
        cdef int i
        for i in range(np):
            if p[i].fd == nfd and p[i].revents:
                return True
        return False

    cdef inline bint can_take(self) noexcept nogil:
        if self.uring:
            return self.nfree_rec > 0
        return self.nfree_rec > 0 and self.nfree_slots >= self.k

    cdef int dev_error(self, int e) noexcept nogil:
        """A failed read of /dev/fuse: 1 to try again, 0 to stop reading,
        -1 for an error the loop cannot go on with."""
        if e == EINTR:
            return 1
        if e == EAGAIN:
            self.dev_ready = False
            return 0
        if e == ENODEV:
            self.finish(END_UNMOUNTED)
        elif e == ECONNABORTED:
            self.finish(END_ABORTED)
        else:
            self.st_errno = e
            self.finish(END_ERROR)
            return -1
        return 0

    cdef int take_requests(self) noexcept nogil:
        """Read requests until none is left or no slot/record is free."""
        cdef uint32_t ri, j
        cdef ssize_t n
        cdef int taken = 0, again
        cdef rec_t *r
        if self.uring:
            return self.take_dev_uring()
        while self.can_take() and self.end == END_NONE and not self.destroying:
            ri = self.rec_alloc()
            r = &self.recs[ri]
            self.iov[0].iov_base = <char *>r.hdr
            self.iov[0].iov_len = HDR
            for j in range(self.k):
                self.nfree_slots -= 1
                self.rec_slots[<size_t>ri * self.k + j] = self.slot_stack[self.nfree_slots]
                self.iov[j + 1].iov_base = self.slot_ptr(self.slot_stack[self.nfree_slots])
                self.iov[j + 1].iov_len = self.be.slot_size
            r.nparts = self.k
            self.st.dev_reads += 1
            n = readv(self.fd, self.iov, self.k + 1)
            if n < 0:
                again = self.dev_error(errno)
                self.rec_free(ri)
                if again < 0:
                    return -1
                if again:
                    continue
                break
            taken += 1
            self.dispatch(ri, <uint32_t>n)
        return taken

    cdef int take_dev_uring(self) noexcept nogil:
        """With FUSE over io_uring, what still comes through read(): INIT,
        FORGET, INTERRUPT (and anything sent before the ring was ready)."""
        cdef uint32_t ri
        cdef ssize_t n
        cdef int taken = 0, again
        cdef rec_t *r
        cdef fuse_in_header *h = <fuse_in_header *>self.devbuf
        while self.can_take() and self.end == END_NONE and not self.destroying:
            self.st.dev_reads += 1
            n = read(self.fd, self.devbuf, HDR + self.max_write)
            if n < 0:
                again = self.dev_error(errno)
                if again < 0:
                    return -1
                if again:
                    continue
                break
            if n < <ssize_t>sizeof(fuse_in_header) or h.len != n:
                self.st_errno = EPROTO
                self.finish(END_ERROR)
                return -1
            taken += 1
            ri = self.rec_alloc()
            r = &self.recs[ri]
            r.unique = h.unique
            r.opcode = h.opcode
            self.st.requests += 1
            if h.opcode == FUSE_READ or h.opcode == FUSE_WRITE:
                # Not sent this way once the ring is ready; before, the
                # kernel holds new requests back (fuse_block_alloc).
                self.reply(ri, EIO, NULL, 0)
                self.rec_free(ri)
                continue
            self.control(ri, h.opcode, h.nodeid, self.devbuf + sizeof(fuse_in_header),
                         <uint32_t>n - sizeof(fuse_in_header), h.uid, h.gid)
        return taken

    cdef void dispatch(self, uint32_t ri, uint32_t n) noexcept nogil:
        """A request read into record ri (header area, then its k slots)."""
        cdef rec_t *r = &self.recs[ri]
        cdef fuse_in_header *h = <fuse_in_header *>r.hdr
        cdef uint32_t body
        if n < sizeof(fuse_in_header) or h.len != n:
            # The kernel always sends whole requests; anything else means
            # this is not the FUSE device we think it is.
            self.rec_free(ri)
            self.st_errno = EPROTO
            self.finish(END_ERROR)
            return
        r.unique = h.unique
        r.opcode = h.opcode
        self.st.requests += 1
        if h.unique & FUSE_UNIQUE_RESEND:
            self.st.resent += 1
        if h.opcode == FUSE_WRITE or h.opcode == FUSE_READ:
            if n < HDR:
                self.keep_slots(ri, 0)
                self.reply(ri, EINVAL, NULL, 0)
                self.rec_free(ri)
                return
            self.data_request(ri, n - HDR)
            return
        # Everything else is small: gather it in one piece (the part past
        # the header area went to the first slot).
        body = n
        if body > SCRATCH:
            self.keep_slots(ri, 0)
            self.reply(ri, ENOSYS, NULL, 0)
            self.rec_free(ri)
            return
        memcpy(self.scratch, <char *>r.hdr, HDR if n > HDR else n)
        if n > HDR:
            memcpy(self.scratch + HDR, self.slot_ptr(self.rec_slots[<size_t>ri * self.k]),
                   n - HDR)
        self.keep_slots(ri, 0)
        self.control(ri, h.opcode, h.nodeid, self.scratch + sizeof(fuse_in_header),
                     n - sizeof(fuse_in_header), h.uid, h.gid)

    cdef void data_request(self, uint32_t ri, uint32_t payload) noexcept nogil:
        """READ or WRITE, its slots still all reserved; payload: the bytes
        of a WRITE that came after the header area, in the slots."""
        cdef rec_t *r = &self.recs[ri]
        cdef fuse_read_in *rd = <fuse_read_in *>(<char *>r.hdr + sizeof(fuse_in_header))
        cdef fuse_write_in *wr = <fuse_write_in *>(<char *>r.hdr + sizeof(fuse_in_header))
        cdef uint64_t offset, size
        cdef bint is_write = r.opcode == FUSE_WRITE
        if is_write:
            self.st.writes += 1
            offset = wr.offset
            size = wr.size
            if size != payload or size > self.max_write:
                self.keep_slots(ri, 0)
                self.reply(ri, EINVAL, NULL, 0)
                self.rec_free(ri)
                return
            if self.read_only:
                self.keep_slots(ri, 0)
                self.reply(ri, EROFS, NULL, 0)
                self.rec_free(ri)
                return
        else:
            self.st.reads += 1
            offset = rd.offset
            size = rd.size
            if size > <uint64_t>self.k * self.be.slot_size:
                self.keep_slots(ri, 0)
                self.reply(ri, EINVAL, NULL, 0)
                self.rec_free(ri)
                return
        # A disk has an end: a read there returns 0 bytes, a write ENOSPC,
        # and one that runs over it is cut short (as a block device does).
        if offset >= self.size or size == 0:
            self.keep_slots(ri, 0)
            if is_write and size:
                self.reply(ri, ENOSPC, NULL, 0)
            elif is_write:
                self.reply_write(ri, 0)
            else:
                self.reply(ri, 0, NULL, 0)
            self.rec_free(ri)
            return
        if offset + size > self.size:
            size = self.size - offset
        r.offset = offset
        r.size = <uint32_t>size
        self.keep_slots(ri, ceil_div(size, self.be.slot_size))
        r.pending = r.nparts
        r.queued = 0
        self.enqueue(ri)

    cdef inline void enqueue(self, uint32_t ri) noexcept nogil:
        self.subq[self.subq_tail % self.nrec] = ri
        self.subq_tail += 1

    cdef void submit_queued(self) noexcept nogil:
        """Hand every queued part to the backend, in order, until it is full."""
        cdef uint32_t ri, j, slot, op
        cdef uint64_t off, length
        cdef rec_t *r
        cdef int ret
        cdef uint32_t total
        while self.subq_head != self.subq_tail:
            ri = self.subq[self.subq_head % self.nrec]
            r = &self.recs[ri]
            total = r.nparts if r.nparts else 1
            while r.queued < total:
                j = r.queued
                if r.opcode == FUSE_READ or r.opcode == FUSE_WRITE:
                    op = DISK_READ if r.opcode == FUSE_READ else DISK_WRITE
                    slot = self.rec_slots[<size_t>ri * self.k + j]
                    off = r.offset + <uint64_t>j * self.be.slot_size
                    length = r.size - <uint64_t>j * self.be.slot_size
                    if length > self.be.slot_size:
                        length = self.be.slot_size
                    ret = self.be.submit(op, slot, off, length, 0,
                                         (<uint64_t>r.gen << 40) | (<uint64_t>ri << 16) | j)
                elif r.opcode == FUSE_FSYNC:
                    ret = self.be.submit(DISK_FSYNC, DISK_NO_SLOT, 0, 0, r.flags,
                                         (<uint64_t>r.gen << 40) | (<uint64_t>ri << 16))
                else:
                    ret = self.be.submit(DISK_FALLOCATE, DISK_NO_SLOT, r.offset, r.length,
                                         r.flags, (<uint64_t>r.gen << 40) | (<uint64_t>ri << 16))
                if ret == -EAGAIN:
                    self.st.eagain += 1
                    return
                r.queued += 1
                if ret < 0:
                    # Refused outright: this part is done, with that error
                    # (and the record with it once every part is back).
                    if r.pending == 1:
                        self.part_done(ri, j, ret)
                        break
                    self.part_done(ri, j, ret)
            self.subq_head += 1

    cdef int reap(self) noexcept nogil:
        cdef int n, i, total = 0
        cdef uint64_t tag
        cdef uint32_t ri, j
        while True:
            n = self.be.reap(self.cqes, REAP_BATCH)
            if n <= 0:
                return total if n == 0 else n
            for i in range(n):
                tag = self.cqes[i].tag
                ri = <uint32_t>((tag >> 16) & 0xffffff)
                j = <uint32_t>(tag & 0xffff)
                if (ri >= self.nrec or not self.recs[ri].live or
                        self.recs[ri].gen != (tag >> 40) or
                        j >= (self.recs[ri].nparts if self.recs[ri].nparts else 1) or
                        j >= self.recs[ri].queued):
                    continue
                self.part_done(ri, j, self.cqes[i].res)
            total += n
            if n < REAP_BATCH:
                return total

    cdef void part_done(self, uint32_t ri, uint32_t j, int64_t res) noexcept nogil:
        cdef rec_t *r = &self.recs[ri]
        self.part_res[<size_t>ri * self.k + j] = res
        r.pending -= 1
        if r.pending == 0:
            self.complete(ri)

    cdef void complete(self, uint32_t ri) noexcept nogil:
        """Every part of the request is back: answer it."""
        cdef rec_t *r = &self.recs[ri]
        cdef fuse_out_header oh
        cdef iovec *v
        cdef uint32_t j, nv = 1
        cdef uint64_t done = 0, want
        cdef int64_t res
        cdef int err = 0
        if r.opcode == FUSE_FSYNC or r.opcode == FUSE_FALLOCATE:
            res = self.part_res[<size_t>ri * self.k]
            self.reply(ri, <int>(-res) if res < 0 else 0, NULL, 0)
            self.rec_free(ri)
            return
        # The answer is the parts that came back whole, in order, up to the
        # first short one; an error counts only if nothing came before it.
        for j in range(r.nparts):
            res = self.part_res[<size_t>ri * self.k + j]
            want = r.size - <uint64_t>j * self.be.slot_size
            if want > self.be.slot_size:
                want = self.be.slot_size
            if res < 0:
                if j == 0:
                    err = <int>(-res)
                break
            if <uint64_t>res > want:
                res = <int64_t>want
            done += <uint64_t>res
            nv += 1
            if <uint64_t>res < want:
                break
        if err:
            self.reply(ri, err, NULL, 0)
        elif r.opcode == FUSE_WRITE:
            self.reply_write(ri, <uint32_t>done)
        elif r.via_ring:
            self.uring_reply(ri, 0, NULL, <uint32_t>done)
        else:
            v = self.iov
            oh.unique = r.unique
            oh.error = 0
            oh.len = <uint32_t>(sizeof(oh) + done)
            v[0].iov_base = &oh
            v[0].iov_len = sizeof(oh)
            for j in range(1, nv):
                v[j].iov_base = self.slot_ptr(self.rec_slots[<size_t>ri * self.k + j - 1])
                res = self.part_res[<size_t>ri * self.k + j - 1]
                v[j].iov_len = <size_t>res
            self.send(v, nv)
        self.rec_free(ri)

    cdef void reply_write(self, uint32_t ri, uint32_t n) noexcept nogil:
        cdef fuse_write_out wo
        wo.size = n
        wo.padding = 0
        self.reply(ri, 0, &wo, sizeof(wo))

    # -- everything but data -------------------------------------------------

    cdef void fill_attr(self, fuse_attr *a) noexcept nogil:
        memset(a, 0, sizeof(fuse_attr))
        a.ino = FUSE_ROOT_ID
        a.size = self.size
        a.blocks = (self.size + 511) // 512
        a.atime = self.mtime
        a.mtime = self.mtime
        a.ctime = self.mtime
        a.mode = self.mode
        a.nlink = 1
        a.uid = self.uid
        a.gid = self.gid
        # What stat() tells callers to use as the I/O unit: a page, which
        # keeps O_DIRECT backends aligned.
        a.blksize = 4096

    cdef void reply_attr(self, uint32_t ri) noexcept nogil:
        cdef fuse_attr_out ao
        memset(&ao, 0, sizeof(ao))
        ao.attr_valid = self.attr_valid
        self.fill_attr(&ao.attr)
        self.reply(ri, 0, &ao, sizeof(ao))

    cdef bint allowed(self, uint32_t uid, uint32_t gid, uint32_t mask) noexcept nogil:
        """access(2) against the file's mode (R=4, W=2, X=1)."""
        cdef uint32_t bits
        if uid == 0:
            return not (mask & 1) or (self.mode & 0o111)
        if uid == self.uid:
            bits = (self.mode >> 6) & 7
        elif gid == self.gid:
            bits = (self.mode >> 3) & 7
        else:
            bits = self.mode & 7
        return (bits & mask) == mask

    cdef void control(self, uint32_t ri, uint32_t opcode, uint64_t nodeid, char *arg,
                      uint32_t alen, uint32_t uid, uint32_t gid) noexcept nogil:
        cdef rec_t *r = &self.recs[ri]
        cdef fuse_init_in *ii
        cdef fuse_init_out io
        cdef fuse_setattr_in *sa
        cdef fuse_open_in *oi
        cdef fuse_open_out oo
        cdef fuse_statfs_out so
        cdef fuse_fsync_in *fs
        cdef fuse_fallocate_in *fa
        cdef fuse_access_in *ac
        cdef uint64_t kflags, grant
        cdef bint keep = False
        self.st.control += 1
        if opcode == FUSE_INIT:
            if alen < 8:
                self.reply(ri, EINVAL, NULL, 0)
            else:
                ii = <fuse_init_in *>arg
                memset(&io, 0, sizeof(io))
                io.major = FUSE_KERNEL_VERSION
                io.minor = FUSE_KERNEL_MINOR_VERSION
                if ii.major < FUSE_KERNEL_VERSION:
                    self.reply(ri, EPROTO, NULL, 0)
                elif ii.major > FUSE_KERNEL_VERSION or alen < sizeof(fuse_init_in) - 44:
                    # The kernel asks again with our major (fuse_kernel.h).
                    self.reply(ri, 0, &io, 8)
                else:
                    self.minor = ii.minor if ii.minor < FUSE_KERNEL_MINOR_VERSION \
                        else FUSE_KERNEL_MINOR_VERSION
                    io.minor = self.minor
                    kflags = ii.flags
                    if kflags & FUSE_INIT_EXT and alen >= 20:
                        kflags |= (<uint64_t>ii.flags2) << 32
                    # ASYNC_DIO lets one O_DIRECT caller have many requests
                    # in flight; ABORT_ERROR tells a dying server an abort
                    # (ECONNABORTED) from an unmount (ENODEV). No
                    # PARALLEL_DIROPS (there are no directories), no
                    # WRITEBACK_CACHE (an answered WRITE is on the backend).
                    grant = (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO |
                             FUSE_ABORT_ERROR | FUSE_MAX_PAGES | FUSE_INIT_EXT)
                    if self.uring:
                        grant |= FUSE_OVER_IO_URING
                    grant &= kflags
                    self.init_flags = grant
                    io.flags = <uint32_t>grant
                    io.flags2 = <uint32_t>(grant >> 32)
                    io.max_readahead = ii.max_readahead if ii.max_readahead < self.max_write \
                        else self.max_write
                    io.max_background = self.max_background
                    io.congestion_threshold = self.max_background * 3 // 4
                    io.max_write = self.max_write
                    io.time_gran = 1
                    io.max_pages = <uint16_t>(self.max_write // 4096)
                    self.reply(ri, 0, &io, sizeof(io))
                    self.initialized = True
                    if self.uring and self.end == END_NONE:
                        self.rec_free(ri)
                        self.uring_register()
                        return
        elif opcode == FUSE_GETATTR:
            self.reply_attr(ri)
        elif opcode == FUSE_SETATTR:
            if alen < sizeof(fuse_setattr_in):
                self.reply(ri, EINVAL, NULL, 0)
            else:
                sa = <fuse_setattr_in *>arg
                if sa.valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
                    # Who owns the disk and how it may be opened is the
                    # trusted side's choice, made at mount.
                    self.reply(ri, EPERM, NULL, 0)
                elif sa.valid & FATTR_SIZE and sa.size != self.size and sa.valid & FATTR_FH:
                    # ftruncate() on an open disk: a disk has its size.
                    self.reply(ri, EPERM, NULL, 0)
                else:
                    # open(O_TRUNC) (and truncate() by path) arrive without
                    # a file handle: ignored, as a block device ignores
                    # O_TRUNC; the answer carries the real size, which the
                    # kernel then takes. Times are accepted and not kept.
                    self.reply_attr(ri)
        elif opcode == FUSE_OPEN:
            if alen < sizeof(fuse_open_in):
                self.reply(ri, EINVAL, NULL, 0)
            else:
                oi = <fuse_open_in *>arg
                if self.read_only and (oi.flags & O_ACCMODE) != O_RDONLY:
                    self.reply(ri, EROFS, NULL, 0)
                else:
                    memset(&oo, 0, sizeof(oo))
                    if self.page_cache:
                        oo.open_flags = FOPEN_KEEP_CACHE
                    else:
                        # Direct writes of one file may run in parallel:
                        # without this flag the kernel takes the inode lock
                        # around each one.
                        oo.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
                    self.reply(ri, 0, &oo, sizeof(oo))
        elif opcode == FUSE_READ or opcode == FUSE_WRITE:
            self.reply(ri, EINVAL, NULL, 0)
        elif opcode == FUSE_FLUSH or opcode == FUSE_RELEASE:
            # close() is not a durability point (fsync is); answering FLUSH
            # at once keeps close() cheap.
            self.reply(ri, 0, NULL, 0)
        elif opcode == FUSE_FSYNC:
            if alen < sizeof(fuse_fsync_in):
                self.reply(ri, EINVAL, NULL, 0)
            elif not (self.be.ops & (1 << DISK_FSYNC)):
                self.reply(ri, 0, NULL, 0)
            else:
                fs = <fuse_fsync_in *>arg
                self.st.flushes += 1
                r.flags = DISK_F_DATASYNC if fs.fsync_flags & FUSE_FSYNC_FDATASYNC else 0
                r.pending = 1
                r.queued = 0
                self.enqueue(ri)
                keep = True
        elif opcode == FUSE_FALLOCATE:
            if alen < sizeof(fuse_fallocate_in):
                self.reply(ri, EINVAL, NULL, 0)
            else:
                fa = <fuse_fallocate_in *>arg
                # Only what keeps the size: FALLOC_FL_KEEP_SIZE (1) with or
                # without PUNCH_HOLE (2) / ZERO_RANGE (0x10), or plain mode 0
                # inside the disk.
                if not (self.be.ops & (1 << DISK_FALLOCATE)):
                    self.reply(ri, EOPNOTSUPP, NULL, 0)
                elif self.read_only:
                    self.reply(ri, EROFS, NULL, 0)
                elif fa.offset >= self.size or fa.length > self.size - fa.offset:
                    self.reply(ri, EOPNOTSUPP if not (fa.mode & 1) else ENOSPC, NULL, 0)
                elif fa.mode not in (0, 1, 3, 0x11):
                    self.reply(ri, EOPNOTSUPP, NULL, 0)
                else:
                    r.offset = fa.offset
                    r.length = fa.length
                    r.flags = fa.mode
                    r.pending = 1
                    r.queued = 0
                    self.enqueue(ri)
                    keep = True
        elif opcode == FUSE_STATFS:
            memset(&so, 0, sizeof(so))
            so.st.blocks = self.size // 4096
            so.st.bsize = 4096
            so.st.frsize = 4096
            so.st.namelen = 255
            so.st.files = 1
            self.reply(ri, 0, &so, sizeof(so))
        elif opcode == FUSE_ACCESS:
            if alen < sizeof(fuse_access_in):
                self.reply(ri, EINVAL, NULL, 0)
            else:
                ac = <fuse_access_in *>arg
                if self.read_only and ac.mask & 2:
                    self.reply(ri, EROFS, NULL, 0)
                else:
                    self.reply(ri, 0 if self.allowed(uid, gid, ac.mask & 7) else EACCES,
                               NULL, 0)
        elif opcode == FUSE_LOOKUP:
            # The root is the file itself: there is nothing under it.
            self.reply(ri, ENOENT, NULL, 0)
        elif opcode == FUSE_FORGET or opcode == FUSE_BATCH_FORGET:
            pass     # no answer is expected
        elif opcode == FUSE_INTERRUPT:
            # ENOSYS to an interrupt makes the kernel stop sending them
            # (fc->no_interrupt): disk I/O is not interruptible, and every
            # request is answered anyway. It goes to the interrupt's own
            # unique, which is all the answer may carry.
            self.reply_unique(r.unique, ENOSYS)
        elif opcode == FUSE_DESTROY:
            self.destroying = True
            self.reply(ri, 0, NULL, 0)
        else:
            self.reply(ri, ENOSYS, NULL, 0)
        if not keep:
            self.rec_free(ri)

    # -- FUSE over io_uring --------------------------------------------------

    cdef void _uring_setup(self, uint32_t nqueues, int ring_fd, bytes params) except *:
        cdef io_uring_params p
        cdef int ret
        cdef uint32_t e
        if nqueues == 0:
            nqueues = os.sysconf("SC_NPROCESSORS_CONF")
        self.nqueues = nqueues
        self.qdepth = self.be.slot_count // nqueues
        if self.qdepth == 0:
            raise ValueError(f"{self.be.slot_count} slots cannot serve {nqueues} queues")
        self.nent = self.qdepth * nqueues
        self.uhdr = <fuse_uring_req_header *>calloc(self.nent, sizeof(fuse_uring_req_header))
        self.uiov = <iovec *>calloc(<size_t>self.nent * 2, sizeof(iovec))
        self.ent_cmd = <uint32_t *>calloc(self.nent, sizeof(uint32_t))
        if self.uhdr == NULL or self.uiov == NULL or self.ent_cmd == NULL:
            raise MemoryError()
        for e in range(self.nent):
            self.uiov[2 * e].iov_base = &self.uhdr[e]
            self.uiov[2 * e].iov_len = sizeof(fuse_uring_req_header)
            self.uiov[2 * e + 1].iov_base = self.slot_ptr(e)
            self.uiov[2 * e + 1].iov_len = self.be.slot_size
        self.devbuf = <char *>calloc(1, HDR + self.max_write)
        if self.devbuf == NULL:
            raise MemoryError()
        memset(&p, 0, sizeof(p))
        if ring_fd >= 0:
            # A ring the trusted side made (setup_ring) and this process
            # inherited, already restricted and enabled.
            if params is None or len(params) != sizeof(io_uring_params):
                raise ValueError(f"io_uring params must be {sizeof(io_uring_params)} bytes")
            memcpy(&p, <const char *>params, sizeof(p))
            if not p.flags & IORING_SETUP_SQE128 or p.sq_entries < self.nent:
                raise ValueError(f"the ring needs 128-byte SQEs and {self.nent} entries")
            ret = io_uring_queue_mmap(ring_fd, &p, &self.ring)
            _check(ret, "io_uring_queue_mmap")
            sq_array_identity(&self.ring, p.flags)
        else:
            p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE
            p.cq_entries = 2 * self.nent
            ret = io_uring_queue_init_params(self.nent, &self.ring, &p)
            _check(ret, "io_uring_queue_init_params (SQE128)")
        self.ring_up = True
        # Every slot belongs to a ring entry for good; the read path takes
        # none (INIT, FORGET and INTERRUPT carry no payload).
        self.nfree_slots = 0

    cdef void uring_prep(self, uint32_t e, uint32_t cmd, uint64_t commit_id) noexcept nogil:
        cdef io_uring_sqe *sqe = io_uring_get_sqe(&self.ring)
        cdef fuse_uring_cmd_req *c
        # The ring has an SQE per entry and an entry has at most one command
        # outstanding, so there is always one.
        if sqe == NULL:
            self.st_errno = EIO
            self.finish(END_ERROR)
            return
        memset(<char *>sqe, 0, 128)
        sqe.opcode = IORING_OP_URING_CMD
        sqe.fd = self.fd
        (<uint32_t *>(<char *>sqe + 8))[0] = cmd        # sqe->cmd_op
        if cmd == FUSE_IO_URING_CMD_REGISTER:
            sqe.addr = <uint64_t>&self.uiov[2 * e]
            sqe.len = 2
        c = <fuse_uring_cmd_req *>(<char *>sqe + 48)    # sqe->cmd
        c.commit_id = commit_id
        c.qid = <uint16_t>(e // self.qdepth)
        io_uring_sqe_set_data64(sqe, e)
        self.ent_cmd[e] = cmd

    cdef int uring_register(self) noexcept nogil:
        cdef uint32_t e
        cdef int ret
        for e in range(self.nent):
            self.uring_prep(e, FUSE_IO_URING_CMD_REGISTER, 0)
        self.st.uring_enters += 1
        ret = io_uring_submit(&self.ring)
        if ret < 0:
            self.st_errno = -ret
            self.finish(END_ERROR)
            return -1
        self.registered = True
        return 0

    cdef int uring_take(self) noexcept nogil:
        """Requests that came on ring entries, and commands that failed."""
        cdef io_uring_cqe *cqes[REAP_BATCH]
        cdef unsigned n, i
        cdef int taken = 0
        cdef uint32_t e, ri
        cdef int res
        while True:
            n = io_uring_peek_batch_cqe(&self.ring, cqes, REAP_BATCH)
            if n == 0:
                return taken
            for i in range(n):
                e = <uint32_t>cqes[i].user_data
                res = cqes[i].res
                if e >= self.nent:
                    continue
                if res == 0:
                    taken += 1
                    self.uring_request(e)
                elif res == -EAGAIN or res == -EINTR:
                    self.uring_prep(e, self.ent_cmd[e],
                                    self.uhdr[e].ring_ent_in_out.commit_id)
                elif res == -ENOTCONN or res == -ENODEV:
                    self.finish(END_UNMOUNTED)
                elif res == -ECONNABORTED:
                    self.finish(END_ABORTED)
                else:
                    self.st_errno = -res
                    self.finish(END_ERROR)
            io_uring_cq_advance(&self.ring, n)
            if self.end == END_ERROR:
                return -1

    cdef void uring_request(self, uint32_t e) noexcept nogil:
        """Entry e holds a request: its header in uhdr[e], its payload in
        slot e. It becomes a record that owns slot e while it is served."""
        cdef fuse_uring_req_header *u = &self.uhdr[e]
        cdef fuse_in_header *h = <fuse_in_header *>u.in_out
        cdef uint32_t ri = self.rec_alloc()
        cdef rec_t *r = &self.recs[ri]
        cdef uint32_t plen = u.ring_ent_in_out.payload_sz
        r.entry = e
        r.via_ring = 1
        r.unique = h.unique
        r.opcode = h.opcode
        memcpy(<char *>r.hdr, u.in_out, sizeof(fuse_in_header))
        memcpy(<char *>r.hdr + sizeof(fuse_in_header), u.op_in, sizeof(fuse_write_in))
        self.rec_slots[<size_t>ri * self.k] = e
        self.st.requests += 1
        if h.opcode == FUSE_READ or h.opcode == FUSE_WRITE:
            r.nparts = 1
            self.data_request(ri, plen)
            # data_request dropped the slot for requests answered at once;
            # it was never the pool's to take back.
            return
        r.nparts = 0
        # Control requests: op header, then any payload (a name), in one piece.
        memcpy(self.scratch, u.op_in, FUSE_URING_OP_IN_OUT_SZ)
        if plen > SCRATCH - FUSE_URING_OP_IN_OUT_SZ:
            plen = SCRATCH - FUSE_URING_OP_IN_OUT_SZ
        memcpy(self.scratch + FUSE_URING_OP_IN_OUT_SZ, self.slot_ptr(e), plen)
        self.control(ri, h.opcode, h.nodeid, self.scratch, FUSE_URING_OP_IN_OUT_SZ + plen,
                     h.uid, h.gid)

    cdef void uring_reply(self, uint32_t ri, int err, const void *data, uint32_t n) noexcept nogil:
        """Answer on the request's ring entry and fetch the next one."""
        cdef rec_t *r = &self.recs[ri]
        cdef uint32_t e = r.entry
        cdef fuse_uring_req_header *u = &self.uhdr[e]
        cdef fuse_out_header *oh = <fuse_out_header *>u.in_out
        if data != NULL and n and not err:
            memcpy(self.slot_ptr(e), data, n)
        if err:
            n = 0
        oh.len = sizeof(fuse_out_header) + n
        oh.error = -err if err > 0 else err
        oh.unique = r.unique
        u.ring_ent_in_out.payload_sz = n
        self.uring_prep(e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, u.ring_ent_in_out.commit_id)
