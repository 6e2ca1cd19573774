"""Helpers for tests that bring pairs up with the real CLI."""
import contextlib
import json
import os
import subprocess
import sys
import time

from channel_env import HELPERS

from drb_uring import procs
from drb_uring.domains.config import PairConfig

DRB = os.path.join(os.path.dirname(sys.executable), "drb")


def monitor_args() -> list[str]:
    """DRB_TEST_NO_MONITOR=1 brings pairs up without the eBPF monitor (while
    another suite restarts the host's monitor service); unset, as make test
    runs them, they are monitored."""
    return ["--no-monitor"] if os.environ.get("DRB_TEST_NO_MONITOR") == "1" else []


def drb(*args, check=True, timeout=120, **kw):
    proc = subprocess.run([DRB, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"drb {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def pairs_made():
    """A function that brings a pair up with the CLI and returns its
    status; every pair it made is taken down at the end."""
    names = []

    def up(name, *args):
        names.append(name)
        drb("up", name, *args)
        return json.loads(drb("status", name, "--json").stdout)
    try:
        yield up
    finally:
        for n in names:
            drb("down", n, check=False)


def in_domain(name, role, code, check=True, timeout=60):
    # Inside a domain: the domain's python3 (the host's /usr, read-only),
    # with drb_uring at /run/drb-lib; nothing of the host's virtualenv.
    return drb("exec", name, role, "--", "python3", "-c", code, check=check,
               timeout=timeout)


def bpf_prog_ids(names=("drb_dev_policy", "drb_sock_policy")) -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    ids = set()
    for line in out.splitlines():
        if any(f"name {n}" in line for n in names):
            ids.add(int(line.split(":")[0]))
    return ids


def leftovers(name_prefix: str) -> list[str]:
    """What the kernel and file system still hold of pairs with this prefix."""
    from drb_uring.domains import cgroup
    found = []
    root = os.path.join(cgroup.cgroup2_root(), "drb")
    if os.path.isdir(root):
        found += [f"cgroup {root}/{n}" for n in os.listdir(root) if n.startswith(name_prefix)]
    if os.path.isdir("/run/drb"):
        found += [f"state /run/drb/{n}" for n in os.listdir("/run/drb")
                  if n.startswith(name_prefix)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{name_prefix}" in cmd and "pytest" not in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if name_prefix in line]
    return found


def wait_gone(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.02)
    return pred()


def rogue_pair(name: str, mode: str, **config):
    """A pair like `drb up NAME --size 16m` makes (with `config`), whose
    workers are rogue (tests/helpers/rogue_worker.py MODE)."""
    cfg = PairConfig(name=name, **{"size": 16 << 20, **config})
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, os.path.join(HELPERS, "pair_with_rogue.py"), mode,
                             cfg.to_json(), str(w)], pass_fds=[w], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=procs.module_env())
    os.close(w)
    with os.fdopen(r) as f:
        assert f.readline().strip() == "ok"
    return proc
