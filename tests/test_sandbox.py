"""Attacks from inside real domains, as a hostile root process would make
them: each must be refused with the exact errno, and leave the host's files,
the other domain's memory and the monitor's maps as they were."""
import hashlib
import os
import re
import subprocess
import textwrap

import pytest
from pair_env import in_domain, leftovers, pairs_made, wait_gone

PREFIX = "tsbx"

# Run inside a domain: a call, and what it did (ok, or the errno's name).
TRY = textwrap.dedent("""
    import ctypes, errno, os, socket, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    def sys_(nr, *args):
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a
                                                for a in args])
        if r < 0:
            raise OSError(ctypes.get_errno(), "")
        return r
    def attempt(name, fn):
        try:
            fn(); print(name, "ok")
        except OSError as e:
            print(name, errno.errorcode.get(e.errno, e.errno))
    def bpf(cmd, attr=b""):
        buf = ctypes.create_string_buffer(attr.ljust(128, b"\\0"), 128)
        return sys_(321, cmd, buf, 128)
""")


def attempts(name, role, body, **kw) -> dict:
    out = in_domain(name, role, TRY + textwrap.dedent(body), **kw).stdout
    return dict(line.split(maxsplit=1) for line in out.splitlines() if " " in line)


def status_of(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def bpf_ids(kind: str) -> set[int]:
    out = subprocess.run(["bpftool", kind, "show"], capture_output=True, text=True).stdout
    return {int(m) for m in re.findall(r"^(\d+):", out, re.M)}


@pytest.fixture(scope="module")
def pair():
    with pairs_made() as up:
        yield up
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


@pytest.fixture(scope="module")
def one(pair):
    st = pair(f"{PREFIX}-a", "--size", "16m")
    with open(st["device"], "r+b") as f:
        f.write(b"device-bytes" * 100)
    return st


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("role", ["user", "driver"])
def test_no_host_privilege(one, role):
    """Root inside is an unprivileged host user with no capability at all,
    no_new_privs and a seccomp filter, for the domain's init and for every
    process started in it."""
    dm = one["domains"][role]
    for pid in (dm["pid"],):
        s = status_of(pid)
        uid = int(s["Uid"].split()[0])
        assert uid == dm["host_id"] and uid >= 1 << 20, s["Uid"]
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(s[cap], 16) == 0, (cap, s[cap])
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
    out = attempts(one["name"], role, """
        s = dict(l.split(":\\t", 1) for l in open("/proc/self/status") if ":\\t" in l)
        print("uid_map", "_".join(open("/proc/self/uid_map").read().split()))
        print("caps", s["CapEff"].strip() + "_" + s["CapBnd"].strip())
        print("nnp", s["NoNewPrivs"].strip() + "_" + s["Seccomp"].strip())
    """)
    assert out["uid_map"] == f"0_{dm['host_id']}_65536"
    assert out["caps"] == "0000000000000000_0000000000000000"
    assert out["nnp"] == "1_2"


@pytest.mark.parametrize("role", ["user", "driver"])
def test_read_only_root_and_nothing_of_the_host(one, role):
    before = _sha(one["device"])
    import drb_uring
    pkg = os.path.dirname(os.path.abspath(drb_uring.__file__))
    out = attempts(one["name"], role, f"""
        attempt("write_root", lambda: open("/evil", "w"))
        attempt("write_usr", lambda: open("/usr/lib/evil", "w"))
        attempt("write_pkg", lambda: open("/run/drb-lib/drb_uring/evil.py", "w"))
        attempt("host_pkg", lambda: os.stat({pkg!r}))
        attempt("shadow", lambda: open("/etc/shadow"))
        attempt("backing", lambda: open({one['device']!r}, "r+b"))
        attempt("state", lambda: os.stat("/run/drb/{one['name']}/daemon.pid"))
        attempt("control", lambda: os.stat("/run/drb/{one['name']}/control.sock"))
        attempt("service", lambda: os.stat("/run/drb-ebpfd.sock"))
        attempt("sys", lambda: open("/sys/kernel/uevent_helper", "w"))
    """)
    assert out == {"write_root": "EROFS", "write_usr": "EROFS", "write_pkg": "EROFS",
                   "host_pkg": "ENOENT", "shadow": "ENOENT", "backing": "ENOENT",
                   "state": "ENOENT", "control": "ENOENT", "service": "ENOENT",
                   "sys": "EROFS"}, out
    assert _sha(one["device"]) == before


def test_no_mounts_no_namespaces_no_handles(one):
    d = one["daemon_pid"]
    out = attempts(one["name"], "user", f"""
        attempt("umount_proc", lambda: sys_(166, b"/proc", 0))
        attempt("umount_sock", lambda: sys_(166, b"/run/drb/{one['name']}", 2))
        attempt("mount_tmpfs", lambda: sys_(165, b"none", b"/tmp", b"tmpfs", 0, 0))
        attempt("daemon_proc", lambda: os.stat("/proc/{d}/root"))
        fd = os.open("/proc/1/ns/mnt", os.O_RDONLY)
        attempt("setns", lambda: sys_(308, fd, 0))
        attempt("unshare_user", lambda: sys_(272, 0x10000000))
        attempt("open_by_handle", lambda: sys_(304, -100, ctypes.create_string_buffer(128), 0))
        attempt("cgroup_kill", lambda: open("/sys/fs/cgroup/unified/drb/{one['name']}/driver/"
                                            "cgroup.kill", "w"))
        attempt("cgroup_move", lambda: open("/sys/fs/cgroup/unified/cgroup.procs", "w"))
    """)
    assert out == {"umount_proc": "EPERM", "umount_sock": "EPERM", "mount_tmpfs": "EPERM",
                   "daemon_proc": "ENOENT", "setns": "EPERM", "unshare_user": "EPERM",
                   "open_by_handle": "EPERM", "cgroup_kill": "ENOENT",
                   "cgroup_move": "ENOENT"}, out


@pytest.mark.parametrize("role", ["user", "driver"])
def test_no_bpf_at_all(one, role):
    """Loading programs, and opening the monitor's programs, links and maps
    by id (which would let a domain rewrite its task table or delete its
    grant entry): refused, and the host's lists are as they were."""
    progs, maps = bpf_ids("prog"), bpf_ids("map")
    some_prog, some_map = max(progs), max(maps)
    out = attempts(one["name"], role, f"""
        attempt("prog_load", lambda: bpf(5, struct.pack("<II", 1, 2)))
        attempt("map_create", lambda: bpf(0, struct.pack("<IIII", 2, 4, 8, 1)))
        attempt("prog_by_id", lambda: bpf(13, struct.pack("<I", {some_prog})))
        attempt("map_by_id", lambda: bpf(14, struct.pack("<I", {some_map})))
        attempt("link_by_id", lambda: bpf(30, struct.pack("<I", 1)))
    """)
    assert set(out.values()) == {"EPERM"}, out
    assert bpf_ids("prog") == progs and bpf_ids("map") == maps


def test_no_view_of_the_other_domain(one):
    """The driver domain cannot read the user domain's memory: it does not
    see its processes, and ptrace and process_vm_readv are refused."""
    user_pid = one["domains"]["user"]["pid"]
    out = attempts(one["name"], "driver", f"""
        attempt("proc_mem", lambda: open("/proc/{user_pid}/mem", "rb"))
        attempt("proc_fd", lambda: os.listdir("/proc/{user_pid}/fd"))
        attempt("ptrace", lambda: sys_(101, 16, {user_pid}, 0, 0))
        iov = ctypes.create_string_buffer(16)
        attempt("vm_readv", lambda: sys_(310, {user_pid}, iov, 1, iov, 1, 0))
        attempt("pidfd_getfd", lambda: sys_(438, 0, 3, 0))
        attempt("kill_init", lambda: os.kill({user_pid}, 9))
    """)
    assert out == {"proc_mem": "ENOENT", "proc_fd": "ENOENT", "ptrace": "EPERM",
                   "vm_readv": "EPERM", "pidfd_getfd": "EPERM", "kill_init": "ESRCH"}, out
    assert os.path.exists(f"/proc/{user_pid}")


def test_sockets_the_user_domain_may_not_make(one):
    out = attempts(one["name"], "user", """
        for fam, typ in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_DGRAM),
                         (socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_UNIX, socket.SOCK_STREAM)):
            attempt(fam.name, lambda: socket.socket(fam, typ).close())
        # An i386 system call does not slip past the filter: it kills.
    """)
    assert out == {"AF_INET": "EPERM", "AF_INET6": "EPERM", "AF_PACKET": "EPERM",
                   "AF_UNIX": "ok"}, out
    # The x32 entry to socket(AF_PACKET): not the native architecture, so
    # the filter kills the caller rather than let the call be judged by
    # another architecture's numbers.
    proc = in_domain(one["name"], "user", "import ctypes\n"
                     "ctypes.CDLL(None).syscall(ctypes.c_long(0x40000000 | 41), 17, 3, 0)\n"
                     "print('x32 socket returned')", check=False)
    assert "x32 socket returned" not in proc.stdout and proc.returncode != 0, proc


def test_limits_on_processes_and_memory(one):
    out = attempts(one["name"], "user", """
        import signal
        kids = []
        try:
            while len(kids) < 2000:
                pid = os.fork()
                if pid == 0:
                    signal.pause()
                kids.append(pid)
        except OSError as e:
            print("fork_stopped_at", len(kids), errno.errorcode[e.errno])
        for k in kids:
            os.kill(k, 9)
            os.waitpid(k, 0)
    """, timeout=120)
    n, err = out["fork_stopped_at"].split()
    assert err == "EAGAIN" and int(n) < 512
    proc = in_domain(one["name"], "user", "x = bytearray(6 << 30); print('got it')",
                     check=False, timeout=120)
    assert "got it" not in proc.stdout and proc.returncode != 0


def test_state_the_domains_cannot_touch(one):
    """drb down knows the daemon by pid and start time, kept in the pair's
    state directory: no domain sees it, and the user domain cannot write in
    the one directory of it that it sees (its socket's)."""
    name = one["name"]
    out = attempts(name, "user", f"""
        attempt("pidfile", lambda: open("/run/drb/{name}/daemon.pid", "w"))
        attempt("replace_socket", lambda: os.unlink("/run/drb/{name}/monitor.sock"))
    """)
    assert out == {"pidfile": "EACCES", "replace_socket": "EACCES"}, out
    out = attempts(name, "driver", f"""
        attempt("pidfile", lambda: open("/run/drb/{name}/daemon.pid", "w"))
    """)
    assert out == {"pidfile": "ENOENT"}, out
    with open(os.path.join("/run/drb", name, "daemon.pid")) as f:
        pid, started = (int(x) for x in f.read().split())
    assert pid == one["daemon_pid"] and started > 0


def test_another_pairs_device_is_out_of_reach(pair, one):
    other = pair(f"{PREFIX}-c", "--size", "16m")
    before = _sha(other["device"])
    for role in ("user", "driver"):
        out = attempts(one["name"], role, f"""
            attempt("other_backing", lambda: open({other['device']!r}, "r+b"))
            attempt("other_socket", lambda: os.stat("/run/drb/{other['name']}"))
        """)
        assert out == {"other_backing": "ENOENT", "other_socket": "ENOENT"}, out
    assert _sha(other["device"]) == before


def test_worker_is_confined_twice(one):
    """The worker runs in the driver domain with its limits and filter, and
    then installs its own allowlist: a second seccomp filter."""
    code = textwrap.dedent(f"""
        import time
        from drb_uring.channel.client import Channel
        from drb_uring.ring import layout as L
        with Channel({one['socket']!r}, 1 << 20,
                     geometry=L.Geometry(slot_size=65536, slot_count=4)) as ch:
            ch.pwrite(0, b"x")
            print(ch.worker_pid, flush=True)
            time.sleep(2)
    """)
    proc = subprocess.Popen([os.path.join(os.path.dirname(__import__("sys").executable), "drb"),
                             "exec", one["name"], "user", "--", "python3", "-c", code],
                            stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        s = status_of(pid)
        # A user of its own in the driver domain: not the domain's root,
        # whose processes then may not signal it, trace it or read its /proc.
        base = one["domains"]["driver"]["host_id"]
        uids = {int(u) for u in s["Uid"].split()}
        assert len(uids) == 1 and base + 20000 <= uids.pop() < base + 60000, s["Uid"]
        assert int(s["CapEff"], 16) == 0 and int(s["CapBnd"], 16) == 0
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
        assert s["Seccomp_filters"] == "2", s["Seccomp_filters"]
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert "anon_inode:[io_uring]" in fds
        assert not [f for f in fds if "bpf" in f or "drb-pool" in f], fds
    finally:
        proc.wait(30)
