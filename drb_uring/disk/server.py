"""The disk's FUSE server process.

    python -m drb_uring.disk.server SPEC      (the /dev/fuse descriptor is fd 3)

It serves one FUSE connection that the trusted side mounted already, from a
backend, until the mount goes, the connection is aborted, or SIGTERM/SIGINT
(then it answers what is in flight first). Its last line on stdout is a
JSON record of why it ended and its counters.

With ``restart`` the connection was set up by an earlier server that died:
this one answers no INIT, and starts by asking the kernel to send again
every request the dead one held (FUSE_NOTIFY_RESEND). A connection outlives
its server because the trusted side keeps its own descriptor of it; it must
start the new server only once the old one is reaped, so that nothing the
old one submitted is still running when the requests come again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from drb_uring import procs
from drb_uring.spec import Spec, SpecError

FUSE_FD = 3
READY_FD = 4
RING_FD = 5
OPEN_WAIT = 10.0       # seconds a restarted server waits for its extent


@dataclasses.dataclass(frozen=True)
class DiskServerSpec(Spec):
    backing: str = ""                  # the local file (or block device) behind the disk,
    channel: str = ""                  # or a channel: the monitor socket (drb's disk)
    size: int | None = None            # bytes shown; default: the whole backing file
    slot_size: int = 128 * 1024
    slot_count: int = 256
    max_write: int = 1 << 20
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    page_cache: bool = False           # FOPEN_KEEP_CACHE instead of FOPEN_DIRECT_IO
    read_only: bool = False
    direct: bool = False               # O_DIRECT on the backing file
    restart: bool = False              # the connection's INIT was answered before
    uring: bool = False                # FUSE over io_uring
    uring_queues: int = 0              # 0: one per possible CPU (what the kernel wants)
    uring_params: str = ""             # hex: the ring at fd 5 is the trusted side's
    spin_us: int = 0                   # poll this long before sleeping
    max_background: int = 64
    ready_fd: bool = False             # fd 4: a byte, then closed, once serving

    def check(self) -> None:
        if bool(self.backing) == bool(self.channel):
            raise SpecError("a disk serves a backing file or a channel, one of them")
        for what in (self.backing, self.channel):
            if what and not what.startswith("/"):
                raise SpecError(f"{what!r} is not an absolute path")
        if self.channel and self.size is None:
            raise SpecError("a channel's disk needs its size")
        if self.slot_size <= 0 or self.slot_size % 4096:
            raise SpecError(f"slot_size {self.slot_size} is not a positive multiple of 4096")
        if not 1 <= self.slot_count <= 16384:
            raise SpecError(f"slot_count {self.slot_count} is not in 1..16384")
        if self.size is not None and self.size < 0:
            raise SpecError(f"size {self.size} is negative")
        if not 1 <= self.max_background <= 65535:
            raise SpecError(f"max_background {self.max_background} is not in 1..65535")
        if self.spin_us < 0:
            raise SpecError("spin_us is negative")
        if self.uring_params and not self.uring:
            raise SpecError("uring_params without uring")


def trusted_ring(entries: int) -> tuple[int, str]:
    """For FUSE over io_uring in a domain, which may not call io_uring_setup:
    the ring, made here (128-byte SQEs), restricted to IORING_OP_URING_CMD
    with no SQE flag and no register operation, then enabled. Returns its fd
    (to pass by inheritance: io_uring fds cannot cross a Unix socket) and
    the params the server maps it with, as hex for the spec."""
    from drb_uring.channel import _grant
    from drb_uring.disk import _fuseloop
    fd, params = _fuseloop.setup_ring(entries)
    try:
        _grant.restrict(fd, [_fuseloop.CONSTANTS["IORING_OP_URING_CMD"]], 0, 0)
        ret = _grant.register(fd, _grant.REGISTER_ENABLE_RINGS, None, 0)
        if ret < 0:
            raise OSError(-ret, f"enabling the ring: {os.strerror(-ret)}")
    except BaseException:
        os.close(fd)
        raise
    return fd, params.hex()


def spawn(spec: DiskServerSpec, fuse_fd: int, *, ring_fd: int | None = None,
          wait_ready: float | None = 10.0, **kw) -> procs.Child:
    """Start a server on `fuse_fd` (it gets its own copy as fd 3; a trusted
    ring as fd 5) and, with `wait_ready`, wait until it serves (its signal
    handlers are in place)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fds = [fuse_fd, w] + ([ring_fd] if ring_fd is not None else [])
        child = procs.spawn_at(procs.argv("drb_uring.disk.server", spec.replace(ready_fd=True)),
                               fds, **kw)
        os.close(w)
        w = -1
        if wait_ready is None:
            return child
        import select
        if not select.select([r], [], [], wait_ready)[0]:
            child.kill()
            child.wait()
            raise TimeoutError(f"the disk server was not serving within {wait_ready} s")
        return child
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _backend(spec: DiskServerSpec):
    """The local file, or a channel of the disk's size at offset 0 of the
    user domain's extent (the same bytes every time: the disk survives its
    server and the pair)."""
    if not spec.channel:
        from drb_uring.disk._backend import LocalFile
        return LocalFile(spec.backing, size=spec.size, slot_size=spec.slot_size,
                         slot_count=spec.slot_count, direct=spec.direct)
    from drb_uring.channel.client import Channel
    from drb_uring.disk._ringbackend import RingBackend
    from drb_uring.ring import layout as L
    geo = L.Geometry(sq_entries=L.next_pow2(spec.slot_count, 2),
                     cq_entries=L.next_pow2(spec.slot_count, 2),
                     slot_size=spec.slot_size, slot_count=spec.slot_count)
    ch = _open_at_zero(Channel, spec, geo)
    try:
        return RingBackend(ch)
    except BaseException:
        ch.close()
        raise


