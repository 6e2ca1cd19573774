"""The FUSE wire protocol of a single-file export, as Python names.

The structs are defined once, in cython_ext/drb_uring/disk/fuse_kernel.pxd
(the kernel's ABI 7.45); this module reads their sizes, field offsets and
the protocol's constants from the compiled loop, the way the task table's
values come from drb_uring.enforce._task. Python never packs a request or
an answer: the loop (``_fuseloop``) does, without the GIL.

What the export answers, and how:

========================  ====================================================
INIT                      7.45 (or the kernel's minor if lower); ASYNC_READ,
                          BIG_WRITES, ASYNC_DIO, ABORT_ERROR, MAX_PAGES,
                          INIT_EXT (and OVER_IO_URING when asked); max_write
                          and max_pages from the server's limits
GETATTR                   the file: one inode, its size, mode, owner
SETATTR                   mode/uid/gid: EPERM; ftruncate to another size:
                          EPERM; O_TRUNC and times: ignored, the real
                          attributes returned
OPEN                      FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, or
                          FOPEN_KEEP_CACHE with the page cache
READ / WRITE              to the backend, split per slot; clipped at the
                          end of the disk (a write past it: ENOSPC)
FSYNC / FALLOCATE         to the backend (FALLOCATE: only what keeps the size)
FLUSH, RELEASE            0
STATFS                    the disk's size in 4 KiB blocks
ACCESS                    the mode bits
LOOKUP                    ENOENT (the root is the file)
INTERRUPT                 ENOSYS, which turns interrupts off for good
FORGET, BATCH_FORGET      no answer
DESTROY                   0, then the loop ends
anything else             ENOSYS
========================  ====================================================
"""

from __future__ import annotations

from drb_uring.disk import _fuseloop

CONSTANTS: dict[str, int] = dict(_fuseloop.CONSTANTS)
globals().update(CONSTANTS)

LAYOUT: dict[str, tuple[int, dict[str, int]]] = _fuseloop.struct_layout()
SIZES: dict[str, int] = {name: size for name, (size, _) in LAYOUT.items()}


def opcode_name(op: int) -> str:
    for name, value in CONSTANTS.items():
        if name.startswith("FUSE_") and value == op and not name.startswith("FUSE_NOTIFY"):
            return name
    return f"opcode {op}"
