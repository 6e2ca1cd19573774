"""The backend worker process, spawned by the monitor inside the driver domain.

It inherits the grant ring and the channel's ring descriptors (never the
data pool), maps the rings, and runs the Cython loop until told to stop.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from drb_uring import ring

PR_SET_PDEATHSIG = 1


def _die_with_monitor() -> None:
    # No channel runs unmonitored: the kernel kills us when our parent (the
    # monitor, or its stand-in that itself dies with the monitor) goes.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:      # reparented: the parent died before prctl
        sys.exit("drb-worker: the monitor is already gone")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    _die_with_monitor()
    from drb_uring._backend import Backend
    end = ring.attach(ring.PeerFds.from_list(spec["ring_fds"]), spin_ns=spec["spin_ns"],
                      map_pool=False)
    backend = Backend(end, spec["ring_fd"], bytes.fromhex(spec["params"]), spec["pool_base"],
                      spec["extent_base"], spec["extent_size"], spec["align"])
    backend.misbehave = int(os.environ.get("DRB_WORKER_MISBEHAVE", "0") or 0)
    probe = os.environ.get("DRB_WORKER_PROBE_OUT")
    if probe:
        # Test hook (tests set it in the monitor's environment; no command
        # line reaches it): what the kernel answers when this worker tries
        # to step outside its grant.
        from drb_uring import _grant
        res = backend.probe_restrictions()
        res["register"] = _grant.register(spec["ring_fd"], _grant.REGISTER_BUFFERS, None, 0)
        with open(probe, "w") as f:
            json.dump(res, f)
    try:
        rc = backend.serve()
    finally:
        stats = backend.stats
        backend.close()
        end.close()
    print(f"drb-worker[{os.getpid()}]: stop rc={rc} {json.dumps(stats)}", file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
