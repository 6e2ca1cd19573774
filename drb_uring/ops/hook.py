"""`drb hook`: the OCI hook that makes a container a user domain.

The runtime runs it with the container's state on stdin (OCI runtime
spec: ociVersion, id, status, pid, bundle, annotations). A container
annotated io.drb.pair=NAME:

- createRuntime (status "creating"): becomes a user domain of the running
  pair NAME, as `drb user add NAME --attach PID` makes one, before its
  process starts. Its root has not moved yet (runc calls the hook before
  pivot_root), so the pair's socket and drb's package are mounted under
  the root the bundle names; they are at /run/drb/NAME and /run/drb-lib once
  it has moved there.
- poststop (status "stopped"): leaves the pair, as `drb user rm` does.

io.drb.disk=1 gives the container a disk (as drb user add --disk does;
its root must then hold python3 and liburing, as the disk's server runs
there); without it the pair's --disk decides. Any other io.drb.* annotation
is a mistake. A refusal is one line on stderr and exit status 1: the
runtime then fails the container's start with it, and the pair is as it was.
"""

from __future__ import annotations

import json
import os
import sys

from drb_uring.domains import control, state
from drb_uring.domains.config import check_name
from drb_uring.errors import DrbError
from drb_uring.ops.install import PAIR_ANNOTATION

DISK_ANNOTATION = "io.drb.disk"
KNOWN = (PAIR_ANNOTATION, DISK_ANNOTATION)
MAX_STATE = 1 << 20


class HookError(DrbError):
    pass


def read_state(text: str) -> dict:
    try:
        st = json.loads(text)
    except ValueError as e:
        raise HookError(f"the container's state on stdin is not JSON: {e}") from None
    if not isinstance(st, dict) or not isinstance(st.get("id"), str) or not st["id"]:
        raise HookError("the container's state on stdin has no id (is this an OCI hook?)")
    if not isinstance(st.get("annotations", {}), dict):
        raise HookError("the container's annotations are not an object")
    return st


def wanted(annotations: dict) -> tuple[str, bool]:
    """The pair a container asks to join, and whether it asks for its disk."""
    ours = {k: v for k, v in annotations.items() if k.startswith("io.drb.")}
    for k in ours:
        if k not in KNOWN:
            raise HookError(f"unknown annotation {k} (drb knows {', '.join(KNOWN)})")
    name = ours.get(PAIR_ANNOTATION)
    if not isinstance(name, str):
        raise HookError(f"no {PAIR_ANNOTATION} annotation: which pair?")
    try:
        check_name(name)
    except DrbError as e:
        raise HookError(f"{PAIR_ANNOTATION}={name}: {e}") from None
    disk = ours.get(DISK_ANNOTATION, "0")
    if disk not in ("0", "1"):
        raise HookError(f"{DISK_ANNOTATION}={disk}: say 1 for a disk, or leave it out")
    return name, disk == "1"


def from_bundle(bundle: str) -> tuple[str, str | None]:
    """The container's root directory and host name, from its bundle's
    config.json (runc sets the host name after the hook)."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            cfg = json.load(f)
        root = cfg["root"]["path"]
        hostname = cfg.get("hostname")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HookError(f"cannot read the container's root from {bundle}/config.json: "
                        f"{e}") from None
    return (os.path.normpath(os.path.join(bundle, root)),
            hostname if isinstance(hostname, str) and hostname else None)


def join(st: dict) -> str:
    name, disk = wanted(st.get("annotations") or {})
    pid = st.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise HookError(f"the container's state has no pid to attach ({pid!r})")
    if not isinstance(st.get("bundle"), str):
        raise HookError("the container's state has no bundle")
    root, hostname = from_bundle(st["bundle"])
    got = control.add_user(name, pid, None, container=st["id"], rootfs=root, disk=disk or None,
                           **({"hostname": hostname} if hostname else {}))
    return f"container {st['id'][:12]} is {got['user']} of pair {name}"


def leave(st: dict) -> str:
    name, _disk = wanted(st.get("annotations") or {})
    if not state.daemon_pid(name):
        return f"pair {name} is not up: nothing to leave"
    mine = [u for u, d in (state.read_state(name) or {}).get("domains", {}).items()
            if u != "user" and d.get("container") == st["id"]]
    if not mine:
        return f"container {st['id'][:12]} was no user domain of pair {name}"
    got = control.ask_daemon(name, {"op": "user_rm", "container": st["id"]})
    return f"container {st['id'][:12]} left pair {name} ({got['user']})"


def run(stdin=None) -> int:
    state.require_root()
    text = (stdin or sys.stdin).read(MAX_STATE)
    try:
        st = read_state(text)
        status = st.get("status")
        if status == "creating":
            said = join(st)
        elif status == "stopped":
            said = leave(st)
        else:
            raise HookError(f"drb hook runs at createRuntime and poststop, not with the "
                            f"container {status!r}")
    except (DrbError, OSError) as e:
        # One line: the runtime puts it in the error it reports.
        print(f"drb hook: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"drb hook: {said}", file=sys.stderr)
    return 0
