"""The Linux calls Python's os module lacks, through one libc handle.

Every call checks its result and raises OSError with the errno the call
itself set, naming what failed.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def syscall(nr: int, *args, what: str = "syscall") -> int:
    """A raw system call with integer, bytes or pointer arguments."""
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return check(libc.syscall(ctypes.c_long(nr), *conv), what)


def die_with_parent(sig: int = 9) -> None:
    """Have the kernel send `sig` to this process when its parent exits.
    Call it in the child; a parent that died before this call left us
    reparented, which the caller should check with os.getppid()."""
    check(libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def setns(fd: int, nstype: int, what: str = "setns") -> None:
    check(libc.setns(fd, nstype), what)
