"""The trusted side of ``drb-fusermount``, the stand-in a domain runs where
libfuse runs the setuid ``fusermount``.

    python -m drb_uring.disk.fusermount SOCKET [--no-allow-other]

A libfuse file system in a domain (fuse2fs, say) cannot mount: the domain's
seccomp profile refuses mount(2) and it has no setuid helper. libfuse then
runs ``fusermount`` with a socket in _FUSE_COMMFD; ``drb-fusermount`` (built
from fusermount.c next to this file) asks this service over SOCKET, which
opens /dev/fuse in the asking process's user namespace, mounts it in its
mount namespace, and hands the descriptor back, which the stand-in passes
on as fusermount does. The connection belongs to the asker's user
namespace: its requests carry the domain's own ids, so a file system keeps
its owners across host id changes (a pair brought up again), and no
process outside that namespace (the host's included) gets past its
permission check.

Whom it distrusts: the asking process. Who it is comes from SO_PEERCRED,
never from the request, and its SO_PEERPIDFD makes sure the namespaces
entered are that process's and not one that took its pid after it exited;
the mount goes into that process's mount namespace,
on a directory that must belong to its uid (or it is root of its user
namespace), with that uid and gid as the mount's user_id and group_id,
always nosuid and nodev; an option it does not know is refused, not passed on. It only
unmounts what it mounted itself, in the same namespace. It keeps no copy of
the descriptor: a libfuse server cannot resume a connection, so the
connection should end (and its mount fail fast) when that server goes.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import sys

from drb_uring.disk import mount as M

MAX_MSG = 8192
SO_PEERPIDFD = 77      # Linux 6.5; Python 3.11's socket module does not name it

# fusermount's own flags, which it handles (or libfuse's, which pass
# through it); none of them lets the asker widen what it gets.
_IGNORED = {"rw", "nosuid", "nodev", "suid", "dev", "exec", "async", "atime", "noatime",
            "nodiratime", "relatime", "nonempty", "auto_unmount", "big_writes"}


class Refused(Exception):
    def __init__(self, err: int, text: str):
        super().__init__(text)
        self.errno = err


def parse_options(opts: str, *, allow_other: bool) -> dict:
    """libfuse's mount options, as mount_dir() keywords; Refused if one is
    unknown or not allowed."""
    out = {"allow_other": False, "default_permissions": False, "read_only": False,
           "max_read": None, "subtype": None, "source": "fuse"}
    for opt in filter(None, opts.split(",")):
        key, eq, value = opt.partition("=")
        if not eq and key in _IGNORED:
            continue
        if not eq and key == "ro":
            out["read_only"] = True
        elif not eq and key == "allow_other":
            if not allow_other:
                raise Refused(errno.EPERM, "allow_other is not allowed here")
            out["allow_other"] = True
        elif not eq and key == "default_permissions":
            out["default_permissions"] = True
        elif eq and key == "max_read" and value.isdigit() and 0 < int(value) < 1 << 31:
            out["max_read"] = int(value)
        elif eq and key in ("fsname", "subtype") and value and len(value) < 256 and \
                all(c.isprintable() and c not in " ,\\" for c in value):
            out["source" if key == "fsname" else "subtype"] = value
        elif eq and key in ("user", "blksize"):
            continue     # mtab's, and fuseblk's only
        else:
            raise Refused(errno.EINVAL, f"mount option {opt!r} is not supported")
    return out


def peer(conn: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return pid, uid, gid


def mount_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


class FusermountService:
    """Answers drb-fusermount requests on a SOCK_SEQPACKET socket, one
    request per connection."""

    def __init__(self, path: str, *, allow_other: bool = True):
        self.path = path
        self.allow_other = allow_other
        self.mounts: dict[tuple[int, str], M.Mount] = {}
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        # The domain's processes run as the domain's uids; who may ask is
        # decided by where the socket is bind-mounted.
        os.chmod(path, 0o666)
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        fd = -1
        pidfd = -1
        try:
            try:
                data = conn.recv(MAX_MSG)
                pid, uid, gid = peer(conn)
                pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
                fields = data.split(b"\0")
                if len(fields) != 4 or fields[3] != b"":
                    raise Refused(errno.EINVAL, "malformed request")
                op, path, arg = (f.decode("utf-8", "strict") for f in fields[:3])
                if not path.startswith("/") or "\0" in path:
                    raise Refused(errno.EINVAL, f"{path!r} is not an absolute path")
                if op == "mount":
                    fd = self.mount(pid, pidfd, uid, gid, path, arg)
                elif op == "umount":
                    self.umount(pid, pidfd, path, arg)
                else:
                    raise Refused(errno.EINVAL, f"unknown request {op!r}")
            except Refused as e:
                self.reply_error(conn, e.errno, str(e))
                return
            except OSError as e:
                self.reply_error(conn, e.errno or errno.EIO, str(e))
                return
            except UnicodeDecodeError:
                self.reply_error(conn, errno.EINVAL, "request is not UTF-8")
                return
            if fd >= 0:
                socket.send_fds(conn, [b"ok\0"], [fd])
            else:
                conn.send(b"ok\0")
        except OSError:
            pass     # the asker went away; nothing to tell it
        finally:
            if fd >= 0:
                os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)

    @staticmethod
    def reply_error(conn: socket.socket, err: int, text: str) -> None:
        try:
            conn.send(b"error\0%d\0%s\0" % (err, text.encode()[:1024]))
        except OSError:
            pass

    def mount(self, pid: int, pidfd: int, uid: int, gid: int, path: str, opts: str) -> int:
        kw = parse_options(opts, allow_other=self.allow_other)
        # In the asker's user namespace: a domain's file system keeps the
        # domain's own ids (its root is 0 there, whichever host ids it has).
        m, fd = M.mount_dir_as(pid, path, uid, gid, pidfd=pidfd, **kw)
        self.mounts[(mount_ns(pid), path)] = m
        return fd

    def umount(self, pid: int, pidfd: int, path: str, how: str) -> None:
        key = (mount_ns(pid), path)
        m = self.mounts.get(key)
        if m is None:
            raise Refused(errno.EINVAL, f"{path} was not mounted by drb-fusermount")
        here = M.Mount(pid, path, m.major, m.minor)
        try:
            current = M.find(pid, path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.major, current.minor) == (m.major, m.minor):
            # auto_unmount asks once the file system is gone: abort first,
            # so that nothing waits on a server that will never answer.
            M.unmount(here, abort_first=(how == "auto"), pidfd=pidfd)
        del self.mounts[key]


def main() -> None:
    ap = argparse.ArgumentParser(description="the trusted side of drb-fusermount")
    ap.add_argument("socket")
    ap.add_argument("--no-allow-other", action="store_true")
    ap.add_argument("--ready-fd", type=int, default=-1,
                    help="a descriptor to close once listening")
    a = ap.parse_args()
    svc = FusermountService(a.socket, allow_other=not a.no_allow_other)
    if a.ready_fd >= 0:
        os.close(a.ready_fd)
    try:
        svc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    sys.exit(0)


def helper_path() -> str:
    """Where the built drb-fusermount is (next to this module)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "drb-fusermount")


if __name__ == "__main__":
    main()
