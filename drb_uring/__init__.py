"""drb-uring: Double Ring Buffer I/O between two containers on one Linux host.

A user domain and a driver domain share two rings in io_uring's own formats
(requests as ``struct io_uring_sqe``, responses as ``struct io_uring_cqe``)
over memfd-backed memory. The parts: ring, channel, enforce, domains, tools.
"""

__version__ = "0.1.0"
