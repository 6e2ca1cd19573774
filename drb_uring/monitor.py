"""The monitor: the only trusted party. It brokers every channel.

It listens on a Unix SOCK_SEQPACKET socket. The driver side hands it its
device once; each user side opens channels by sending its ring's memory and
eventfds. For every channel the monitor checks the layout, gives the channel
an extent of the device that it alone decides, builds the grant ring (the
user's pool as fixed buffers, the device as fixed file 0, restricted, then
enabled) and spawns a backend worker that inherits the grant ring. It
watches each worker through a pidfd: a worker that dies fails its channel at
once, and the user side hears it on its connection.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys

from drb_uring import _backend, _grant, procs, protocol, ring
from drb_uring import layout as L

log = logging.getLogger("drb.monitor")

BLKGETSIZE64 = 0x80081272
MAX_SLOTS = 16384          # io_uring's limit on registered buffers
WORKER_STOP_GRACE = 1.0    # seconds between SIGTERM and SIGKILL


class MonitorError(Exception):
    pass


class Device:
    """The driver domain's device and the extents handed out on it."""

    def __init__(self, fd: int, align: int):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("Q", buf)[0]
        else:
            raise protocol.ProtocolError("the device must be a regular file or a block device")
        self.fd = fd
        self.align = align
        self.free = [(0, self.size)]   # sorted, disjoint (base, size)

    def alloc(self, size: int) -> tuple[int, int]:
        for i, (base, n) in enumerate(self.free):
            if n >= size:
                self.free[i:i + 1] = [(base + size, n - size)] if n > size else []
                return base, size
        raise MonitorError(f"no free extent of {size} bytes on the device "
                           f"(largest free: {max((n for _, n in self.free), default=0)})")

    def release(self, base: int, size: int) -> None:
        self.free.append((base, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for b, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((b, n))
        self.free = merged


class Channel:
    def __init__(self, cid: int, conn: socket.socket, extent: tuple[int, int]):
        self.id = cid
        self.conn: socket.socket | None = conn
        self.extent = extent
        self.worker: subprocess.Popen | None = None
        self.worker_pid = 0
        self.pidfd = -1
        self.gid = 0          # the channel's id in the host's eBPF maps
        self.closing = False


class Monitor:
    def __init__(self, path: str, *, worker_spin_ns: int = ring.DEFAULT_SPIN_NS,
                 spawn=None, enforce: bool = True):
        self.path = path
        # The eBPF monitor: without it no task table exists and nothing
        # checks what a worker submits. Turning it off is loud on purpose.
        self.ebpf = None
        self.domains: dict[str, str] = {}     # role -> cgroup, when a pair watches them
        if enforce:
            from drb_uring.ebpf import EbpfClient
            self.ebpf = EbpfClient()
        else:
            log.warning("RUNNING WITHOUT THE eBPF MONITOR (--no-monitor): workers' "
                        "access to user memory is bounded by the grant rings only, "
                        "not checked against any I/O task table")
        # spawn(argv_tail, fds) -> (Popen to watch, pid of the worker itself)
        self.spawn = spawn or _spawn_plain
        self.worker_spin_ns = worker_spin_ns
        self.sel = selectors.DefaultSelector()
        self.device: Device | None = None
        self.channels: dict[int, Channel] = {}
        self.next_id = 1
        self.stopping = False
        self.sock = protocol.listen(path)
        self.sel.register(self.sock, selectors.EVENT_READ, ("listen", None))

    # ---- the loop ------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping:
            self.step(1.0)

    def step(self, timeout: float) -> None:
        """One round of the loop: handle whatever is ready within `timeout`."""
        for key, _ in self.sel.select(timeout=timeout):
            kind, obj = key.data
            try:
                if kind == "listen":
                    conn, _ = self.sock.accept()
                    conn.setblocking(True)
                    self.sel.register(conn, selectors.EVENT_READ, ("conn", None))
                elif kind == "conn":
                    self._on_message(key.fileobj)
                elif kind == "channel":
                    self._on_channel_message(obj)
                elif kind == "worker":
                    self._on_worker_exit(obj)
            except Exception:   # one bad party must not take the monitor down
                log.exception("while handling %s", kind)

    def stop(self, *_):
        self.stopping = True

    def close(self) -> None:
        """Stop every worker and release everything. Idempotent."""
        for ch in list(self.channels.values()):
            self._stop_worker(ch)
            self._finish(ch, None)
        if self.device:
            protocol.close_fds([self.device.fd])
            self.device = None
        for key in list(self.sel.get_map().values()):
            if key.data[0] == "conn":
                key.fileobj.close()
        self.sel.close()
        if self.ebpf:
            self.ebpf.close()
            self.ebpf = None
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- messages ------------------------------------------------------------

    def _reply_error(self, conn: socket.socket, err: Exception) -> None:
        log.warning("refused: %s", err)
        try:
            protocol.send(conn, {"op": "error", "error": str(err)})
        except OSError:
            pass

    def _drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        conn.close()

    def _on_message(self, conn: socket.socket) -> None:
        try:
            msg, fds = protocol.recv(conn)
        except protocol.ProtocolError as e:
            self._reply_error(conn, e)
            return
        except OSError:
            self._drop(conn)
            return
        if msg is None:
            self._drop(conn)
            return
        out_fds: list[int] = []
        try:
            if msg["op"] == "register-device":
                reply = self._register_device(msg, fds)
            elif msg["op"] == "open":
                reply, out_fds = self._open(conn, msg, fds)
            elif msg["op"] == "trace":
                reply = self._trace(msg)
            else:
                raise protocol.ProtocolError(f"operation {msg['op']!r} is not a request")
        except (protocol.ProtocolError, MonitorError, L.LayoutError, OSError,
                RuntimeError) as e:
            protocol.close_fds(fds)
            self._reply_error(conn, e)
            return
        try:
            protocol.send(conn, {"op": "ok", **reply}, out_fds)
        finally:
            protocol.close_fds(out_fds)

    def _trace(self, msg: dict) -> dict:
        if not self.ebpf:
            raise MonitorError("this monitor runs without eBPF (--no-monitor): nothing traced")
        by_gid = {ch.gid: ch.id for ch in self.channels.values() if ch.gid}
        lease = msg.get("lease", 0)
        hist = self.ebpf.histograms(list(by_gid),
                                    lease if isinstance(lease, (int, float)) else 0)
        return {"channels": {str(by_gid[g]): {st: {str(b): n for b, n in bk.items()}
                                              for st, bk in v.items()}
                             for g, v in hist.items()},
                "counters": {role: self.ebpf.counters(path)
                             for role, path in self.domains.items()}}

    def _register_device(self, msg: dict, fds: list[int]) -> dict:
        if self.device is not None:
            raise MonitorError("a device is already registered")
        align = protocol.int_field(msg, "align", 0, 1 << 20) if "align" in msg else 0
        if align & (align - 1):
            raise protocol.ProtocolError(f"align {align} is not a power of two")
        self.device = Device(fds[0], align)
        log.info("device registered: %d bytes, align %d", self.device.size, align)
        return {"size": self.device.size}

    def _open(self, conn: socket.socket, msg: dict,
              fds: list[int]) -> tuple[dict, list[int]]:
        if self.device is None:
            raise MonitorError("no device registered by the driver domain yet")
        size = protocol.int_field(msg, "size", 1, self.device.size)
        peer = ring.PeerFds.from_list(fds)
        geo = ring.validate_peer_fds(peer)
        if geo.slot_count > MAX_SLOTS:
            raise MonitorError(f"slot_count {geo.slot_count} exceeds {MAX_SLOTS}")
        if self.device.align and geo.slot_size % self.device.align:
            raise MonitorError("slot size is not a multiple of the device alignment")
        extent = self.device.alloc(size)
        ch = Channel(self.next_id, conn, extent)
        tt_fd = -1
        try:
            ring_fd, params = _grant.setup_disabled(geo.sq_entries)
            try:
                pool_base = _grant.register_pool(ring_fd, peer.pool, geo.slot_size,
                                                 geo.slot_count)
                _grant.register_device(ring_fd, self.device.fd)
                _grant.restrict(ring_fd, [L.OP_READ_FIXED, L.OP_WRITE_FIXED, L.OP_FSYNC],
                                _backend.FLAG_FIXED_FILE, _backend.FLAG_FIXED_FILE)
                _grant.enable(ring_fd)
                if self.ebpf:
                    # Enforced from before the worker exists.
                    ch.gid, tt_fd = self.ebpf.grant(ring_fd, pool_base, geo.slot_size,
                                                    geo.slot_count, extent)
                ch.worker, ch.worker_pid = self._spawn_worker(ring_fd, params, pool_base,
                                                              peer, extent)
            finally:
                os.close(ring_fd)
        except BaseException:
            if ch.gid:
                self.ebpf.ungrant(ch.gid)
            protocol.close_fds([tt_fd] if tt_fd >= 0 else [])
            self.device.release(*extent)
            raise
        finally:
            peer.close()       # the worker has its own copies; never the pool
        self.next_id += 1
        ch.pidfd = os.pidfd_open(ch.worker.pid)
        self.channels[ch.id] = ch
        self.sel.unregister(conn)
        self.sel.register(conn, selectors.EVENT_READ, ("channel", ch))
        self.sel.register(ch.pidfd, selectors.EVENT_READ, ("worker", ch))
        log.info("channel %d open: extent %d+%d, worker pid %d%s", ch.id, extent[0], extent[1],
                 ch.worker_pid, "" if self.ebpf else " (UNMONITORED)")
        reply = {"channel": ch.id, "extent_size": extent[1], "worker_pid": ch.worker_pid}
        if tt_fd >= 0:
            from drb_uring.ebpf import REAP_HIST_OFFSET, TASK_TABLE_BYTES, TASK_VERSION
            reply["task_table_version"] = TASK_VERSION
            reply["task_table_bytes"] = TASK_TABLE_BYTES
            reply["reap_hist_offset"] = REAP_HIST_OFFSET
            return reply, [tt_fd]
        return reply, []

    def _spawn_worker(self, ring_fd, params, pool_base, peer,
                      extent) -> tuple[subprocess.Popen, int]:
        fds = [ring_fd, peer.ctl_user, peer.ctl_driver, peer.user_efd, peer.driver_efd]
        spec = {"ring_fd": ring_fd, "params": params.hex(), "pool_base": pool_base,
                "ring_fds": [peer.ctl_user, peer.ctl_driver, -1, peer.user_efd,
                             peer.driver_efd],
                "extent_base": extent[0], "extent_size": extent[1],
                "align": self.device.align, "spin_ns": self.worker_spin_ns}
        return self.spawn(["-m", "drb_uring.worker", json.dumps(spec)], fds)

    # ---- channel life --------------------------------------------------------

    def _on_channel_message(self, ch: Channel) -> None:
        try:
            msg, fds = protocol.recv(ch.conn)
            protocol.close_fds(fds)
        except (protocol.ProtocolError, OSError):
            msg = None
        ch.closing = True
        # The extent is released only once the worker is gone: until then it
        # could still be doing I/O there. A "close" is answered after that,
        # so the user side may reuse the space as soon as it has the reply.
        self._stop_worker(ch)
        if msg is not None and msg["op"] == "close":
            try:
                protocol.send(ch.conn, {"op": "ok"})
            except OSError:
                pass
        self._finish(ch, None)

    def _stop_worker(self, ch: Channel) -> None:
        w = ch.worker
        if w is None or w.poll() is not None:
            return
        try:
            os.kill(ch.worker_pid, signal.SIGTERM)   # the worker itself stops cleanly
        except ProcessLookupError:
            pass
        try:
            w.wait(WORKER_STOP_GRACE)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()

    def _on_worker_exit(self, ch: Channel) -> None:
        rc = ch.worker.wait()
        reason = None
        if not ch.closing:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            if rc == 137:     # the stand-in in the driver domain reports 128 + signal
                how = "killed by signal 9"
            reason = f"backend worker {ch.worker_pid} {how}"
            violated = self.ebpf.failed(ch.gid) if self.ebpf and ch.gid else None
            if violated:
                reason = f"monitor killed backend worker {ch.worker_pid}: {violated}"
                log.error("VIOLATION channel %d: %s", ch.id, violated)
            log.error("channel %d failed: %s", ch.id, reason)
        self._finish(ch, reason)

    def _finish(self, ch: Channel, reason: str | None) -> None:
        if ch.conn is not None:
            if reason:
                try:
                    protocol.send(ch.conn, {"op": "failed", "reason": reason})
                except OSError:
                    pass
            self.sel.unregister(ch.conn)
            ch.conn.close()
            ch.conn = None
        if ch.pidfd >= 0:
            self.sel.unregister(ch.pidfd)
            os.close(ch.pidfd)
            ch.pidfd = -1
        if ch.worker is not None and ch.worker.poll() is None:
            ch.worker.kill()
            ch.worker.wait()
        if self.ebpf and ch.gid:
            self.ebpf.ungrant(ch.gid)
            ch.gid = 0
        if self.device is not None:
            self.device.release(*ch.extent)
        self.channels.pop(ch.id, None)
        log.info("channel %d closed", ch.id)


def _spawn_plain(args: list[str], fds: list[int]):
    proc = subprocess.Popen([sys.executable, *args], pass_fds=fds, env=procs.module_env())
    return proc, proc.pid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drb-monitor", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--worker-spin-ns", type=int, default=ring.DEFAULT_SPIN_NS)
    p.add_argument("--no-monitor", action="store_true",
                   help="run without the eBPF monitor (loudly logged; for comparison only)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s drb-monitor[%(process)d] %(message)s")
    try:
        mon = Monitor(a.socket, worker_spin_ns=a.worker_spin_ns, enforce=not a.no_monitor)
    except RuntimeError as e:
        print(f"drb-monitor: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, mon.stop)
    signal.signal(signal.SIGINT, mon.stop)
    print("ready", flush=True)
    try:
        mon.run()
    finally:
        mon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