def _open_at_zero(Channel, spec: DiskServerSpec, geo):
    """The disk's channel, at offset 0 of the extent. A server started
    after another died may find the dead one's channel still holding it:
    the broker frees an extent only once the kernel is done with its ring.
    That takes a moment; the server waits for it rather than fail."""
    from drb_uring import protocol
    end = time.monotonic() + OPEN_WAIT
    while True:
        try:
            return Channel(spec.channel, spec.size, offset=0, geometry=geo)
        except protocol.ProtocolError as e:
            if "overlaps another channel" not in str(e) or time.monotonic() > end:
                raise
        time.sleep(0.02)


def _run(server, backend, stop_r: int, spin_ns: int) -> str:
    """Serve until the end, hearing the backend's notices in the pauses."""
    while True:
        why = server.run(stop_r, spin_ns)
        if why != "notice":
            return why
        backend.hear()


def serve(spec: DiskServerSpec, fd: int = FUSE_FD) -> dict:
    from drb_uring.disk._fuseloop import FuseServer

    os.set_blocking(fd, False)
    mtime = spec.mtime or (int(os.stat(spec.backing).st_mtime) if spec.backing else 0)
    # SIGTERM/SIGINT reach the loop (which runs without the GIL) through the
    # wake-up descriptor Python's C-level handler writes to.
    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(stop_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    backend = _backend(spec)
    try:
        server = FuseServer(fd, backend, max_write=spec.max_write, mode=spec.mode, uid=spec.uid,
                            gid=spec.gid, mtime=mtime, page_cache=spec.page_cache,
                            read_only=spec.read_only, initialized=spec.restart,
                            uring=spec.uring, uring_queues=spec.uring_queues,
                            uring_fd=RING_FD if spec.uring_params else -1,
                            uring_params=bytes.fromhex(spec.uring_params) or None,
                            max_background=spec.max_background)
        if spec.restart:
            server.notify_resend()
        if spec.ready_fd:
            # A byte, not only the close: whoever started us through a
            # runtime (runc exec) may hold another copy of this descriptor.
            os.write(READY_FD, b"r")
            os.close(READY_FD)
        why = _run(server, backend, stop_r, spec.spin_us * 1000)
        return {"end": why, **server.stats, **({"backend": backend.stats}
                                              if spec.channel else {})}
    finally:
        if spec.channel:
            backend.ch.close()
        else:
            backend.close()


def main() -> None:
    spec = procs.spec_from_argv(DiskServerSpec)
    try:
        result = serve(spec)
    except OSError as e:
        print(json.dumps({"end": "error", "error": str(e)}), flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
