# Linux system interfaces used by the rings that Cython's posix/ package lacks.
from libc.stdint cimport uint64_t

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC
    int EFD_NONBLOCK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int POLLIN
    int POLLERR
    int POLLHUP
    int POLLNVAL

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec

cdef extern from "<poll.h>" nogil:
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *tmo, const sigset_t *sigmask)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    int MAP_POPULATE
    void *MAP_FAILED

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR
    int EAGAIN
    int ETIMEDOUT
    int EPROTO
    int EPIPE
    int EBUSY
